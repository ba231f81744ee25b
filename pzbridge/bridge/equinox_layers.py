"""Lifted forms of Equinox layers that need Equinox-specific configuration.

Most of a lifted Equinox layer is framework-neutral pzbridge vocabulary
(``pzb.nn.Linear``, ``AddBias``, ``Elementwise`` ...). A few Equinox details
have no neutral counterpart but must survive the round trip exactly, such as
``"scalar"`` feature sizes or the way ``eqx.nn.Sequential`` splits its
``key``. Those layers lift to a named ``Sequential`` subclass defined here:
selectors still reach the primitives inside (``at_instances_of(pzb.nn.Linear)``),
and the subclass's static fields carry the Equinox configuration back.

This module imports no framework: the classes are plain pzbridge layers.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> layer = EqxLinear([pzb.nn.Linear.from_config("l", jax.random.key(0), {"features": 1}, {"features": 2})],
    ...                   in_features="scalar", out_features=2)
    >>> dict(layer(pzb.nx.wrap(jnp.ones(3), "batch")).named_shape)
    {'batch': 3, 'features': 2}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import PzbridgeError
from pzbridge.core.random_stream import RandomStream
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.activations import PReLU
from pzbridge.nn.attention import Attention, merge_axes, split_axis
from pzbridge.nn.combinators import Sequential
from pzbridge.core.named_axes_core import make_named
from pzbridge.nn.contraction import contract, data_layout
from pzbridge.nn.conv import Conv
from pzbridge.nn.conv_transpose import ConvTranspose
from pzbridge.nn.dropout import Dropout
from pzbridge.nn.embeddings import EmbeddingLookup
from pzbridge.nn.layer import Layer
from pzbridge.nn.masks import ApplyExplicitMask
from pzbridge.nn.normalization import GroupNorm, LayerNorm, RMSNorm
from pzbridge.nn.pooling import AdaptiveAvgPool, AdaptiveMaxPool, AvgPool, MaxPool
from pzbridge.nn.rope import ApplyRoPE


def _add_axis(x: nx.NamedArrayBase, name: str) -> nx.NamedArray:
    canonical = x.with_positional_prefix() if hasattr(x, "with_positional_prefix") else x
    return nx.NamedArray(canonical.data_array[..., None], {**dict(canonical.named_axes), name: 1})


@pytree_dataclass
class EqxLinear(Sequential):
    """``eqx.nn.Linear`` lifted: ``[Linear]`` or ``[Linear, AddBias]`` plus Equinox sizes.

    A ``"scalar"`` input gets a size-1 ``features`` axis before the map; a
    ``"scalar"`` output loses it after, exactly as Equinox does.

    Attributes:
      in_features: ``int`` or ``"scalar"`` (static).
      out_features: ``int`` or ``"scalar"`` (static).
      features_axis: Name of the feature axis (static).
    """

    in_features: Any = static_field(default=None)
    out_features: Any = static_field(default=None)
    features_axis: str = static_field(default="features")

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        if self.in_features == "scalar":
            x = _add_axis(x, self.features_axis)
        x = super().__call__(x, **side_inputs)
        if self.out_features == "scalar":
            x = x[{self.features_axis: 0}]
        return x


@pytree_dataclass
class EqxSequential(Sequential):
    """``eqx.nn.Sequential`` lifted: a ``key`` side input is split per layer, as Equinox does.

    Example:
        >>> import pzbridge as pzb
        >>> EqxSequential([pzb.nn.Identity()])(1, key=jax.random.key(0))
        1
    """

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        key = side_inputs.get("key")
        if key is None:
            return super().__call__(x, **side_inputs)
        keys = jax.random.split(key, len(self.sublayers))
        for layer, layer_key in zip(self.sublayers, keys):
            x = layer(x, **{**side_inputs, "key": layer_key})
        return x


@dataclasses.dataclass(frozen=True)
class EqxOrigin:
    """The Equinox class and static fields a layer was lifted from (static metadata).

    Lowering an untouched layer rebuilds exactly this class with exactly these
    static fields, so ``lower(lift(m))`` has ``m``'s tree structure. Values
    must be hashable (Equinox static fields are).

    Attributes:
      cls: The original ``eqx.Module`` subclass.
      static: ``((field_name, value), ...)`` of the original's static fields.

    Example:
        >>> origin = EqxOrigin(int, (("depth", 2),))
        >>> origin.get("depth"), origin.get("missing", 7)
        (2, 7)
    """

    cls: type
    static: tuple[tuple[str, Any], ...] = ()

    def get(self, name: str, default: Any = None) -> Any:
        """The static field ``name`` of the original, or ``default``."""
        return dict(self.static).get(name, default)


@pytree_dataclass
class EqxMLP(Sequential):
    """``eqx.nn.MLP`` lifted: ``[EqxLinear, Elementwise(activation), ..., EqxLinear, Elementwise(final)]``.

    With ``scan=True`` the stacked hidden layers are one :class:`EqxScannedLinears`.

    Attributes:
      origin: The original class and static fields (static).
      activation: The original ``activation`` leaf (static; used when no
        ``Elementwise`` carries it, i.e. ``depth=0``).
      final_activation: Likewise for ``final_activation``.

    Example:
        >>> import pzbridge as pzb
        >>> EqxMLP([pzb.nn.Identity()])(3)
        3
    """

    origin: EqxOrigin | None = static_field(default=None)
    activation: Any = static_field(default=None)
    final_activation: Any = static_field(default=None)


@pytree_dataclass
class EqxScannedLinears(Layer):
    """The stacked hidden layers of ``eqx.nn.MLP(scan=True)``, run with ``lax.scan``.

    Each step is ``activation(weight[i] @ x + bias[i])`` over ``features``,
    as Equinox computes it; other named axes pass through.

    Attributes:
      weights: Parameter over ``(layers, features_out, features)`` (Equinox buffer ``(depth-1, w, w)``).
      biases: Parameter over ``(layers, features)``, or None.
      activation: The elementwise activation (static).
      features_axis: Name of the feature axis (static).
      layers_axis: Name of the stacking axis (static).
      hidden_origin: The stacked ``eqx.nn.Linear``'s class and static fields (static).

    Example:
        >>> import pzbridge as pzb
        >>> w = pzb.Parameter(pzb.nx.wrap(jnp.stack([jnp.eye(2)] * 3), "layers", "features_out", "features"), "w")
        >>> layer = EqxScannedLinears(w, None, jax.nn.relu)
        >>> layer(pzb.nx.wrap(jnp.array([1.0, -1.0]), "features")).unwrap("features")
        Array([1., 0.], dtype=float32)
    """

    weights: Any
    biases: Any = None
    activation: Callable[[jax.Array], jax.Array] = static_field(default=None)
    features_axis: str = static_field(default="features")
    layers_axis: str = static_field(default="layers")
    hidden_origin: EqxOrigin | None = static_field(default=None)

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        f, out = self.features_axis, self.features_axis + "_out"
        stacked_w = self.weights.value.untag(self.layers_axis, out, f).unwrap()
        stacked_b = None if self.biases is None else self.biases.value.untag(self.layers_axis, f).unwrap()
        order = tuple(x.named_axes)
        x = x.canonicalize() if hasattr(x, "canonicalize") else x

        def step(h: Any, wb: tuple[jax.Array, jax.Array | None]) -> tuple[Any, None]:
            w, b = wb
            y = contract([h, nx.wrap(w, out, f)], (f,), {out: f})
            if b is not None:
                y = y + nx.wrap(b, f)
            y = nx.nmap(self.activation)(y) if self.activation is not None else y
            return y.order_as(*order), None

        x, _ = jax.lax.scan(step, x.order_as(*order), (stacked_w, stacked_b))
        return x


@pytree_dataclass
class EqxEmbedding(EmbeddingLookup):
    """``eqx.nn.Embedding`` lifted: an :class:`EmbeddingLookup` clamping ids as ``weight[i]`` does.

    Attributes:
      origin: The original class and static fields (static).
    """

    origin: EqxOrigin | None = static_field(default=None)


@pytree_dataclass
class EqxLayerNorm(LayerNorm):
    """``eqx.nn.LayerNorm`` lifted (keeps the Equinox ``shape`` and flags for lowering).

    Attributes:
      origin: The original class and static fields (static).
    """

    origin: EqxOrigin | None = static_field(default=None)


@pytree_dataclass
class EqxRMSNorm(RMSNorm):
    """``eqx.nn.RMSNorm`` lifted (weight *and* bias, as Equinox has by default).

    Attributes:
      origin: The original class and static fields (static).
    """

    origin: EqxOrigin | None = static_field(default=None)


@pytree_dataclass
class EqxGroupNorm(GroupNorm):
    """``eqx.nn.GroupNorm`` lifted; channels first, ``across_axes`` the spatial names.

    Attributes:
      origin: The original class and static fields (static).
    """

    origin: EqxOrigin | None = static_field(default=None)


@pytree_dataclass
class EqxConv(Conv):
    """``eqx.nn.Conv`` / ``Conv1d..3d`` lifted (kernel buffer ``(out, in/groups, *kernel)`` kept).

    Attributes:
      origin: The original class and static fields (static).
    """

    origin: EqxOrigin | None = static_field(default=None)


@pytree_dataclass
class EqxConvTranspose(ConvTranspose):
    """``eqx.nn.ConvTranspose`` / ``ConvTranspose1d..3d`` lifted.

    Attributes:
      origin: The original class and static fields (static).
    """

    origin: EqxOrigin | None = static_field(default=None)


@pytree_dataclass
class EqxPReLU(PReLU):
    """``eqx.nn.PReLU`` lifted (ignores a ``key`` side input, unlike the original).

    Attributes:
      origin: The original class and static fields (static).
    """

    origin: EqxOrigin | None = static_field(default=None)


def _eqx_dropout(data: jax.Array, key: jax.Array, rate: float) -> jax.Array:
    # Equinox's formula exactly: bernoulli(key, q, shape), then where(mask, x / q, 0).
    q = 1 - jax.lax.stop_gradient(rate)
    mask = jax.random.bernoulli(key, q, data.shape)
    return jnp.where(mask, data / q, 0)


@pytree_dataclass
class EqxDropout(Dropout):
    """``eqx.nn.Dropout`` lifted: a :class:`~pzbridge.nn.dropout.Dropout` that also takes Equinox's ``key``.

    The random key comes from a ``key=`` side input (as Equinox's ``key``) or
    a ``random_stream=`` side input (its next key). ``inference=`` (Equinox)
    or ``train=`` (pzbridge) override the static ``deterministic`` flag.

    The mask is drawn over ``unbatched_axes`` (the axes the original module
    saw) with Equinox's formula and repeated over every other axis, which is
    what ``jax.vmap`` of the original with one shared key does; with
    ``split_axis`` the key is first split along that axis (Equinox attention
    splits it per head). When ``unbatched_axes`` is None one mask spans the
    input's stored layout (for an input the original saw whole, Equinox's
    very mask).

    Attributes:
      unbatched_axes: Names the mask is drawn over, or None for all (static).
      split_axis: Name along which the key is split, or None (static).
      origin: The original class and static fields (static).

    Example:
        >>> drop = EqxDropout(0.5, None, deterministic=False)
        >>> y = drop(nx.ones({"features": 1000}), key=jax.random.key(0))
        >>> sorted(set(y.unwrap("features").tolist()))
        [0.0, 2.0]
    """

    unbatched_axes: tuple[str, ...] | None = static_field(default=None)
    split_axis: str | None = static_field(default=None)
    origin: EqxOrigin | None = static_field(default=None)

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        inference = side_inputs.get("inference")
        train = side_inputs.get("train")
        deterministic = self.deterministic
        if inference is not None:
            deterministic = bool(inference)
        elif train is not None:
            deterministic = not train
        if deterministic or self.rate == 0:
            return x
        key = side_inputs.get("key")
        if key is None and isinstance(side_inputs.get("random_stream"), RandomStream):
            key = side_inputs["random_stream"].next_key()
        if key is None:
            raise PzbridgeError(
                f"EqxDropout(rate={self.rate}): dropping needs a key: pass key=jax.random.key(...) (as for the "
                "Equinox module), random_stream=pzb.RandomStream.from_base_key(key), or inference=True."
            )
        if self.unbatched_axes is None:
            # One mask over the stored layout: for an input the original saw whole, Equinox's very mask.
            data, positional, names = data_layout(x)
            return make_named(_eqx_dropout(data, key, self.rate), positional, names)
        axes = self.unbatched_axes
        if self.split_axis is None:
            return nx.nmap(lambda d: _eqx_dropout(d, key, self.rate))(x.untag(*axes)).tag(*axes)
        keys = nx.wrap(jax.random.split(key, x.named_shape[self.split_axis]), self.split_axis)
        return nx.nmap(lambda d, k: _eqx_dropout(d, k, self.rate))(x.untag(*axes), keys).tag(*axes)


@pytree_dataclass
class SplitAxis(Layer):
    """Splits named axis ``axis`` into ``(first, second)`` (``first`` major) by a free reshape.

    Equinox attention forms heads by ``reshape(seq, heads, -1)`` of a flat
    projection; this is that reshape on names.

    Attributes:
      axis: The axis split (static).
      first: Name of the major part (static).
      first_size: Its size (static).
      second: Name of the minor part (static).

    Example:
        >>> dict(SplitAxis("projection", "heads", 2, "projection")(nx.ones({"projection": 6})).named_shape)
        {'heads': 2, 'projection': 3}
    """

    axis: str = static_field()
    first: str = static_field()
    first_size: int = static_field()
    second: str = static_field()

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        return split_axis(x, self.axis, self.first, self.first_size, self.second)


@pytree_dataclass
class MergeAxes(Layer):
    """Merges adjacent named axes ``(first, second)`` (``first`` major) into ``merged``.

    Example:
        >>> dict(MergeAxes("heads", "projection", "projection")(nx.ones({"heads": 2, "projection": 3})).named_shape)
        {'projection': 6}
    """

    first: str = static_field()
    second: str = static_field()
    merged: str = static_field()

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        return merge_axes(x.canonicalize() if hasattr(x, "canonicalize") else x, self.first, self.second,
                          self.merged)


@pytree_dataclass
class DivideQueries(Layer):
    """``(queries, keys) -> (queries / by, keys)``: Equinox scales queries by division, not a product.

    Example:
        >>> q, k = DivideQueries(2.0)((nx.ones({"a": 1}), 1))
        >>> q.unwrap("a"), k
        (Array([0.5], dtype=float32), 1)
    """

    by: float = static_field()

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        query, key = x
        return query / self.by, key


@pytree_dataclass
class OptionalExplicitMask(ApplyExplicitMask):
    """Applies the ``attn_mask`` side input when one is given, else passes logits through.

    Equinox attention takes an optional boolean mask of shape
    ``(seq, kv_seq)`` or ``(heads, seq, kv_seq)``.

    Example:
        >>> OptionalExplicitMask()(nx.zeros({"seq": 1, "kv_seq": 2})).unwrap("seq", "kv_seq")
        Array([[0., 0.]], dtype=float32)
    """

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        if self.mask is None and side_inputs.get(self.mask_input) is None:
            return x
        return super().__call__(x, **side_inputs)


def _name_mask(mask: Any, seq: str, kv_seq: str, heads: str) -> Any:
    if mask is None:
        return None
    if not nx.is_namedarray(mask):
        names = (heads, seq, kv_seq)[-mask.ndim:]
        return nx.wrap(mask, *names)
    if mask.positional_shape:
        missing = [n for n in (heads, seq, kv_seq) if n not in mask.named_shape]
        return mask.tag(*missing[-len(mask.positional_shape):])
    return mask


@pytree_dataclass
class EqxMultiheadAttention(Attention):
    """``eqx.nn.MultiheadAttention`` lifted: heads as a named axis, every step a sublayer.

    Called on one named array (self-attention) or a tuple ``(query, key,
    value)`` / ``(query, key, value, mask)`` as Equinox is. Side inputs:
    ``attn_mask`` (or ``mask``; boolean over ``seq``/``kv_seq`` and optionally
    ``heads``), ``key`` / ``inference`` for attention dropout, and Equinox's
    ``process_heads`` callable, applied to positional ``(seq, heads, size)``
    heads between the projections and the logits, as Equinox does.

    Attributes:
      seq_axis, kv_seq_axis, heads_axis, projection_axis: Axis names (static).
      origin: The original class and static fields (static).
    """

    seq_axis: str = static_field(default="seq")
    kv_seq_axis: str = static_field(default="kv_seq")
    heads_axis: str = static_field(default="heads")
    projection_axis: str = static_field(default="projection")
    origin: EqxOrigin | None = static_field(default=None)

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        mask = side_inputs.pop("mask", None)
        if isinstance(x, tuple):
            query_in, key_in, value_in, *rest = x
            if rest:
                mask = rest[0]
        else:
            query_in = key_in = value_in = x
        if mask is not None:
            side_inputs["attn_mask"] = _name_mask(mask, self.seq_axis, self.kv_seq_axis, self.heads_axis)
        process_heads = side_inputs.pop("process_heads", None)
        query = self.input_to_query(query_in, **side_inputs)
        key = self.input_to_key(key_in, **side_inputs)
        value = self.input_to_value(value_in, **side_inputs)
        if process_heads is not None:
            query, key, value = self._process(process_heads, query, key, value)
        return self.attend(query, key, value, side_inputs)

    def _process(self, process_heads: Callable, query: Any, key: Any, value: Any) -> tuple[Any, Any, Any]:
        h, p = self.heads_axis, self.projection_axis
        q_axes, kv_axes = (self.seq_axis, h, p), (self.kv_seq_axis, h, p)
        out = nx.nmap(process_heads)(query.untag(*q_axes), key.untag(*kv_axes), value.untag(*kv_axes))
        q, k, v = out
        return q.tag(*q_axes), k.tag(*kv_axes), v.tag(*kv_axes)


@pytree_dataclass
class EqxRotaryEmbedding(ApplyRoPE):
    """``eqx.nn.RotaryPositionalEmbedding`` lifted: RoPE over ``features`` of a ``(seq, features)`` input.

    Attributes:
      origin: The original class and static fields (static).
    """

    origin: EqxOrigin | None = static_field(default=None)


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


@pytree_dataclass
class EqxMaxPool(MaxPool):
    """``eqx.nn.MaxPool{1,2,3}d`` lifted; ``init`` / ``operation`` kept for lowering (static).

    Attributes:
      origin: The original class and static fields (static).
      init: The original ``init`` leaf (static).
      operation: The original ``operation`` leaf (static).
    """

    origin: EqxOrigin | None = static_field(default=None)
    init: Any = static_field(default=None)
    operation: Any = static_field(default=None)


@pytree_dataclass
class EqxAvgPool(AvgPool):
    """``eqx.nn.AvgPool{1,2,3}d`` lifted (divides by the full window, as Equinox does).

    Attributes:
      origin, init, operation: As in :class:`EqxMaxPool` (static).
    """

    origin: EqxOrigin | None = static_field(default=None)
    init: Any = static_field(default=None)
    operation: Any = static_field(default=None)


@pytree_dataclass
class EqxAdaptiveMaxPool(AdaptiveMaxPool):
    """``eqx.nn.AdaptiveMaxPool{1,2,3}d`` lifted.

    Attributes:
      origin: The original class and static fields (static).
      operation: The original ``operation`` leaf (static).
    """

    origin: EqxOrigin | None = static_field(default=None)
    operation: Any = static_field(default=None)


@pytree_dataclass
class EqxAdaptiveAvgPool(AdaptiveAvgPool):
    """``eqx.nn.AdaptiveAvgPool{1,2,3}d`` lifted.

    Attributes:
      origin, operation: As in :class:`EqxAdaptiveMaxPool` (static).
    """

    origin: EqxOrigin | None = static_field(default=None)
    operation: Any = static_field(default=None)
