"""Equinox ``Embedding``, both directions side by side.

``eqx.nn.Embedding`` (weight ``(num_embeddings, embedding_size)``) lifts to
:class:`EqxEmbedding`, a pzbridge ``EmbeddingLookup`` over a table named
``{vocabulary, features}``; Equinox looks up one scalar index per call.

Example:
    >>> import jax, jax.numpy as jnp, equinox as eqx
    >>> import pzbridge as pzb
    >>> emb = eqx.nn.Embedding(5, 3, key=jax.random.key(0))
    >>> bool(jnp.all(pzb.lift(emb).positional(jnp.array(2)) == emb(jnp.array(2))))
    True
"""

from __future__ import annotations

from typing import Any

import equinox as eqx

from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.equinox.traversal import (
    EqxOrigin,
    equinox_rule,
    origin_of,
    rebuild_from_origin,
)
from pzbridge.bridge.lifted import CallingConvention
from pzbridge.core.errors import LowerError
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.embeddings import EmbeddingLookup, EmbeddingTable


@pytree_dataclass
class EqxEmbedding(EmbeddingLookup):
    """``eqx.nn.Embedding`` lifted: an :class:`EmbeddingLookup` clamping ids as ``weight[i]`` does.

    Attributes:
      origin: The original class and static fields (static).
    """

    origin: EqxOrigin | None = static_field(default=None)


@equinox_rule(source=eqx.nn.Embedding, lifted=(EqxEmbedding, EmbeddingLookup))
class EmbeddingRule:
    """``eqx.nn.Embedding`` <-> ``EqxEmbedding(EmbeddingTable)``; ``weight (num, size)`` -> ``{vocabulary, features}``.

    Ids are clamped (``mode="clip"``) as Equinox's ``weight[i]`` does. Any
    ``EmbeddingLookup`` with a two-axis table lowers to ``eqx.nn.Embedding``.
    """

    def lift(self, module: eqx.nn.Embedding, ctx: LiftContext) -> EqxEmbedding:
        names = (ctx.naming.vocabulary, ctx.naming.features)
        weight = ctx.child("weight").parameter(module.weight, names)
        vocabulary = tuple(weight.value.named_axes)[0]
        return EqxEmbedding(EmbeddingTable(weight, vocabulary), mode="clip", origin=origin_of(module))

    def convention(self, module: eqx.nn.Embedding, naming: Any) -> CallingConvention:
        return CallingConvention(((),), (naming.features,))

    def lower(self, layer: EmbeddingLookup, ctx: LowerContext) -> Any:
        table = layer.table.embeddings.value
        names = tuple(table.named_axes) if hasattr(table, "named_axes") else ()
        vocab = layer.table.vocabulary_axis
        if len(names) != 2 or vocab not in names or layer.dtype is not None:
            raise LowerError(
                f"{ctx.where}: eqx.nn.Embedding needs a (vocabulary, features) table without a dtype cast; "
                f"found axes {list(names)} and dtype={layer.dtype}. Fix: keep the table two-dimensional, or "
                "wrap the lookup in pzb.nn.Sequential to lower it through an adapter."
            )
        other = names[1] if names[0] == vocab else names[0]
        weight = ctx.child("weight").array(layer.table.embeddings, (vocab, other))
        origin = getattr(layer, "origin", None)
        return rebuild_from_origin(origin, eqx.nn.Embedding, num_embeddings=weight.shape[0],
                                   embedding_size=weight.shape[1], weight=weight)
