"""Flax NNX ``Embed`` rule: lookup and tied decoding over one shared table.

``nnx.Embed`` is called for the lookup and its ``attend`` method scores the
vocabulary with the same matrix (tied output). The lifted
:class:`NnxEmbed` therefore holds an ``EmbeddingLookup`` and an
``EmbeddingDecode`` over the *same* :class:`~pzbridge.nn.embeddings.EmbeddingTable`
(one :class:`~pzbridge.Parameter`): calling it looks tokens up, ``.attend``
decodes, and a selector edit of the table reaches both uses.

Axis names: ``embedding (num, features)`` -> ``{vocabulary, features}`` (the
NNX buffer, not transposed); token ids keep their axes, the output gains
``features``; ``attend`` contracts ``features`` and adds ``vocabulary``.

Kept ``Foreign``: ``num_embeddings == 1`` (NNX broadcasts instead of
indexing), a ``dtype`` other than the table's, a custom ``promote_dtype``.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import pzbridge as pzb
    >>> embed = nnx.Embed(5, 3, rngs=nnx.Rngs(0))
    >>> lifted = pzb.lift(embed).body
    >>> lifted.lookup.table is lifted.decode.table
    True
    >>> tokens = jnp.array([[1, 4]])
    >>> bool(jnp.all(pzb.lift(embed).positional(tokens) == embed(tokens)))
    True
"""

from __future__ import annotations

import functools
from typing import Any

from flax import nnx

from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.lifted import CallingConvention
from pzbridge.bridge.naming import AxisNaming
from pzbridge.bridge.nnx.adapter import NnxAdapter
from pzbridge.bridge.nnx.statics import (
    NnxStatics,
    build_module,
    fresh_statics,
    has_data,
    statics_match,
)
from pzbridge.bridge.nnx.traversal import lift_foreign, nnx_rule
from pzbridge.bridge.nnx.variables import lift_variable, nnx_variable, storage_names
from pzbridge.core import named_axes as nx
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.embeddings import EmbeddingDecode, EmbeddingLookup, EmbeddingTable
from pzbridge.nn.layer import Layer


@pytree_dataclass
class NnxEmbed(Layer):
    """``nnx.Embed`` lifted: a lookup and a tied decode sharing one table.

    Attributes:
      lookup: ``EmbeddingLookup`` (what calling the layer does).
      decode: ``EmbeddingDecode`` over the same table (what ``attend`` does).
      config: The original module's statics (static).

    Example:
        >>> import jax.numpy as jnp
        >>> t = EmbeddingTable(pzb.Parameter(pzb.nx.wrap(jnp.eye(3), "vocabulary", "features"), "t"))
        >>> e = NnxEmbed(EmbeddingLookup(t), EmbeddingDecode(t))
        >>> e.attend(pzb.nx.wrap(jnp.array([0.0, 2.0, 0.0]), "features")).unwrap("vocabulary").tolist()
        [0.0, 2.0, 0.0]
    """

    lookup: Layer
    decode: Layer
    config: Any = static_field(default=None)

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        return self.lookup(x, **side_inputs)

    def attend(self, query: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        """Scores every token against ``query`` (NNX ``Embed.attend``).

        Args:
          query: A named array with the table's embedding axes.
          **side_inputs: Forwarded to the decode layer.

        Returns:
          Logits with the vocabulary axis instead of the embedding axes.
        """
        return self.decode(query, **side_inputs)


@functools.lru_cache(maxsize=None)
def _defaults() -> NnxStatics:
    return fresh_statics(lambda: nnx.Embed(2, 1, rngs=nnx.Rngs(0)))


@nnx_rule(source=nnx.Embed, lifted=(NnxEmbed,))
class EmbedRule:
    """``nnx.Embed`` <-> ``NnxEmbed(EmbeddingLookup, EmbeddingDecode)`` over one ``{vocabulary, features}`` table.

    Lowering needs both sublayers to still use one table of two axes; an
    edited lookup or decode (e.g. an intervention inserted) lowers through
    the generic adapter path instead.
    """

    def _supported(self, module: nnx.Embed) -> bool:
        return (has_data(module, ("embedding",)) and module.num_embeddings > 1
                and module.dtype == module.embedding.get_raw_value().dtype
                and statics_match(module, _defaults(), ("promote_dtype",)))

    def lift(self, module: nnx.Embed, ctx: LiftContext) -> Any:
        if not self._supported(module):
            return lift_foreign(module, ctx)
        vocab = ctx.naming.vocabulary
        table = EmbeddingTable(lift_variable(module.embedding, ctx.child("embedding"), (vocab, ctx.naming.features)),
                               vocabulary_axis=vocab)
        return NnxEmbed(EmbeddingLookup(table), EmbeddingDecode(table), config=NnxStatics.of(module))

    def convention(self, module: nnx.Embed, naming: AxisNaming) -> CallingConvention | None:
        return CallingConvention(((),), (naming.features,)) if self._supported(module) else None

    def lower(self, layer: NnxEmbed, ctx: LowerContext) -> Any:

        lookup, decode = layer.lookup, layer.decode
        native = (layer.config is not None and type(lookup) is EmbeddingLookup and type(decode) is EmbeddingDecode
                  and lookup.table.embeddings is decode.table.embeddings and lookup.mode is None
                  and lookup.dtype is None and lookup.table.vocabulary_axis == decode.table.vocabulary_axis)
        names = storage_names(lookup.table.embeddings) if native else ()
        if len(names) != 2 or lookup.table.vocabulary_axis not in names:
            return NnxAdapter.wrap(layer, ctx)
        vocab = lookup.table.vocabulary_axis
        order = (vocab, next(n for n in names if n != vocab))
        embedding = nnx_variable(lookup.table.embeddings, ctx.child("embedding"), order)
        return build_module(nnx.Embed, layer.config, {"embedding": embedding})
