"""Equinox rule for ``eqx.nn.Shared``: tied weights become one shared Parameter.

``Shared(pytree, where, get)`` stores ``pytree`` with the tied nodes replaced
by placeholders and puts ``get(pytree)`` back on every call. Lifting lifts
the *filled* pytree (``shared()``), in which the tied arrays are one object,
so the lift context's sharing table turns them into one
:class:`~pzbridge.Parameter` reached from both places (a selector edit or a
gradient of it reaches both uses). Lowering lowers the filled pytree (one
array in both places) and takes the ``where`` nodes out again, putting the
original placeholder objects back, so the round trip is exact.

Only ties where ``get`` returns the source arrays themselves are lifted
this way; a ``get`` that computes (e.g. a transpose) keeps ``Shared`` as
``Foreign``.

Example:
    >>> import jax, equinox as eqx
    >>> import pzbridge as pzb
    >>> emb, lin = eqx.nn.Embedding(5, 3, key=jax.random.key(0)), eqx.nn.Linear(3, 5, key=jax.random.key(1))
    >>> shared = eqx.nn.Shared((emb, lin), lambda p: p[1].weight, lambda p: p[0].weight)
    >>> body = pzb.lift(shared).body
    >>> body.children["[0]"].table.embeddings is body.children["[1]"].sublayers[0].weights
    True
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax

from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.equinox_core import _child_key, _key_text, equinox_rule, is_array, lift_foreign, new_module
from pzbridge.bridge.equinox_layers import EqxShared


def _as_tuple(nodes: Any) -> tuple[Any, ...]:
    return tuple(nodes) if isinstance(nodes, (list, tuple)) else (nodes,)


@equinox_rule(source=eqx.nn.Shared, lifted=(EqxShared,))
class SharedRule:
    """``eqx.nn.Shared`` <-> ``EqxShared`` holding the lifted filled pytree (children ``"[0]"``, ``"[1]"``...)."""

    def lift(self, module: eqx.nn.Shared, ctx: LiftContext) -> Any:
        sources = _as_tuple(module.get(module.pytree))
        if not all(is_array(s) for s in sources):
            return lift_foreign(module, ctx)
        filled = module()
        if not all(a is b for a, b in zip(_as_tuple(module.where(filled)), sources)):
            return lift_foreign(module, ctx)
        placeholders = _as_tuple(module.where(module.pytree))
        flat, treedef = jax.tree_util.tree_flatten_with_path(filled, is_leaf=lambda v: isinstance(v, eqx.Module))
        leaves: list[Any] = []
        children: dict[str, Any] = {}
        positions: list[int] = []
        pytree_ctx = ctx.child("pytree")
        for index, (path, leaf) in enumerate(flat):
            keys = _child_key(path)
            if isinstance(leaf, eqx.Module):
                child = pytree_ctx.lift(leaf, *keys)
            elif is_array(leaf):
                child = pytree_ctx.child(*keys).raw_parameter(leaf)
            else:
                leaves.append(leaf)
                continue
            name = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys) or _key_text(keys)
            children[name] = child
            positions.append(index)
            leaves.append(name)
        return EqxShared(children, treedef, tuple(leaves), tuple(positions), module.where, module.get,
                         placeholders)

    def lower(self, layer: EqxShared, ctx: LowerContext) -> eqx.nn.Shared:
        leaves = list(layer.leaves)
        pytree_ctx = ctx.child("pytree")
        for position in layer.child_positions:
            key = leaves[position]
            leaves[position] = pytree_ctx.lower(layer.children[key], key)
        filled = jax.tree_util.tree_unflatten(layer.treedef, leaves)
        remaining = iter(layer.placeholders)
        emptied = eqx.tree_at(layer.where, filled, replace_fn=lambda _: next(remaining))
        return new_module(eqx.nn.Shared, pytree=emptied, where=layer.where, get=layer.get)
