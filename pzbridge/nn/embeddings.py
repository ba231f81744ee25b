"""Token embeddings: a shared ``EmbeddingTable``, ``EmbeddingLookup`` and tied ``EmbeddingDecode``.

Why the table is its own struct: a language model with tied embeddings uses
one array twice, to look tokens up at the bottom and to score the vocabulary
at the top (NNX ``Embed.attend``). Both layers hold the *same*
``EmbeddingTable`` (the same :class:`~pzbridge.Parameter`), so the tie is
visible in the tree, survives ``unbind_params`` as one variable, and a
selector edit of the table reaches both uses.

The table's named array has the vocabulary axis plus any embedding axes, in
any storage order (an NNX ``Embed`` is ``(vocabulary, features)``; a lifted
table keeps that buffer). Lookup is one ``jnp.take`` on the raw data and
decoding is one ``einsum``; no axis of the table is ever transposed.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> table = EmbeddingTable.from_config("embed", jax.random.key(0), 10, {"features": 4})
    >>> tokens = pzb.nx.wrap(jnp.array([[1, 2, 3]]), "batch", "seq")
    >>> h = EmbeddingLookup(table)(tokens)
    >>> dict(h.named_shape), dict(EmbeddingDecode(table)(h).named_shape)
    ({'batch': 1, 'seq': 3, 'features': 4}, {'batch': 1, 'seq': 3, 'vocabulary': 10})
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError
from pzbridge.core.named_axes_core import make_named
from pzbridge.core.struct import Struct, pytree_dataclass, static_field
from pzbridge.nn.contraction import contract, data_layout
from pzbridge.nn.initializers import make_parameter
from pzbridge.nn.layer import Layer


@pytree_dataclass
class EmbeddingTable(Struct):
    """A vocabulary of embedding vectors, shared by lookup and decode layers.

    Attributes:
      embeddings: A ``Parameter`` (or frozen value / slot) holding a NamedArray
        with ``vocabulary_axis`` and the embedding axes.
      vocabulary_axis: The name of the token axis (static).

    Example:
        >>> t = EmbeddingTable(pzb.Parameter(pzb.nx.zeros({"vocabulary": 5, "features": 2}), "t"))
        >>> t.embedding_axes()
        {'features': 2}
    """

    embeddings: Any
    vocabulary_axis: str = static_field(default="vocabulary")

    def table(self, where: str) -> nx.NamedArrayBase:
        """The table's named array, checked to have the vocabulary axis and no positional axes.

        Raises:
          NamedAxisError: If the stored array does not fit, naming ``where``.

        Example:
            >>> t = EmbeddingTable(pzb.Parameter(pzb.nx.zeros({"vocabulary": 5, "features": 2}), "t"))
            >>> t.table("here").named_shape["vocabulary"]
            5
        """
        value = self.embeddings.value
        if (not nx.is_namedarray(value) or value.positional_shape
                or self.vocabulary_axis not in value.named_shape):
            found = (f"named {dict(value.named_shape)} positional {value.positional_shape}"
                     if nx.is_namedarray(value) else f"{type(value).__name__} {getattr(value, 'shape', '')}")
            raise NamedAxisError(
                f"{where}: embedding table {self.label!r} must be a NamedArray with axis "
                f"{self.vocabulary_axis!r} and only named axes; found {found}. "
                "Fix: store e.g. pzb.nx.wrap(table, 'vocabulary', 'features'), or set vocabulary_axis."
            )
        return value

    @property
    def label(self) -> str:
        """The label of the embeddings parameter ("?" when it has none)."""
        return getattr(self.embeddings, "label", "?")

    def embedding_axes(self) -> dict[str, int]:
        """Names and sizes of the embedding axes (every table axis but the vocabulary)."""
        shape = self.table("EmbeddingTable").named_shape
        return {n: s for n, s in shape.items() if n != self.vocabulary_axis}

    @classmethod
    def from_config(
        cls,
        name: str,
        init_base_rng: jax.Array | None,
        vocab_size: int,
        embedding_axes: Mapping[str, int],
        vocabulary_axis: str = "vocabulary",
        dtype: Any = jnp.float32,
    ) -> EmbeddingTable:
        """Builds a table labelled ``f"{name}.embeddings"``, initialised ``N(0, 1/embedding_size)``.

        The variance matches NNX ``Embed``'s default (variance scaling, fan-in
        the embedding size).

        Args:
          name: Layer name.
          init_base_rng: Base key, or None for a ``ParameterSlot``.
          vocab_size: Number of tokens.
          embedding_axes: Names and sizes of each embedding (e.g. ``{"features": d}``).
          vocabulary_axis: Name of the token axis.
          dtype: Table dtype.

        Returns:
          The table.

        Example:
            >>> EmbeddingTable.from_config("e", None, 10, {"features": 4}).embeddings
            ParameterSlot(label='e.embeddings')
        """
        shape = {vocabulary_axis: vocab_size, **dict(embedding_axes)}
        fan_in = 1
        for size in embedding_axes.values():
            fan_in *= size

        def init(key: jax.Array) -> nx.NamedArray:
            data = jax.random.normal(key, tuple(shape.values()), dtype) * jnp.sqrt(1.0 / max(fan_in, 1)).astype(dtype)
            return nx.wrap(data, *shape)

        return cls(make_parameter(f"{name}.embeddings", init_base_rng, init), vocabulary_axis)


@pytree_dataclass
class EmbeddingLookup(Layer):
    """Replaces integer token ids by their embeddings (adds the embedding axes).

    Every axis of the ids passes through; the embedding axes are added. One
    ``jnp.take`` on the raw table data.

    Attributes:
      table: The (possibly shared) :class:`EmbeddingTable`.
      mode: ``jnp.take``'s out-of-range mode (static). ``None`` is jax's
        default (``"fill"``: NaN rows, what NNX ``Embed`` does); ``"clip"``
        clamps like Equinox's ``weight[i]`` indexing.
      dtype: If set, the table is cast to this dtype first (NNX ``dtype``; static).

    Example:
        >>> t = EmbeddingTable(pzb.Parameter(pzb.nx.wrap(jnp.eye(3), "vocabulary", "features"), "t"))
        >>> EmbeddingLookup(t)(pzb.nx.wrap(jnp.array([2, 0]), "seq")).unwrap("seq", "features")
        Array([[0., 0., 1.],
               [1., 0., 0.]], dtype=float32)
    """

    table: EmbeddingTable
    mode: str | None = static_field(default=None)
    dtype: Any = static_field(default=None)

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        where = f"EmbeddingLookup {self.table.label!r}"
        table = self.table.table(where)
        if not nx.is_namedarray(x) or not jnp.issubdtype(x.dtype, jnp.integer):
            raise NamedAxisError(
                f"{where}: expected a NamedArray of integer token ids, found {type(x).__name__} with dtype "
                f"{getattr(x, 'dtype', None)}. Fix: pass token ids, e.g. pzb.nx.wrap(ids.astype(jnp.int32), 'seq')."
            )
        embedding_names = [n for n in table.named_shape if n != self.table.vocabulary_axis]
        clash = [n for n in embedding_names if n in x.named_shape]
        if clash:
            raise NamedAxisError(
                f"{where}: token ids already have axes {clash} that the embedding would add "
                f"(ids named shape {dict(x.named_shape)}). Fix: rename those axes of the ids first."
            )
        table_data, _, table_axes = data_layout(table)
        if self.dtype is not None:
            table_data = table_data.astype(self.dtype)
        ids, ids_positional, ids_names = data_layout(x)
        vocab_axis = table_axes[self.table.vocabulary_axis]
        out = jnp.take(table_data, ids, axis=vocab_axis, mode=self.mode)
        # take() puts the ids' axes where the vocabulary axis was.
        shift = ids.ndim - 1

        def moved(axis: int) -> int:
            return axis if axis < vocab_axis else axis + shift

        names = {n: moved(a) for n, a in table_axes.items() if n != self.table.vocabulary_axis}
        names.update({n: vocab_axis + a for n, a in ids_names.items()})
        return make_named(out, tuple(vocab_axis + a for a in ids_positional), names)


@pytree_dataclass
class EmbeddingDecode(Layer):
    """Scores every token: contracts the embedding axes with the (tied) table.

    Output axes: the input's other axes plus the vocabulary axis (logits).
    Equivalent to NNX ``Embed.attend``.

    Attributes:
      table: The (possibly shared) :class:`EmbeddingTable`.

    Example:
        >>> t = EmbeddingTable(pzb.Parameter(pzb.nx.wrap(jnp.eye(3), "vocabulary", "features"), "t"))
        >>> EmbeddingDecode(t)(pzb.nx.wrap(jnp.array([0.0, 5.0, 1.0]), "features")).unwrap("vocabulary")
        Array([0., 5., 1.], dtype=float32)
    """

    table: EmbeddingTable

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArray:
        where = f"EmbeddingDecode {self.table.label!r}"
        table = self.table.table(where)
        embedding_names = [n for n in table.named_shape if n != self.table.vocabulary_axis]
        if not nx.is_namedarray(x) or any(n not in x.named_shape for n in embedding_names):
            raise NamedAxisError(
                f"{where}: input must be a NamedArray with the embedding axes {embedding_names}; found "
                f"{dict(x.named_shape) if nx.is_namedarray(x) else type(x).__name__}. "
                "Fix: tag or rename the input's axes to the table's embedding axes."
            )
        if self.table.vocabulary_axis in x.named_shape:
            raise NamedAxisError(
                f"{where}: input already has the vocabulary axis {self.table.vocabulary_axis!r} "
                f"(named shape {dict(x.named_shape)}). Fix: rename it before decoding."
            )
        return contract([x, table], embedding_names)
