"""Equinox rules for dense layers: ``MLP``, ``Embedding``, ``PReLU``, ``Dropout``.

Each rule keeps the original class and static fields in the lifted layer's
``origin`` (see :class:`~pzbridge.bridge.equinox_layers.EqxOrigin`), so an
untouched layer lowers to exactly the module it came from, while the lifted
body is ordinary pzbridge vocabulary (``Linear``, ``Elementwise``,
``EmbeddingLookup``, ``Dropout``) that selectors and edits understand.
Non-array leaves that Equinox keeps as pytree leaves (``MLP.activation``,
``Dropout.p``) are carried as static fields and put back as they were.

Example:
    >>> import jax, jax.numpy as jnp, equinox as eqx
    >>> import pzbridge as pzb
    >>> mlp = eqx.nn.MLP(3, 2, 4, 2, key=jax.random.key(0))
    >>> lifted = pzb.lift(mlp)
    >>> type(lifted.body).__name__, bool(jnp.allclose(lifted.positional(jnp.ones(3)), mlp(jnp.ones(3))))
    ('EqxMLP', True)
    >>> pzb.lower(lifted).layers[1].weight is mlp.layers[1].weight
    True
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax

from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.equinox_core import equinox_rule, is_array, lift_foreign, origin_of, rebuild_from_origin
from pzbridge.bridge.equinox_layers import EqxDropout, EqxEmbedding, EqxLinear, EqxMLP, EqxPReLU, EqxScannedLinears
from pzbridge.bridge.lifted import CallingConvention
from pzbridge.core.errors import LowerError
from pzbridge.nn.activations import PReLU
from pzbridge.nn.basic import Elementwise
from pzbridge.nn.combinators import Sequential
from pzbridge.nn.dropout import Dropout
from pzbridge.nn.embeddings import EmbeddingLookup, EmbeddingTable


def _has_arrays(tree: Any) -> bool:
    return any(is_array(leaf) for leaf in jax.tree_util.tree_leaves(tree))


@equinox_rule(source=eqx.nn.MLP, lifted=(EqxMLP,))
class MLPRule:
    """``eqx.nn.MLP`` <-> ``EqxMLP([EqxLinear, Elementwise(activation), ..., EqxLinear, Elementwise(final)])``.

    ``scan=True`` keeps the stacked hidden layers as one
    :class:`EqxScannedLinears` (weight ``(depth-1, w, w)`` ->
    ``{layers, features_out, features}``). ``depth=0`` is one ``EqxLinear``
    and, as in Equinox, applies no final activation. Learnt activations (with
    arrays) keep the MLP ``Foreign``. An edited MLP that no longer has this
    pattern lowers to ``eqx.nn.Sequential``.
    """

    def lift(self, module: eqx.nn.MLP, ctx: LiftContext) -> Any:
        if _has_arrays((module.activation, module.final_activation)):
            return lift_foreign(module, ctx)
        origin = origin_of(module)
        act, final = module.activation, module.final_activation
        layers = module.layers
        if module.depth == 0:
            return EqxMLP([ctx.lift(layers[0], "layers", 0)], origin=origin, activation=act, final_activation=final)
        if module.scan:
            first, hidden, last = layers
            sub: list[Any] = [ctx.lift(first, "layers", 0), Elementwise(act), _lift_scanned(hidden, act, ctx)]
            sub += [ctx.lift(last, "layers", 2), Elementwise(final)]
        else:
            sub = []
            for i, linear in enumerate(layers[:-1]):
                sub += [ctx.lift(linear, "layers", i), Elementwise(act)]
            sub += [ctx.lift(layers[-1], "layers", len(layers) - 1), Elementwise(final)]
        return EqxMLP(sub, origin=origin, activation=act, final_activation=final)

    def convention(self, module: eqx.nn.MLP, naming: Any) -> CallingConvention:
        f = naming.features
        return CallingConvention(((() if module.in_size == "scalar" else (f,)),),
                                 () if module.out_size == "scalar" else (f,))

    def lower(self, layer: EqxMLP, ctx: LowerContext) -> Any:
        parsed = _parse_mlp(layer)
        if parsed is None:
            return ctx.lower_node(Sequential(list(layer.sublayers)), ctx)
        linears, act, final = parsed
        lowered = []
        for i, sub in enumerate(linears):
            if isinstance(sub, EqxScannedLinears):
                lowered.append(_lower_scanned(sub, ctx.child("layers", i)))
            else:
                lowered.append(ctx.lower(sub, "layers", i))
        return rebuild_from_origin(layer.origin, eqx.nn.MLP, layers=tuple(lowered), activation=act,
                                   final_activation=final)


def _parse_mlp(layer: EqxMLP) -> tuple[list[Any], Any, Any] | None:
    """The linear parts and activations of an EqxMLP still in Equinox's pattern, else None."""
    subs = list(layer.sublayers)
    origin = layer.origin
    if origin is None:
        return None
    if origin.get("depth") == 0:
        ok = len(subs) == 1 and isinstance(subs[0], EqxLinear)
        return (subs, layer.activation, layer.final_activation) if ok else None
    if origin.get("scan"):
        kinds = (EqxLinear, Elementwise, EqxScannedLinears, EqxLinear, Elementwise)
        if len(subs) != 5 or not all(isinstance(s, k) for s, k in zip(subs, kinds)):
            return None
        if subs[1].fn is not subs[2].activation:
            return None
        return [subs[0], subs[2], subs[3]], subs[1].fn, subs[4].fn
    if len(subs) % 2 or not all(isinstance(s, Elementwise) for s in subs[1::2]):
        return None
    linears = subs[0::2]
    if not all(isinstance(s, EqxLinear) for s in linears) or len({id(s.fn) for s in subs[1:-1:2]}) != 1:
        return None
    return linears, subs[1].fn, subs[-1].fn


def _lift_scanned(hidden: eqx.nn.Linear, activation: Any, ctx: LiftContext) -> EqxScannedLinears:
    f = ctx.naming.features
    child = ctx.child("layers", 1)
    weights = child.child("weight").parameter(hidden.weight, ("layers", f + "_out", f))
    biases = None if hidden.bias is None else child.child("bias").parameter(hidden.bias, ("layers", f))
    return EqxScannedLinears(weights, biases, activation, f, "layers", hidden_origin=origin_of(hidden))


def _lower_scanned(layer: EqxScannedLinears, ctx: LowerContext) -> eqx.nn.Linear:
    f = layer.features_axis
    weight = ctx.child("weight").array(layer.weights, (layer.layers_axis, f + "_out", f))
    bias = None if layer.biases is None else ctx.child("bias").array(layer.biases, (layer.layers_axis, f))
    return rebuild_from_origin(layer.hidden_origin, eqx.nn.Linear, weight=weight, bias=bias)


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


@equinox_rule(source=eqx.nn.PReLU, lifted=(EqxPReLU, PReLU))
class PReLURule:
    """``eqx.nn.PReLU`` <-> ``EqxPReLU``; a scalar slope stays unnamed, a vector slope is ``{features}``."""

    def lift(self, module: eqx.nn.PReLU, ctx: LiftContext) -> Any:
        slope = module.negative_slope
        if not is_array(slope) or slope.ndim > 1:
            return lift_foreign(module, ctx)
        names = (ctx.naming.features,) if slope.ndim == 1 else ()
        return EqxPReLU(ctx.child("negative_slope").parameter(slope, names), origin=origin_of(module))

    def convention(self, module: eqx.nn.PReLU, naming: Any) -> CallingConvention:
        names = (naming.features,) if getattr(module.negative_slope, "ndim", 0) == 1 else ()
        return CallingConvention((names,), names)

    def lower(self, layer: PReLU, ctx: LowerContext) -> Any:
        value = layer.alpha.value
        names = tuple(value.named_axes) if hasattr(value, "named_axes") else ()
        if len(names) > 1 or layer.dtype is not None or layer.cast_slope_to_input:
            raise LowerError(
                f"{ctx.where}: eqx.nn.PReLU needs a scalar or one-axis slope with Equinox dtype rules; found axes "
                f"{list(names)}. Fix: wrap the layer in pzb.nn.Sequential to lower it through an adapter."
            )
        slope = ctx.child("negative_slope").array(layer.alpha, names)
        return rebuild_from_origin(getattr(layer, "origin", None), eqx.nn.PReLU, negative_slope=slope)


@equinox_rule(source=eqx.nn.Dropout, lifted=(EqxDropout, Dropout))
class DropoutRule:
    """``eqx.nn.Dropout(p, inference)`` <-> ``EqxDropout(rate=p, deterministic=inference)``.

    The Equinox call-time ``key`` becomes the ``key`` side input (or a
    ``random_stream`` side input); a generic ``Dropout`` lowers to
    ``eqx.nn.Dropout`` with its rate and flag (its held stream is dropped:
    Equinox dropout takes a key at call time).
    """

    def lift(self, module: eqx.nn.Dropout, ctx: LiftContext) -> Any:
        if not isinstance(module.p, (int, float)) or not isinstance(module.inference, bool):
            return lift_foreign(module, ctx)
        return EqxDropout(module.p, None, deterministic=module.inference, origin=origin_of(module))

    def lower(self, layer: Dropout, ctx: LowerContext) -> Any:
        return rebuild_from_origin(getattr(layer, "origin", None), eqx.nn.Dropout, p=layer.rate,
                                   inference=layer.deterministic)
