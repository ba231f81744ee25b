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

LoRA on a tied layer (the usual case: an output ``Linear`` whose weight is
the embedding table) adapts *that use* of the weight: the lifted adapter wraps
the ``Linear`` only, so the embedding keeps reading the base table and the
output layer computes with ``table + scale * A @ B``. Lowering keeps exactly
that: the ``Linear`` becomes a :class:`~pzbridge.bridge.equinox.lora.LoRALinear`
and the lowered ``Shared``'s ``where`` / ``get`` are wrapped in
:class:`~pzbridge.bridge.equinox.lora.ThroughLoRA`, so the tie is made at the
``LoRALinear``'s base ``linear.weight`` (the original ``where`` would name
the computed effective ``weight``, which ``eqx.tree_at`` cannot replace).
Gradients of the table come from both uses, those of ``A`` / ``B`` from the
output layer. Once no ``LoRALinear`` is left the original functions are put
back. A tie that an edit has broken (``merge_lora`` folds the adapter into a
new weight for the output layer only) cannot be expressed by this ``Shared``
and raises a ``LowerError``, rather than silently dropping one of the arrays.

Example:
    >>> import jax, equinox as eqx
    >>> import pzbridge as pzb
    >>> emb, lin = eqx.nn.Embedding(5, 3, key=jax.random.key(0)), eqx.nn.Linear(3, 5, key=jax.random.key(1))
    >>> shared = eqx.nn.Shared((emb, lin), lambda p: p[1].weight, lambda p: p[0].weight)
    >>> body = pzb.lift(shared).body
    >>> body.children["[0]"].table.embeddings is body.children["[1]"].sublayers[0].weights
    True
    >>> edited = pzb.toolshed.loraify_linears_in_selection(
    ...     pzb.select(pzb.lift(shared)).at_instances_of(pzb.nn.Linear), 2, jax.random.key(2))
    >>> emb_out, lin_out = pzb.lower(edited)()
    >>> type(lin_out).__name__, lin_out.linear.weight is emb_out.weight is emb.weight
    ('LoRALinear', True)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import numpy as np

from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.equinox.lora import LoRALinear, ThroughLoRA
from pzbridge.bridge.equinox.traversal import (
    _child_key,
    _key_text,
    equinox_rule,
    is_array,
    lift_foreign,
    new_module,
)
from pzbridge.core.errors import LowerError, PzbridgeError
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.layer import Layer


@pytree_dataclass
class EqxShared(Layer):
    """``eqx.nn.Shared`` lifted: the *filled* pytree, so tied arrays are one shared Parameter.

    ``children`` are the lifted modules / arrays of ``shared()`` (the pytree
    with the tied nodes put back); lowering removes the ``where`` nodes again.
    Like the original, it is not called on data: parents call the lowered
    ``Shared`` (through ``Foreign``), which returns the filled pytree.

    Attributes:
      children: Lifted children by path (``"[0]"``, ``"[1]"``).
      treedef: The filled pytree's structure (static).
      leaves: Per leaf: a child key, or the original non-array leaf (static).
      child_positions: Leaf positions that hold children (static).
      where: The original ``where`` callable (static).
      get: The original ``get`` callable (static).
      placeholders: The original placeholder nodes, in ``where`` order (static).
    """

    children: dict[str, Any]
    treedef: Any = static_field(default=None)
    leaves: tuple[Any, ...] = static_field(default=())
    child_positions: tuple[int, ...] = static_field(default=())
    where: Callable = static_field(default=None)
    get: Callable = static_field(default=None)
    placeholders: tuple[Any, ...] = static_field(default=())

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        raise PzbridgeError(
            "EqxShared: an eqx.nn.Shared holds tied layers and is not called on data; its parent module "
            "calls it with no arguments. Fix: call the lowered model (pzb.lower(lifted)) or the parent layer."
        )


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
        where, get = _original(layer.where), _original(layer.get)
        if _has_lora(filled):
            where, get = ThroughLoRA(where), ThroughLoRA(get)
        _check_tied(where(filled), get(filled), ctx)
        remaining = iter(layer.placeholders)
        emptied = eqx.tree_at(where, filled, replace_fn=lambda _: next(remaining))
        return new_module(eqx.nn.Shared, pytree=emptied, where=where, get=get)


def _original(fn: Callable) -> Callable:
    return fn.fn if isinstance(fn, ThroughLoRA) else fn


def _has_lora(tree: Any) -> bool:
    is_lora = lambda node: isinstance(node, LoRALinear)  # noqa: E731
    return any(is_lora(leaf) for leaf in jax.tree_util.tree_leaves(tree, is_leaf=is_lora))


def _same_array(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if not (is_array(a) and is_array(b)) or a.shape != b.shape or a.dtype != b.dtype:
        return False
    if isinstance(a, jax.core.Tracer) or isinstance(b, jax.core.Tracer):
        return False
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))


def _check_tied(targets: Any, sources: Any, ctx: LowerContext) -> None:
    """Raises unless each tied node still holds its source array (``Shared`` keeps only the source)."""
    for index, (target, source) in enumerate(zip(_as_tuple(targets), _as_tuple(sources))):
        if not _same_array(target, source):
            raise LowerError(
                f"{ctx.where}: eqx.nn.Shared ties where(pytree)[{index}] to get(pytree)[{index}], but they are now "
                f"different arrays (expected the tied array of shape {getattr(source, 'shape', '?')}, found one "
                f"of shape {getattr(target, 'shape', '?')} with other values), e.g. because merge_lora folded an "
                "adapter into a new weight for one use of a tied weight. The Shared would silently keep only "
                "get(pytree). Fix: lower the model with its adapters (the lowered Shared keeps the tie and the "
                "LoRALinear adds its update to that use only), or give both uses the same Parameter again."
            )
