"""Flax NNX ``MultiHeadAttention`` rule: per-head kernels on named axes, masks, GQA, decode cache.

``nnx.MultiHeadAttention`` lifts to :class:`NnxAttention`, whose fields are
the NNX submodules (``query``, ``key``, ``value``, ``out``, optional
``query_ln`` / ``key_ln``) plus every step of the attention kernel as its own
layer, so each can be selected and edited:

    q = query(x)                     # {features} -> {heads, projection}   (kernel (in, H, hd))
    k = key(x), v = value(x)         # {features} -> {kv_heads, projection} (GQA) or {heads, projection}
    q, k = query_ln(q), key_ln(k)    # normalize_qk: LayerNorm over projection
    k, v: seq -> kv_seq              # decode: written into the cache first
    logits  = query_key_to_logits((q, k))   # AttentionLogits, then * 1/sqrt(head_dim)
    logits  = mask(logits)                  # NNX `mask=` argument, `is_causal`, cache validity
    weights = logits_to_weights(logits)     # Softmax over kv_seq
    out     = out(attend_to_values((weights, v)))   # {heads, projection} -> {features}

The op order follows what NNX runs by default (``jax.nn.dot_product_attention``:
logits scaled after the dot product, masked with ``-0.7 * finfo.max``,
softmax in float32). Grouped-query attention (``num_kv_heads < num_heads``)
keeps keys and values on ``kv_heads`` and groups the query heads inside the
contractions, as :mod:`pzbridge.nn.attention` does.

Decode mode: after ``init_cache`` the ``Cache`` Variables ``cached_key``,
``cached_value`` ``(*batch, L, H_kv, hd)`` and ``cache_index`` become
``StateVariable``s holding the raw NNX arrays; a decode call (``decode=True``
side input, or the module's ``decode`` attribute) writes one token at
``cache_index`` and attends over the valid prefix, exactly as NNX does.

Compute dtype: with ``dtype`` set (``bfloat16``, ``float16``) the projections
lift to promoted layers (:mod:`pzbridge.bridge.nnx.linear`) and the kernel
computes as ``jax.nn.dot_product_attention`` does on such queries: logits in
float32 with the dot algorithm JAX picks (:class:`NnxAttentionLogits`), softmax
in float32, weights cast back to ``dtype`` before the weighted sum.

Kept ``Foreign`` (exact, NNX code runs): ``dropout_rate > 0`` (NNX then uses a
different kernel and an RNG stream), a custom ``attention_fn``, non-default
numerics (``precision``, ``dot_general``, promotion functions, projections
computing in another dtype than the module's), non-float32 parameters with
``dtype=None``, ``normalize_qk`` with a ``dtype`` (an ``nnx.LayerNorm`` with a
``dtype`` stays ``Foreign``), and modules with extra data attributes (e.g. after
a ``sow_weights=True`` call stored ``attention_weights``). A lifted call with
``sow_weights=True`` raises: capture ``logits_to_weights`` with
:mod:`pzbridge.toolshed.intermediates` instead (the lowered NNX module sows
as usual). An edited kernel step (a replaced ``mask``, an inserted layer
inside) lowers to an adapter module, since NNX's class cannot express it.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import pzbridge as pzb
    >>> mha = nnx.MultiHeadAttention(num_heads=2, in_features=4, decode=False, rngs=nnx.Rngs(0))
    >>> lifted = pzb.lift(mha)
    >>> dict(lifted.body.query.sublayers[0].weights.value.named_shape)
    {'features': 4, 'heads': 2, 'projection': 2}
    >>> x = jax.random.normal(jax.random.key(0), (1, 3, 4))
    >>> bool(jnp.allclose(lifted.positional(x), mha(x), atol=1e-6))
    True
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.lifted import CallingConvention
from pzbridge.bridge.naming import AxisNaming
from pzbridge.bridge.native_calls import register_keyword_inputs, without_unit_positional
from pzbridge.bridge.nnx.adapter import NnxAdapter
from pzbridge.bridge.nnx.linear import (
    LinearGeneralRule,
    NnxLinearGeneral,
    linear_layers,
    nnx_compute_dtype,
)
from pzbridge.bridge.nnx.norm import LayerNormRule, NnxLayerNorm
from pzbridge.bridge.nnx.statics import (
    NnxStatics,
    build_module,
    fresh_statics,
    has_data,
    statics_match,
)
from pzbridge.bridge.nnx.traversal import lift_foreign, nnx_rule
from pzbridge.bridge.nnx.variables import lift_variable, nnx_variable
from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError, PzbridgeError
from pzbridge.core.named_axes_core import make_named
from pzbridge.core.named_axes_ops import map_data
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.attention import (
    AttendToValues,
    AttentionLogits,
    merge_axes,
    split_axis,
)
from pzbridge.nn.basic import CastToDType, ConstantRescale, RenameAxes, Softmax
from pzbridge.nn.combinators import Sequential
from pzbridge.nn.contraction import contract, data_layout
from pzbridge.nn.layer import Layer
from pzbridge.nn.linear import Linear
from pzbridge.nn.normalization import align_to_layout

DECODE_INDEX = "__nnx_decode_index__"
"""Side input through which :class:`NnxAttention` tells its mask the cache index (decode mode)."""


def large_negative(dtype: Any) -> jax.Array:
    """The fill value ``jax.nn.dot_product_attention`` uses for masked logits.

    Example:
        >>> float(large_negative(jnp.float32)) < -1e38
        True
    """
    top = min(jnp.finfo(dtype).max, jnp.finfo(np.float32).max)
    return jnp.asarray(-0.7 * top, dtype=dtype)


def xla_logits_numerics(dtype: Any) -> tuple[Any, Any]:
    """The ``(precision, result dtype)`` of ``jax.nn.dot_product_attention``'s (XLA) logits for ``dtype`` queries.

    Logits are computed in ``promote_types(dtype, float32)``; half-precision
    queries use the matching ``DotAlgorithmPreset`` (JAX's workaround for
    inconsistent backward-pass types).

    Example:
        >>> xla_logits_numerics(jnp.bfloat16)
        (DotAlgorithmPreset.BF16_BF16_F32, dtype('float32'))
        >>> xla_logits_numerics(jnp.float32)
        (None, dtype('float32'))
    """
    result = jnp.promote_types(dtype, jnp.float32)
    if jnp.dtype(dtype) == jnp.bfloat16:
        return jax.lax.DotAlgorithmPreset.BF16_BF16_F32, result
    if jnp.dtype(dtype) == jnp.float16:
        return jax.lax.DotAlgorithmPreset.F16_F16_F32, result
    return None, result


_QUERY_GROUP = "__nnx_query_group__"


@pytree_dataclass
class NnxAttentionLogits(AttentionLogits):
    """``AttentionLogits`` with the numerics of ``jax.nn.dot_product_attention`` (XLA) for any query dtype.

    The dot product runs with :func:`xla_logits_numerics` of the queries'
    dtype: bfloat16 queries and keys give float32 logits, computed with the
    ``BF16_BF16_F32`` algorithm, as NNX's default attention computes them.
    Heads are grouped as in :class:`~pzbridge.nn.attention.AttentionLogits`.

    Example:
        >>> q = pzb.nx.ones({"seq": 2, "heads": 1, "projection": 3}).astype(jnp.bfloat16)
        >>> k = pzb.nx.ones({"kv_seq": 4, "heads": 1, "projection": 3}).astype(jnp.bfloat16)
        >>> NnxAttentionLogits()((q, k)).dtype
        dtype('float32')
    """

    def __call__(self, x: Any, /, **side_inputs: Any) -> nx.NamedArray:
        query, key = x
        precision, dtype = xla_logits_numerics(query.dtype)
        try:
            return self._logits(query, key, precision, dtype)
        except Exception:  # noqa: BLE001
            # As JAX does: a platform without that dot algorithm (F16_F16_F32 on CPU) uses the default one.
            return self._logits(query, key, None, dtype)

    def _logits(self, query: nx.NamedArrayBase, key: nx.NamedArrayBase, precision: Any, dtype: Any) -> nx.NamedArray:
        axes = (self.projection_axis,)
        grouped = (self.kv_heads_axis != self.heads_axis and self.heads_axis in query.named_shape
                   and self.kv_heads_axis in key.named_shape and self.heads_axis not in key.named_shape)
        if not grouped:
            return contract([query, key], axes, precision=precision, preferred_element_type=dtype)
        split = split_axis(query, self.heads_axis, self.kv_heads_axis, key.named_shape[self.kv_heads_axis],
                           _QUERY_GROUP)
        logits = contract([split, key], axes, precision=precision, preferred_element_type=dtype)
        return merge_axes(logits, self.kv_heads_axis, _QUERY_GROUP, self.heads_axis)


def named_mask(mask: Any, batch_names: tuple[str, ...], core: dict[str, int]) -> nx.NamedArrayBase:
    """An NNX mask ``[batch..., H|1, T|1, S|1]`` as a boolean NamedArray of full size.

    The trailing three dims get the names of ``core`` (``{name: size}`` for
    heads, query and key positions); leading dims are right-aligned with
    ``batch_names`` (sizes taken from the mask; size-1 dims broadcast to the
    ``core`` sizes only).

    Raises:
      NamedAxisError: If the mask's rank or batch dims do not fit.

    Example:
        >>> m = named_mask(jnp.ones((1, 2, 3), bool), (), {"heads": 4, "seq": 2, "kv_seq": 3})
        >>> dict(m.named_shape)
        {'heads': 4, 'seq': 2, 'kv_seq': 3}
    """
    if nx.is_namedarray(mask):
        return mask.astype(bool)
    m = jnp.asarray(mask).astype(bool)
    lead = m.shape[:-3] if m.ndim >= 3 else None
    if lead is None or (len(lead) > len(batch_names) and any(s != 1 for s in lead[: len(lead) - len(batch_names)])):
        raise NamedAxisError(
            f"NnxAttention mask: expected NNX's layout [batch..., heads, q_length, kv_length] with at most "
            f"{len(batch_names)} batch dims (the input's positional batch axes), found shape {m.shape}. Fix: pass "
            f"a mask of that layout, or a NamedArray over (some of) {list(core)} and the batch axis names."
        )
    m = m.reshape(m.shape[max(0, len(lead) - len(batch_names)):])
    names = batch_names[len(batch_names) - (m.ndim - 3):]
    m = jnp.broadcast_to(m, m.shape[:-3] + tuple(core.values()))
    keep_names = [n for n, s in zip(names, m.shape) if s != 1]
    squeezed = m.reshape(tuple(s for n, s in zip(names, m.shape) if s != 1) + m.shape[-3:])
    return nx.wrap(squeezed, *keep_names, *core)


def _broadcast_unit_axes(mask: nx.NamedArrayBase, sizes: Mapping[str, int]) -> nx.NamedArrayBase:
    """``mask`` without its size-1 named axes that the logits lack or hold larger (NNX broadcasts them)."""
    unit = [n for n, s in mask.named_shape.items() if s == 1 and sizes.get(n, 1) != 1 or s == 1 and n not in sizes]
    if not unit:
        return mask
    return nx.nmap(lambda m: m.reshape(m.shape[len(unit):]))(mask.untag_prefix(*unit))


@pytree_dataclass
class NnxAttentionMask(Layer):
    """Masks attention logits the way ``nnx.MultiHeadAttention`` does.

    Combines (logical and) the ``mask`` side input (NNX layout
    ``[batch..., heads, q_length, kv_length]`` with size-1 broadcasting, or a
    NamedArray over the logits' names), a causal mask when the ``is_causal``
    side input is true, and in decode mode the cache validity
    ``kv_position <= cache_index``. Masked logits become
    :func:`large_negative`.

    Attributes:
      heads_axis, seq_axis, kv_seq_axis: The logits' axis names (static).

    Example:
        >>> logits = pzb.nx.zeros({"heads": 1, "seq": 2, "kv_seq": 2})
        >>> out = NnxAttentionMask()(logits, is_causal=True).unwrap("heads", "seq", "kv_seq")
        >>> bool(out[0, 0, 1] < -1e38), float(out[0, 1, 0])
        (True, 0.0)
    """

    heads_axis: str = static_field(default="heads")
    seq_axis: str = static_field(default="seq")
    kv_seq_axis: str = static_field(default="kv_seq")

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        core = (self.heads_axis, self.seq_axis, self.kv_seq_axis)
        data, positional, name_axes = data_layout(x)
        missing = [n for n in core if n not in name_axes]
        if missing:
            raise NamedAxisError(
                f"NnxAttentionMask: logits lack axes {missing} (named shape {dict(x.named_shape)}). "
                "Fix: configure heads_axis / seq_axis / kv_seq_axis to the logits' names."
            )
        keeps = []
        mask = side_inputs.get("mask")
        if mask is not None:
            if not nx.is_namedarray(mask):
                sizes = {n: x.named_shape[n] for n in core}
                mask = named_mask(mask, (), sizes)
            else:
                mask = without_unit_positional(mask)  # Broadcast, as in NNX.
            mask = _broadcast_unit_axes(mask, x.named_shape)
            keeps.append(align_to_layout(mask.astype(bool), data.ndim, name_axes, data.shape,
                                         "NnxAttentionMask mask"))
        seq, kv = name_axes[self.seq_axis], name_axes[self.kv_seq_axis]
        q_pos = jax.lax.broadcasted_iota(jnp.int32, data.shape, seq)
        k_pos = jax.lax.broadcasted_iota(jnp.int32, data.shape, kv)
        if side_inputs.get("is_causal"):
            keeps.append(k_pos <= q_pos)
        index = side_inputs.get(DECODE_INDEX)
        if index is not None:
            keeps.append(k_pos <= index)
        if not keeps:
            return x
        keep = functools.reduce(jnp.logical_and, keeps)
        return make_named(jnp.where(keep, data, large_negative(data.dtype)), positional, name_axes)


@pytree_dataclass
class NnxAttention(Layer):
    """``nnx.MultiHeadAttention`` lifted: projections and kernel steps as separate layers.

    Called on a named array (self-attention) or a tuple ``(inputs_q,
    inputs_k[, inputs_v])`` with axes ``seq`` and ``features``; side inputs
    ``mask``, ``is_causal`` and ``decode`` act as NNX's call arguments.

    Attributes:
      query, key, value: Input projections (``NnxLinearGeneral``).
      query_ln, key_ln: ``normalize_qk`` LayerNorms over ``projection``, or None.
      query_key_to_logits: ``(queries, keys) -> logits`` (scaled; float32 logits,
        :class:`NnxAttentionLogits`, when the module computes in half precision).
      mask: Logits -> masked logits (:class:`NnxAttentionMask`).
      logits_to_weights: Softmax over ``kv_seq`` (then cast to the module's ``dtype``, if set).
      attend_to_values: ``(weights, values) ->`` per-head outputs.
      out: Output projection ``{heads, projection} -> {features}``.
      cached_key, cached_value, cache_index: Decode-cache ``StateVariable``s
        (raw NNX arrays ``(*batch, L, H_kv, hd)`` and a scalar), or None.
      decode: The module's default decode flag (static).
      seq_axis, kv_seq_axis, heads_axis, kv_heads_axis, projection_axis:
        Axis names (static).
      config: The original module's statics (static).
      dtype: The ``dtype`` NNX's ``attention_fn`` promotes queries, keys and
        values to before the kernel (static; None: their promoted type).
    """

    query: Layer
    key: Layer
    value: Layer
    query_ln: Any
    key_ln: Any
    query_key_to_logits: Layer
    mask: Layer
    logits_to_weights: Layer
    attend_to_values: Layer
    out: Layer
    cached_key: Any = None
    cached_value: Any = None
    cache_index: Any = None
    decode: Any = static_field(default=False)
    seq_axis: str = static_field(default="seq")
    kv_seq_axis: str = static_field(default="kv_seq")
    heads_axis: str = static_field(default="heads")
    kv_heads_axis: str = static_field(default="heads")
    projection_axis: str = static_field(default="projection")
    config: Any = static_field(default=None)
    dtype: Any = static_field(default=None)

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        if side_inputs.get("sow_weights"):
            raise PzbridgeError(
                "NnxAttention: sow_weights=True cannot store weights in a lifted layer. Fix: capture the output "
                "of `logits_to_weights` with pzbridge.toolshed.intermediates, or call the lowered NNX module."
            )
        inputs = tuple(x) if isinstance(x, tuple) else (x,)
        if len(inputs) > 3:
            # Called as Equinox attention is, (query, key, value, mask): glue of a model converted from Equinox.
            inputs, side_inputs = self._with_positional_mask(inputs, side_inputs)
        # Contractions need every axis named: positional (batch) axes get temporary names.
        temps = tuple(f"__attention_batch{i}" for i in range(len(inputs[0].positional_shape)))
        if temps:
            inputs = tuple(None if a is None else a.tag(*temps) for a in inputs)
            mask = side_inputs.get("mask")
            if mask is not None and not nx.is_namedarray(mask):
                sizes = {self.heads_axis: self._num_heads(), self.seq_axis: inputs[0].named_shape[self.seq_axis],
                         self.kv_seq_axis: self._kv_length(inputs, side_inputs)}
                side_inputs = {**side_inputs, "mask": named_mask(mask, temps, sizes)}
        out = self._attend(inputs, temps, side_inputs)
        return out.untag(*temps) if temps else out

    def _with_positional_mask(self, inputs: tuple[Any, ...],
                              side_inputs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if len(inputs) > 4 or (inputs[3] is not None and "mask" in side_inputs):
            raise NamedAxisError(
                f"NnxAttention: called with {len(inputs)} inputs{' and a mask= side input' if len(inputs) == 4 else ''}"
                "; expected (query[, key[, value[, mask]]]) with one mask at most. Fix: pass the mask either as "
                "the fourth input or as mask=, not both."
            )
        mask = inputs[3]
        if mask is not None and not (nx.is_namedarray(mask) and not mask.positional_shape):
            raise NamedAxisError(
                f"NnxAttention: a mask passed as the fourth input must be a NamedArray over (some of) "
                f"{[self.heads_axis, self.seq_axis, self.kv_seq_axis]} and batch names, found "
                f"{type(mask).__name__} {getattr(mask, 'shape', '')}. Fix: name its axes, or pass it as mask= in "
                "NNX's layout."
            )
        return inputs[:3], side_inputs if mask is None else {**side_inputs, "mask": mask}

    def _num_heads(self) -> int:
        linear = self.out.sublayers[0] if isinstance(self.out, Sequential) else None
        value = getattr(getattr(linear, "weights", None), "value", None)
        if not nx.is_namedarray(value) or self.heads_axis not in value.named_shape:
            raise NamedAxisError(
                f"NnxAttention: cannot tell the number of heads (the output projection has no {self.heads_axis!r} "
                "axis). Fix: pass the mask as a NamedArray."
            )
        return value.named_shape[self.heads_axis]

    def _kv_length(self, inputs: tuple[Any, ...], side_inputs: dict[str, Any]) -> int:
        decode = side_inputs.get("decode", self.decode)
        if decode and self.cached_key is not None:
            return self.cached_key.value.shape[-3]
        source = inputs[1] if len(inputs) > 1 and inputs[1] is not None else inputs[0]
        return source.named_shape[self.seq_axis]

    def _attend(self, inputs: tuple[Any, ...], temps: tuple[str, ...], side_inputs: dict[str, Any]) -> Any:
        inputs_q = inputs[0]
        inputs_k = inputs[1] if len(inputs) > 1 and inputs[1] is not None else inputs_q
        inputs_v = inputs[2] if len(inputs) > 2 and inputs[2] is not None else inputs_k
        query = self.query(inputs_q, **side_inputs)
        key = self.key(inputs_k, **side_inputs)
        value = self.value(inputs_v, **side_inputs)
        if self.query_ln is not None:
            query = self.query_ln(query, **side_inputs)
        if self.key_ln is not None:
            key = self.key_ln(key, **side_inputs)
        to_kv = RenameAxes((self.seq_axis,), (self.kv_seq_axis,))
        key, value = to_kv(key), to_kv(value)
        decode = side_inputs.get("decode")
        if decode is None:
            decode = self.decode
        if decode:
            key, value, side_inputs = self._write_cache(key, value, temps, side_inputs)
        query, key, value = self._promoted(query, key, value)
        logits = self.query_key_to_logits((query, key), **side_inputs)
        logits = self.mask(logits, **side_inputs)
        weights = self.logits_to_weights(logits, **side_inputs)
        return self.out(self.attend_to_values((weights, value), **side_inputs), **side_inputs)

    def _promoted(self, *arrays: nx.NamedArrayBase) -> tuple[nx.NamedArrayBase, ...]:
        # NNX's dot_product_attention starts with promote_dtype((q, k, v), dtype=dtype): a no-op unless a
        # projection computes in another dtype (a LoRA update in float32 on a bfloat16 projection).
        dtype = nnx_compute_dtype(self.dtype, *(a.data_array for a in arrays))
        return tuple(map_data(lambda data: jnp.asarray(data, dtype), a) for a in arrays)

    def _write_cache(self, key: Any, value: Any, temps: tuple[str, ...],
                     side_inputs: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
        if self.cached_key is None or self.cached_value is None or self.cache_index is None:
            raise PzbridgeError(
                "NnxAttention: decode=True but the autoregressive cache is not initialised. Fix: call "
                "`init_cache(input_shape)` on the NNX module before lifting it."
            )
        core = (self.kv_seq_axis, self.kv_heads_axis, self.projection_axis)
        if key.named_shape.get(self.kv_seq_axis) != 1:
            raise NamedAxisError(
                f"NnxAttention decode: expected one new token along {self.seq_axis!r}, found named shape "
                f"{dict(key.named_shape)}. Fix: decode one token per call, as NNX does."
            )
        # The cache's leading dims are NNX's batch dims: the (temporarily named) positional axes first.
        batch_names = [*temps, *(n for n in key.named_axes if n not in core and n not in temps)]
        index = self.cache_index.value
        results = []
        for variable, chunk in ((self.cached_key, key), (self.cached_value, value)):
            cache = variable.value
            data = chunk.untag(*batch_names, *core).unwrap()
            if data.shape[:-3] != cache.shape[:-3] or data.shape[-2:] != cache.shape[-2:]:
                raise NamedAxisError(
                    f"NnxAttention decode: new entries of shape {data.shape} (batch axes {batch_names}, "
                    f"then {list(core)}) do not fit the cache of shape {cache.shape}. Fix: init_cache with the "
                    "batch shape of the inputs."
                )
            zero = jnp.zeros((), jnp.asarray(index).dtype)
            starts = (zero,) * (cache.ndim - 3) + (index, zero, zero)
            updated = jax.lax.dynamic_update_slice(cache, data.astype(cache.dtype), starts)
            variable.value = updated
            results.append(nx.wrap(updated).tag(*batch_names, *core))
        self.cache_index.value = index + 1
        return results[0], results[1], {**side_inputs, DECODE_INDEX: index}


def _mask_keyword(module: nnx.MultiHeadAttention, naming: AxisNaming | None) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """A native NNX attention takes a mask after its three inputs as ``mask=`` over ``(heads, seq, kv_seq)``."""
    naming = naming or AxisNaming()
    return (("mask", (naming.heads, naming.seq, naming.kv_seq)),)


register_keyword_inputs(nnx.MultiHeadAttention, _mask_keyword)


def _computes_in_float32(dtype: Any) -> bool:
    return dtype is None or jnp.dtype(dtype) == jnp.float32


def kernel_layers(head_dim: int, naming: AxisNaming, kv_heads: str, dtype: Any = None) -> dict[str, Layer]:
    """The kernel steps NNX's default attention performs, as pzbridge layers.

    ``dtype``: the module's compute ``dtype``. Other than None / float32, the
    logits are :class:`NnxAttentionLogits` (float32) and the softmax weights
    are cast back to ``dtype``, as ``jax.nn.dot_product_attention`` does.

    Example:
        >>> sorted(kernel_layers(4, AxisNaming(), "heads"))
        ['attend_to_values', 'logits_to_weights', 'mask', 'query_key_to_logits']
        >>> half = kernel_layers(4, AxisNaming(), "heads", jnp.bfloat16)
        >>> [type(layer).__name__ for layer in half["logits_to_weights"].sublayers]
        ['Softmax', 'CastToDType']
    """
    heads, kv_seq = naming.heads, naming.kv_seq
    scale = ConstantRescale(float(1.0 / np.sqrt(head_dim)))
    if _computes_in_float32(dtype):
        logits: Layer = Sequential([AttentionLogits(naming.projection, heads, kv_heads, kv_seq), scale])
        weights: Layer = Softmax((kv_seq,))
    else:
        logits = Sequential([NnxAttentionLogits(naming.projection, heads, kv_heads, kv_seq), scale])
        weights = Sequential([Softmax((kv_seq,)), CastToDType(dtype)])
    return {
        "query_key_to_logits": logits,
        "mask": NnxAttentionMask(heads, naming.seq, kv_seq),
        "logits_to_weights": weights,
        "attend_to_values": AttendToValues(kv_seq, heads, kv_heads),
    }


@functools.lru_cache(maxsize=None)
def _defaults() -> NnxStatics:
    return fresh_statics(lambda: nnx.MultiHeadAttention(1, 1, rngs=nnx.Rngs(0)))


_KNOBS = ("precision", "attention_fn", "qkv_promote_dtype", "out_promote_dtype", "ln_promote_dtype",
          "qkv_dot_general", "out_dot_general", "qkv_dot_general_cls", "out_dot_general_cls")


_DATA = ("query", "key", "value", "query_ln", "key_ln", "out", "rngs", "cached_key", "cached_value", "cache_index")


def _projection(module: nnx.LinearGeneral, ctx: LiftContext, ins: tuple[str, ...],
                outs: tuple[str, ...]) -> NnxLinearGeneral:
    key = ("nnx-module", id(module))
    done = ctx.shared.by_identity.get(key)
    if done is None:
        done = NnxLinearGeneral(linear_layers(module, ctx, ins, outs), config=NnxStatics.of(module))
        ctx.shared.by_identity[key] = done
        ctx.shared.keep_alive.append(module)
    return done


def _projections_compute_in(projections: list[Any], dtype: Any) -> bool:
    """Every projection outputs the module's compute dtype, so NNX's ``attention_fn`` promotes nothing."""
    if any(p.precision is not None or p.preferred_element_type is not None for p in projections):
        return False
    if dtype is None:
        # The lifted kernel then computes in float32, which NNX infers only from float32 kernels.
        return all(p.dtype is None and p.kernel.get_raw_value().dtype == jnp.float32 for p in projections)
    return all(p.dtype is not None and jnp.dtype(p.dtype) == jnp.dtype(dtype) for p in projections)


def _qk_norm(module: Any, ctx: LiftContext) -> Any:
    if module is None:
        return None
    key = ("nnx-module", id(module))
    if key not in ctx.shared.by_identity:
        p = ctx.naming.projection
        ctx.shared.by_identity[key] = NnxLayerNorm(
            None if module.scale is None else lift_variable(module.scale, ctx.child("scale"), (p,)),
            None if module.bias is None else lift_variable(module.bias, ctx.child("bias"), (p,)),
            (p,), module.epsilon, use_fast_variance=module.use_fast_variance, scale_into_inverse=True,
            dtype_policy="promote", config=NnxStatics.of(module))
        ctx.shared.keep_alive.append(module)
    return ctx.shared.by_identity[key]


@nnx_rule(source=nnx.MultiHeadAttention, lifted=(NnxAttention,))
class MultiHeadAttentionRule:
    """``nnx.MultiHeadAttention`` <-> :class:`NnxAttention`.

    ``query.kernel (in, H, hd)`` -> ``{features, heads, projection}``;
    ``key`` / ``value`` ``(in, H_kv, hd)`` -> ``{features, kv_heads, projection}``
    (``heads`` when not grouped); ``out.kernel (H, hd, out)`` -> ``{heads,
    projection, features}``; biases on the output names; ``query_ln`` /
    ``key_ln`` scales ``{projection}``; ``Cache`` Variables -> raw
    ``StateVariable``s. The calling convention names the trailing
    ``(seq, features)`` of each input.
    """

    def _supported(self, module: nnx.MultiHeadAttention) -> bool:
        # A projection replaced by another module (a lowered LoRALinearGeneral) keeps the attention Foreign.
        projections = [getattr(module, n) for n in ("query", "key", "value", "out")]
        linear_ok = all(type(p) is nnx.LinearGeneral and LinearGeneralRule()._supported(p) for p in projections)
        norms_ok = all(m is None or LayerNormRule()._supported(m) for m in (module.query_ln, module.key_ln))
        return (has_data(module, _DATA) and module.rngs is None and module.dropout_rate == 0.0 and linear_ok
                and norms_ok and statics_match(module, _defaults(), _KNOBS)
                and _projections_compute_in(projections, module.dtype))

    def lift(self, module: nnx.MultiHeadAttention, ctx: LiftContext) -> Any:
        if not self._supported(module):
            return lift_foreign(module, ctx)
        n = ctx.naming
        kv_heads = n.heads if module.num_kv_heads == module.num_heads else n.kv_heads
        f = (n.features,)
        cache = {name: None if getattr(module, name) is None else lift_variable(getattr(module, name), ctx.child(name))
                 for name in ("cached_key", "cached_value", "cache_index")}
        return NnxAttention(
            query=_projection(module.query, ctx.child("query"), f, (n.heads, n.projection)),
            key=_projection(module.key, ctx.child("key"), f, (kv_heads, n.projection)),
            value=_projection(module.value, ctx.child("value"), f, (kv_heads, n.projection)),
            query_ln=_qk_norm(module.query_ln, ctx.child("query_ln")),
            key_ln=_qk_norm(module.key_ln, ctx.child("key_ln")),
            out=_projection(module.out, ctx.child("out"), (n.heads, n.projection), f),
            **kernel_layers(module.head_dim, n, kv_heads, module.dtype),
            **cache,
            decode=module.decode,
            seq_axis=n.seq, kv_seq_axis=n.kv_seq, heads_axis=n.heads, kv_heads_axis=kv_heads,
            projection_axis=n.projection, config=NnxStatics.of(module), dtype=module.dtype,
        )

    def convention(self, module: nnx.MultiHeadAttention, naming: AxisNaming) -> CallingConvention | None:
        if not self._supported(module):
            return None
        names = (naming.seq, naming.features)
        return CallingConvention((names, names, names), names)

    def call_convention(self, module: nnx.MultiHeadAttention, naming: AxisNaming, args: Sequence[Any],
                        kwargs: Mapping[str, Any]) -> CallingConvention | None:
        """The convention of one call site (traced parents ask): a ``mask=`` names ``(heads, seq, kv_seq)``.

        Its side inputs follow the positional inputs in ``inputs``; None
        (the rule's convention) when the call passes other array keywords.
        """
        convention = self.convention(module, naming)
        arrays = [k for k, v in kwargs.items() if hasattr(v, "shape")]
        if convention is None or arrays != ["mask"] or not 1 <= len(args) <= 3:
            return None
        tokens = (naming.seq, naming.features)
        return CallingConvention((tokens,) * len(args) + ((naming.heads, naming.seq, naming.kv_seq),), tokens)

    def lower(self, layer: NnxAttention, ctx: LowerContext) -> Any:
        native = layer.config is not None and all(
            isinstance(getattr(layer, name), NnxLinearGeneral) and getattr(layer, name).config is not None
            for name in ("query", "key", "value", "out"))
        if native:
            naming = AxisNaming(seq=layer.seq_axis, kv_seq=layer.kv_seq_axis, heads=layer.heads_axis,
                                projection=layer.projection_axis)
            expected = kernel_layers(layer.config["head_dim"], naming, layer.kv_heads_axis, layer.dtype)
            native = all(getattr(layer, name) == value for name, value in expected.items())
        if not native:
            names = (layer.seq_axis, layer.query.sublayers[0].in_axis_names[0]
                     if isinstance(layer.query, Sequential) and layer.query.sublayers
                     and isinstance(layer.query.sublayers[0], Linear) else "features")
            return NnxAdapter.wrap(layer, ctx, CallingConvention((names, names, names), names))
        data = {name: ctx.lower(getattr(layer, name), name) for name in ("query", "key", "value", "out")}
        for name in ("query_ln", "key_ln"):
            data[name] = None if getattr(layer, name) is None else ctx.lower(getattr(layer, name), name)
        for name in ("cached_key", "cached_value", "cache_index"):
            variable = getattr(layer, name)
            data[name] = None if variable is None else nnx_variable(variable, ctx.child(name))
        data["rngs"] = None
        return build_module(nnx.MultiHeadAttention, layer.config.replace(decode=layer.decode, dtype=layer.dtype), data)
