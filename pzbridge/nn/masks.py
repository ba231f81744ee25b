"""Attention masks as layers: causal, sliding-window and explicit.

A mask is an ordinary layer that sits between the query-key logits and the
softmax of an :class:`~pzbridge.nn.attention.Attention` block, so it can be
selected, swapped or removed like any other layer. Each one replaces the
logits it masks out by ``masked_out_value``; with the default ``None`` that is
``jnp.finfo(logits.dtype).min``, what Flax NNX and Equinox use (finite, so a
fully masked row gives a uniform softmax instead of NaNs).

Positions: a query's position comes from the ``token_positions`` side input
(a named integer array over ``seq`` and optionally batch axes) when given, else
it is its index along ``seq``; a key's position comes from
``kv_token_positions`` when given, else its index along ``kv_seq``. During
key/value-cache decoding the cache slots are the absolute positions, so only
the query positions need passing (``KVCachingAttention`` does that itself).

The mask is computed as a small boolean named array (``seq x kv_seq``, plus
any axes of the positions) and applied with one ``jnp.where`` that keeps the
logits' own layout.

Example:
    >>> import jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> logits = pzb.nx.zeros({"seq": 3, "kv_seq": 3})
    >>> ApplyCausalMask(masked_out_value=-1.0)(logits).unwrap("seq", "kv_seq")
    Array([[ 0., -1., -1.],
           [ 0.,  0., -1.],
           [ 0.,  0.,  0.]], dtype=float32)
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError
from pzbridge.core.named_axes_ops import elementwise
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.layer import Layer


def _fill_value(masked_out_value: float | None, dtype: Any) -> Any:
    if masked_out_value is None:
        return jnp.finfo(dtype).min
    return jnp.asarray(masked_out_value, dtype)


def apply_mask(
    logits: nx.NamedArrayBase, keep: nx.NamedArrayBase, masked_out_value: float | None, layer: str
) -> nx.NamedArrayBase:
    """Replaces logits where ``keep`` is False, broadcasting ``keep`` by name.

    The logits come first in the elementwise call, so the result keeps their
    axis order (no transpose of the big array).

    Args:
      logits: The attention logits.
      keep: A boolean named array whose names are a subset of the logits'.
      masked_out_value: Fill value, or None for ``finfo(dtype).min``.
      layer: Layer name for error messages.

    Returns:
      The masked logits.

    Raises:
      NamedAxisError: If ``keep`` has axes the logits lack.

    Example:
        >>> keep = pzb.nx.wrap(jnp.array([True, False]), "kv_seq")
        >>> apply_mask(pzb.nx.zeros({"kv_seq": 2}), keep, -5.0, "demo").unwrap("kv_seq")
        Array([ 0., -5.], dtype=float32)
    """
    extra = [name for name in keep.named_shape if name not in logits.named_shape]
    if extra or keep.positional_shape:
        raise NamedAxisError(
            f"{layer}: the mask has axes {extra or list(keep.positional_shape)} that the logits lack "
            f"(mask named shape {dict(keep.named_shape)}, positional {keep.positional_shape}; logits named "
            f"shape {dict(logits.named_shape)}). Fix: give the mask only axes of the logits, e.g. "
            "pzb.nx.wrap(mask, 'seq', 'kv_seq')."
        )
    fill = _fill_value(masked_out_value, logits.dtype)
    return elementwise(lambda x, k: jnp.where(k, x, fill), logits, keep, what=layer)


def query_and_key_positions(
    logits: nx.NamedArrayBase,
    side_inputs: dict[str, Any],
    seq_axis: str,
    kv_seq_axis: str,
    positions_input: str,
    kv_positions_input: str,
    layer: str,
) -> tuple[nx.NamedArrayBase, nx.NamedArrayBase]:
    """Query and key positions for a mask, from side inputs or by index.

    Example:
        >>> q, k = query_and_key_positions(pzb.nx.zeros({"seq": 2, "kv_seq": 3}), {}, "seq", "kv_seq",
        ...                                "token_positions", "kv_token_positions", "demo")
        >>> q.unwrap("seq").tolist(), k.unwrap("kv_seq").tolist()
        ([0, 1], [0, 1, 2])
    """
    for name in (seq_axis, kv_seq_axis):
        if name not in logits.named_shape:
            raise NamedAxisError(
                f"{layer}: the logits lack the axis {name!r} (named shape {dict(logits.named_shape)}). "
                f"Fix: configure the mask with the logits' axis names (seq_axis / kv_seq_axis), or rename "
                "the keys' sequence axis with RenameAxes(('seq',), ('kv_seq',))."
            )
    q_pos = side_inputs.get(positions_input)
    if q_pos is None:
        q_pos = nx.arange(seq_axis, logits.named_shape[seq_axis])
    k_pos = side_inputs.get(kv_positions_input)
    if k_pos is None:
        k_pos = nx.arange(kv_seq_axis, logits.named_shape[kv_seq_axis])
    for name, pos, axis in ((positions_input, q_pos, seq_axis), (kv_positions_input, k_pos, kv_seq_axis)):
        if not nx.is_namedarray(pos) or axis not in pos.named_shape:
            found = dict(pos.named_shape) if nx.is_namedarray(pos) else f"a {type(pos).__name__}"
            raise NamedAxisError(
                f"{layer}: side input {name!r} must be a named integer array with axis {axis!r}, found {found}. "
                f"Fix: pass e.g. {name}=pzb.nx.arange({axis!r}, n)."
            )
    return q_pos, k_pos


@pytree_dataclass
class ApplyCausalMask(Layer):
    """Masks logits where the key comes after the query (``kv_pos > q_pos``).

    Attributes:
      masked_out_value: Fill value, or None for ``finfo(dtype).min`` (static).
      seq_axis: Query sequence axis of the logits (static).
      kv_seq_axis: Key sequence axis of the logits (static).
      positions_input: Side input with query positions (static).
      kv_positions_input: Side input with key positions (static).

    Example:
        >>> m = ApplyCausalMask(masked_out_value=-1.0)
        >>> m(pzb.nx.zeros({"seq": 1, "kv_seq": 3}), token_positions=pzb.nx.wrap(jnp.array([1]), "seq")).unwrap("seq", "kv_seq")
        Array([[ 0.,  0., -1.]], dtype=float32)
    """

    masked_out_value: float | None = static_field(default=None)
    seq_axis: str = static_field(default="seq")
    kv_seq_axis: str = static_field(default="kv_seq")
    positions_input: str = static_field(default="token_positions")
    kv_positions_input: str = static_field(default="kv_token_positions")

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        q_pos, k_pos = query_and_key_positions(
            x, side_inputs, self.seq_axis, self.kv_seq_axis, self.positions_input, self.kv_positions_input,
            "ApplyCausalMask",
        )
        return apply_mask(x, k_pos <= q_pos, self.masked_out_value, "ApplyCausalMask")


@pytree_dataclass
class ApplySlidingWindowMask(Layer):
    """Masks logits outside a window of ``window`` positions.

    Causal form (default): a query at ``q`` sees keys ``q - window < k <= q``
    (Mistral-style). With ``causal=False``: keys with ``|q - k| < window``.

    Attributes:
      window: Window size, at least 1 (static).
      causal: Whether keys after the query are masked too (static).
      masked_out_value: Fill value, or None for ``finfo(dtype).min`` (static).
      seq_axis, kv_seq_axis, positions_input, kv_positions_input: As in
        :class:`ApplyCausalMask` (static).

    Example:
        >>> m = ApplySlidingWindowMask(2, masked_out_value=-1.0)
        >>> m(pzb.nx.zeros({"seq": 3, "kv_seq": 3})).unwrap("seq", "kv_seq")
        Array([[ 0., -1., -1.],
               [ 0.,  0., -1.],
               [-1.,  0.,  0.]], dtype=float32)
    """

    window: int = static_field()
    causal: bool = static_field(default=True)
    masked_out_value: float | None = static_field(default=None)
    seq_axis: str = static_field(default="seq")
    kv_seq_axis: str = static_field(default="kv_seq")
    positions_input: str = static_field(default="token_positions")
    kv_positions_input: str = static_field(default="kv_token_positions")

    def __post_init__(self) -> None:
        if not isinstance(self.window, int) or self.window < 1:
            raise NamedAxisError(
                f"ApplySlidingWindowMask: window must be a positive int, found {self.window!r}. "
                "Fix: pass e.g. ApplySlidingWindowMask(window=128)."
            )

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        q_pos, k_pos = query_and_key_positions(
            x, side_inputs, self.seq_axis, self.kv_seq_axis, self.positions_input, self.kv_positions_input,
            "ApplySlidingWindowMask",
        )
        distance = q_pos - k_pos
        keep = (distance >= 0) & (distance < self.window) if self.causal else abs(distance) < self.window
        return apply_mask(x, keep, self.masked_out_value, "ApplySlidingWindowMask")


@pytree_dataclass
class ApplyExplicitMask(Layer):
    """Masks logits where a given boolean mask is False.

    The mask is the ``mask`` field when set, else the side input named
    ``mask_input`` (default ``attn_mask``). It is a boolean named array whose
    axes are a subset of the logits' (e.g. ``seq``/``kv_seq``, optionally
    ``batch`` / ``heads``), broadcast by name.

    Attributes:
      mask: A fixed boolean NamedArray, or None to read the side input.
      mask_input: Side input name (static).
      masked_out_value: Fill value, or None for ``finfo(dtype).min`` (static).

    Example:
        >>> keep = pzb.nx.wrap(jnp.array([True, False]), "kv_seq")
        >>> ApplyExplicitMask(masked_out_value=-1.0)(pzb.nx.zeros({"seq": 1, "kv_seq": 2}), attn_mask=keep).unwrap("seq", "kv_seq")
        Array([[ 0., -1.]], dtype=float32)
    """

    mask: Any = None
    mask_input: str = static_field(default="attn_mask")
    masked_out_value: float | None = static_field(default=None)

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        mask = self.mask if self.mask is not None else side_inputs.get(self.mask_input)
        if mask is None:
            raise NamedAxisError(
                f"ApplyExplicitMask: no mask: the layer's mask field is None and side input {self.mask_input!r} "
                f"was not given (side inputs: {sorted(side_inputs)}). Fix: call the model with "
                f"{self.mask_input}=pzb.nx.wrap(mask, 'seq', 'kv_seq'), or set the mask field."
            )
        if not nx.is_namedarray(mask):
            raise NamedAxisError(
                f"ApplyExplicitMask: the mask must be a boolean named array, found {type(mask).__name__} with "
                f"shape {getattr(mask, 'shape', '?')}. Fix: wrap it, e.g. pzb.nx.wrap(mask, 'seq', 'kv_seq')."
            )
        return apply_mask(x, mask.astype(bool), self.masked_out_value, "ApplyExplicitMask")
