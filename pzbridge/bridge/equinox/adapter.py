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

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.equinox.foreign_state import report_state
from pzbridge.bridge.equinox.signatures import StandIn, bind_like
from pzbridge.bridge.equinox.traversal import EQUINOX, equinox_rule, is_array
from pzbridge.bridge.lifted import CallingConvention
from pzbridge.bridge.native_calls import NativeCall, fill_native_slots, native_lowerer, split_natives, \
    wants_native_children
from pzbridge.bridge.naming import AxisNaming
from pzbridge.bridge.tracing.state_writes import refuse_state_writes
from pzbridge.core.errors import LowerError
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


class EquinoxAdapter(eqx.Module):
    """A genuine ``eqx.Module`` running a pzbridge layer that has no Equinox counterpart.

    The layer's variables are stored as frozen values (pytrees of arrays:
    ordinary Equinox leaves, so gradients and optimizers reach them); the
    layer's structure with slots is a static field. Positional inputs are
    named by ``convention``; the output is returned positional. With
    ``calls_like`` the adapter takes exactly the arguments of that class's
    ``__call__`` (it stands in for such a child inside an unknown module).

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
        refuse_state_writes(layer, ctx.where, "equinox")  # an adapter would drop a traced module's state writes
        natives: list[Any] = []
        if wants_native_children(ctx):
            # Inside a conversion, sub-layers with an Equinox counterpart become native children;
            # stateful or random ones stay lifted (an Equinox call would need state / key arguments).
            lower_native = native_lowerer(ctx, EQUINOX.convention_of, lambda m: not isinstance(m, EquinoxAdapter),
                                          accept=_is_pure)
            layer, natives = split_natives(layer, lower_native, ctx.where)
        structure, values = unbind_variables(layer, freeze=True)
        # Arrays held directly by the layer (not in variables) must be leaves, not static data.
        arrays, structure = eqx.partition(structure, is_array)
        return cls(tuple(values), arrays, structure, convention or CallingConvention(), calls_like, tuple(natives),
                   unit_batch, converted_from)

    def _layer_with_slots(self, native: bool = True) -> Any:
        layer = eqx.combine(self.arrays, self.structure)
        if not native or not self.natives:
            return layer
        return fill_native_slots(layer, lambda slot: NativeCall(self.natives[slot.index], slot.convention,
                                                                batched=False, path=slot.path))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the layer on the positional inputs (named by the convention); keywords are side inputs.

        With ``calls_like`` the arguments are first bound to that class's
        ``__call__`` signature: its leading positional parameters (as many
        as the convention names, or those passed positionally when it names
        none) are the inputs, every other argument given is a side input by
        its parameter name. ``key=None`` is dropped.
        """
        if self.calls_like is not None:
            inputs, side = bind_like(self.calls_like, len(self.convention.inputs), args, kwargs)
            convention = self.convention
        else:
            inputs, side = list(args), dict(kwargs)
            convention = self.convention if self.convention.inputs else _default_convention(args[0] if args else None)
        if side.get("key", 0) is None:
            del side["key"]
        if self.unit_batch:
            inputs = [jnp.asarray(a)[None] if hasattr(a, "shape") else a for a in inputs]
        x, side = convention.split_call(inputs, side)
        out, new_state = stateless_call(self._layer_with_slots(), self.values, x, **side)
        report_state(new_state, self.values)
        out = convention.unname_output(out)
        return jax.tree_util.tree_map(lambda y: y[0], out) if self.unit_batch else out

    def lifted_layer(self) -> Any:
        """The pzbridge layer with fresh mutable variables (used when re-lifting).

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
        return bind_variables(layer, self.values, unfreeze_as_copy=True) if self.values else layer


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
