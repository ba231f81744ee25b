"""Equinox layer stacks: modules made by ``eqx.filter_vmap``, lifted as :class:`~pzbridge.nn.LayerStack`.

A module whose arrays all carry a leading stack axis (``eqx.filter_vmap(lambda
k: Block(k))(keys)``) fails its rule, which expects one block's shapes; it is
then lifted as one block whose parameters carry ``layers``, wrapped in a
``LayerStack`` (run as ``lax.scan`` over the blocks runs them). A plain
stack lowers under ``eqx.filter_vmap`` back to the stacked module; a stack
with other inputs or outputs (a traced scan's body) lowers to an adapter.

Example:
    >>> import jax, jax.numpy as jnp, equinox as eqx
    >>> import pzbridge as pzb
    >>> stacked = eqx.filter_vmap(lambda k: eqx.nn.Linear(2, 2, key=k))(jax.random.split(jax.random.key(0), 4))
    >>> lifted = pzb.lift(stacked)
    >>> dict(lifted.body.body.sublayers[0].weights.value.named_shape)
    {'layers': 4, 'features_out': 2, 'features': 2}
    >>> pzb.lower(lifted).weight.shape
    (4, 2, 2)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax

from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.equinox.adapter import EquinoxAdapter
from pzbridge.bridge.equinox.traversal import EQUINOX, is_array
from pzbridge.bridge.stacking import (
    STACK_AXIS,
    is_plain_stack,
    lift_stacked,
    lower_stacked,
    stack_or_none,
    stack_size,
)
from pzbridge.nn.layer_stack import LayerStack


def split_stacked(module: Any) -> tuple[list[Any], Any]:
    """The module's arrays and ``rebuild(arrays) -> module`` (one block's when given per-block arrays).

    Example:
        >>> leaves, rebuild = split_stacked(eqx.nn.Linear(2, 3, key=jax.random.key(0)))
        >>> [l.shape for l in leaves], type(rebuild(leaves)).__name__
        ([(3, 2), (3,)], 'Linear')
    """
    arrays, static = eqx.partition(module, is_array)
    leaves, treedef = jax.tree_util.tree_flatten(arrays)

    def rebuild(per_block: Sequence[Any]) -> Any:
        return eqx.combine(jax.tree_util.tree_unflatten(treedef, list(per_block)), static)

    return leaves, rebuild


def lift_stacked_block(module: Any, ctx: LiftContext, axis: str = STACK_AXIS) -> Any:
    """One block of the stacked ``module``, lifted with parameters carrying ``axis``.

    ``ctx.example``, when set, is one block's call (the block is traced if it has no rule).
    """
    return lift_stacked(module, ctx, split_stacked, axis)


EQUINOX.set_stacked_handler(
    lambda module, ctx: stack_or_none(module, ctx, split_stacked, lambda block: EQUINOX.convention_of(block, ctx.naming)),
    lambda module: stack_size(split_stacked(module)[0]) is not None)


@EQUINOX.rule(lifted=(LayerStack,))
class LayerStackRule:
    """A plain ``LayerStack`` lowers to the stacked module (``eqx.filter_vmap`` of its block's lowering)."""

    def lower(self, layer: LayerStack, ctx: LowerContext) -> Any:
        if is_plain_stack(layer):
            return lower_stacked(layer, ctx, eqx.filter_vmap, eqx.filter_eval_shape)
        return EquinoxAdapter.wrap(layer, ctx, None)
