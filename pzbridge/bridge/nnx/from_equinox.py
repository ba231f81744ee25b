"""Cross lowering into Flax NNX: layers lifted from Equinox (or built in pzbridge) become native NNX classes.

A layer lifted from Equinox is framework-neutral data, so ``pzb.lower(lifted,
framework="nnx")`` can build the NNX counterpart instead of an adapter. The
rules here are registered for the *generic* pzbridge classes (``LayerNorm``,
``Conv`` ...): lower rules match along the MRO, so they catch ``EqxLayerNorm``
and friends, while the NNX-lifted subclasses (``NnxLayerNorm`` ...) keep their
own rules (``lower(lift(m))`` stays the identity for NNX models).

The contract every rule meets: for a lifted layer ``L`` and ``native =
lower(L)``, calling ``native`` positionally with arrays laid out as NNX's own
lift rule records for that class (``convention_of(native)``: channels last,
leading batch axes) gives what ``L`` gives on the same named arrays, within a
few ulps (NNX multiplies the scale into ``rsqrt(var + eps)`` first, Equinox
after: not bitwise). Equality assumes float32 inputs: Equinox norms compute in
at least float32 and return the input dtype, NNX returns the promoted dtype.

A rule builds the native module only when the lifted layer carries every
setting NNX needs and NNX can express it; otherwise it *declines* and the
layer lowers exactly as it did before (the adapter fallback rule). What
declines: an Equinox ``RMSNorm`` with a bias (``nnx.RMSNorm`` has none),
multi-axis norms, ``replicate`` padding and circular / reflect padding other
than NNX's centred pairs, grouped or circular transposed convolutions, a
per-channel ``PReLU`` slope (``nnx.PReLU`` has a scalar slope), a dropout that
splits its key along an axis (Equinox attention dropout), and the attention,
cell, ``BatchNorm`` and sequence cases each rule names.

Stochastic layers are equal in deterministic (inference) mode: an NNX
``Dropout`` draws its mask from its own ``RngStream`` (a lifted
``RandomStream`` becomes one, with the same key and count), an Equinox one
from the ``key`` argument, so training-mode masks differ. Embedding lookups
are equal for in-range ids (Equinox clamps an out-of-range id, ``jnp.take``
in NNX fills it).

See ``docs/architecture.md`` for how rule tables drive lowering.

Example:
    >>> import jax, jax.numpy as jnp, equinox as eqx
    >>> from flax import nnx
    >>> import pzbridge as pzb
    >>> norm = eqx.nn.LayerNorm(4, eps=1e-3)
    >>> native = pzb.lower(pzb.lift(norm), framework="nnx")
    >>> type(native).__name__, native.epsilon
    ('LayerNorm', 0.001)
    >>> x = jax.random.normal(jax.random.key(0), (2, 4))
    >>> bool(jnp.allclose(native(x), jax.vmap(norm)(x), atol=1e-5))
    True
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from flax import nnx

from pzbridge.bridge.context import LowerContext
from pzbridge.bridge.equinox.attention import EqxMultiheadAttention, _features
from pzbridge.bridge.equinox.attention import _parse as _parse_attention
from pzbridge.bridge.equinox.linear import EqxMLP
from pzbridge.bridge.equinox.recurrent import EqxCell, _gru_fits, _lstm_fits
from pzbridge.bridge.equinox.sequential import EqxSequential, PositionalJoin
from pzbridge.bridge.naming import AxisNaming
from pzbridge.bridge.nnx.adapter import NnxAdapter
from pzbridge.bridge.nnx.containers import ELEMENTWISE_FUNCTIONS, NnxFunction
from pzbridge.bridge.nnx.conv import _conv_fields, _kernel_names, _transpose_fields
from pzbridge.bridge.nnx.recurrent import CellRule, NnxCell
from pzbridge.bridge.nnx.recurrent import _config as _cell_config
from pzbridge.bridge.nnx.statics import NnxStatics, build_module, fresh_statics
from pzbridge.bridge.nnx.traversal import NNX, convention_of
from pzbridge.bridge.nnx.variables import nnx_variable, storage_names
from pzbridge.core import named_axes as nx
from pzbridge.nn.activations import PReLU
from pzbridge.nn.basic import Elementwise
from pzbridge.nn.combinators import Identity, Sequential
from pzbridge.nn.conv import Conv, kernel_axis_name
from pzbridge.nn.conv_transpose import ConvTranspose, transposed_padding
from pzbridge.nn.dropout import Dropout
from pzbridge.nn.embeddings import EmbeddingLookup
from pzbridge.nn.linear import AddBias, Linear, weight_output_name
from pzbridge.nn.normalization import (
    BatchNorm,
    GroupNorm,
    InstanceNorm,
    LayerNorm,
    RMSNorm,
)
from pzbridge.nn.padding import dilated_size
from pzbridge.nn.recurrent import GRUCell, LSTMCell

_FALLBACK: Any = NNX.lower_rule_for(object)  # The adapter rule: what these layers lowered to before.


def decline(layer: Any, ctx: LowerContext) -> Any:
    """Lowers ``layer`` as if no cross rule existed: through the fallback (adapter) rule.

    Example:
        >>> import pzbridge as pzb
        >>> from pzbridge.bridge.nnx.traversal import new_lower_context
        >>> type(decline(pzb.nn.Identity(), new_lower_context())).__name__
        'NnxAdapter'
    """
    return _FALLBACK.lower(layer, ctx)


def _names(variable: Any) -> tuple[str, ...]:
    return storage_names(variable) if variable is not None else ()


def _once(ctx: LowerContext, tag: str, source: Any, make: Callable[[], Any]) -> Any:
    """``make()`` once per ``(tag, source)`` in this lowering: a re-laid-out copy stays shared.

    Keyed apart from ``ctx.cached`` (which maps a variable to its Variable in
    storage layout, and a layer to its lowered module), so an adapter lowering
    the same variable or layer elsewhere still gets its own layout.
    """
    memo: dict[Any, Any] = ctx.shared.by_identity
    key = ("nnx-from-equinox", tag, id(source))
    if key not in memo:
        memo[key] = make()
        ctx.shared.keep_alive.append(source)
    return memo[key]


def _flat_param(variable: Any, ctx: LowerContext, first: str) -> nnx.Param:
    """An ``nnx.Param`` holding ``variable`` flattened to 1-d (an Equinox conv bias ``(C, 1, ..., 1)``)."""
    names = storage_names(variable)
    order = (first, *[n for n in names if n != first])
    return _once(ctx, "flat", variable, lambda: nnx.Param(ctx.array(variable, order).reshape(-1)))


# --- LayerNorm / RMSNorm -------------------------------------------------------------------------------


def _norm_setup(layer: Any) -> tuple[str, int, Any] | None:
    """``(axis, size, param dtype)`` of a one-axis norm whose scale / bias span exactly that axis, else None."""
    if len(layer.across_axes) != 1 or isinstance(layer, InstanceNorm):
        return None
    (axis,) = layer.across_axes
    params = [p for p in (layer.scale, layer.bias) if p is not None]
    if any(_names(p) != (axis,) for p in params):
        return None
    if params:
        value = params[0].value
        return axis, int(value.named_shape[axis]), value.dtype
    origin = getattr(layer, "origin", None)
    shape = origin.get("shape") if origin is not None else None
    if not isinstance(shape, tuple) or len(shape) != 1:
        return None  # No parameter and no recorded size: nnx needs num_features.
    return axis, int(shape[0]), jnp.float32


def _norm_dtype(layer: Any) -> tuple[bool, Any]:
    """Whether NNX can compute in this norm's dtype policy, and the NNX ``dtype``."""
    if layer.dtype_policy == "input":
        return layer.dtype is None, None  # Equal for float32 inputs (see the module docstring).
    return True, layer.dtype


class LayerNormCrossRule:
    """``LayerNorm`` (e.g. lifted from ``eqx.nn.LayerNorm(d)``) -> ``nnx.LayerNorm(d)``.

    ``epsilon``, scale / bias presence and ``use_fast_variance`` carry over;
    the normalised axis (``features``) is NNX's trailing feature axis.
    """

    def lower(self, layer: LayerNorm, ctx: LowerContext) -> Any:
        setup = _norm_setup(layer)
        ok, dtype = _norm_dtype(layer)
        if setup is None or not ok:
            return decline(layer, ctx)
        axis, size, param_dtype = setup
        config = fresh_statics(lambda: nnx.LayerNorm(
            size, epsilon=layer.epsilon, dtype=dtype, param_dtype=param_dtype, use_bias=layer.bias is not None,
            use_scale=layer.scale is not None, use_fast_variance=layer.use_fast_variance, rngs=nnx.Rngs(0)))
        return build_module(nnx.LayerNorm, config, {
            "scale": None if layer.scale is None else nnx_variable(layer.scale, ctx.child("scale"), (axis,)),
            "bias": None if layer.bias is None else nnx_variable(layer.bias, ctx.child("bias"), (axis,)),
        })


class RMSNormCrossRule:
    """``RMSNorm`` without a bias -> ``nnx.RMSNorm`` (``epsilon``, scale presence); with a bias it declines.

    Equinox's ``RMSNorm`` has a bias by default; build it with
    ``use_bias=False`` to get a native ``nnx.RMSNorm``.
    """

    def lower(self, layer: RMSNorm, ctx: LowerContext) -> Any:
        setup = _norm_setup(layer)
        ok, dtype = _norm_dtype(layer)
        if setup is None or not ok or layer.bias is not None:
            return decline(layer, ctx)
        axis, size, param_dtype = setup
        config = fresh_statics(lambda: nnx.RMSNorm(
            size, epsilon=layer.epsilon, dtype=dtype, param_dtype=param_dtype, use_scale=layer.scale is not None,
            rngs=nnx.Rngs(0)))
        scale = None if layer.scale is None else nnx_variable(layer.scale, ctx.child("scale"), (axis,))
        return build_module(nnx.RMSNorm, config, {"scale": scale})


# --- Conv / ConvTranspose ------------------------------------------------------------------------------


def _centred(padding: Any, window: tuple[int, ...], strides: tuple[int, ...], dilation: tuple[int, ...]) -> bool:
    """The padding is NNX's implicit ``CIRCULAR`` / ``REFLECT`` padding ``((e-1)//2, e//2)``."""
    pairs = [((e - 1) // 2, e // 2) for e in map(dilated_size, window, dilation)]
    if padding == "SAME":
        return all(s == 1 for s in strides)  # stride 1: SAME is exactly the centred pairs.
    return not isinstance(padding, str) and [tuple(p) for p in padding] == pairs


def _window(layer: Any) -> tuple[int, ...] | None:
    shape = layer.kernel.value.named_shape
    names = [kernel_axis_name(s) for s in layer.spatial_axes]
    return tuple(int(shape[n]) for n in names) if all(n in shape for n in names) else None


def _conv_setup(layer: Any, swapped: bool) -> tuple[tuple[str, ...], int, int, tuple[int, ...]] | None:
    """``(kernel names in NNX order, in features, out features, window)``, or None if the kernel is not a conv kernel."""
    if not 1 <= layer.num_spatial_dims <= 3 or not nx.is_namedarray(getattr(layer.kernel, "value", None)):
        return None
    names = _kernel_names(layer.spatial_axes, layer.in_channel_axis, layer.out_channel_axis, swapped)
    window = _window(layer)
    if window is None or set(storage_names(layer.kernel)) != set(names):
        return None
    shape = layer.kernel.value.named_shape
    if layer.bias is not None:
        bias_names = _names(layer.bias)
        units = [n for n in bias_names if n != layer.out_channel_axis]
        if layer.out_channel_axis not in bias_names or any(layer.bias.value.named_shape[n] != 1 for n in units):
            return None
    out = shape[names[-2] if swapped else names[-1]]
    return names, int(shape[layer.in_channel_axis]) * layer.groups, int(out), window


def _bias(layer: Any, ctx: LowerContext) -> Any:
    if layer.bias is None:
        return None
    if len(_names(layer.bias)) == 1:
        return nnx_variable(layer.bias, ctx.child("bias"), (layer.out_channel_axis,))
    return _flat_param(layer.bias, ctx.child("bias"), layer.out_channel_axis)


_FIELDS = ("strides", "padding", "padding_mode", "dilation", "groups", "precision")


def _fields_agree(layer: Any, fields: dict[str, Any] | None, extra: tuple[str, ...] = ()) -> bool:
    """NNX's config, read back as the NNX lift rule reads it, gives the lifted layer's own fields."""
    if fields is None or fields.pop("num_spatial") != layer.num_spatial_dims:
        return False
    return all(getattr(layer, k) == fields[k] for k in (*_FIELDS, *extra) if k in fields)


class ConvCrossRule:
    """``Conv`` (e.g. lifted from ``eqx.nn.Conv2d``) -> ``nnx.Conv``.

    Kernel ``{channels_out, channels, kernel_<spatial>...}`` (Equinox ``(O, I,
    *k)``) -> NNX ``(*k, I, O)``; the bias ``(O, 1, ..., 1)`` -> ``(O,)``.
    Strides, explicit or ``SAME`` / ``VALID`` padding, dilation, input dilation
    and ``feature_group_count`` carry over; ``circular`` / ``reflect`` padding
    becomes NNX's ``CIRCULAR`` / ``REFLECT`` where the pads are NNX's centred
    ones. The call is channels last, ``(*batch, *spatial, channels)``.
    """

    def lower(self, layer: Conv, ctx: LowerContext) -> Any:
        setup = _conv_setup(layer, swapped=False)
        if setup is None:
            return decline(layer, ctx)
        names, c_in, c_out, window = setup
        padding: Any = layer.padding
        if layer.padding_mode in ("circular", "reflect"):
            if not _centred(layer.padding, window, layer.strides, layer.dilation):
                return decline(layer, ctx)
            padding = layer.padding_mode.upper()
        elif layer.padding_mode != "zeros" or (isinstance(layer.padding, str) and layer.padding not in ("SAME", "VALID")):
            return decline(layer, ctx)  # replicate padding; SAME_LOWER / CAUSAL strings
        dtype = layer.kernel.value.dtype

        def make() -> Any:
            return nnx.Conv(c_in, c_out, window, strides=layer.strides, padding=padding,
                            input_dilation=layer.input_dilation, kernel_dilation=layer.dilation,
                            feature_group_count=layer.groups, use_bias=layer.bias is not None,
                            param_dtype=dtype, precision=layer.precision, rngs=nnx.Rngs(0))

        config = fresh_statics(make)
        if not _fields_agree(layer, _conv_fields(config.__getitem__), ("input_dilation",)):
            return decline(layer, ctx)
        return build_module(nnx.Conv, config, {"kernel": nnx_variable(layer.kernel, ctx.child("kernel"), names),
                                                "bias": _bias(layer, ctx)})


class ConvTransposeCrossRule:
    """``ConvTranspose`` (e.g. lifted from ``eqx.nn.ConvTranspose2d``) -> ``nnx.ConvTranspose``.

    Both convolve the stride-dilated input with unit strides; the pzbridge
    layer's forward padding and ``output_padding`` become the explicit pads of
    that convolution (what NNX's ``padding`` pairs are), ``flip_kernel``
    becomes ``transpose_kernel`` (kernel ``(*k, O, I)``), else the kernel is
    ``(*k, I, O)`` as for ``Conv``. Grouped (NNX has no groups) and circular
    transposed convolutions decline.
    """

    def lower(self, layer: ConvTranspose, ctx: LowerContext) -> Any:
        swapped = bool(layer.flip_kernel)
        setup = _conv_setup(layer, swapped)
        if setup is None or layer.groups != 1 or layer.padding_mode != "zeros" or layer.padding == "CAUSAL":
            return decline(layer, ctx)
        names, c_in, c_out, window = setup
        pads = transposed_padding(layer.padding, window, layer.strides, layer.output_padding, layer.dilation)
        dtype = layer.kernel.value.dtype

        def make() -> Any:
            return nnx.ConvTranspose(c_in, c_out, window, strides=layer.strides, padding=pads,
                                     kernel_dilation=layer.dilation, use_bias=layer.bias is not None,
                                     param_dtype=dtype, precision=layer.precision, transpose_kernel=swapped,
                                     rngs=nnx.Rngs(0))

        config = fresh_statics(make)
        fields = _transpose_fields(config.__getitem__)
        # NNX's pads read back as forward padding with output_padding 0: the same underlying convolution.
        if fields is None or transposed_padding(fields["padding"], window, fields["strides"], (0,) * len(window),
                                                fields["dilation"]) != pads:
            return decline(layer, ctx)
        return build_module(nnx.ConvTranspose, config, {
            "kernel": nnx_variable(layer.kernel, ctx.child("kernel"), names), "bias": _bias(layer, ctx)})


# --- Embedding, Dropout, PReLU, GroupNorm -------------------------------------------------------------


class EmbeddingCrossRule:
    """``EmbeddingLookup`` over a ``{vocabulary, features}`` table (e.g. ``eqx.nn.Embedding``) -> ``nnx.Embed``.

    Token ids are the positional input (any leading shape); the table is
    ``(num_embeddings, features)`` in both frameworks, so the very buffer is
    kept.
    """

    def lower(self, layer: EmbeddingLookup, ctx: LowerContext) -> Any:
        table = layer.table
        names = _names(table.embeddings)
        vocab = table.vocabulary_axis
        if len(names) != 2 or vocab not in names or layer.dtype is not None:
            return decline(layer, ctx)
        order = (vocab, next(n for n in names if n != vocab))
        shape = table.embeddings.value.named_shape
        num, features, dtype = int(shape[order[0]]), int(shape[order[1]]), table.embeddings.value.dtype
        if num < 2:
            return decline(layer, ctx)  # nnx.Embed broadcasts a one-row table instead of looking it up.
        config = fresh_statics(lambda: nnx.Embed(num, features, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))
        return build_module(nnx.Embed, config, {
            "embedding": nnx_variable(table.embeddings, ctx.child("embedding"), order)})


def _stream(layer: Dropout, ctx: LowerContext) -> Any:
    """The lifted ``RandomStream`` as an ``nnx.RngStream`` (same key, count), or None."""
    stream = layer.random_stream
    if stream is None:
        return None

    def make() -> nnx.RngStream:
        rng = nnx.RngStream(stream.base_key, tag="dropout")
        offset = stream.offset
        count = getattr(offset, "value", offset)
        rng.count = nnx.RngCount(jnp.asarray(nx.wrap(count).unwrap() if nx.is_namedarray(count) else count,
                                             jnp.uint32), tag="dropout")
        return rng

    return ctx.cached(stream, make)


class DropoutCrossRule:
    """``Dropout`` (e.g. lifted from ``eqx.nn.Dropout(p, inference)``) -> ``nnx.Dropout(rate, deterministic)``.

    A held ``RandomStream`` becomes the module's ``rngs`` stream; without one
    (Equinox dropout takes a key per call) ``rngs`` is None and an NNX call
    in training mode passes ``rngs=``. Equal in deterministic mode.
    """

    def lower(self, layer: Dropout, ctx: LowerContext) -> Any:
        if layer.broadcast_axes or getattr(layer, "split_axis", None) is not None:
            return decline(layer, ctx)
        config = fresh_statics(lambda: nnx.Dropout(layer.rate, deterministic=layer.deterministic))
        return build_module(nnx.Dropout, config, {"rngs": _stream(layer, ctx.child("rngs"))})


class PReLUCrossRule:
    """``PReLU`` with one scalar slope (e.g. ``eqx.nn.PReLU()``) -> ``nnx.PReLU``; a per-channel slope declines."""

    def lower(self, layer: PReLU, ctx: LowerContext) -> Any:
        value: Any = getattr(layer.alpha, "value", None)
        raw = value.unwrap() if nx.is_namedarray(value) and not value.named_shape else value
        if getattr(raw, "ndim", None) != 0 or layer.dtype is not None:
            return decline(layer, ctx)
        config = fresh_statics(lambda: nnx.PReLU(param_dtype=raw.dtype))
        return build_module(nnx.PReLU, config, {
            "negative_slope": nnx_variable(layer.alpha, ctx.child("negative_slope"), ())})


class GroupNormCrossRule:
    """``GroupNorm`` over a channel axis (e.g. ``eqx.nn.GroupNorm(G, C)``) -> ``nnx.GroupNorm(C, num_groups=G)``.

    NNX is channels last: the call is ``(batch, *spatial, channels)`` and NNX
    reduces every axis after the leading batch axis. Scale and bias must both
    be present or both absent (Equinox's ``channelwise_affine``) or NNX's
    ``use_scale`` / ``use_bias`` say which.
    """

    def lower(self, layer: GroupNorm, ctx: LowerContext) -> Any:
        c = layer.channel_axis
        params = [p for p in (layer.scale, layer.bias) if p is not None]
        ok, dtype = _norm_dtype(layer)
        origin = getattr(layer, "origin", None)
        size = int(params[0].value.named_shape[c]) if params else (origin.get("channels") if origin else None)
        if size is None or not ok or any(_names(p) != (c,) for p in params):
            return decline(layer, ctx)
        param_dtype = params[0].value.dtype if params else jnp.float32
        config = fresh_statics(lambda: nnx.GroupNorm(
            size, num_groups=layer.groups, epsilon=layer.epsilon, dtype=dtype, param_dtype=param_dtype,
            use_bias=layer.bias is not None, use_scale=layer.scale is not None,
            use_fast_variance=layer.use_fast_variance, rngs=nnx.Rngs(0)))
        return build_module(nnx.GroupNorm, config, {
            "scale": None if layer.scale is None else nnx_variable(layer.scale, ctx.child("scale"), (c,)),
            "bias": None if layer.bias is None else nnx_variable(layer.bias, ctx.child("bias"), (c,)),
        })


class BatchNormCrossRule:
    """A plain ``BatchNorm`` (mode ``"batch"``, no debiasing) over one feature axis -> ``nnx.BatchNorm``.

    The running statistics become ``nnx.BatchStat`` Variables holding the same
    arrays; ``momentum`` means the same in both (``new = momentum * old +
    (1 - momentum) * batch``), ``use_running_average`` is the train / eval
    switch, and NNX reduces over every axis but the trailing features.

    ``eqx.nn.BatchNorm`` declines in both of its modes: mode ``"batch"``
    debiases the running statistics in inference (divides by ``1 - momentum **
    count``) and mode ``"ema"`` normalises training batches with the updated
    running statistics; ``nnx.BatchNorm`` does neither, so its statistics and
    outputs would drift apart from Equinox's during training.
    """

    def lower(self, layer: BatchNorm, ctx: LowerContext) -> Any:
        names = _names(layer.running_mean)
        ok, dtype = _norm_dtype(layer)
        params = [p for p in (layer.scale, layer.bias) if p is not None]
        if (layer.mode != "batch" or layer.debias or not ok or len(names) != 1 or _names(layer.running_var) != names
                or any(_names(p) != names for p in params) or names[0] in layer.across_axes):
            return decline(layer, ctx)
        (axis,) = names
        value = layer.running_mean.value
        size, param_dtype = int(value.named_shape[axis]), (params[0].value.dtype if params else value.dtype)
        config = fresh_statics(lambda: nnx.BatchNorm(
            size, use_running_average=layer.use_running_average, momentum=layer.momentum, epsilon=layer.epsilon,
            dtype=dtype, param_dtype=param_dtype, use_bias=layer.bias is not None, use_scale=layer.scale is not None,
            use_fast_variance=layer.use_fast_variance, rngs=nnx.Rngs(0)))
        return build_module(nnx.BatchNorm, config, {
            "mean": nnx_variable(layer.running_mean, ctx.child("mean"), names, default_type=nnx.BatchStat),
            "var": nnx_variable(layer.running_var, ctx.child("var"), names, default_type=nnx.BatchStat),
            "scale": None if layer.scale is None else nnx_variable(layer.scale, ctx.child("scale"), names),
            "bias": None if layer.bias is None else nnx_variable(layer.bias, ctx.child("bias"), names),
        })


# --- MultiheadAttention ---------------------------------------------------------------------------------


def _projection_parts(sub: Any, ins: str, outs: str) -> tuple[Linear, AddBias | None] | None:
    """``(linear, bias)`` of a lifted Equinox projection ``[Linear(ins -> outs), AddBias?]``, else None."""
    layers = getattr(sub, "sublayers", None)
    if not isinstance(sub, Sequential) or not layers or len(layers) > 2 or type(layers[0]) is not Linear:
        return None
    linear, bias = layers[0], (layers[1] if len(layers) == 2 else None)
    if (linear.in_axis_names, linear.out_axis_names) != ((ins,), (outs,)):
        return None
    if bias is not None and (type(bias) is not AddBias or _names(bias.bias) != (outs,)):
        return None
    return linear, bias


def _general(statics: NnxStatics, kernel: Any, bias: Any) -> Any:
    return build_module(nnx.LinearGeneral, statics, {"kernel": nnx.Param(kernel),
                                                     "bias": None if bias is None else nnx.Param(bias)})


class MultiheadAttentionCrossRule:
    """``EqxMultiheadAttention`` (``eqx.nn.MultiheadAttention``) -> ``nnx.MultiHeadAttention``.

    Equinox's flat projections ``(H*d, in)`` become NNX's per-head kernels:
    ``query.kernel = W_q.T.reshape(in, H, d)`` (heads major, as Equinox's
    ``reshape(L, H, -1)``), ``out.kernel = W_o.T.reshape(H, d, out)``; biases
    likewise. ``query_size`` -> ``in_features``, ``key_size`` (= ``value_size``)
    -> ``in_kv_features``, ``H * qk_size`` -> ``qkv_features``, ``output_size``
    -> ``out_features``. NNX scales logits after the product, Equinox divides
    the queries first: equal within ulps. Equinox's boolean mask ``(q_seq,
    kv_seq)`` is NNX's ``mask=`` broadcast over ``(batch, heads)``.

    Declines (adapter) where NNX has one setting for several Equinox ones:
    ``key_size != value_size``, ``qk_size != vo_size``, biases on only some
    projections, attention dropout with ``p > 0`` (NNX keeps such a module
    ``Foreign`` when lifting it back, and draws from its own stream), or an
    edited attention.
    """

    def lower(self, layer: EqxMultiheadAttention, ctx: LowerContext) -> Any:
        parts = _parse_attention(layer)
        if parts is None:
            return decline(layer, ctx)
        return self._build(layer, parts, ctx)

    def _build(self, layer: EqxMultiheadAttention, parts: tuple[Any, ...], ctx: LowerContext) -> Any:
        _, _, _, _, dropout = parts
        f, p = _features(layer), layer.projection_axis
        steps: dict[str, Any] = {name: getattr(layer, name).sublayers for name in (
            "input_to_query", "input_to_key", "input_to_value", "query_key_to_logits", "attn_value_to_output")}
        found = [_projection_parts(steps[name][0], f, p) for name in ("input_to_query", "input_to_key", "input_to_value")]
        found.append(_projection_parts(steps["attn_value_to_output"][2], p, f))
        projections = [part for part in found if part is not None]
        split = steps["input_to_query"][1]
        if len(projections) != 4 or dropout.rate != 0 or split.axis != p or split.second != p:
            return decline(layer, ctx)
        q, k, v, o = projections
        heads = split.first_size
        shapes = {name: dict(part[0].weights.value.named_shape) for name, part in zip("qkvo", (q, k, v, o))}
        in_q, in_k, in_v = shapes["q"][f], shapes["k"][f], shapes["v"][f]
        qk, vo = shapes["q"][p], shapes["v"][p]
        use_bias = {part[1] is not None for part in (q, k, v, o)}
        logits = steps["query_key_to_logits"]
        if (in_k != in_v or qk != vo or shapes["k"][p] != qk or shapes["o"][p] != vo or len(use_bias) != 1
                or qk % heads or logits[0].by != math.sqrt(qk // heads)):
            return decline(layer, ctx)
        head_dim, out = qk // heads, shapes["o"][f]
        dtype = q[0].weights.value.dtype
        abstract = nnx.eval_shape(lambda: nnx.MultiHeadAttention(
            heads, in_q, qkv_features=qk, out_features=out, in_kv_features=in_k, use_bias=use_bias.pop(),
            param_dtype=dtype, decode=False, keep_rngs=False, rngs=nnx.Rngs(0)))

        def projection(name: str, part: tuple[Linear, AddBias | None], sub: LowerContext) -> Any:
            linear, bias = part
            out_name = weight_output_name(p, (f,))
            kernel = sub.child("kernel").array(linear.weights, (f, out_name)).reshape(-1, heads, head_dim)
            b = None if bias is None else sub.child("bias").array(bias.bias, (p,)).reshape(heads, head_dim)
            return _general(NnxStatics.of(getattr(abstract, name)), kernel, b)

        def output(part: tuple[Linear, AddBias | None], sub: LowerContext) -> Any:
            linear, bias = part
            kernel = sub.child("kernel").array(linear.weights, (p, weight_output_name(f, (p,))))
            b = None if bias is None else sub.child("bias").array(bias.bias, (f,))
            return _general(NnxStatics.of(abstract.out), kernel.reshape(heads, head_dim, -1), b)

        data = {
            "query": _once(ctx, "heads-in", q[0], lambda: projection("query", q, ctx.child("query"))),
            "key": _once(ctx, "heads-in", k[0], lambda: projection("key", k, ctx.child("key"))),
            "value": _once(ctx, "heads-in", v[0], lambda: projection("value", v, ctx.child("value"))),
            "out": _once(ctx, "heads-out", o[0], lambda: output(o, ctx.child("out"))),
            "query_ln": None, "key_ln": None, "cached_key": None, "cached_value": None, "cache_index": None,
        }
        return build_module(nnx.MultiHeadAttention, NnxStatics.of(abstract), data)


# --- GRU / LSTM cells ---------------------------------------------------------------------------------


def _all_zero(variable: Any) -> bool:
    """The variable's value is concretely all zeros (False under tracing: cannot be checked)."""
    value: Any = getattr(variable, "value", None)
    raw = value.unwrap(*value.named_shape) if nx.is_namedarray(value) else value
    try:
        return bool(jnp.all(raw == 0))
    except jax.errors.ConcretizationTypeError:
        return False


class EqxCellCrossRule:
    """``EqxCell`` (``eqx.nn.GRUCell`` / ``eqx.nn.LSTMCell``) -> ``nnx.GRUCell`` / ``nnx.OptimizedLSTMCell``.

    Both frameworks fuse the gates (GRU ``r, z, n``; LSTM ``i, f, g, o``):
    Equinox ``weight_ih (G*H, in)`` -> NNX ``dense_i.kernel (in, G*H)``,
    ``weight_hh`` -> ``dense_h.kernel``. The GRU's input bias is NNX's
    ``dense_i.bias``; NNX has no recurrent candidate bias, so a GRU lowers
    natively only when Equinox's ``bias_n`` is (concretely) zero, else it
    declines. The LSTM's single bias is NNX's ``dense_h.bias`` (a sum either
    way); ``OptimizedLSTMCell`` is ``nnx.LSTMCell``'s maths with fused kernels,
    so Equinox's buffers are kept (transposed, not split).

    Calling conventions differ: Equinox ``cell(x, hidden) -> hidden`` with the
    LSTM hidden ``(h, c)``, NNX ``cell(carry, x) -> (carry, y)`` with the LSTM
    carry ``(c, h)``; the converter reorders the arguments.
    """

    def lower(self, layer: EqxCell, ctx: LowerContext) -> Any:
        cell = layer.cell
        native: Any
        make: Callable[[int, int], Any]
        if isinstance(cell, GRUCell) and _gru_fits(cell):
            if cell.recurrent_bias is not None and not _all_zero(cell.recurrent_bias):
                return decline(layer, ctx)
            native = dataclasses.replace(cell, update="interpolate", recurrent_bias=None)
            make = lambda i, h: nnx.GRUCell(i, h, rngs=nnx.Rngs(0))
        elif isinstance(cell, LSTMCell) and _lstm_fits(cell):
            native = dataclasses.replace(cell, carry_order=("c", "h"), bias_placement="recurrent")
            make = lambda i, h: nnx.OptimizedLSTMCell(i, h, rngs=nnx.Rngs(0))
        else:
            return decline(layer, ctx)
        shape = cell.input_weights.value.named_shape
        hidden = int(cell.recurrent_weights.value.named_shape[cell.hidden_axis])
        has_bias = (native.input_bias if isinstance(native, GRUCell) else native.bias) is not None
        if cell.fused_axis != "gates" or not has_bias or cell.input_axis == cell.fused_axis:
            return decline(layer, ctx)  # NNX cells always have a bias; the gates axis is NNX's GATES.
        abstract = nnx.eval_shape(lambda: make(int(shape[cell.input_axis]), hidden))
        return CellRule().lower(NnxCell(native, config=_cell_config(abstract)), ctx)


# --- Sequential / MLP -----------------------------------------------------------------------------------


_MLP_IDENTITY = inspect.signature(eqx.nn.MLP.__init__).parameters["final_activation"].default


def _passes_names(module: Any) -> bool:
    """An NNX native that acts elementwise (Dropout, PReLU): names pass through it in a sequence."""
    return bool(getattr(NNX.lift_rule_for(type(module)), "elementwise", False))


class EqxSequentialCrossRule:
    """``EqxSequential`` / ``EqxMLP`` -> ``nnx.Sequential`` when every item lowers natively and the conventions chain.

    Items: natives from the rules above (each NNX class's convention names
    what it takes and gives), known activations (and an MLP's own
    ``activation`` / ``final_activation``) as plain functions, which
    ``nnx.Sequential`` calls as they are, and so are the plain functions of an
    ``nnx.Sequential`` converted to Equinox and back (``NnxFunction``: NNX
    calls them on the batched array, as before); ``Identity`` and the MLP's
    default identity ``final_activation`` are dropped. The
    sequence is native only if each item's input names are the trailing
    output names of the item before it (a ``GroupNorm`` over ``channels``
    after a ``Conv``; a ``Linear`` over ``features`` after a ``Conv`` needs a
    reshape Equinox does per example: that declines). Anything else, e.g. an item that became an
    adapter, a ``Lambda`` of an unknown function, or ``MLP(scan=True)``,
    makes the whole sequence decline.
    """

    def lower(self, layer: Sequential, ctx: LowerContext) -> Any:
        own = {id(f) for f in (getattr(layer, "activation", None), getattr(layer, "final_activation", None))
               if f is not None} if isinstance(layer, EqxMLP) else set()
        items: list[Any] = []
        current: tuple[str, ...] | None = None
        for index, sub in enumerate(layer.sublayers):
            if type(sub) is Identity:
                continue
            if isinstance(sub, PositionalJoin):  # NNX chains positionally too: the names move on, nothing runs.
                renames = dict(zip(sub.old, sub.new))
                current = None if current is None else tuple(renames.get(n, n) for n in current)
                continue
            if type(sub) is Elementwise:
                if sub.fn is _MLP_IDENTITY:
                    continue  # eqx.nn.MLP's default final activation: nothing to run.
                if sub.fn not in ELEMENTWISE_FUNCTIONS and id(sub.fn) not in own:
                    return decline(layer, ctx)
                items.append(sub.fn)
                continue
            if type(sub) is NnxFunction:
                # A plain function of an nnx.Sequential that went to Equinox and back: NNX calls it as it did.
                if current is not None and current[len(current) - len(sub.input_names):] != sub.input_names:
                    return decline(layer, ctx)
                items.append(sub.fn)
                current = (sub.output_names if current is None
                           else current[:len(current) - len(sub.input_names)] + sub.output_names)
                continue
            module = ctx.lower(sub, "layers", index)
            convention = convention_of(module, AxisNaming())
            if isinstance(module, NnxAdapter) or convention is None:
                return decline(layer, ctx)
            if _passes_names(module):
                items.append(module)
                continue
            if len(convention.inputs) != 1 or convention.output is None:
                return decline(layer, ctx)  # Several inputs or outputs (attention, cells): not a chain link.
            ins, outs = tuple(convention.inputs[0]), tuple(convention.output)
            # The item consumes the trailing axes it names; axes before them are batch-like to NNX.
            if current is not None and current[len(current) - len(ins):] != ins:
                return decline(layer, ctx)
            items.append(module)
            current = outs if current is None else current[:len(current) - len(ins)] + outs
        sequential = nnx.Sequential(*items)
        if isinstance(layer, EqxMLP) and layer.origin is not None:
            # NNX has no MLP class: the origin rides along (static), so converting back gives eqx.nn.MLP again.
            sequential.equinox_mlp = (layer.origin, layer.activation, layer.final_activation)
        return sequential


_RULES: tuple[tuple[Callable[[], Any], type], ...] = (
    (LayerNormCrossRule, LayerNorm),
    (RMSNormCrossRule, RMSNorm),
    (ConvCrossRule, Conv),
    (ConvTransposeCrossRule, ConvTranspose),
    (EmbeddingCrossRule, EmbeddingLookup),
    (DropoutCrossRule, Dropout),
    (PReLUCrossRule, PReLU),
    (GroupNormCrossRule, GroupNorm),
    (BatchNormCrossRule, BatchNorm),
    (MultiheadAttentionCrossRule, EqxMultiheadAttention),
    (EqxCellCrossRule, EqxCell),
    (EqxSequentialCrossRule, EqxSequential),
    (EqxSequentialCrossRule, EqxMLP),
)

for _make, _cls in _RULES:
    NNX.add(_make(), lifted=(_cls,))
