"""The Equinox adapter: how a pzbridge-only layer becomes a genuine ``eqx.Module``.

A lifted layer with no Equinox counterpart (an inserted intervention, a
pzbridge ``Elementwise``, an edited combination) lowers to
:class:`EquinoxAdapter`. Its variables become frozen values whose arrays are
ordinary Equinox leaves, so ``eqx.filter_grad`` and optax train them; the
layer's structure with unbound slots is a static field. The adapter rule is
registered for ``object``: lowering reaches it only when nothing on a layer's
MRO has a rule of its own. Re-lifting an adapter gives the layer back.

An adapter standing in for a child of an unknown module (a ``Foreign``'s
edited child, see :mod:`pzbridge.bridge.equinox.signatures`) is
called by that module's original code exactly as the original child was:
it keeps the original class (``calls_like``), binds its arguments to that
class's ``__call__`` signature, names the positional inputs by the
original's calling convention and passes the rest (``mask=``, ``key=``...)
as side inputs. State its layer writes (a capture saver) is reported to the
``Foreign`` running it (:mod:`pzbridge.bridge.equinox.foreign_state`).

Example:
    >>> import jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> adapter = pzb.lower(pzb.nn.Softmax("features"), framework="equinox")
    >>> type(adapter).__name__, adapter(jnp.array([0.0, 0.0])).tolist()
    ('EquinoxAdapter', [0.5, 0.5])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import equinox as eqx
import jax

from pzbridge.bridge.across_axes import (
    axes_read_across,
    axis_bound,
    gathered_inputs,
    require_bound,
    require_entries_kept,
)
from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.equinox.adapter_state import (
    WrittenVariable,
    batch_norm_state_labels,
    batch_statistics_axis,
    markers_for_indices,
    new_state,
    new_state_index,
    split_written,
    state_values,
    written_variable,
    written_variables,
)
from pzbridge.bridge.equinox.foreign_state import report_state
from pzbridge.bridge.equinox.signatures import StandIn, bind_like
from pzbridge.bridge.equinox.traversal import EQUINOX, equinox_rule, is_array
from pzbridge.bridge.lifted import CallingConvention
from pzbridge.bridge.native_calls import NativeCall, fill_native_slots, native_lowerer, split_natives, \
    wants_native_children
from pzbridge.bridge.naming import AxisNaming
from pzbridge.bridge.tracing.state_writes import refuse_state_writes
from pzbridge.bridge.train_modes import evaluating, keyed_streams, switchable, with_modes
from pzbridge.core import named_axes as nx
from pzbridge.core.errors import LiftError, LowerError
from pzbridge.core.random_stream import RandomStream
from pzbridge.core.selectors import select
from pzbridge.core.variables import (
    AbstractVariableValue,
    StateVariable,
    StateVariableValue,
    bind_variables,
    stateless_call,
    unbind_variables,
)


class EquinoxAdapter(eqx.nn.StatefulLayer):
    """A genuine ``eqx.Module`` running a pzbridge layer that has no Equinox counterpart.

    The layer's variables are stored as frozen values (pytrees of arrays:
    ordinary Equinox leaves, so gradients and optimizers reach them); the
    layer's structure with slots is a static field. Positional inputs are
    named by ``convention``; the output is returned positional. With
    ``calls_like`` the adapter takes exactly the arguments of that class's
    ``__call__`` (it stands in for such a child inside an unknown module).

    When a traced module inside writes its own state (an NNX module updating
    its Variables), the adapter is stateful the Equinox way: the written
    variables live in an ``eqx.nn.State`` (``state_index``; build it with
    ``eqx.nn.State(adapter)``) and a call is ``y, state = adapter(x, state)``
    (``eqx.nn.Sequential`` threads the State through it). A converted NNX
    model called under ``jax.vmap(..., axis_name="batch")`` computes on the
    whole batch, as the NNX module does (see
    :mod:`pzbridge.bridge.equinox.adapter_state`).

    Example:
        >>> import pzbridge as pzb
        >>> from pzbridge.bridge.equinox.traversal import new_lower_context
        >>> adapter = EquinoxAdapter.wrap(pzb.nn.Elementwise(jax.nn.relu), new_lower_context())
        >>> adapter(jax.numpy.array([-1.0, 1.0])).tolist()
        [0.0, 1.0]
    """

    values: tuple[AbstractVariableValue, ...]
    arrays: Any
    structure: Any = eqx.field(static=True)
    convention: CallingConvention = eqx.field(static=True)
    calls_like: type | None = eqx.field(static=True, default=None)
    # Native Equinox children (a converted model's eqx.nn.Linear, ...), called from NativeSlots.
    natives: tuple[Any, ...] = ()
    # A converted NNX model: the convention is batched, so each per-example call gets a batch axis of size one.
    unit_batch: bool = eqx.field(static=True, default=False)
    # On a converted model's root, the framework it came from: converting back restores the original classes.
    converted_from: str | None = eqx.field(static=True, default=None)
    # The state its traced modules write: one eqx.nn.State entry, label -> array (None when nothing is written).
    state_index: eqx.nn.StateIndex | None = None
    written: tuple[WrittenVariable, ...] = eqx.field(static=True, default=())
    # The vmap axis over which a converted NNX model's per-example calls form the batch.
    batch_axis: str = eqx.field(static=True, default="batch")
    # A converted NNX model whose examples interact (attention over the batch axis): only a named vmap computes it.
    needs_batch_axis: bool = eqx.field(static=True, default=False)
    # Equinox's switch (eqx.nn.inference_mode sets it); differing from the layer's own mode, it sets every
    # BatchNorm and Dropout inside. None when the layer has neither (nothing to switch).
    inference: bool = False
    layer_inference: bool | None = eqx.field(static=True, default=None)

    @classmethod
    def wrap(cls, layer: Any, ctx: LowerContext, convention: CallingConvention | None = None,
             calls_like: type | None = None, unit_batch: bool = False,
             converted_from: str | None = None) -> EquinoxAdapter:
        """Lowers ``layer`` into an adapter (its variables frozen into leaves).

        Args:
          layer: A lifted layer with no Equinox rule.
          ctx: The lower context.
          convention: How positional inputs are named; defaults to
            ``(..., "seq", "features")``-style trailing names by rank at call time
            (with ``calls_like``: inputs beyond the convention stay unnamed).
          calls_like: The class whose call signature the adapter takes (see
            :meth:`__call__`); None takes ``(x, *args, key=None, **side_inputs)``.
          unit_batch: ``convention`` is batched (a converted NNX model): each
            call adds a leading axis of size one to the inputs and removes it
            from the outputs.
          converted_from: On a converted model's root, the framework it came from.
        """
        if calls_like is not None:  # Unknown code calls a stand-in as the original child: no State comes back.
            refuse_state_writes(layer, ctx.where, "equinox")
        natives: list[Any] = []
        if wants_native_children(ctx):
            # Inside a conversion, sub-layers with an Equinox counterpart become native children;
            # stateful or random ones stay lifted (an Equinox call would need state / key arguments).
            lower_native = native_lowerer(ctx, EQUINOX.convention_of, lambda m: not isinstance(m, EquinoxAdapter),
                                          accept=_is_pure, lowered_convention=EQUINOX.lowered_convention)
            layer, natives = split_natives(layer, lower_native, ctx.where)
        structure, values = unbind_variables(markers_for_indices(layer), freeze=True)
        written = written_variables(structure, values)
        if calls_like is None:  # Called y, state = adapter(x, state): Equinox BatchNorms keep their statistics there.
            labels = batch_norm_state_labels(layer) - {variable.label for variable in written}
            written += tuple(written_variable(value) for value in values if value.label in labels)
        values, init = split_written(values, written)
        index = new_state_index(f"{ctx.where or '<root>'}.state", init) if written else None
        # Arrays held directly by the layer (not in variables) must be leaves, not static data.
        arrays, structure = eqx.partition(structure, is_array)
        mode = evaluating(layer) if switchable(layer) else None
        return cls(tuple(values), arrays, structure, convention or CallingConvention(), calls_like, tuple(natives),
                   unit_batch, converted_from, index, written, AxisNaming().batch, inference=bool(mode),
                   layer_inference=mode)  # A Python bool: a traced (jax.jit) flag is refused at call time.

    def with_written(self, labels: Iterable[str]) -> EquinoxAdapter:
        """This adapter with the state variables ``labels`` also kept in its ``eqx.nn.State``.

        For state the layer writes outside traced modules (a lifted NNX
        ``BatchNorm`` updating its running statistics in training mode): held
        as frozen leaves, the writes would be lost after every call.

        Example:
            >>> import pzbridge as pzb
            >>> from pzbridge.bridge.equinox.traversal import new_lower_context
            >>> EquinoxAdapter.wrap(pzb.nn.Identity(), new_lower_context()).with_written([]).is_stateful()
            False
        """
        labels = set(labels) - {variable.label for variable in self.written}
        if not labels:
            return self
        moved = [value for value in self.values if value.label in labels]
        written = self.written + tuple(written_variable(value) for value in moved)
        values, init = split_written(self.values, written[len(self.written):])
        if self.state_index is not None:
            init = {**self.state_index.init, **init}
        marker = self.state_index.marker if self.state_index is not None else "<root>.state"
        return dataclasses.replace(self, values=values, state_index=new_state_index(marker, init), written=written)

    def is_stateful(self) -> bool:
        """Whether the adapter is called ``y, state = adapter(x, state)`` (a traced module writes state)."""
        return self.state_index is not None

    def _layer_with_slots(self, native: bool = True) -> Any:
        layer = self._switched(eqx.combine(self.arrays, self.structure))
        return self._with_native_slots(layer) if native else layer

    def _switched(self, layer: Any) -> Any:
        """``layer`` in the mode ``eqx.nn.inference_mode`` set on the adapter (as the layer is, if not changed)."""
        if self.layer_inference is None:
            return layer
        if isinstance(self.inference, jax.core.Tracer):
            raise LowerError(
                "<root>: this converted model holds Equinox's inference switch (a Python bool, as "
                "eqx.nn.Dropout does) for the BatchNorms / Dropouts it runs; found it traced by jax.jit. Fix: "
                "eqx.filter_jit(...) instead of jax.jit, or partition the model first (eqx.partition(model, "
                "eqx.is_array))."
            )
        if bool(self.inference) == self.layer_inference:
            return layer
        return with_modes(layer, use_running_average=bool(self.inference), deterministic=bool(self.inference))

    def _with_native_slots(self, layer: Any) -> Any:
        if not self.natives:
            return layer
        return fill_native_slots(layer, lambda slot: NativeCall(self.natives[slot.index], slot.convention,
                                                                batched=False, path=slot.path))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the layer on the positional inputs (named by the convention); keywords are side inputs.

        With ``calls_like`` the arguments are first bound to that class's
        ``__call__`` signature: its leading positional parameters (as many
        as the convention names, or those passed positionally when it names
        none) are the inputs, every other argument given is a side input by
        its parameter name. ``key=None`` is dropped. A stateful adapter
        takes the ``eqx.nn.State`` after the inputs (or as ``state=``) and
        returns ``(output, new_state)``.
        """
        state = None
        if self.state_index is not None:
            args, kwargs, state = self._split_state(args, kwargs)
        if self.calls_like is not None:
            inputs, side = bind_like(self.calls_like, len(self.convention.inputs), args, kwargs)
            convention = self.convention
        else:
            inputs, side = list(args), dict(kwargs)
            convention = self.convention if self.convention.inputs else _default_convention(args[0] if args else None)
        key = side.get("key")
        if "key" in side and key is None:
            del side["key"]
        layer = self._switched(eqx.combine(_no_gradient(self.arrays), self.structure))
        row, gathered = None, None
        if not self.unit_batch:
            gathered = batch_statistics_axis(layer, str(self.state_index.marker) if self.state_index else "")
        if gathered is not None:
            if not axis_bound(gathered):
                raise LowerError(
                    f"<root>: this module's BatchNorms take statistics of the batch, which Equinox computes across "
                    f"jax.vmap(..., axis_name={gathered!r}); found a call outside such a vmap. Fix: "
                    f"jax.vmap(model, axis_name={gathered!r}, in_axes=(0, None), out_axes=(0, None))(xs, state), "
                    "or eqx.nn.inference_mode(model) to use the running statistics.")
            inputs, row = gathered_inputs(inputs, gathered)
        elif self.unit_batch:
            if self.needs_batch_axis and not axis_bound(self.batch_axis):
                raise LowerError(
                    f"<root>: this converted NNX model mixes the examples of a batch (e.g. attention over the batch "
                    f"axis, statistics of the batch), so each call must see the whole batch; expected a call under "
                    f"jax.vmap(..., axis_name={self.batch_axis!r}), found none. Fix: "
                    f"jax.vmap(model, axis_name={self.batch_axis!r})(xs) (one example: a batch of one, xs[None])."
                )
            inputs, row = gathered_inputs(inputs, self.batch_axis)
        across = axes_read_across(layer)  # a worlds axis the layer reads across (an interchange intervention)
        if across:
            if len(across) > 1 or row is not None:
                raise LowerError(
                    f"<root>: this adapter's layer reads across the axes {list(across)} and "
                    f"{'the batch' if row is not None else 'more than one of them'}; an adapter gathers one vmap "
                    "axis per call. Fix: keep such a model lifted (call it on named axes), or apply one "
                    "intervention reading one worlds axis to a model without batch statistics.")
            require_bound(across[0], "<root>", "an intervention in this module")
            gathered = across[0]
            inputs, row = gathered_inputs(inputs, gathered)
        x, side = convention.split_call(inputs, side)
        if gathered is not None:  # The gathered examples (worlds) are the lifted layers' named axis.
            x = jax.tree_util.tree_map(lambda a: a.tag_prefix(gathered), x, is_leaf=nx.is_namedarray)
        values = self.values if state is None else self._values_with(state.get(self.state_index))
        # Only Parameters train: state (running statistics) and the glue's constants get no gradient, so optax
        # updates on eqx.filter(model, eqx.is_inexact_array) leave them as the original framework would.
        values = tuple(_no_gradient(v) if isinstance(v, StateVariableValue) else v for v in values)
        if key is not None and select(layer).at_instances_of(RandomStream).count():
            # Equinox takes randomness per call: an NNX module's streams draw from the key (else from their own
            # keys, the next draw of the original, the same at every call).
            layer = keyed_streams(layer, key)
            del side["key"]
        out, new_values = stateless_call(self._with_native_slots(layer), values, x, **side)
        written = {variable.label for variable in self.written}
        report_state([v for v in new_values if v.label not in written], self.values)
        if across:
            require_entries_kept(out, gathered, jax.tree_util.tree_leaves(inputs)[0].shape[0])
        out = convention.unname_output(out)
        if row is not None:
            out = jax.tree_util.tree_map(lambda y: y[row], out)
        if state is None:
            return out
        return out, state.set(self.state_index, new_state(self.written, new_values, self.state_index.marker))

    def _split_state(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any],
                                                                                     eqx.nn.State]:
        kwargs = dict(kwargs)
        if "state" in kwargs:
            state = kwargs.pop("state")
        elif len(args) == len(self.convention.inputs) + 1:
            args, state = args[:-1], args[-1]
        else:
            state = None
        if not isinstance(state, eqx.nn.State):
            raise LowerError(
                f"{self.state_index.marker}: this module updates state during its call (state variables "
                f"{[v.label for v in self.written]}), so it is called y, state = model(x, state); expected an "
                f"eqx.nn.State after the {len(self.convention.inputs)} input(s), found "
                f"{type(state).__name__ if state is not None else 'none'}. Fix: state = eqx.nn.State(model), then "
                "y, state = model(x, state) (batched: jax.vmap(model, axis_name='batch', in_axes=(0, None), "
                "out_axes=(0, None)))."
            )
        return args, kwargs, state

    def _values_with(self, entry: Any) -> tuple[AbstractVariableValue, ...]:
        """The layer's values with the written variables' values taken from the State's entry."""
        return self.values + state_values(self.written, entry, self.state_index.marker)

    def lifted_layer(self, state: eqx.nn.State | None = None) -> Any:
        """The pzbridge layer with fresh mutable variables (used when re-lifting).

        Args:
          state: A stateful adapter's ``eqx.nn.State`` (its written variables' current values).

        Raises:
          LiftError: If the adapter is stateful and ``state`` is None.

        Example:
            >>> import pzbridge as pzb
            >>> from pzbridge.bridge.equinox.traversal import new_lower_context
            >>> EquinoxAdapter.wrap(pzb.nn.Identity(), new_lower_context()).lifted_layer()
            Identity()
        """
        if self.natives:
            raise LowerError(
                "<root>: this adapter holds native Equinox children; re-lift it with pzb.lift(adapter) (found "
                f"{len(self.natives)} native children). Fix: call pzb.lift on the adapter instead.")
        layer = self._layer_with_slots()
        values = self.values if self.state_index is None else self._values_with(self.state_entry(state))
        return bind_variables(layer, values, unfreeze_as_copy=True) if values else layer

    def state_entry(self, state: eqx.nn.State | None) -> Any:
        """This stateful adapter's entry of ``state`` (label -> array of each written variable).

        Raises:
          LiftError: If ``state`` is None: the current values live only in the State.

        Example:
            >>> import pzbridge as pzb
            >>> from pzbridge.bridge.equinox.traversal import new_lower_context
            >>> adapter = EquinoxAdapter.wrap(pzb.nn.Identity(), new_lower_context())
            >>> adapter.is_stateful()  # nothing written: called without a State
            False
        """
        if state is None:
            raise LiftError(
                f"{self.state_index.marker}: this module keeps the state its call writes (state variables "
                f"{[v.label for v in self.written]}) in an eqx.nn.State, expected state=, found none. Fix: pass "
                "the State its last call returned, e.g. pzb.lift(model, state=state) or "
                "pzb.convert(model, x, to='nnx', state=state) (a fresh one: eqx.nn.State(model))."
            )
        return state.get(self.state_index)


def _no_gradient(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda leaf: jax.lax.stop_gradient(leaf) if eqx.is_inexact_array(leaf) else leaf,
                                  tree)


def _is_pure(layer: Any) -> bool:
    """Whether a lifted layer holds neither state nor randomness (so its Equinox native needs no extra arguments)."""
    return not select(layer).at_instances_of((StateVariable, StateVariableValue, RandomStream)).count()


def _default_convention(x: Any) -> CallingConvention:
    naming = AxisNaming()
    rank = len(getattr(x, "shape", ()))
    names = (naming.seq, naming.features)[-rank:] if 0 < rank <= 2 else ((naming.features,) if rank else ())
    return CallingConvention((names,), names)


@equinox_rule(source=EquinoxAdapter, lifted=(object,))
class EquinoxAdapterRule:
    """The fallback for layers without an Equinox rule: lower to an adapter; re-lifting gives the layer back.

    Registered for ``object``, so lowering reaches it only when nothing on the
    layer's MRO has a rule of its own.
    """

    def lower(self, layer: Any, ctx: LowerContext) -> EquinoxAdapter:
        return EquinoxAdapter.wrap(layer, ctx)

    def convention(self, module: EquinoxAdapter, naming: AxisNaming) -> CallingConvention | None:
        """The adapter's own convention (None for the rank-based default)."""
        return module.convention if module.convention.inputs else None

    def calls_like(self, module: EquinoxAdapter) -> type:
        """The class whose call signature the adapter keeps (the adapter's own class by default)."""
        return module.calls_like or type(module)

    def lift(self, module: EquinoxAdapter, ctx: LiftContext) -> Any:
        natives = [ctx.lift_node(native, ctx.child("natives", i)) for i, native in enumerate(module.natives)]
        structure = fill_native_slots(module._layer_with_slots(native=False), lambda slot: natives[slot.index])
        values = module.values
        if module.state_index is not None:
            values = module._values_with(module.state_entry(ctx.shared.extras.get("state")))
        if not values:
            return structure
        fresh = []
        for value in values:
            variable = ctx.variable(
                type(value.unfreeze_as_copy()), value, lambda v=value: v.value, value.label, dict(value.metadata)
            )
            fresh.append(variable)
        return bind_variables(structure, fresh)


@equinox_rule(lifted=(StandIn,))
class StandInRule:
    """An edited child of an unknown module lowers to an adapter called exactly like the original child."""

    def lower(self, stand_in: StandIn, ctx: LowerContext) -> EquinoxAdapter:
        if stand_in.original is EquinoxAdapter:
            # The child was an adapter already (a lowered model lifted again): keep its way of being called.
            return EquinoxAdapter.wrap(stand_in.layer, ctx, stand_in.convention)
        return EquinoxAdapter.wrap(stand_in.layer, ctx, stand_in.convention or CallingConvention(),
                                   calls_like=stand_in.original)
