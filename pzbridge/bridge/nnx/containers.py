"""Flax NNX ``Sequential``, ``List`` and ``Dict``, both directions side by side.

``nnx.Sequential`` lifts to :class:`NnxSequential` (its layers in order, with
``RenameAxes`` where one layer's output names differ from the next one's
inputs). NNX containers (``nnx.List``, ``nnx.Dict``) are not layers (nothing calls
them as a whole); they lift to :class:`LayerList` / :class:`LayerDict`
structs so their items stay reachable. Plain functions inside an
``nnx.Sequential`` lift to ``Elementwise`` (known activations) or
:class:`NnxFunction` (anything else, called on batched positional arrays).

Example:
    >>> import jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> f = NnxFunction(lambda a: a.sum(-1), input_names=("features",))
    >>> dict(f(pzb.nx.wrap(jnp.ones((2, 3)), "batch", "features")).named_shape)
    {'batch': 2}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.lifted import CallingConvention, name_trailing_axes
from pzbridge.bridge.naming import AxisNaming
from pzbridge.bridge.nnx.statics import NnxStatics
from pzbridge.bridge.tracing.container_examples import item_examples
from pzbridge.bridge.nnx.traversal import (
    NNX,
    call_batched,
    convention_of,
    nnx_rule,
    with_names,
)
from pzbridge.bridge.nnx.variables import lift_variable, nnx_variable
from pzbridge.core.struct import Struct, pytree_dataclass, static_field
from pzbridge.core.variable_base import AbstractVariable
from pzbridge.core.variables import AbstractVariableValue
from pzbridge.nn.basic import Elementwise, RenameAxes
from pzbridge.nn.combinators import Sequential
from pzbridge.nn.dataflow import Traced
from pzbridge.nn.foreign import Foreign
from pzbridge.nn.layer import Layer


@pytree_dataclass
class NnxFunction(Layer):
    """A plain function from an ``nnx.Sequential`` (not known to be elementwise).

    It is called like NNX calls it: on batched positional arrays (see
    :func:`call_batched`).

    Attributes:
      fn: The function (static; compared by identity).
      input_names: Named axes it consumes, moved to the trailing dims (static).
      output_names: Names for its output's trailing dims (static).

    Example:
        >>> import jax.numpy as jnp
        >>> NnxFunction(jnp.flip)(pzb.nx.wrap(jnp.arange(3))).unwrap().tolist()
        [2, 1, 0]
    """

    fn: Callable[..., Any] = static_field()
    input_names: tuple[str, ...] = static_field(default=())
    output_names: tuple[str, ...] = static_field(default=())

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        return call_batched(self.fn, x, {}, self.input_names, self.output_names)


@pytree_dataclass
class NnxSequential(Sequential):
    """``nnx.Sequential`` lifted: its layers in order (functions as ``Elementwise`` / ``NnxFunction``).

    NNX passes the previous output as the only positional argument and no
    keyword arguments, so side inputs are forwarded but unused by NNX code.

    Attributes:
      config: The original module's static attributes (static).

    Example:
        >>> NnxSequential([]).sublayers
        []
    """

    config: Any = static_field(default=None)


@pytree_dataclass
class LayerList(Struct):
    """An ``nnx.List`` lifted: a list of lifted items (layers, variables, or kept values).

    Not a layer: code calls the items, never the list. Selectors reach the
    items (``select(model).at_instances_of(LayerList)``).

    Attributes:
      items: The items in order.

    Example:
        >>> len(LayerList([1, 2]).items)
        2
    """

    items: list[Any]


@pytree_dataclass
class LayerDict(Struct):
    """An ``nnx.Dict`` lifted: a dict of lifted items by attribute name.

    Attributes:
      items: The items.

    Example:
        >>> sorted(LayerDict({"b": 1, "a": 2}).items)
        ['a', 'b']
    """

    items: dict[str, Any]


ELEMENTWISE_FUNCTIONS: frozenset[Any] = frozenset(
    fn for fn in (
        jax.nn.relu, jax.nn.gelu, jax.nn.silu, jax.nn.swish, jax.nn.sigmoid, jnp.tanh, jax.nn.elu, jax.nn.selu, jax.nn.celu, jax.nn.leaky_relu, jax.nn.softplus, jax.nn.relu6,
        jax.nn.hard_tanh, jax.nn.hard_sigmoid, jax.nn.hard_silu, jax.nn.log_sigmoid, jax.nn.soft_sign,
        jnp.exp, jnp.abs, jnp.square, jnp.sin, jnp.cos,
        nnx.relu, nnx.gelu, nnx.silu, nnx.sigmoid, nnx.tanh, nnx.elu, nnx.softplus, nnx.leaky_relu, nnx.swish,
    ) if fn is not None
)
"""Functions that an ``nnx.Sequential`` item may hold and that lift to ``Elementwise``."""


def _lift_item(item: Any, ctx: LiftContext, *keys: str | int) -> Any:
    if isinstance(item, nnx.Variable) or isinstance(item, jax.Array):
        return lift_variable(item, ctx.child(*keys))
    if isinstance(item, nnx.Module):
        return ctx.lift(item, *keys)
    return item


def _lower_item(item: Any, ctx: LowerContext, *keys: str | int) -> Any:
    if isinstance(item, (AbstractVariable, AbstractVariableValue)):
        return nnx_variable(item, ctx.child(*keys))
    if isinstance(item, Struct):
        return ctx.lower(item, *keys)
    return item


def _io_names(module: Any, naming: AxisNaming) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None]:
    """``(None, None)`` for an item passing names through, ``((), ())`` for one acting positionally, else its names."""
    if not isinstance(module, nnx.Module):
        return (None, None) if module in ELEMENTWISE_FUNCTIONS else ((), ())
    rule = NNX.lift_rule_for(type(module))
    if getattr(rule, "elementwise", False) and convention_of(module, naming) is not None:
        return None, None  # an elementwise layer (Dropout): passes names through
    convention = convention_of(module, naming)
    if convention is None:
        return (), ()  # a custom module (Foreign): acts positionally
    return tuple(convention.inputs[0] if convention.inputs else ()), tuple(convention.output or ())


@pytree_dataclass
class NnxRetag(Layer):
    """Untags ``old`` (in order, after the positional axes) then names the trailing axes ``new``.

    Joins two items of an ``nnx.Sequential`` whose names do not line up (a
    ``Linear``, then an attention naming ``seq``; a custom module acting on
    the whole positional array). Positional order never changes; lowering
    drops it (it is the identity on positional arrays). A name of ``new``
    the array already carries stays as it is.

    Attributes:
      old: The trailing names the array carries, in positional order (static).
      new: The trailing names the next item needs (static).

    Example:
        >>> import jax.numpy as jnp
        >>> y = NnxRetag(("seq", "features"), ("features",))(pzb.nx.wrap(jnp.ones((2, 3)), "seq", "features"))
        >>> y.positional_shape, dict(y.named_shape)
        ((2,), {'features': 3})
    """

    old: tuple[str, ...] = static_field(default=())
    new: tuple[str, ...] = static_field(default=())

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        x = x.untag(*self.old) if self.old else x
        # A name the array carries already (the batch axis of an enclosing trace) needs no positional axis.
        missing = [n for n in self.new if n not in x.named_shape]
        return name_trailing_axes(x, missing) if missing else x


def _rename_between(produced: tuple[str, ...], consumed: tuple[str, ...]) -> RenameAxes | None:
    """A rename joining one layer's trailing output names to the next layer's input names, if they differ."""
    k = min(len(produced), len(consumed))
    if k == 0 or produced[-k:] == consumed[-k:]:
        return None
    old, new = produced[-k:], consumed[-k:]
    pairs = [(o, n) for o, n in zip(old, new) if o != n]
    kept = set(produced) - {o for o, _ in pairs}
    if any(n in kept for _, n in pairs):
        return None
    return RenameAxes(tuple(o for o, _ in pairs), tuple(n for _, n in pairs))


def _join(current: tuple[str, ...], ins: tuple[str, ...], outs: tuple[str, ...],
          keep_extra: bool) -> tuple[Layer | None, tuple[str, ...]]:
    """The layer (or None) handing an array named ``current`` to an item consuming ``ins``; the names after it.

    A batched layer (``keep_extra``) lets leading named axes through; otherwise
    every name but ``ins`` is untagged first (in place, so order is kept).
    """
    if current == ins:
        return None, outs
    if keep_extra and len(current) >= len(ins):
        extra = current[:len(current) - len(ins)]
        if not set(extra) & set(outs) and len(set(extra) | set(ins)) == len(current):
            if current[len(extra):] == ins:
                return None, extra + outs
            rename = _rename_between(current, ins)
            if rename is not None:
                return rename, extra + outs
    if len(current) == len(ins) and not keep_extra:
        rename = _rename_between(current, ins)
        if rename is not None:
            return rename, outs
    return NnxRetag(current, ins), outs


def _run_item(item: Any, x: Any) -> Any:
    """Runs one ``nnx.Sequential`` item on an abstract value without touching it (a copy runs)."""
    if not isinstance(item, nnx.Module):
        return item(x)
    return nnx.clone(item)(x)  # merge(*split(item)) would share its Variables: a write would reach the user's.


@nnx_rule(source=nnx.Sequential, lifted=(NnxSequential, Sequential))
class SequentialRule:
    """``nnx.Sequential`` <-> ``NnxSequential`` (layers lifted in order).

    Functions become ``Elementwise`` (known activations, see
    :data:`ELEMENTWISE_FUNCTIONS`) or ``NnxFunction``. Between items the array
    carries the names the next item needs: where one layer's output names
    differ from the next layer's input names (``Einsum`` letters then
    ``Linear`` features) a ``RenameAxes`` joins them, where they do not line up
    an :class:`NnxRetag` untags and renames the trailing axes; lowering drops
    both (they are the identity on positional arrays). A ``Foreign`` item or
    an ``NnxFunction`` gets the whole array positional (in its order) and names
    its output for the next layer. Any other pzbridge ``Sequential`` lowers to
    ``nnx.Sequential`` of its lowered sublayers.
    """

    def _plan(self, module: nnx.Sequential, naming: AxisNaming
              ) -> tuple[tuple[str, ...], list[tuple[Layer | None, tuple[str, ...], tuple[str, ...]]], tuple[str, ...]]:
        """``(input names, [(join, consumed, produced)] per item, output names)``."""
        raw = [_io_names(item, naming) for item in module.layers]

        def needs_from(index: int, default: tuple[str, ...] = ()) -> tuple[str, ...]:
            # What the next item that does not pass names through consumes (a positional one: nothing).
            return next((r[0] for r in raw[index:] if r[0] is not None), default)

        first = needs_from(0)
        current = first
        steps: list[tuple[Layer | None, tuple[str, ...], tuple[str, ...]]] = []
        for index, (item, (ins, outs)) in enumerate(zip(module.layers, raw)):
            if ins is None:  # passes names through
                steps.append((None, current, current))
            elif ins == () and outs == () and not isinstance(item, nnx.Sequential):  # acts positionally
                # With nothing naming axes after it, an item keeps the names it got (a trailing activation,
                # a residual block); call_batched leaves a function's output of lower rank unnamed.
                produced = needs_from(index + 1, current)
                steps.append((None, current, produced))
                current = produced
            else:
                join, current = _join(current, ins, outs, keep_extra=not isinstance(item, nnx.Sequential))
                steps.append((join, ins, outs))
        return first, steps, current

    def lift(self, module: nnx.Sequential, ctx: LiftContext) -> NnxSequential:
        _, steps, _ = self._plan(module, ctx.naming)
        # With an example, each custom item is traced with the value that reaches it.
        examples = item_examples(module.layers, ctx.example, _run_item)
        outer = ctx.example.input_names[0] if ctx.example is not None and ctx.example.input_names else None
        # Inside a traced module the input carries the batch axis by name already: retags leave it alone.
        named_batch = ctx.naming.batch in (outer or ())
        sublayers: list[Any] = []
        for index, (item, (join, ins, outs), example) in enumerate(zip(module.layers, steps, examples)):
            if join is not None:
                sublayers.append(join)
            if isinstance(item, nnx.Module):
                child = ctx.child("layers", index)
                lifted = ctx.lift_node(item, child.with_example(example) if example is not None else child)
                if isinstance(lifted, Foreign):
                    lifted = with_names(lifted, ins, outs)
                elif isinstance(lifted, Traced) and lifted.convention is not None and lifted.convention.inputs:
                    # Planned as acting positionally: retag into the trace's own names and back.
                    # Lowering drops the retags (they are the identity on positional arrays).
                    own_in, own_out = tuple(lifted.convention.inputs[0]), tuple(lifted.convention.output or ())
                    if named_batch:
                        own_in = tuple(n for n in own_in if n != ctx.naming.batch)
                        own_out = tuple(n for n in own_out if n != ctx.naming.batch)
                    sublayers.append(NnxRetag(tuple(ins), own_in))
                    sublayers.append(lifted)
                    lifted = NnxRetag(own_out, tuple(outs))
            elif item in ELEMENTWISE_FUNCTIONS:
                lifted = Elementwise(item)
            else:
                lifted = NnxFunction(item, ins, outs)
            sublayers.append(lifted)
        return NnxSequential(sublayers, config=NnxStatics.of(module))

    def convention(self, module: nnx.Sequential, naming: AxisNaming) -> CallingConvention:
        if not module.layers:
            return CallingConvention()
        first, _, last = self._plan(module, naming)
        return CallingConvention((first,), last)

    def lower(self, layer: Sequential, ctx: LowerContext) -> nnx.Sequential:
        items = []
        for index, sub in enumerate(layer.sublayers):
            if isinstance(sub, (RenameAxes, NnxRetag)):
                continue  # NNX is positional: a rename is the identity there.
            if isinstance(sub, (Elementwise, NnxFunction)):
                items.append(sub.fn)
            else:
                items.append(ctx.lower(sub, "layers", index))
        return nnx.Sequential(*items)


@nnx_rule(source=nnx.List, lifted=(LayerList,))
class ListRule:
    """``nnx.List`` <-> ``LayerList``: modules and Variables lifted, other items kept as they are."""

    def lift(self, module: nnx.List, ctx: LiftContext) -> LayerList:
        return LayerList([_lift_item(item, ctx, index) for index, item in enumerate(module)])

    def lower(self, layer: LayerList, ctx: LowerContext) -> nnx.List:
        return nnx.List([_lower_item(item, ctx, index) for index, item in enumerate(layer.items)])


@nnx_rule(source=nnx.Dict, lifted=(LayerDict,))
class DictRule:
    """``nnx.Dict`` <-> ``LayerDict``: modules and Variables lifted, other items kept as they are."""

    def lift(self, module: nnx.Dict, ctx: LiftContext) -> LayerDict:
        items = {k: v for k, v in vars(module).items() if not k.startswith("_pytree__")}
        return LayerDict({k: _lift_item(v, ctx, k) for k, v in items.items()})

    def lower(self, layer: LayerDict, ctx: LowerContext) -> nnx.Dict:
        return nnx.Dict({k: _lower_item(v, ctx, k) for k, v in layer.items.items()})
