"""NNX layer stacks: modules made by ``nnx.vmap``, lifted as :class:`~pzbridge.nn.LayerStack`.

A module whose array Variables all carry a leading stack axis (blocks made
by ``nnx.vmap`` over split ``Rngs``) fails its rule, which expects one
block's shapes; it is then lifted as one block whose parameters carry
``layers``, wrapped in a ``LayerStack`` (run as ``nnx.scan`` over the blocks
runs them). A plain stack lowers by lowering one block under ``jax.vmap``
(``nnx.split`` inside, ``nnx.merge`` outside), which is how ``nnx.vmap``
builds the stacked module; a stack with other inputs or outputs lowers to an
adapter.

Example:
    >>> import jax
    >>> from flax import nnx
    >>> import pzbridge as pzb
    >>> @nnx.split_rngs(splits=3)
    ... @nnx.vmap(in_axes=(0,), out_axes=0)
    ... def make(rngs): return nnx.Linear(2, 2, rngs=rngs)
    >>> stacked = make(nnx.Rngs(0))
    >>> lifted = pzb.lift(stacked)
    >>> type(lifted.body).__name__, lifted.body.size
    ('LayerStack', 3)
    >>> pzb.lower(lifted).kernel.shape
    (3, 2, 2)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx

from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.nnx.adapter import NnxAdapter
from pzbridge.bridge.nnx.traversal import NNX
from pzbridge.bridge.nnx.variables import fresh_variable, is_array, raw_value
from pzbridge.bridge.stacking import (
    STACK_AXIS,
    is_plain_stack,
    lift_stacked,
    lower_stacked,
    stack_or_none,
    stack_size,
)
from pzbridge.nn.layer_stack import LayerStack


def split_stacked(module: Any) -> tuple[list[Any], Callable[[Sequence[Any]], Any]]:
    """The module's arrays and ``rebuild(arrays) -> module`` (on new Variables; the module is not touched).

    Example:
        >>> leaves, rebuild = split_stacked(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
        >>> [l.shape for l in leaves], type(rebuild(leaves)).__name__
        ([(3,), (2, 3)], 'Linear')
    """
    graphdef, state = nnx.split(module)
    flat = list(nnx.to_flat_state(state))
    arrays = [(path, var) for path, var in flat if is_array(raw_value(var))]
    others = [(path, var) for path, var in flat if not is_array(raw_value(var))]

    def rebuild(per_block: Sequence[Any]) -> Any:
        fresh = [(path, fresh_variable(var, value)) for (path, var), value in zip(arrays, per_block)]
        fresh += [(path, fresh_variable(var, raw_value(var))) for path, var in others]
        return nnx.merge(graphdef, nnx.from_flat_state(fresh))

    return [raw_value(var) for _, var in arrays], rebuild


def lift_stacked_block(module: Any, ctx: LiftContext, axis: str = STACK_AXIS) -> Any:
    """One block of the stacked ``module``, lifted with parameters carrying ``axis``.

    ``ctx.example``, when set, is one block's call (the block is traced if it has no rule).
    """
    return lift_stacked(module, ctx, split_stacked, axis)


def _stacked_modules(make_one: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``jax.vmap`` for a function returning an NNX module: the stacked module ``nnx.vmap`` would make."""
    def run(values: Any) -> Any:
        graphdefs: list[Any] = []

        def state_of_one(per_block: Any) -> Any:
            graphdef, state = nnx.split(make_one(per_block))
            graphdefs.append(graphdef)
            return state

        states = jax.vmap(state_of_one)(values)
        return nnx.merge(graphdefs[0], states)

    return run


NNX.set_stacked_handler(
    lambda module, ctx: stack_or_none(module, ctx, split_stacked, lambda block: NNX.convention_of(block, ctx.naming)),
    lambda module: stack_size(split_stacked(module)[0]) is not None)


@NNX.rule(lifted=(LayerStack,))
class LayerStackRule:
    """A plain ``LayerStack`` lowers to the stacked module (one block lowered under ``jax.vmap``)."""

    def lower(self, layer: LayerStack, ctx: LowerContext) -> Any:
        if is_plain_stack(layer):
            return lower_stacked(layer, ctx, _stacked_modules, nnx.eval_shape)
        return NnxAdapter.wrap(layer, ctx, None)
