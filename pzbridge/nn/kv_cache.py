"""Key/value-cache attention for autoregressive decoding.

``KVCachingAttention`` has the same sublayers as
:class:`~pzbridge.nn.attention.Attention` plus three ``StateVariable``s, laid
out like Flax NNX ``MultiHeadAttention``'s decode cache so the two can be
bridged:

- ``cached_keys`` / ``cached_values``: named arrays over ``kv_seq`` (the cache
  length) and the key/value axes (batch, ``heads`` or ``kv_heads``,
  ``projection``), zero-initialised;
- ``cache_index``: an int32 scalar, the number of positions written so far.

A call with ``T`` new tokens writes their keys/values at
``[cache_index, cache_index + T)`` along ``kv_seq`` (one
``dynamic_update_slice``), advances the index by ``T``, and attends the
queries against the whole cache. Unless the caller passes ``token_positions``,
the new tokens' positions are ``cache_index + arange(T)`` and are forwarded to
every sublayer, so RoPE rotates by absolute position and
:class:`~pzbridge.nn.masks.ApplyCausalMask` hides both future tokens and the
unwritten cache slots (their slot index exceeds every query position). A
prompt can thus be prefilled in one call and then decoded token by token;
``T = 1`` reproduces NNX's decode step (mask ``arange(L) <= cache_index``).

The mask must hide unwritten slots: keep a causal (or sliding-window) mask.
Writing past the cache end is not checked at run time (the index is traced);
``dynamic_update_slice`` would clamp, so size the cache for prompt + steps.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> from pzbridge.nn.attention import Attention
    >>> attn = Attention.from_config("a", jax.random.key(0), d_model=4, num_heads=2, qk_size=2)
    >>> cached = KVCachingAttention.from_uncached(attn, 8, {"batch": 1, "heads": 2, "projection": 2}, "a")
    >>> _ = cached(pzb.nx.ones({"batch": 1, "seq": 3, "features": 4}))
    >>> int(cached.cache_index.value)
    3
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.core.variables import StateVariable
from pzbridge.nn.attention import Attention
from pzbridge.nn.layer import Layer


def write_into_cache(cache: nx.NamedArray, chunk: nx.NamedArrayBase, index: Any, axis: str,
                     where: str = "cache") -> nx.NamedArray:
    """Writes ``chunk`` into ``cache`` at ``index`` along ``axis`` (one ``dynamic_update_slice``).

    ``chunk`` must have the cache's axes with the same sizes except along
    ``axis``; it is laid out like the cache (a transpose of the small chunk
    at most) and cast to the cache dtype.

    Args:
      cache: The cache, a NamedArray without positional axes.
      chunk: The new entries.
      index: Start position along ``axis`` (a scalar, may be traced).
      axis: The cached sequence axis.
      where: Description for error messages.

    Returns:
      The updated cache (same layout).

    Raises:
      NamedAxisError: If the axes or sizes do not match.

    Example:
        >>> c = write_into_cache(pzb.nx.zeros({"kv_seq": 4}), pzb.nx.ones({"kv_seq": 2}), 1, "kv_seq")
        >>> c.unwrap("kv_seq").tolist()
        [0.0, 1.0, 1.0, 0.0]
    """
    cache_shape = dict(cache.named_shape)
    chunk_shape = dict(chunk.named_shape)
    others_ok = {n: s for n, s in cache_shape.items() if n != axis} == {
        n: s for n, s in chunk_shape.items() if n != axis
    }
    if not others_ok or axis not in chunk_shape or chunk.positional_shape or chunk_shape[axis] > cache_shape[axis]:
        raise NamedAxisError(
            f"{where}: new entries with named shape {chunk_shape} (positional {chunk.positional_shape}) do not fit "
            f"the cache with named shape {cache_shape} along {axis!r}. Fix: build the cache with the same "
            "batch / heads / projection sizes as the model's keys and values, and a length at least the "
            "number of tokens written."
        )
    data = chunk.order_as(*cache.named_axes).data_array.astype(cache.dtype)
    names = list(cache.named_axes)
    zero = jnp.zeros((), jnp.int32)
    starts = tuple(jnp.asarray(index, jnp.int32) if n == axis else zero for n in names)
    return nx.NamedArray(jax.lax.dynamic_update_slice(cache.data_array, data, starts), cache.named_axes)


@pytree_dataclass
class KVCachingAttention(Layer):
    """Attention that appends new keys/values to a cache in ``StateVariable``s.

    Attributes:
      input_to_query, input_to_key, input_to_value, query_key_to_logits, mask,
        logits_to_weights, attn_value_to_output: As in
        :class:`~pzbridge.nn.attention.Attention`.
      cached_keys: ``StateVariable`` holding the key cache (named array).
      cached_values: ``StateVariable`` holding the value cache.
      cache_index: ``StateVariable`` holding an int32 scalar.
      seq_axis: The input's sequence axis (static).
      kv_seq_axis: The cached sequence axis (static).
      positions_input: Side input with token positions (static).

    Example:
        >>> attn = Attention.from_config("a", None, d_model=4, num_heads=2, qk_size=2)
        >>> c = KVCachingAttention.from_uncached(attn, 5, {"heads": 2, "projection": 2}, "a")
        >>> c.cached_keys.label, dict(c.cached_keys.value.named_shape)
        ('a.cached_keys', {'heads': 2, 'projection': 2, 'kv_seq': 5})
    """

    input_to_query: Layer
    input_to_key: Layer
    input_to_value: Layer
    query_key_to_logits: Layer
    mask: Layer
    logits_to_weights: Layer
    attn_value_to_output: Layer
    cached_keys: Any
    cached_values: Any
    cache_index: Any
    seq_axis: str = static_field(default="seq")
    kv_seq_axis: str = static_field(default="kv_seq")
    positions_input: str = static_field(default="token_positions")

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        index = self.cache_index.value
        if self.positions_input not in side_inputs:
            if not nx.is_namedarray(x) or self.seq_axis not in x.named_shape:
                raise NamedAxisError(
                    f"KVCachingAttention: the input lacks the axis {self.seq_axis!r} and no {self.positions_input!r} "
                    f"side input was given (input named shape {dict(getattr(x, 'named_shape', {}))}). "
                    "Fix: tag the input's sequence axis, or pass token positions."
                )
            steps = nx.arange(self.seq_axis, x.named_shape[self.seq_axis], dtype=jnp.int32)
            side_inputs = {**side_inputs, self.positions_input: steps + index}
        query = self.input_to_query(x, **side_inputs)
        key = self.input_to_key(x, **side_inputs)
        value = self.input_to_value(x, **side_inputs)
        label = getattr(self.cached_keys, "label", "?")
        keys = write_into_cache(self.cached_keys.value, key, index, self.kv_seq_axis, f"KVCachingAttention {label!r}")
        values = write_into_cache(self.cached_values.value, value, index, self.kv_seq_axis,
                                  f"KVCachingAttention {label!r}")
        self.cached_keys.value = keys
        self.cached_values.value = values
        self.cache_index.value = index + key.named_shape[self.kv_seq_axis]
        return self.to_uncached().attend(query, keys, values, side_inputs)

    @classmethod
    def from_uncached(
        cls,
        original: Attention,
        cache_len: int,
        cached_axes: Mapping[str, int],
        label: str,
        dtype: Any = jnp.float32,
        value_axes: Mapping[str, int] | None = None,
        seq_axis: str = "seq",
        kv_seq_axis: str = "kv_seq",
        positions_input: str = "token_positions",
    ) -> KVCachingAttention:
        """Wraps an :class:`Attention`'s sublayers with a fresh, empty cache.

        Args:
          original: The attention layer (its sublayers are reused as they are,
            parameters shared).
          cache_len: Cache length (prompt + generated tokens).
          cached_axes: The keys'/values' other axes and sizes, e.g.
            ``{"batch": 2, "heads": 4, "projection": 16}``.
          label: Prefix of the state variables' labels.
          dtype: Cache dtype.
          value_axes: The values' other axes if they differ from the keys'
            (e.g. a different value head size); default ``cached_axes``.
          seq_axis, kv_seq_axis, positions_input: As the attributes.

        Returns:
          The caching layer (``cache_index`` = 0).

        Raises:
          NamedAxisError: If ``cached_axes`` contains ``kv_seq_axis``.

        Example:
            >>> attn = Attention.from_config("a", None, d_model=4, num_heads=2, qk_size=2)
            >>> int(KVCachingAttention.from_uncached(attn, 5, {"heads": 2, "projection": 2}, "a").cache_index.value)
            0
        """
        value_axes = cached_axes if value_axes is None else value_axes
        for axes in (cached_axes, value_axes):
            if kv_seq_axis in axes:
                raise NamedAxisError(
                    f"KVCachingAttention.from_uncached: cached axes {dict(axes)} must not contain {kv_seq_axis!r} "
                    "(its size is cache_len). Fix: drop it from cached_axes / value_axes."
                )
        shape = {**dict(cached_axes), kv_seq_axis: cache_len}
        value_shape = {**dict(value_axes), kv_seq_axis: cache_len}
        return cls(
            original.input_to_query,
            original.input_to_key,
            original.input_to_value,
            original.query_key_to_logits,
            original.mask,
            original.logits_to_weights,
            original.attn_value_to_output,
            cached_keys=StateVariable(nx.zeros(shape, dtype), f"{label}.cached_keys"),
            cached_values=StateVariable(nx.zeros(value_shape, dtype), f"{label}.cached_values"),
            cache_index=StateVariable(jnp.zeros((), jnp.int32), f"{label}.cache_index"),
            seq_axis=seq_axis,
            kv_seq_axis=kv_seq_axis,
            positions_input=positions_input,
        )

    def to_uncached(self) -> Attention:
        """The plain :class:`Attention` with the same sublayers (cache dropped).

        Example:
            >>> attn = Attention.from_config("a", None, d_model=4, num_heads=2, qk_size=2)
            >>> c = KVCachingAttention.from_uncached(attn, 5, {"heads": 2, "projection": 2}, "a")
            >>> c.to_uncached() == attn
            True
        """
        return Attention(self.input_to_query, self.input_to_key, self.input_to_value, self.query_key_to_logits,
                         self.mask, self.logits_to_weights, self.attn_value_to_output)
