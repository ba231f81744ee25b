"""Layers lifted from Flax NNX, lowered to native Equinox classes (cross-framework lowering).

``pzb.lower(layer, framework="equinox")`` of a layer lifted from NNX (and
``pzb.convert``, for every layer of a converted model) reaches these rules
for the NNX-lifted classes (``NnxLinear``, ``NnxLayerNorm``, ...). Each rule
builds the ``eqx.nn`` class that computes the same function *per example*
(Equinox layers are unbatched; NNX layers take leading batch axes), so
``jax.vmap(native)(x)`` equals the NNX module on the batch ``x``, with arrays
laid out by the calling convention Equinox's own lift rule records for the
native class (``EQUINOX.convention_of(native, naming)``). The op order can
differ from NNX's, so outputs agree to float32 rounding, not bit for bit.

A rule declines to the adapter (:class:`~pzbridge.bridge.equinox.adapter.EquinoxAdapter`,
which runs the lifted layer itself, exactly) whenever the native class cannot
express the layer: several contracted axes, compute dtypes and promotion,
query/key normalisation, grouped-query attention, a decode cache. Layers
lifted from Equinox keep their own rules (registered on their own classes,
which come first on their MRO), so ``lower(lift(m))`` stays the identity.

Where NNX and Equinox differ beyond layout (documented per rule and pinned by
``tests/bridge/test_cross_to_equinox.py``):

- norms: NNX's default fast variance ``E[x^2] - E[x]^2`` becomes Equinox's
  two-pass variance (the same value up to rounding for inputs whose mean is
  not large against their spread); float32 parameters only, since Equinox
  returns the input dtype where NNX returns the promoted one;
- ``nnx.Embed``: ids out of range give NaN rows in NNX and clamped rows in
  Equinox; ``attend`` (tied decoding) is not an ``eqx.nn.Embedding`` call, so
  a traced model's decode step lowers as an adapter over the same table;
- ``nnx.Einsum`` lowered to ``eqx.nn.Linear``: positionally the same map, but
  Equinox names both axes ``features`` where the einsum named them by letter
  (inside a conversion an einsum keeps the adapter, so it converts back);
- ``nnx.GroupNorm`` becomes ``eqx.nn.GroupNorm`` and ``nnx.BatchNorm``
  ``eqx.nn.BatchNorm`` (its statistics in an ``eqx.nn.State``), both taking
  channels first (``(C, *spatial)`` per example) where NNX takes them last;
  inside a conversion (``pzb.convert``) a GroupNorm lifted for a known call
  (traced, or a root lifted with examples) is a native child called with
  ``(channels, *spatial)`` by name, a BatchNorm keeps the adapter (its
  Equinox convention cannot thread the State); ``nnx.InstanceNorm`` has no
  Equinox class and keeps the adapter;
- NNX recurrent cells keep the adapter: they are called ``(carry, x) ->
  (carry, y)``, Equinox's ``(x, hidden) -> hidden``, so an ``eqx.nn.GRUCell``
  could not stand in for one positionally.

See ``docs/architecture.md`` ("The lift / lower contract").

Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import pzbridge as pzb
    >>> layer = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> native = pzb.lower(pzb.lift(layer).body, framework="equinox")
    >>> x = jnp.ones((4, 3))
    >>> type(native).__name__, bool(jnp.allclose(jax.vmap(native)(x), layer(x), atol=1e-5))
    ('Linear', True)
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import equinox as eqx
import jax.numpy as jnp

from pzbridge.bridge.context import LowerContext
from pzbridge.bridge.equinox.adapter import EquinoxAdapter
from pzbridge.bridge.equinox.state_entries import STATE_OUT_KEY
from pzbridge.bridge.equinox.traversal import EQUINOX, equinox_rule, new_module, rebuild_from_origin
from pzbridge.bridge.lifted import CallingConvention
from pzbridge.bridge.naming import AxisNaming
from pzbridge.bridge.native_calls import wants_native_children
from pzbridge.bridge.nnx.attention import NnxAttention, kernel_layers
from pzbridge.bridge.nnx.containers import NnxSequential
from pzbridge.bridge.nnx.embed import NnxEmbed
from pzbridge.bridge.nnx.group_norm import NnxGroupNorm
from pzbridge.bridge.nnx.linear import NnxEinsum, NnxLinear, NnxLinearGeneral
from pzbridge.bridge.nnx.norm import NnxBatchNorm, NnxLayerNorm, NnxRMSNorm
from pzbridge.bridge.nnx.prelu import NnxPReLU
from pzbridge.bridge.nnx.variables import storage_names
from pzbridge.core import named_axes as nx
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.basic import NamedEinsum, RenameAxes
from pzbridge.nn.combinators import Sequential
from pzbridge.nn.embeddings import EmbeddingLookup
from pzbridge.nn.layer import Layer
from pzbridge.nn.linear import AddBias, Linear, weight_output_name


def _float32(*variables: Any) -> bool:
    """Every variable given (None skipped) holds a float32 array."""
    return all(v is None or jnp.dtype(v.value.dtype) == jnp.float32 for v in variables)


# Dense layers. -----------------------------------------------------------------------------------------


def _dense_parts(layer: Sequential) -> tuple[Any, str, str, Any] | None:
    """``(weights, in_name, out_name, bias)`` of a one-axis-to-one-axis dense layer with NNX's defaults, else None.

    Exact classes only: the promoted layers (compute dtypes) and LoRA
    adapters are subclasses or other layers and keep the adapter.
    """
    subs = list(layer.sublayers)
    if not 1 <= len(subs) <= 2 or (len(subs) == 2 and type(subs[1]) is not AddBias):
        return None
    first, bias = subs[0], (subs[1] if len(subs) == 2 else None)
    if type(first) is Linear and len(first.in_axis_names) == 1 and len(first.out_axis_names) == 1:
        weights, (f_in,), (f_out,) = first.weights, first.in_axis_names, first.out_axis_names
    elif type(first) is NamedEinsum and len(first.weights) == 1 and len(first.contract_axes) == 1 and not first.rename:
        weights, (f_in,) = first.weights[0], first.contract_axes
        others = [name for name in storage_names(weights) if name != f_in]
        if len(others) != 1:
            return None
        f_out = others[0]
    else:
        return None
    names = set(storage_names(weights))
    if names != {f_in, weight_output_name(f_out, (f_in,))} or not _float32(weights, bias and bias.bias):
        return None
    if bias is not None and storage_names(bias.bias) != (f_out,):
        return None
    return weights, f_in, f_out, bias


def _dense_convention(layer: Sequential) -> CallingConvention:
    """What the lifted dense layer consumes and produces (the adapter's calling convention)."""
    first = layer.sublayers[0] if layer.sublayers else None
    if isinstance(first, Linear):
        return CallingConvention((tuple(first.in_axis_names),), tuple(first.out_axis_names))
    if type(first) is NamedEinsum and len(first.weights) == 1 and not first.rename:
        # An einsum's contracted letters go in; its kernel's other letters come out.
        ins = tuple(first.contract_axes)
        outs = tuple(n for n in storage_names(first.weights[0]) if n not in ins)
        return CallingConvention((ins,), outs)
    return CallingConvention()


@equinox_rule(lifted=(NnxLinear, NnxLinearGeneral, NnxEinsum))
class NnxDenseToLinear:
    """``nnx.Linear`` / ``LinearGeneral`` / ``Einsum`` (one in, one out axis) -> ``eqx.nn.Linear``.

    NNX's kernel ``(in, out)`` becomes Equinox's weight ``(out, in)`` (the
    same buffer, transposed by name); the bias ``(out,)`` is kept. For an
    einsum such as ``"...a,ad->...d"`` the contracted letter is the input
    axis. Several contracted or produced axes, compute dtypes (``dtype``,
    ``precision``, non-float32 parameters), LoRA and edited layer lists lower
    to the adapter, which computes exactly what NNX computes. So does an
    ``Einsum`` inside a conversion (``pzb.convert``): an ``eqx.nn.Linear``
    cannot say it was an einsum, so converting back would give ``nnx.Linear``,
    where the adapter gives the ``nnx.Einsum`` back.
    """

    def lower(self, layer: Sequential, ctx: LowerContext) -> Any:
        parts = _dense_parts(layer)
        if parts is None or (isinstance(layer, NnxEinsum) and wants_native_children(ctx)):
            return EquinoxAdapter.wrap(layer, ctx, _dense_convention(layer))
        weights, f_in, f_out, bias = parts
        weight = ctx.child("weight").array(weights, (weight_output_name(f_out, (f_in,)), f_in))
        bias_array = None if bias is None else ctx.child("bias").array(bias.bias, (f_out,))
        return new_module(eqx.nn.Linear, weight=weight, bias=bias_array, in_features=int(weight.shape[1]),
                          out_features=int(weight.shape[0]), use_bias=bias is not None)


# Normalisation. ----------------------------------------------------------------------------------------


def _norm_axis(layer: Any) -> str | None:
    """The one normalised axis when the norm is Equinox-expressible (float32, NNX numerics), else None."""
    params = [p for p in (layer.scale, layer.bias) if p is not None]
    if len(layer.across_axes) != 1 or layer.dtype is not None or not _float32(*params):
        return None
    axis = layer.across_axes[0]
    return axis if all(storage_names(p) == (axis,) for p in params) else None


def _lower_norm(layer: Any, ctx: LowerContext, eqx_cls: type) -> Any:
    axis = _norm_axis(layer)
    config = getattr(layer, "config", None)
    size = None
    if axis is not None:
        param = layer.scale if layer.scale is not None else layer.bias
        size = param.value.named_shape[axis] if param is not None else (
            config["num_features"] if config is not None else None)
    if size is None:
        names = tuple(layer.across_axes)
        return EquinoxAdapter.wrap(layer, ctx, CallingConvention((names,), names))
    weight = None if layer.scale is None else ctx.child("weight").array(layer.scale, (axis,))
    bias = None if layer.bias is None else ctx.child("bias").array(layer.bias, (axis,))
    return new_module(eqx_cls, shape=(int(size),), eps=float(layer.epsilon), use_weight=weight is not None,
                      use_bias=bias is not None, weight=weight, bias=bias)


@equinox_rule(lifted=(NnxLayerNorm,))
class NnxLayerNormToEquinox:
    """``nnx.LayerNorm`` -> ``eqx.nn.LayerNorm((F,), eps, use_weight=use_scale, use_bias=use_bias)``.

    NNX's fast variance becomes Equinox's two-pass variance (see the module
    docstring); non-float32 parameters keep the adapter.
    """

    def lower(self, layer: NnxLayerNorm, ctx: LowerContext) -> Any:
        return _lower_norm(layer, ctx, eqx.nn.LayerNorm)


@equinox_rule(lifted=(NnxRMSNorm,))
class NnxRMSNormToEquinox:
    """``nnx.RMSNorm`` -> ``eqx.nn.RMSNorm((F,), eps, use_weight=use_scale, use_bias=False)`` (NNX has no bias)."""

    def lower(self, layer: NnxRMSNorm, ctx: LowerContext) -> Any:
        return _lower_norm(layer, ctx, eqx.nn.RMSNorm)


@equinox_rule(lifted=(NnxGroupNorm,))
class NnxGroupNormToEquinox:
    """``nnx.GroupNorm`` -> ``eqx.nn.GroupNorm(groups, channels, eps, channelwise_affine)``.

    Equinox takes channels first (``(C, *spatial)`` per example) where NNX
    takes them last, and has scale and bias both or neither: a GroupNorm with
    only one of them, non-float32 parameters or named ``across_axes`` keeps
    the adapter. Inside a conversion (``pzb.convert``) the native is called
    by name, ``(channels, *middle_axes)`` (:meth:`native_convention`), so a
    GroupNorm whose call the lift never saw (``middle_axes`` None) keeps the
    adapter too.
    """

    def native_convention(self, layer: NnxGroupNorm, module: Any, naming: Any) -> CallingConvention | None:
        """``(channels, *middle_axes)`` in and out: the lifted call's axes, channels first as Equinox takes them.

        Example:
            >>> norm = NnxGroupNorm(None, None, "channels", 1, (), 0.0, middle_axes=("height", "width"))
            >>> NnxGroupNormToEquinox().native_convention(norm, None, None).inputs
            (('channels', 'height', 'width'),)
        """
        if layer.middle_axes is None:
            return None
        names = (layer.channel_axis, *layer.middle_axes)
        return CallingConvention((names,), names)

    def lower(self, layer: NnxGroupNorm, ctx: LowerContext) -> Any:
        c = layer.channel_axis
        params = [p for p in (layer.scale, layer.bias) if p is not None]
        config = layer.config
        channels = params[0].value.named_shape.get(c) if params else (
            config["num_groups"] * config["group_size"] if config is not None else None)
        fits = (len(params) in (0, 2) and not layer.across_axes and layer.dtype is None and _float32(*params)
                and all(storage_names(p) == (c,) for p in params) and channels is not None
                and (layer.middle_axes is not None or not wants_native_children(ctx)))
        if not fits:
            return EquinoxAdapter.wrap(OneExample(layer), ctx, CallingConvention(((c,),), (c,)))
        weight = None if layer.scale is None else ctx.child("weight").array(layer.scale, (c,))
        bias = None if layer.bias is None else ctx.child("bias").array(layer.bias, (c,))
        return new_module(eqx.nn.GroupNorm, groups=int(layer.groups), channels=int(channels),
                          eps=float(layer.epsilon), channelwise_affine=weight is not None, weight=weight, bias=bias)


@pytree_dataclass
class OneExample(Layer):
    """Runs an NNX-lifted layer on one example: none of its positional axes is a batch axis.

    ``NnxGroupNorm`` takes NNX's rule that the leading positional axis is the
    batch unless a named batch axis exists; an Equinox adapter is called per
    example, so a size-1 named batch axis is added around the call.

    Attributes:
      layer: The wrapped layer.
      example_axis: The temporary batch axis's name (static).

    Example:
        >>> from pzbridge.bridge.lifted import name_trailing_axes
        >>> norm = NnxGroupNorm(None, None, "channels", 1, (), 0.0)
        >>> x = name_trailing_axes(nx.wrap(jnp.array([[1.0, 3.0], [5.0, 7.0]])), ("channels",))  # (W, C)
        >>> norm(x).untag("channels").unwrap().tolist()  # the leading axis taken as NNX's batch
        [[-1.0, 1.0], [-1.0, 1.0]]
        >>> import numpy as np
        >>> np.asarray(OneExample(norm)(x).untag("channels").unwrap(), float).round(2).tolist()  # W reduced too
        [[-1.34, -0.45], [0.45, 1.34]]
    """

    layer: Layer
    example_axis: str = static_field(default="__one_example")

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        canonical = x.canonicalize() if hasattr(x, "canonicalize") else x
        batched = nx.NamedArray(canonical.data_array[..., None], {**dict(canonical.named_axes), self.example_axis: 1})
        return self.layer(batched, **side_inputs)[{self.example_axis: 0}]


def saturated_counter(momentum: float) -> int | None:
    """A step count from which on Equinox's debiasing divisor ``1 - momentum**count`` is exactly 1 in float32.

    NNX's running averages are not debiased; ``eqx.nn.BatchNorm(mode="batch")``
    divides its running averages by ``1 - momentum**count``. Starting the
    Equinox counter here makes that divisor exactly 1 now and at every later
    step (``momentum**count`` only shrinks), so the Equinox statistics are
    NNX's, update for update. The count is the first one with
    ``momentum**count <= 2**-25``, raised where float32's power rounds up.
    None when no such count fits an int32 (``momentum`` of 1 or outside
    ``[0, 1)``).

    Example:
        >>> saturated_counter(0.99), saturated_counter(0.0), saturated_counter(1.0)
        (1725, 1, None)
    """
    if not 0.0 <= momentum < 1.0:
        return None
    if momentum == 0.0:
        return 1
    count = max(1, math.ceil(math.log(2.0 ** -25) / math.log(momentum)))
    while count < 2 ** 31 - 1:
        # Computed as Equinox computes it: a Python float to the power of an int32 array, in float32.
        if float(1 - momentum ** jnp.asarray(count, jnp.int32)) == 1.0:
            return count
        count = min(2 ** 31 - 1, count + count // 8 + 1)
    return None


def _state_index(ctx: LowerContext, name: str) -> eqx.nn.StateIndex:
    """A ``StateIndex`` as ``eqx.nn.make_with_state`` leaves it: a path marker, the initial value dropped."""
    where = ctx.where if ctx.path else "BatchNorm"
    return new_module(eqx.nn.StateIndex, marker=f"{where}.{name}", init=_SENTINEL)


_SENTINEL = eqx.nn.make_with_state(eqx.nn.BatchNorm)(1, "batch", mode="batch")[0].batch_counter.init


@equinox_rule(lifted=(NnxBatchNorm,))
class NnxBatchNormToEquinox:
    """``nnx.BatchNorm`` -> ``eqx.nn.BatchNorm(mode="batch", axis_name="batch")`` plus its ``eqx.nn.State``.

    Equinox keeps the statistics in an ``eqx.nn.State``: lower with
    :func:`~pzbridge.bridge.equinox.state.lower_with_state` to get it (plain
    ``pzb.lower`` gives the module only). The State holds NNX's running mean
    and variance and a saturated counter (:func:`saturated_counter`), so
    inference normalises with NNX's statistics and every training call
    updates them as NNX does (``m * running + (1 - m) * batch``). Equinox
    reduces over the ``vmap`` axis named ``"batch"`` and takes channels first
    (``(C, *spatial)`` per example): call it as
    ``jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))``.
    Scale without bias (or the reverse), a compute dtype, non-float32
    parameters or a momentum of 1 keep the adapter, as does a BatchNorm
    lowered inside a conversion (``pzb.convert``): a converted model is
    called without a State.
    """

    def lower(self, layer: NnxBatchNorm, ctx: LowerContext) -> Any:
        f = storage_names(layer.running_mean)
        params = [p for p in (layer.scale, layer.bias) if p is not None]
        counter = saturated_counter(float(layer.momentum))
        fits = (not wants_native_children(ctx) and len(f) == 1 and storage_names(layer.running_var) == f
                and len(params) in (0, 2)
                and all(storage_names(p) == f for p in params) and layer.mode == "batch" and not layer.debias
                and layer.dtype is None and _float32(*params, layer.running_mean, layer.running_var)
                and counter is not None)
        if not fits:
            return EquinoxAdapter.wrap(layer, ctx, CallingConvention((f,), f))
        weight = None if layer.scale is None else ctx.child("weight").array(layer.scale, f)
        bias = None if layer.bias is None else ctx.child("bias").array(layer.bias, f)
        mean, var = ctx.array(layer.running_mean, f), ctx.array(layer.running_var, f)
        counter_index, stats_index = _state_index(ctx, "batch_counter"), _state_index(ctx, "batch_state_index")
        out = ctx.shared.extras.setdefault(STATE_OUT_KEY, {})
        out[counter_index.marker] = jnp.asarray(counter, jnp.int32)
        out[stats_index.marker] = (mean, var)
        return new_module(
            eqx.nn.BatchNorm, weight=weight, bias=bias, ema_first_time_index=None, ema_state_index=None,
            batch_counter=counter_index, batch_state_index=stats_index, axis_name=AxisNaming().batch,
            inference=bool(layer.use_running_average), input_size=int(mean.shape[0]), eps=float(layer.epsilon),
            channelwise_affine=weight is not None, momentum=float(layer.momentum), mode="batch",
        )


# Elementwise and lookup layers. ------------------------------------------------------------------------


@equinox_rule(lifted=(NnxPReLU,))
class NnxPReLUToEquinox:
    """``nnx.PReLU`` (scalar slope) -> ``eqx.nn.PReLU`` holding the same scalar.

    NNX casts the slope to the input's dtype, Equinox promotes: equal for
    float32 inputs. A non-float32 or non-scalar slope keeps the adapter.
    """

    def lower(self, layer: NnxPReLU, ctx: LowerContext) -> Any:
        value = layer.alpha.value
        if storage_names(layer.alpha) or getattr(value, "ndim", 0) != 0 or layer.dtype is not None \
                or not _float32(layer.alpha):
            return EquinoxAdapter.wrap(layer, ctx, CallingConvention(((),), ()))
        return new_module(eqx.nn.PReLU, negative_slope=ctx.child("negative_slope").array(layer.alpha, ()))


@equinox_rule(lifted=(NnxEmbed,))
class NnxEmbedToEquinox:
    """``nnx.Embed`` -> ``eqx.nn.Embedding`` over the same ``(num, features)`` table (the lookup).

    Equinox looks up one scalar id per call (``jax.vmap`` it over the ids).
    The ``attend`` method has no ``eqx.nn.Embedding`` counterpart: where a
    traced model decodes with it, that step is an ``EmbeddingDecode`` layer
    and lowers to an adapter reading the same table. An edited lookup, a
    lookup with a ``dtype`` or ``mode``, or a table of other rank keeps the
    adapter.
    """

    def lower(self, layer: NnxEmbed, ctx: LowerContext) -> Any:
        lookup = layer.lookup
        table = lookup.table if type(lookup) is EmbeddingLookup else None
        names = storage_names(table.embeddings) if table is not None else ()
        if (table is None or len(names) != 2 or table.vocabulary_axis not in names or lookup.dtype is not None
                or lookup.mode is not None):
            return EquinoxAdapter.wrap(layer, ctx, CallingConvention(((),), (AxisNaming().features,)))
        vocab = table.vocabulary_axis
        weight = ctx.child("weight").array(table.embeddings, (vocab, next(n for n in names if n != vocab)))
        return new_module(eqx.nn.Embedding, num_embeddings=int(weight.shape[0]), embedding_size=int(weight.shape[1]),
                          weight=weight)


# Attention. --------------------------------------------------------------------------------------------


def _projection(layer: Any, ins: tuple[str, ...], outs: tuple[str, ...]) -> tuple[Any, Any] | None:
    """``(kernel, bias or None)`` of an NNX projection still ``[Linear(ins -> outs), AddBias(outs)?]``, else None."""
    subs = list(getattr(layer, "sublayers", ()))
    if not 1 <= len(subs) <= 2 or type(subs[0]) is not Linear or (len(subs) == 2 and type(subs[1]) is not AddBias):
        return None
    linear, bias = subs[0], (subs[1].bias if len(subs) == 2 else None)
    if tuple(linear.in_axis_names) != ins or tuple(linear.out_axis_names) != outs or not _float32(linear.weights, bias):
        return None
    if bias is not None and set(storage_names(bias)) != set(outs):
        return None
    return linear.weights, bias


def _flat_linear(ctx: LowerContext, kernel: Any, bias: Any, out_names: tuple[str, ...],
                 in_names: tuple[str, ...]) -> eqx.nn.Linear:
    """An ``eqx.nn.Linear`` whose weight is ``kernel`` laid out ``(*out_names, *in_names)`` and flattened to 2-d."""
    weight_names = (*(weight_output_name(n, in_names) for n in out_names), *in_names)
    full = ctx.child("weight").array(kernel, weight_names)
    n_out = int(jnp.prod(jnp.array(full.shape[: len(out_names)])))
    weight = full.reshape(n_out, -1)
    flat_bias = None if bias is None else ctx.child("bias").array(bias, out_names).reshape(-1)
    return new_module(eqx.nn.Linear, weight=weight, bias=flat_bias, in_features=int(weight.shape[1]),
                      out_features=n_out, use_bias=bias is not None)


def _attention_native(layer: NnxAttention) -> bool:
    """The NNX attention has Equinox's shape: no GQA, qk norm, cache, compute dtype or edited kernel step."""
    if (layer.config is None or layer.kv_heads_axis != layer.heads_axis or layer.query_ln is not None
            or layer.key_ln is not None or layer.cached_key is not None or layer.decode or layer.dtype is not None):
        return False
    naming = AxisNaming(seq=layer.seq_axis, kv_seq=layer.kv_seq_axis, heads=layer.heads_axis,
                        projection=layer.projection_axis)
    expected = kernel_layers(layer.config["head_dim"], naming, layer.kv_heads_axis, None)
    return all(getattr(layer, name) == value for name, value in expected.items())


def _attention_features(layer: NnxAttention) -> str:
    first = layer.query.sublayers[0] if isinstance(layer.query, Sequential) and layer.query.sublayers else None
    return first.in_axis_names[0] if isinstance(first, Linear) and first.in_axis_names else AxisNaming().features


@equinox_rule(lifted=(NnxAttention,))
class NnxAttentionToEquinox:
    """``nnx.MultiHeadAttention`` -> ``eqx.nn.MultiheadAttention`` (per-head kernels flattened head-major).

    ``query/key/value.kernel (in, H, hd)`` -> ``*_proj.weight (H*hd, in)``;
    ``out.kernel (H, hd, out)`` -> ``output_proj.weight (out, H*hd)``; biases
    flattened likewise (``use_*_bias`` from their presence). Equinox is called
    ``(query, key, value, mask)`` per example: NNX's ``mask`` ``(B, H|1, T, S)``
    becomes Equinox's ``(H|1, T, S)`` under ``jax.vmap``, and NNX's default
    ``inputs_k = inputs_q`` has to be passed explicitly. Both scale the
    logits by ``1/sqrt(head_dim)``, at different points: equal to rounding.
    Grouped-query attention, ``normalize_qk``, a decode cache, a compute
    ``dtype`` or an edited kernel step keep the adapter.
    """

    def lower(self, layer: NnxAttention, ctx: LowerContext) -> Any:
        f = _attention_features(layer)
        h, p = layer.heads_axis, layer.projection_axis
        parts = {name: _projection(getattr(layer, name), (f,), (h, p)) for name in ("query", "key", "value")}
        parts["out"] = _projection(layer.out, (h, p), (f,))
        if not _attention_native(layer) or any(part is None for part in parts.values()):
            tokens = (layer.seq_axis, f)
            return EquinoxAdapter.wrap(layer, ctx, CallingConvention((tokens, tokens, tokens), tokens))
        projections = {
            f"{name}_proj": _flat_linear(ctx.child(f"{name}_proj"), *parts[name], (h, p), (f,))
            for name in ("query", "key", "value")
        }
        projections["output_proj"] = _flat_linear(ctx.child("output_proj"), *parts["out"], (f,), (h, p))
        heads = int(layer.config["num_heads"])
        head_dim = int(layer.config["head_dim"])
        return new_module(
            eqx.nn.MultiheadAttention, **projections,
            dropout=new_module(eqx.nn.Dropout, p=0.0, inference=False),
            num_heads=heads, query_size=int(projections["query_proj"].in_features),
            key_size=int(projections["key_proj"].in_features), value_size=int(projections["value_proj"].in_features),
            output_size=int(projections["output_proj"].out_features), qk_size=head_dim, vo_size=head_dim,
            use_query_bias=parts["query"][1] is not None, use_key_bias=parts["key"][1] is not None,
            use_value_bias=parts["value"][1] is not None, use_output_bias=parts["out"][1] is not None,
        )


# Containers. -------------------------------------------------------------------------------------------


def _takes_key(module: Any) -> bool:
    """Whether ``module(x, key=...)`` is a valid call (``eqx.nn.Sequential`` passes ``key`` to every layer)."""
    try:
        params = inspect.signature(type(module).__call__).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == "key" or p.kind is p.VAR_KEYWORD for p in params)


@equinox_rule(lifted=(NnxSequential,))
class NnxSequentialToEquinox:
    """``nnx.Sequential`` -> ``eqx.nn.Sequential`` of its lowered items (functions -> ``eqx.nn.Lambda``).

    ``eqx.nn.Sequential`` calls every layer with ``key=`` and one input; an
    item whose native class takes no ``key`` (``eqx.nn.PReLU``) or several
    inputs (``eqx.nn.MultiheadAttention``, which NNX calls with the one
    input as query, key and value) lowers to the adapter instead, which
    takes what the ``nnx.Sequential`` passes.
    """

    def lower(self, layer: NnxSequential, ctx: LowerContext) -> eqx.nn.Sequential:
        lowered = []
        for i, sub in enumerate(layer.sublayers):
            if isinstance(sub, RenameAxes):
                continue  # A join between items' names: Equinox is positional, so the identity there.
            native = ctx.lower(sub, "layers", i)
            convention = EQUINOX.convention_of(native, AxisNaming())
            one_input = convention is None or len(convention.inputs) <= 1
            if not _takes_key(native) or not one_input:
                # Several inputs: the adapter names the one it gets by its rank.
                native = EquinoxAdapter.wrap(sub, ctx.child("layers", i), convention if one_input else None)
            lowered.append(native)
        mlp = _as_mlp(layer, lowered)
        return mlp if mlp is not None else new_module(eqx.nn.Sequential, layers=tuple(lowered))


def _as_mlp(layer: NnxSequential, lowered: list[Any]) -> eqx.nn.MLP | None:
    """The ``eqx.nn.MLP`` an ``nnx.Sequential`` was converted from, while its items still follow that pattern."""
    config = dict(layer.config.items) if layer.config is not None else {}
    if "equinox_mlp" not in config:
        return None
    origin, activation, final = config["equinox_mlp"]
    linears = [m for m in lowered if isinstance(m, eqx.nn.Linear)]
    functions = [m.fn for m in lowered if isinstance(m, eqx.nn.Lambda)]
    hidden = [activation] * (len(linears) - 1)
    # The MLP's default identity final activation was dropped on the way to NNX.
    expected = [hidden, [*hidden, final]]
    if len(linears) + len(functions) != len(lowered) or len(linears) != origin.get("depth") + 1 \
            or functions not in expected or not all(isinstance(m, eqx.nn.Linear) for m in lowered[0::2]):
        return None
    return rebuild_from_origin(origin, eqx.nn.MLP, layers=tuple(linears), activation=activation,
                               final_activation=final)

