"""Equinox ``Linear`` and ``MLP`` (including ``scan=True``), both directions side by side.

``eqx.nn.Linear`` lifts to :class:`EqxLinear`: ``[Linear]`` or ``[Linear,
AddBias]`` with the weight named ``{features_out, features}`` (Equinox stores
it ``(out, in)``) and ``"scalar"`` sizes kept as static fields. ``eqx.nn.MLP``
lifts to :class:`EqxMLP`, its layers and activations in order; with
``scan=True`` the stacked middle layers become one :class:`EqxScannedLinears`.
The shared machinery (dispatch, ``Foreign`` templates) is in
:mod:`pzbridge.bridge.equinox.traversal`.

Example:
    >>> import jax, jax.numpy as jnp, equinox as eqx
    >>> import pzbridge as pzb
    >>> linear = eqx.nn.Linear(3, 4, key=jax.random.key(0))
    >>> lifted = pzb.lift(linear)
    >>> bool(jnp.allclose(lifted.positional(jnp.ones(3)), linear(jnp.ones(3)), atol=1e-6))
    True
    >>> pzb.lower(lifted).weight is linear.weight
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax

from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.equinox.traversal import (
    EqxOrigin,
    equinox_rule,
    is_array,
    lift_foreign,
    new_module,
    origin_of,
    rebuild_from_origin,
)
from pzbridge.bridge.lifted import CallingConvention
from pzbridge.core import named_axes as nx
from pzbridge.core.errors import LowerError
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.basic import Elementwise, RenameAxes
from pzbridge.nn.combinators import Sequential
from pzbridge.nn.contraction import contract
from pzbridge.nn.layer import Layer
from pzbridge.nn.linear import AddBias, Affine, Linear, weight_output_name


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


def _size(features: Any) -> int:
    return 1 if features == "scalar" else int(features)


@equinox_rule(source=eqx.nn.Linear, lifted=(EqxLinear, Affine, Linear))
class LinearRule:
    """``eqx.nn.Linear`` <-> ``EqxLinear([Linear, AddBias])``.

    ``weight (out, in)`` -> ``{features_out, features}``; ``bias (out,)`` ->
    ``{features}``. A plain ``Affine`` or ``Linear`` with one input and one
    output axis lowers to ``eqx.nn.Linear`` too.

    A weight tied to an array already lifted under other names (an
    ``eqx.nn.Shared`` embedding used as the output layer) keeps that one
    shared Parameter: the Linear contracts the names the Parameter has and
    ``RenameAxes`` layers map them to and from ``features``.
    """

    def lift(self, module: eqx.nn.Linear, ctx: LiftContext) -> EqxLinear:
        f = ctx.naming.features
        return lift_linear(module, ctx, f, f)

    def convention(self, module: eqx.nn.Linear, naming: Any) -> CallingConvention:
        f = naming.features
        return CallingConvention(((() if module.in_features == "scalar" else (f,)),),
                                 () if module.out_features == "scalar" else (f,))

    def lower(self, layer: Any, ctx: LowerContext) -> Any:
        sublayers = list(layer.sublayers) if isinstance(layer, Sequential) else [layer]
        parsed = _parse_linear(sublayers)
        if parsed is None:
            return ctx.lower_node(Sequential(list(sublayers)), ctx)
        linear, bias = parsed
        if len(linear.in_axis_names) != 1 or len(linear.out_axis_names) != 1:
            raise LowerError(
                f"{ctx.where}: eqx.nn.Linear maps one axis to one axis; this Linear maps "
                f"{list(linear.in_axis_names)} -> {list(linear.out_axis_names)}. "
                "Fix: lower it through an adapter by wrapping it in pzb.nn.Sequential, or reshape the axes."
            )
        (f_in,), (f_out,) = linear.in_axis_names, linear.out_axis_names
        weight = ctx.child("weight").array(linear.weights, (weight_output_name(f_out, (f_in,)), f_in))
        bias_array = None if bias is None else ctx.child("bias").array(bias.bias, tuple(bias.bias.value.named_axes))
        in_features = getattr(layer, "in_features", None) or weight.shape[1]
        out_features = getattr(layer, "out_features", None) or weight.shape[0]
        return new_module(
            eqx.nn.Linear, weight=weight, bias=bias_array, in_features=in_features,
            out_features=out_features, use_bias=bias is not None,
        )


def lift_linear(module: eqx.nn.Linear, ctx: LiftContext, in_axis: str, out_axis: str) -> EqxLinear:
    """Lifts ``module`` as a map from ``in_axis`` to ``out_axis`` (both default ``features``).

    The weight becomes a Parameter over ``(weight_output_name(out_axis), in_axis)``
    holding the original buffer; if that buffer was already lifted under
    other names (a tied weight), the shared Parameter is kept and renames are
    added around the ``Linear``.

    Example:
        >>> from pzbridge.bridge.equinox.traversal import new_lift_context
        >>> lin = eqx.nn.Linear(2, 6, key=jax.random.key(0))
        >>> lifted = lift_linear(lin, new_lift_context(), "features", "projection")
        >>> dict(lifted.sublayers[0].weights.value.named_shape)
        {'projection': 6, 'features': 2}
    """
    w_out = weight_output_name(out_axis, (in_axis,))
    weight = ctx.child("weight").parameter(module.weight, (w_out, in_axis))
    stored_out, stored_in = tuple(weight.value.named_axes)
    linear_out = out_axis if stored_out == w_out else stored_out
    layers: list[Any] = [RenameAxes((in_axis,), (stored_in,))] if stored_in != in_axis else []
    layers.append(Linear(weight, (stored_in,), (linear_out,)))
    if linear_out != out_axis:
        layers.append(RenameAxes((linear_out,), (out_axis,)))
    if module.bias is not None:
        layers.append(AddBias(ctx.child("bias").parameter(module.bias, (out_axis,))))
    return EqxLinear(layers, in_features=module.in_features, out_features=module.out_features,
                     features_axis=in_axis)


def _parse_linear(sublayers: list[Any]) -> tuple[Linear, AddBias | None] | None:
    """``[RenameAxes?, Linear, RenameAxes?, AddBias?]`` -> (linear, bias), else None.

    A nested Sequential item is opened (a Linear lifted from NNX, ``[Linear]``,
    where a converted model comes back with its bias beside it).
    """
    sublayers = [inner for layer in sublayers
                 for inner in (layer.sublayers if isinstance(layer, Sequential) and not isinstance(layer, EqxLinear)
                               else [layer])]
    rest = [layer for layer in sublayers if not isinstance(layer, RenameAxes)]
    renames = len(sublayers) - len(rest)
    if not rest or not isinstance(rest[0], Linear) or len(rest) > 2 or renames > 2:
        return None
    if len(rest) == 2 and not isinstance(rest[1], AddBias):
        return None
    if len(rest) == 2 and (len(rest[1].bias.value.named_shape) != 1 if nx.is_namedarray(rest[1].bias.value) else True):
        return None
    if renames and not isinstance(sublayers[0], (RenameAxes, Linear)):
        return None
    return rest[0], (rest[1] if len(rest) == 2 else None)


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
        if not all(isinstance(m, eqx.nn.Linear) or isinstance(sub, (EqxLinear, EqxScannedLinears))
                   for m, sub in zip(lowered, linears)):  # A projection lifted from NNX that lowered to no Linear.
            return ctx.lower_node(Sequential(list(layer.sublayers)), ctx)
        return rebuild_from_origin(layer.origin, eqx.nn.MLP, layers=tuple(lowered), activation=act,
                                   final_activation=final)


def _parse_mlp(layer: EqxMLP) -> tuple[list[Any], Any, Any] | None:
    """The linear parts and activations of an EqxMLP still in Equinox's pattern, else None."""
    subs = list(layer.sublayers)
    origin = layer.origin
    if origin is None:
        return None
    if origin.get("depth") == 0:
        ok = len(subs) == 1 and _is_linear_part(subs[0])
        return (subs, layer.activation, layer.final_activation) if ok else None
    if origin.get("scan"):
        kinds = (_LinearPart, Elementwise, EqxScannedLinears, _LinearPart, Elementwise)
        if len(subs) != 5 or not all(_is_kind(s, k) for s, k in zip(subs, kinds)):
            return None
        if subs[1].fn is not subs[2].activation:
            return None
        return [subs[0], subs[2], subs[3]], subs[1].fn, subs[4].fn
    if len(subs) % 2 or not all(isinstance(s, Elementwise) for s in subs[1::2]):
        return None
    linears = subs[0::2]
    if not all(_is_linear_part(s) for s in linears) or len({id(s.fn) for s in subs[1:-1:2]}) != 1:
        return None
    return linears, subs[1].fn, subs[-1].fn


class _LinearPart:
    """Marker in :func:`_parse_mlp`'s patterns for :func:`_is_linear_part`."""


def _is_linear_part(layer: Any) -> bool:
    """An ``EqxLinear``, or a ``[Linear, AddBias?]`` group lifted elsewhere (a model converted from NNX and back)."""
    subs = getattr(layer, "sublayers", None) if isinstance(layer, Sequential) else None
    return isinstance(layer, EqxLinear) or bool(subs) and type(subs[0]) is Linear and len(subs) <= 2


def _is_kind(layer: Any, kind: type) -> bool:
    return _is_linear_part(layer) if kind is _LinearPart else isinstance(layer, kind)


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
