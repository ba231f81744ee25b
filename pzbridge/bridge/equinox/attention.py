"""Equinox rules for attention: ``MultiheadAttention`` and ``RotaryPositionalEmbedding``.

Equinox keeps four flat ``Linear`` projections (``query_proj (H*qk, in)``
...) and forms heads by reshaping activations ``(seq, H*qk) -> (seq, H,
qk)``. The lifted form keeps those very weight buffers (a flat
``projection`` axis) and splits the *activation* by name instead
(:class:`SplitAxis`, a free reshape), so
heads are a named axis everywhere after the projections while lowering
gives back the original arrays. Every step of Equinox's
``dot_product_attention`` is a sublayer in Equinox's op order: queries are
*divided* by ``sqrt(qk_size)``, the optional boolean mask fills
``finfo.min``, softmax, per-head dropout with a split key, weighted sum,
heads merged, output projection.

Example:
    >>> import jax, jax.numpy as jnp, equinox as eqx
    >>> import pzbridge as pzb
    >>> mha = eqx.nn.MultiheadAttention(2, 8, key=jax.random.key(0))
    >>> x = jnp.ones((3, 8))
    >>> lifted = pzb.lift(mha)
    >>> lifted.positional(x, x, x).shape
    (3, 8)
    >>> pzb.lower(lifted).query_proj.weight is mha.query_proj.weight
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import equinox as eqx

from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.equinox.adapter import EquinoxAdapter
from pzbridge.bridge.equinox.dropout import EqxDropout
from pzbridge.bridge.equinox.linear import lift_linear
from pzbridge.bridge.equinox.traversal import (
    EqxOrigin,
    equinox_rule,
    lift_foreign,
    origin_of,
    rebuild_from_origin,
)
from pzbridge.bridge.lifted import CallingConvention
from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.attention import (
    AttendToValues,
    Attention,
    AttentionLogits,
)
from pzbridge.nn.basic import RenameAxes, Softmax
from pzbridge.nn.combinators import Sequential
from pzbridge.nn.layer import Layer
from pzbridge.nn.masks import ApplyExplicitMask
from pzbridge.nn.named_ops import MergeAxes, SplitAxis
from pzbridge.nn.rope import ApplyRoPE


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
    """The mask on named axes; positional axes are the trailing ones of ``(heads, seq, kv_seq)`` it lacks.

    A ``heads`` axis of size 1 is dropped, so the mask is shared by every head
    (NNX's broadcasting; Equinox itself only takes ``(seq, kv_seq)`` for that).
    """
    if mask is None:
        return None
    if not nx.is_namedarray(mask):
        names = (heads, seq, kv_seq)[-mask.ndim:]
        mask = nx.wrap(mask, *names)
    elif mask.positional_shape:
        missing = [n for n in (heads, seq, kv_seq) if n not in mask.named_shape]
        if len(mask.positional_shape) > len(missing):
            raise NamedAxisError(
                f"EqxMultiheadAttention mask: expected at most the axes (heads, seq, kv_seq), found named shape "
                f"{dict(mask.named_shape)} and {len(mask.positional_shape)} more positional axes "
                f"{mask.positional_shape}. Fix: pass a (seq, kv_seq) or (heads, seq, kv_seq) mask per example "
                "(vmap over batches), or name the extra axes."
            )
        mask = mask.tag(*missing[len(missing) - len(mask.positional_shape):])
    if mask.named_shape.get(heads) == 1:
        mask = nx.nmap(lambda m: m[0])(mask.untag(heads))
    return mask


def _example_convention(ctx: LiftContext) -> CallingConvention | None:
    """The convention of the example call when it differs from the rule's (a per-head mask), else None."""
    if ctx.example is None:
        return None
    convention = call_convention(ctx.naming, ctx.example.args, ctx.example.kwargs)
    return None if convention == _convention(ctx.naming) else convention


def call_convention(naming: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> CallingConvention:
    """The convention of one call ``attn(query, key, value[, mask])``: a per-head mask names ``heads`` first.

    Equinox takes a mask ``(seq, kv_seq)`` or ``(heads, seq, kv_seq)``; the
    rule's convention names the former. A converted model called on a batch
    prepends ``batch`` to these names, and a traced parent names the mask's
    axes by them, so they must match the mask's rank.

    Example:
        >>> from pzbridge.bridge.naming import AxisNaming
        >>> import jax.numpy as jnp
        >>> x = jnp.ones((3, 4))
        >>> call_convention(AxisNaming(), (x, x, x, jnp.ones((2, 3, 3), bool)), {}).inputs[3]
        ('heads', 'seq', 'kv_seq')
    """
    mask = args[3] if len(args) > 3 else kwargs.get("mask")
    convention = _convention(naming)
    if len(getattr(mask, "shape", ())) != 3:
        return convention
    tokens = (naming.seq, naming.features)
    return CallingConvention((tokens, tokens, tokens, (naming.heads, naming.seq, naming.kv_seq)), tokens)


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
      traced_convention: The calling convention of the example call when it
        differs from the rule's: a per-head mask names ``(heads, seq, kv_seq)``
        (static; None otherwise).
    """

    seq_axis: str = static_field(default="seq")
    kv_seq_axis: str = static_field(default="kv_seq")
    heads_axis: str = static_field(default="heads")
    projection_axis: str = static_field(default="projection")
    origin: EqxOrigin | None = static_field(default=None)
    traced_convention: CallingConvention | None = static_field(default=None)

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


def _convention(naming: Any) -> CallingConvention:
    tokens = (naming.seq, naming.features)
    return CallingConvention((tokens, tokens, tokens, (naming.seq, naming.kv_seq)), tokens)


@equinox_rule(source=eqx.nn.MultiheadAttention, lifted=(EqxMultiheadAttention,))
class MultiheadAttentionRule:
    """``eqx.nn.MultiheadAttention`` <-> ``EqxMultiheadAttention`` (heads a named axis).

    Axes: inputs ``{seq, features}``; projections' weights ``{projection,
    features}`` (flat ``H*size``), split into ``{heads, projection}`` on the
    activations; keys/values renamed to ``kv_seq``. An edited attention that
    no longer has this shape lowers to an adapter taking ``(query, key,
    value, mask)`` like the original.
    """

    def lift(self, module: eqx.nn.MultiheadAttention, ctx: LiftContext) -> Any:
        naming = ctx.naming
        f, seq, kv, h, p = naming.features, naming.seq, naming.kv_seq, naming.heads, naming.projection
        dropout = module.dropout
        if type(dropout) is not eqx.nn.Dropout or not isinstance(dropout.p, (int, float)):
            return lift_foreign(module, ctx)

        def heads(proj: eqx.nn.Linear, name: str, rename: bool) -> Sequential:
            layers = [lift_linear(proj, ctx.child(name), f, p), SplitAxis(p, h, module.num_heads, p)]
            return Sequential(layers + ([RenameAxes((seq,), (kv,))] if rename else []))

        drop = EqxDropout(dropout.p, None, deterministic=dropout.inference, unbatched_axes=(seq, kv), split_axis=h,
                          origin=origin_of(dropout))
        return EqxMultiheadAttention(
            input_to_query=heads(module.query_proj, "query_proj", False),
            input_to_key=heads(module.key_proj, "key_proj", True),
            input_to_value=heads(module.value_proj, "value_proj", True),
            query_key_to_logits=Sequential([DivideQueries(math.sqrt(module.qk_size)), AttentionLogits(p, h, h, kv)]),
            mask=OptionalExplicitMask(),
            logits_to_weights=Sequential([Softmax((kv,)), drop]),
            attn_value_to_output=Sequential([
                AttendToValues(kv, h, h), MergeAxes(h, p, p),
                lift_linear(module.output_proj, ctx.child("output_proj"), p, f),
            ]),
            seq_axis=seq, kv_seq_axis=kv, heads_axis=h, projection_axis=p, origin=origin_of(module),
            traced_convention=_example_convention(ctx),
        )

    def convention(self, module: eqx.nn.MultiheadAttention, naming: Any) -> CallingConvention:
        return _convention(naming)

    def call_convention(self, module: eqx.nn.MultiheadAttention, naming: Any, args: Sequence[Any],
                        kwargs: Mapping[str, Any]) -> CallingConvention:
        """The convention of one call (traced parents ask it per call site): see :func:`call_convention`."""
        return call_convention(naming, args, kwargs)

    def lower(self, layer: EqxMultiheadAttention, ctx: LowerContext) -> Any:
        parts = _parse(layer)
        if parts is None:
            naming_conv = CallingConvention(
                ((layer.seq_axis, _features(layer)),) * 3 + ((layer.seq_axis, layer.kv_seq_axis),),
                (layer.seq_axis, _features(layer)),
            )
            return EquinoxAdapter.wrap(layer, ctx, naming_conv)
        query, key, value, output, dropout = parts
        return rebuild_from_origin(
            layer.origin, eqx.nn.MultiheadAttention,
            query_proj=ctx.lower(query, "query_proj"), key_proj=ctx.lower(key, "key_proj"),
            value_proj=ctx.lower(value, "value_proj"), output_proj=ctx.lower(output, "output_proj"),
            dropout=ctx.lower(dropout, "dropout"),
        )


def _features(layer: EqxMultiheadAttention) -> str:
    return getattr(layer.input_to_query.sublayers[0], "features_axis", "features") \
        if isinstance(layer.input_to_query, Sequential) and layer.input_to_query.sublayers else "features"


def _parse(layer: EqxMultiheadAttention) -> tuple[Any, Any, Any, Any, Any] | None:
    """The projections and dropout of an attention still in Equinox's shape, else None."""
    def seq_of(sub: Any, kinds: tuple[type, ...]) -> list[Any] | None:
        if type(sub) is not Sequential or len(sub.sublayers) != len(kinds):
            return None
        ok = all(k is object or type(s) is k for s, k in zip(sub.sublayers, kinds))
        return list(sub.sublayers) if ok else None

    q = seq_of(layer.input_to_query, (object, SplitAxis))
    k = seq_of(layer.input_to_key, (object, SplitAxis, RenameAxes))
    v = seq_of(layer.input_to_value, (object, SplitAxis, RenameAxes))
    logits = seq_of(layer.query_key_to_logits, (DivideQueries, AttentionLogits))
    weights = seq_of(layer.logits_to_weights, (Softmax, EqxDropout))
    out = seq_of(layer.attn_value_to_output, (AttendToValues, MergeAxes, object))
    mask_ok = type(layer.mask) is OptionalExplicitMask and layer.mask.mask is None
    if None in (q, k, v, logits, weights, out) or not mask_ok or layer.origin is None:
        return None
    return q[0], k[0], v[0], out[2], weights[1]


@equinox_rule(source=eqx.nn.RotaryPositionalEmbedding, lifted=(EqxRotaryEmbedding,))
class RotaryEmbeddingRule:
    """``eqx.nn.RotaryPositionalEmbedding`` <-> ``EqxRotaryEmbedding`` (rotate-half over ``{seq, features}``).

    Positions are ``0..seq-1`` unless a ``token_positions`` side input is given.
    """

    def lift(self, module: eqx.nn.RotaryPositionalEmbedding, ctx: LiftContext) -> EqxRotaryEmbedding:
        return EqxRotaryEmbedding(
            max_wavelength=module.theta, convention="rotate_half", projection_axis=ctx.naming.features,
            seq_axis=ctx.naming.seq, origin=origin_of(module),
        )

    def convention(self, module: eqx.nn.RotaryPositionalEmbedding, naming: Any) -> CallingConvention:
        return CallingConvention(((naming.seq, naming.features),), (naming.seq, naming.features))

    def lower(self, layer: ApplyRoPE, ctx: LowerContext) -> Any:
        return rebuild_from_origin(layer.origin, eqx.nn.RotaryPositionalEmbedding, theta=layer.max_wavelength)
