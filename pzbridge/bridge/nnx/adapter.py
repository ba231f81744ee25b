"""The NNX adapter: how a pzbridge-only layer becomes a genuine ``nnx.Module``.

A lifted layer with no NNX counterpart lowers to :class:`NnxAdapter`. Its
variables are NNX Variables (``nnx.Param`` for parameters, so
``nnx.Optimizer(model, tx, wrt=nnx.Param)`` trains them), arrays the layer
holds directly (an intervention's plain ``NamedArray`` vector, patch or
mask) are plain array data of the module (NNX refuses arrays in static
attributes, and they are constants, not parameters), the rest of the layer
with unbound slots is a static attribute, and calls write new state back into
the Variables (so ``nnx.jit`` keeps it). The adapter rule is registered for
``object``: lowering reaches it only when nothing on a layer's MRO has a rule
of its own. Re-lifting an adapter gives the layer back.

Example:
    >>> import jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> adapter = pzb.lower(pzb.nn.Softmax("features"), framework="nnx")
    >>> type(adapter).__name__, adapter(jnp.array([[0.0, 0.0]])).tolist()
    ('NnxAdapter', [[0.5, 0.5]])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from pzbridge.bridge.across_axes import axes_read_across, gathered_inputs, require_bound, require_entries_kept
from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.lifted import CallingConvention
from pzbridge.bridge.naming import AxisNaming
from pzbridge.bridge.native_calls import NativeCall, conventions_chain, fill_native_slots, native_lowerer, split_natives, \
    wants_native_children
from pzbridge.bridge.nnx.traversal import NNX, convention_of, new_lift_context, nnx_rule
from pzbridge.bridge.nnx.variables import is_array, lowered_layout, nnx_variable
from pzbridge.core import named_axes as nx
from pzbridge.bridge.train_modes import with_modes
from pzbridge.core.errors import LowerError
from pzbridge.core.selectors import select
from pzbridge.core.variables import (
    AbstractVariableValue,
    Parameter,
    ParameterValue,
    StateVariable,
    StateVariableValue,
    bind_variables,
    stateless_call,
    unbind_variables,
)
from pzbridge.nn.normalization import BatchNorm
from pzbridge.toolshed.lora import is_lora_parameter


@dataclasses.dataclass(frozen=True)
class VariableSpec:
    """How an adapter's NNX Variable maps back to a pzbridge variable.

    Attributes:
      label: The pzbridge label.
      kind: ``"Parameter"`` or ``"StateVariable"``.
      names: Axis names of the value in storage order (``()`` for raw values).
      metadata: The pzbridge metadata (as ``(key, value)`` pairs).

    Example:
        >>> VariableSpec("w", "Parameter", ("features",), ()).label
        'w'
    """

    label: str
    kind: str
    names: tuple[str, ...]
    metadata: tuple[tuple[Any, Any], ...]

    def __hash__(self) -> int:
        return hash((self.label, self.kind, self.names))


@dataclasses.dataclass(frozen=True)
class ArrayHole:
    """Marks, in an adapter's static structure, where an array held by the layer goes.

    Example:
        >>> ArrayHole() == ArrayHole()
        True
    """


def split_arrays(structure: Any) -> tuple[Any, list[Any]]:
    """``structure`` with every array leaf replaced by an :class:`ArrayHole`, and those arrays in order.

    Example:
        >>> import pzbridge as pzb
        >>> stripped, arrays = split_arrays(pzb.nn.AddBias(pzb.nx.wrap(jnp.ones(2), "features")))
        >>> stripped.bias.data_array, [a.shape for a in arrays]
        (ArrayHole(), [(2,)])
    """
    leaves, treedef = jax.tree_util.tree_flatten(structure)
    arrays = [leaf for leaf in leaves if is_array(leaf)]
    holes = [ArrayHole() if is_array(leaf) else leaf for leaf in leaves]
    return jax.tree_util.tree_unflatten(treedef, holes), arrays


def fill_arrays(stripped: Any, arrays: Sequence[Any]) -> Any:
    """The inverse of :func:`split_arrays`: the holes of ``stripped`` filled with ``arrays`` in order.

    Example:
        >>> import pzbridge as pzb
        >>> fill_arrays(*split_arrays(pzb.nn.AddBias(pzb.nx.wrap(jnp.ones(2), "features")))).bias.unwrap("features")
        Array([1., 1.], dtype=float32)
    """
    leaves, treedef = jax.tree_util.tree_flatten(stripped)
    supply = iter(arrays)
    return jax.tree_util.tree_unflatten(
        treedef, [next(supply) if isinstance(leaf, ArrayHole) else leaf for leaf in leaves]
    )


class NnxAdapter(nnx.Module):
    """A genuine ``nnx.Module`` running a pzbridge layer with no NNX counterpart.

    Its variables are NNX Variables (``nnx.Param`` for parameters, so
    ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` trains them; LoRA factors made
    by ``loraify_linears_in_selection`` are ``nnx.LoRAParam`` s, so
    ``wrt=nnx.LoRAParam`` trains only those); arrays the
    layer holds directly are plain array data (``arrays``); the layer with
    unbound slots and array holes is a static attribute. Calling it names the positional
    inputs by ``convention`` (default: the last axis is ``features``, leading
    axes stay positional; extra positional arguments of a traced module become
    the side inputs its convention names), runs the layer with ``stateless_call`` and writes
    new state values back into its Variables (so ``nnx.jit`` keeps them).
    Re-lifting an adapter gives back the layer.

    Example:
        >>> import pzbridge as pzb
        >>> from pzbridge.bridge.nnx.traversal import new_lower_context
        >>> adapter = NnxAdapter.wrap(pzb.nn.Elementwise(jax.nn.relu), new_lower_context())
        >>> adapter(jax.numpy.array([[-1.0, 1.0]])).tolist()
        [[0.0, 1.0]]
    """

    def __init__(self, structure: Any, variables: Sequence[nnx.Variable], specs: Sequence[VariableSpec],
                 convention: CallingConvention | None = None, natives: Sequence[nnx.Module] = (),
                 converted_from: str | None = None) -> None:
        stripped, arrays = split_arrays(structure)
        self.structure = nnx.static(stripped)
        self.arrays = nnx.List(arrays)
        self.variables = nnx.List(list(variables))
        self.specs = tuple(specs)
        self.convention = convention
        # Native NNX children (a converted model's nnx.Linear, nnx.Conv, ...), called from NativeSlots.
        self.natives = nnx.List(list(natives))
        # On a converted model's root, the framework it came from: converting back restores the original classes.
        self.converted_from = converted_from
        # NNX's train / eval switches (``model.eval()`` sets both True); None keeps each layer's own mode.
        self.use_running_average: bool | None = None
        self.deterministic: bool | None = None

    @classmethod
    def wrap(cls, layer: Any, ctx: LowerContext, convention: CallingConvention | None = None,
             converted_from: str | None = None) -> NnxAdapter:
        """Lowers ``layer`` into an adapter (its variables become NNX Variables).

        Args:
          layer: A lifted layer with no NNX rule.
          ctx: The lower context (shared variables stay shared).
          convention: How positional inputs are named (default: trailing ``features``).
          converted_from: On a converted model's root, the framework it came from.

        Inside a conversion (:func:`pzbridge.bridge.convert.convert`) every
        sub-layer with an NNX counterpart becomes a native child module.
        """
        natives: list[Any] = []
        if wants_native_children(ctx):
            lower_native = native_lowerer(
                ctx, convention_of, _is_native_module, lowered_convention=NNX.lowered_convention
            )
            layer, natives = split_natives(layer, lower_native, ctx.where)
        # Running statistics are nnx.BatchStat, as in nnx.BatchNorm (nnx.state(model, nnx.BatchStat) finds them).
        statistics = {id(v) for norm in select(layer).at_instances_of(BatchNorm).get_sequence()
                      for v in (norm.running_mean, norm.running_var)}
        structure, variables = unbind_variables(layer)
        lowered, specs = [], []
        for variable in variables:
            kind = type(variable).__name__
            if isinstance(variable, AbstractVariableValue):
                kind = "Parameter" if isinstance(variable, ParameterValue) else "StateVariable"
            # LoRA factors added in pzbridge become nnx.LoRAParam (a Param), so both
            # wrt=nnx.LoRAParam (adapters only) and wrt=nnx.Param train them.
            default = nnx.LoRAParam if is_lora_parameter(variable) else nnx.BatchStat if id(variable) in statistics \
                else None
            lowered.append(nnx_variable(variable, ctx, default_type=default))
            specs.append(VariableSpec(variable.label, kind, lowered_layout(variable, ctx),
                                      tuple(dict(variable.metadata).items())))
        return cls(structure, lowered, specs, convention, natives, converted_from)

    def frozen_values(self) -> list[AbstractVariableValue]:
        """The variables as pzbridge frozen values (named as the layer expects).

        Example:
            >>> import pzbridge as pzb
            >>> from pzbridge.bridge.nnx.traversal import new_lower_context
            >>> NnxAdapter.wrap(pzb.nn.Identity(), new_lower_context()).frozen_values()
            []
        """
        values = []
        for spec, var in zip(self.specs, self.variables):
            raw = var.get_raw_value() if isinstance(var, nnx.Variable) else var
            value = nx.wrap(raw, *spec.names) if spec.names else raw
            cls = ParameterValue if spec.kind == "Parameter" else StateVariableValue
            values.append(cls(value, spec.label, dict(spec.metadata)))
        return values

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        rank = len(getattr(x, "shape", ()))
        convention = self.convention or CallingConvention((("features",) if rank else (),), ("features",))
        # A traced module's extra positional arguments (a mask) are side inputs named in its convention.
        layer = self._switched(self.layer_with_slots())
        across = axes_read_across(layer)  # a worlds axis the layer reads across (an interchange intervention)
        row = None
        if across:
            if len(across) > 1:
                raise LowerError(f"<root>: this adapter's layer reads across the axes {list(across)}; an adapter "
                                 "gathers one vmap axis per call. Fix: keep such a model lifted.")
            require_bound(across[0], "<root>", "an intervention in this module")
            if not convention.inputs or not convention.inputs[0]:
                raise LowerError(f"<root>: this adapter's layer reads across the axis {across[0]!r}, but its input "
                                 "has no named axes to place that axis before. Fix: keep such a model lifted.")
            gathered, row = gathered_inputs([x, *args], across[0])
            # The gathered worlds become the named axis just before each input's named trailing axes (NNX's
            # leading batch axes stay positional), and the output keeps it there until the row is taken.
            gathered = [jax.numpy.moveaxis(a, 0, a.ndim - len(names) - 1) if names and hasattr(a, "ndim") else a
                        for a, names in zip(gathered, (*convention.inputs, *[()] * len(gathered)))]
            x, args = gathered[0], tuple(gathered[1:])
            convention = dataclasses.replace(
                convention, inputs=tuple((across[0], *names) if names else names for names in convention.inputs),
                output=(across[0], *convention.output))
        inputs, side = convention.split_call([x, *args], kwargs)
        out, new_state = stateless_call(layer, self.frozen_values(), inputs, **side)
        by_label = {spec.label: var for spec, var in zip(self.specs, self.variables)}
        for value in new_state:
            target = by_label.get(value.label)
            if isinstance(target, nnx.Variable):
                names = next(s.names for s in self.specs if s.label == value.label)
                new = value.value
                # A scalar entry comes back as a NamedArray without axes: the Variable holds its raw array.
                unwrap = nx.is_namedarray(new) and (names or not new.named_shape)
                target.set_raw_value(new.untag(*names).unwrap() if unwrap else new)
        if across:
            require_entries_kept(out, across[0], gathered[0].shape[gathered[0].ndim - len(convention.inputs[0])])
            world = len(convention.output)
            return jax.tree_util.tree_map(lambda y: jax.numpy.take(y, row, axis=y.ndim - world),
                                          convention.unname_output(out))
        return convention.unname_output(out)

    def lifted_layer(self, ctx: LiftContext | None = None) -> Any:
        """The pzbridge layer with mutable variables (shared through ``ctx`` when given).

        Example:
            >>> import pzbridge as pzb
            >>> from pzbridge.bridge.nnx.traversal import new_lower_context
            >>> NnxAdapter.wrap(pzb.nn.Identity(), new_lower_context()).lifted_layer()
            Identity()
        """
        ctx = ctx or new_lift_context()
        natives = [ctx.lift_node(native, ctx.child("natives", i)) for i, native in enumerate(self.natives)]
        fresh = []
        for spec, var, value in zip(self.specs, self.variables, self.frozen_values()):
            kind = Parameter if spec.kind == "Parameter" else StateVariable
            fresh.append(ctx.variable(kind, var, lambda v=value: v.value, spec.label, dict(spec.metadata)))
        layer = self._switched(self.layer_with_slots(native=False))
        layer = fill_native_slots(layer, lambda slot: natives[slot.index])
        return bind_variables(layer, fresh) if fresh else layer

    def _switched(self, layer: Any) -> Any:
        """``layer`` with its BatchNorms / Dropouts in the mode ``.train()`` / ``.eval()`` set on the adapter."""
        return with_modes(layer, self.use_running_average, self.deterministic)

    def layer_with_slots(self, native: bool = True) -> Any:
        """The pzbridge layer with its arrays back in place and its variables as unbound slots.

        Native children are called in their slots (``native=False`` keeps the slots).

        Example:
            >>> import pzbridge as pzb
            >>> from pzbridge.bridge.nnx.traversal import new_lower_context
            >>> bias = pzb.nn.AddBias(pzb.nx.wrap(jnp.ones(2), "features"))
            >>> NnxAdapter.wrap(bias, new_lower_context()).layer_with_slots().bias.unwrap("features")
            Array([1., 1.], dtype=float32)
        """
        layer = fill_arrays(self.structure, list(self.arrays))
        if not native or not len(self.natives):
            return layer
        return fill_native_slots(layer, lambda slot: NativeCall(self.natives[slot.index], slot.convention,
                                                                batched=True, path=slot.path))


def _is_native_module(module: Any) -> bool:
    """A module a conversion can call as a native child: no adapter, and a Sequential only when its layouts chain."""
    if isinstance(module, NnxAdapter):
        return False
    if isinstance(module, nnx.Sequential):
        items = list(module.layers)
        if any(isinstance(item, nnx.Module) and not _is_native_module(item) for item in items):
            return False
        naming = AxisNaming()
        return conventions_chain([convention_of(i, naming) if isinstance(i, nnx.Module) else None for i in items])
    return True


@nnx_rule(source=NnxAdapter, lifted=(object,))
class NnxAdapterRule:
    """The fallback for layers without an NNX rule: lower to an adapter; re-lifting gives the layer back.

    Registered for ``object``, so lowering reaches it only when nothing on the
    layer's MRO has a rule of its own.
    """

    def lower(self, layer: Any, ctx: LowerContext) -> NnxAdapter:
        return NnxAdapter.wrap(layer, ctx)

    def lift(self, module: NnxAdapter, ctx: LiftContext) -> Any:
        return module.lifted_layer(ctx)
