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
from pzbridge.bridge.equinox_core import equinox_rule
from pzbridge.bridge.equinox_layers import EqxLinear, EqxSequential
from pzbridge.bridge.lifted import CallingConvention
from pzbridge.core.errors import LowerError
from pzbridge.nn.basic import Elementwise
from pzbridge.nn.combinators import Identity, Sequential
from pzbridge.nn.linear import AddBias, Affine, Linear


def new_module(cls: type, **fields: Any) -> Any:
    """Builds an Equinox module from its field values without running ``__init__``.

    ``__init__`` of built-in layers draws random weights (slow for big models
    and needing a key); the fields fully determine the module.

    Example:
        >>> new_module(eqx.nn.Identity)
        Identity()
    """
    module = object.__new__(cls)
    for name, value in fields.items():
        object.__setattr__(module, name, value)
    return module


def _size(features: Any) -> int:
    return 1 if features == "scalar" else int(features)


@equinox_rule(source=eqx.nn.Linear, lifted=(EqxLinear, Affine, Linear))
class LinearRule:
    """``eqx.nn.Linear`` <-> ``EqxLinear([Linear, AddBias])``.

    ``weight (out, in)`` -> ``{features_out, features}``; ``bias (out,)`` ->
    ``{features}``. A plain ``Affine`` or ``Linear`` with one input and one
    output axis lowers to ``eqx.nn.Linear`` too.
    """

    def lift(self, module: eqx.nn.Linear, ctx: LiftContext) -> EqxLinear:
        f = ctx.naming.features
        weight = ctx.child("weight").parameter(module.weight, (f + "_out", f))
        layers: list[Any] = [Linear(weight, (f,), (f,))]
        if module.bias is not None:
            layers.append(AddBias(ctx.child("bias").parameter(module.bias, (f,))))
        return EqxLinear(layers, in_features=module.in_features, out_features=module.out_features, features_axis=f)

    def convention(self, module: eqx.nn.Linear, naming: Any) -> CallingConvention:
        f = naming.features
        return CallingConvention(((() if module.in_features == "scalar" else (f,)),),
                                 () if module.out_features == "scalar" else (f,))

    def lower(self, layer: Any, ctx: LowerContext) -> eqx.nn.Linear:
        sublayers = layer.sublayers if isinstance(layer, Sequential) else [layer]
        linear, bias = sublayers[0], (sublayers[1] if len(sublayers) > 1 else None)
        if not isinstance(linear, Linear) or len(sublayers) > 2 or (bias is not None and not isinstance(bias, AddBias)):
            return ctx.lower_node(Sequential(list(sublayers)), ctx)
        if len(linear.in_axis_names) != 1 or len(linear.out_axis_names) != 1:
            raise LowerError(
                f"{ctx.where}: eqx.nn.Linear maps one axis to one axis; this Linear maps "
                f"{list(linear.in_axis_names)} -> {list(linear.out_axis_names)}. "
                "Fix: lower it through an adapter by wrapping it in pzb.nn.Sequential, or reshape the axes."
            )
        (f_in,), (f_out,) = linear.in_axis_names, linear.out_axis_names
        w_out = f_out + "_out" if f_out == f_in else f_out
        weight = ctx.child("weight").array(linear.weights, (w_out, f_in))
        bias_array = None if bias is None else ctx.child("bias").array(bias.bias, (f_out,))
        in_features = getattr(layer, "in_features", None) or weight.shape[1]
        out_features = getattr(layer, "out_features", None) or weight.shape[0]
        return new_module(
            eqx.nn.Linear, weight=weight, bias=bias_array, in_features=in_features,
            out_features=out_features, use_bias=bias is not None,
        )


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


@equinox_rule(source=eqx.nn.Sequential, lifted=(EqxSequential, Sequential))
class SequentialRule:
    """``eqx.nn.Sequential`` <-> ``EqxSequential`` (layers lifted in order; ``key`` split per layer).

    Any other pzbridge ``Sequential`` (including named groups) lowers to
    ``eqx.nn.Sequential`` of its lowered sublayers.
    """

    def lift(self, module: eqx.nn.Sequential, ctx: LiftContext) -> EqxSequential:
        return EqxSequential([ctx.lift(layer, "layers", i) for i, layer in enumerate(module.layers)])

    def lower(self, layer: Sequential, ctx: LowerContext) -> eqx.nn.Sequential:
        return new_module(
            eqx.nn.Sequential, layers=tuple(ctx.lower(sub, "layers", i) for i, sub in enumerate(layer.sublayers))
        )
