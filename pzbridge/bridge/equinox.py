"""Equinox lifting and lowering rules, both directions side by side.

Each rule names the ``eqx.nn`` class it lifts and the lifted class(es) it
lowers, and documents the axis naming. The shared machinery (dispatch,
``Foreign`` templates, adapters) is in :mod:`pzbridge.bridge.equinox_core`.

Example:
    >>> import jax, jax.numpy as jnp, equinox as eqx
    >>> import pzbridge as pzb
    >>> linear = eqx.nn.Linear(3, 4, key=jax.random.key(0))
    >>> lifted = pzb.lift(linear)
    >>> bool(jnp.all(lifted.positional(jnp.ones(3)) == linear(jnp.ones(3))))
    True
    >>> pzb.lower(lifted).weight is linear.weight
    True
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax

from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.equinox_core import EQUINOX, equinox_rule, new_module, with_names
from pzbridge.bridge.equinox_layers import EqxLinear, EqxSequential
from pzbridge.bridge.lifted import CallingConvention
from pzbridge.core.errors import LowerError
from pzbridge.core import named_axes as nx
from pzbridge.nn.basic import Elementwise, RenameAxes
from pzbridge.nn.combinators import Identity, Sequential
from pzbridge.nn.foreign import Foreign
from pzbridge.nn.linear import AddBias, Affine, Linear, weight_output_name


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
        >>> from pzbridge.bridge.equinox_core import new_lift_context
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
    """``[RenameAxes?, Linear, RenameAxes?, AddBias?]`` -> (linear, bias), else None."""
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


@equinox_rule(source=eqx.nn.Identity, lifted=(Identity,))
class IdentityRule:
    """``eqx.nn.Identity`` <-> ``Identity``."""

    def lift(self, module: eqx.nn.Identity, ctx: LiftContext) -> Identity:
        return Identity()

    def lower(self, layer: Identity, ctx: LowerContext) -> eqx.nn.Identity:
        return new_module(eqx.nn.Identity)


@equinox_rule(source=eqx.nn.Lambda, lifted=(Elementwise,))
class LambdaRule:
    """``eqx.nn.Lambda(fn)`` <-> ``Elementwise(fn)``.

    Equinox applies ``fn`` to the unbatched array; ``Elementwise`` applies it
    to the whole named array, which is the same for elementwise functions
    (activations). Non-elementwise functions should stay ``Foreign``:
    register your own rule for a ``Lambda`` subclass if needed.
    """

    def lift(self, module: eqx.nn.Lambda, ctx: LiftContext) -> Elementwise:
        return Elementwise(module.fn)

    def lower(self, layer: Elementwise, ctx: LowerContext) -> eqx.nn.Lambda:
        return new_module(eqx.nn.Lambda, fn=layer.fn)


def _convention_of(layer: Any, naming: Any) -> CallingConvention | None:
    rule = EQUINOX.lift_rule_for(type(layer))
    if _preserves_shape(layer) or rule is None or not hasattr(rule, "convention"):
        return None
    return rule.convention(layer, naming)


def _preserves_shape(layer: Any) -> bool:
    if type(layer) is eqx.nn.Sequential:
        return all(_preserves_shape(sub) for sub in layer.layers)
    return type(layer) in (eqx.nn.Lambda, eqx.nn.Identity, eqx.nn.Dropout)


@equinox_rule(source=eqx.nn.Sequential, lifted=(EqxSequential, Sequential))
class SequentialRule:
    """``eqx.nn.Sequential`` <-> ``EqxSequential`` (layers lifted in order; ``key`` split per layer).

    Any other pzbridge ``Sequential`` (including named groups) lowers to
    ``eqx.nn.Sequential`` of its lowered sublayers.
    """

    def lift(self, module: eqx.nn.Sequential, ctx: LiftContext) -> EqxSequential:
        layers = [ctx.lift(layer, "layers", i) for i, layer in enumerate(module.layers)]
        conventions = [_convention_of(layer, ctx.naming) for layer in module.layers]
        for i, lifted in enumerate(layers):
            if isinstance(lifted, Foreign):
                # An unknown module's own axes are named by its neighbours.
                before = next((c.output for c in reversed(conventions[:i]) if c and c.output is not None), None)
                after = next((c.inputs[0] for c in conventions[i + 1 :] if c and c.inputs), None)
                inputs = before if before is not None else (after or ())
                layers[i] = with_names(lifted, inputs, after if after is not None else inputs)
        return EqxSequential(layers)

    def convention(self, module: eqx.nn.Sequential, naming: Any) -> CallingConvention | None:
        """The first named layer's input names and the last one's output names.

        Shape-preserving layers (``Lambda``, ``Identity``, ``Dropout``) are
        skipped; None when a layer without a convention comes first.
        """
        def first(layers: Any) -> CallingConvention | None:
            for layer in layers:
                if _preserves_shape(layer):
                    continue
                rule = EQUINOX.lift_rule_for(type(layer))
                return rule.convention(layer, naming) if hasattr(rule, "convention") else None
            return None

        head, tail = first(module.layers), first(reversed(module.layers))
        return None if head is None or tail is None else CallingConvention(head.inputs, tail.output)

    def lower(self, layer: Sequential, ctx: LowerContext) -> eqx.nn.Sequential:
        return new_module(
            eqx.nn.Sequential, layers=tuple(ctx.lower(sub, "layers", i) for i, sub in enumerate(layer.sublayers))
        )


# Rule modules register themselves on import; they are split by topic to keep files short.
from pzbridge.bridge import equinox_dense as _dense  # noqa: E402,F401
from pzbridge.bridge import equinox_norm as _norm  # noqa: E402,F401
from pzbridge.bridge import equinox_attention as _attention  # noqa: E402,F401
from pzbridge.bridge import equinox_conv as _conv  # noqa: E402,F401
from pzbridge.bridge import equinox_shared as _shared  # noqa: E402,F401
from pzbridge.bridge import equinox_pool as _pool  # noqa: E402,F401
from pzbridge.bridge import equinox_recurrent as _recurrent  # noqa: E402,F401
from pzbridge.bridge import equinox_groupnorm as _groupnorm  # noqa: E402,F401
from pzbridge.bridge import equinox_state as _state  # noqa: E402,F401
