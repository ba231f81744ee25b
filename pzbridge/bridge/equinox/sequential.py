"""Equinox ``Sequential``, ``Identity`` and ``Lambda``, both directions side by side.

``eqx.nn.Sequential`` lifts to :class:`EqxSequential` (its layers in order;
``key`` is split per layer as Equinox does). An unknown module inside it
becomes ``Foreign`` whose own axes are named by its neighbours' calling
conventions. Any other pzbridge ``Sequential`` lowers to ``eqx.nn.Sequential``
of its lowered sublayers. ``Identity`` and ``Lambda`` map to pzbridge's
``Identity`` and ``Elementwise``.

Example:
    >>> import jax, jax.numpy as jnp, equinox as eqx
    >>> import pzbridge as pzb
    >>> seq = eqx.nn.Sequential([eqx.nn.Linear(3, 4, key=jax.random.key(0)), eqx.nn.Lambda(jax.nn.relu)])
    >>> lifted = pzb.lift(seq)
    >>> type(lifted.body).__name__, type(pzb.lower(lifted)).__name__
    ('EqxSequential', 'Sequential')
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax

from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.equinox.traversal import (
    EQUINOX,
    equinox_rule,
    new_module,
    with_names,
)
from pzbridge.bridge.lifted import CallingConvention
from pzbridge.bridge.registry import memoised
from pzbridge.bridge.tracing.container_examples import item_examples
from pzbridge.bridge.tracing.example import Example
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.basic import Elementwise, RenameAxes
from pzbridge.nn.combinators import Identity, Sequential
from pzbridge.nn.dataflow import Traced
from pzbridge.nn.foreign import Foreign


@pytree_dataclass
class EqxSequential(Sequential):
    """``eqx.nn.Sequential`` lifted: a ``key`` side input is split per layer, as Equinox does.

    ``traced_convention`` is the calling convention when some items were
    traced (lifted with an example): their names come from the trace.

    Example:
        >>> import pzbridge as pzb
        >>> EqxSequential([pzb.nn.Identity()])(1, key=jax.random.key(0))
        1
    """

    traced_convention: CallingConvention | None = static_field(default=None)

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        key = side_inputs.get("key")
        if key is None:
            return super().__call__(x, **side_inputs)
        keys = jax.random.split(key, len(self.sublayers))
        for layer, layer_key in zip(self.sublayers, keys):
            x = layer(x, **{**side_inputs, "key": layer_key})
        return x


@pytree_dataclass
class PositionalJoin(RenameAxes):
    """The renames a positional container implies between two items that name the same axes differently.

    ``eqx.nn.Sequential`` hands each item's output to the next by position:
    an adapter returning ``c`` before an ``eqx.nn.Linear`` taking ``features``
    is one axis. Lifted, the items compute on names, so the join renames the
    output's names to the next item's input names (in order); lowering into a
    positional container drops it again.

    Example:
        >>> import pzbridge as pzb
        >>> dict(PositionalJoin(("c",), ("features",))(pzb.nx.zeros({"c": 3})).named_shape)
        {'features': 3}
    """


def _joined(layers: list[Any], conventions: list[CallingConvention | None]) -> list[Any]:
    """``layers`` with a :class:`PositionalJoin` wherever an item's output names differ from the next one's input.

    Only between items whose conventions name one input and the output with
    the same number of axes (what Equinox passes positionally); items that
    keep the layout (no convention) pass the names on.
    """
    joined: list[Any] = []
    previous: tuple[str, ...] | None = None
    for layer, convention in zip(layers, conventions):
        ins = tuple(convention.inputs[0]) if convention is not None and len(convention.inputs) == 1 else ()
        if previous and ins and len(ins) == len(previous) and None not in ins and None not in previous:
            old = tuple(o for o, i in zip(previous, ins) if o != i)
            new = tuple(i for o, i in zip(previous, ins) if o != i)
            if old and not set(new) & (set(previous) - set(old)):
                joined.append(PositionalJoin(old, new))
        joined.append(layer)
        if convention is not None and convention.output:
            previous = tuple(convention.output)
    return joined


@equinox_rule(source=eqx.nn.Identity, lifted=(Identity,))
class IdentityRule:
    """``eqx.nn.Identity`` <-> ``Identity``."""

    def lift(self, module: eqx.nn.Identity, ctx: LiftContext) -> Identity:
        return Identity()

    def lower(self, layer: Identity, ctx: LowerContext) -> eqx.nn.Identity:
        return new_module(eqx.nn.Identity)


@equinox_rule(source=eqx.nn.Lambda, lifted=(Elementwise,))
class LambdaRule:
    """``eqx.nn.Lambda(fn)`` <-> ``Elementwise(fn)``.

    Equinox applies ``fn`` to the unbatched array; ``Elementwise`` applies it
    to the whole named array, which is the same for elementwise functions
    (activations). Non-elementwise functions should stay ``Foreign``:
    register your own rule for a ``Lambda`` subclass if needed.
    """

    def lift(self, module: eqx.nn.Lambda, ctx: LiftContext) -> Elementwise:
        return Elementwise(module.fn)

    def lower(self, layer: Elementwise, ctx: LowerContext) -> eqx.nn.Lambda:
        return new_module(eqx.nn.Lambda, fn=layer.fn)


def _convention_of(layer: Any, naming: Any) -> CallingConvention | None:
    return None if _preserves_shape(layer) else EQUINOX.convention_of(layer, naming)


def _preserves_shape(layer: Any) -> bool:
    if type(layer) is eqx.nn.Sequential:
        # Memoised per layer: every level of nested Sequentials asks about all the levels below it.
        return memoised("eqx-preserves-shape", layer, lambda: all(_preserves_shape(sub) for sub in layer.layers))
    return type(layer) in (eqx.nn.Lambda, eqx.nn.Identity, eqx.nn.Dropout, eqx.nn.BatchNorm)


def _first_convention(layers: Any, naming: Any) -> CallingConvention | None:
    """The convention of the first layer that is not shape-preserving (None if it has none)."""
    for layer in layers:
        if not _preserves_shape(layer):
            return EQUINOX.convention_of(layer, naming)
    return None


@equinox_rule(source=eqx.nn.Sequential, lifted=(EqxSequential, Sequential))
class SequentialRule:
    """``eqx.nn.Sequential`` <-> ``EqxSequential`` (layers lifted in order; ``key`` split per layer).

    Any other pzbridge ``Sequential`` (including named groups) lowers to
    ``eqx.nn.Sequential`` of its lowered sublayers.
    """

    def lift(self, module: eqx.nn.Sequential, ctx: LiftContext) -> EqxSequential:
        # With an example, each custom item is traced with the value that reaches it.
        examples = item_examples(module.layers, ctx.example, lambda layer, x: layer(x, key=None))
        conventions = [_convention_of(layer, ctx.naming) for layer in module.layers]
        layers = []
        for i, (layer, example) in enumerate(zip(module.layers, examples)):
            before = next((c.output for c in reversed(conventions[:i]) if c and c.output is not None), None)
            if example is not None and before is not None and len(before) == len(example.args[0].shape):
                example = Example(example.args, example.kwargs, (tuple(before),))
            child = ctx.child("layers", i)
            layers.append(ctx.lift_node(layer, child.with_example(example) if example is not None else child))
            if isinstance(layers[-1], Traced):
                conventions[i] = layers[-1].convention
        for i, lifted in enumerate(layers):
            if isinstance(lifted, Foreign):
                # An unknown module's own axes are named by its neighbours.
                before = next((c.output for c in reversed(conventions[:i]) if c and c.output is not None), None)
                after = next((c.inputs[0] for c in conventions[i + 1 :] if c and c.inputs), None)
                inputs = before if before is not None else (after or ())
                layers[i] = with_names(lifted, inputs, after if after is not None else inputs)
        layers = _joined(layers, conventions)
        traced = None
        if any(isinstance(layer, Traced) for layer in layers):
            # Traced items know their names, which the original modules' rules could not say.
            head = next((c for c in conventions if c is not None and c.inputs), None)
            tail = next((c for c in reversed(conventions) if c is not None and c.output is not None), None)
            traced = None if head is None or tail is None else CallingConvention(head.inputs[:1], tail.output)
        return EqxSequential(layers, traced_convention=traced)

    def convention(self, module: eqx.nn.Sequential, naming: Any) -> CallingConvention | None:
        """The first named layer's input names and the last one's output names.

        Shape-preserving layers (``Lambda``, ``Identity``, ``Dropout``) are
        skipped; None when a layer without a convention comes first.
        """
        # Through EQUINOX.convention_of (memoised): nested Sequentials ask for each inner convention twice.
        head, tail = _first_convention(module.layers, naming), _first_convention(reversed(module.layers), naming)
        return None if head is None or tail is None else CallingConvention(head.inputs, tail.output)

    def lower(self, layer: Sequential, ctx: LowerContext) -> eqx.nn.Sequential:
        # A positional join is the identity on Equinox's positional arrays.
        layers = tuple(ctx.lower(sub, "layers", i) for i, sub in enumerate(layer.sublayers)
                       if not isinstance(sub, PositionalJoin))
        return new_module(eqx.nn.Sequential, layers=layers)
