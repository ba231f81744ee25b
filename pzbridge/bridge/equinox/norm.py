"""Equinox rules for normalisation: ``LayerNorm`` and ``RMSNorm``.

Equinox normalises the whole unbatched input (``shape == x.shape``), in at
least float32, as ``weight * ((x - mean) * rsqrt(var + eps)) + bias``; the
pzbridge norms reproduce that op order with their default knobs
(``dtype_policy="input"``, two-pass variance), so lifted norms are exact.
A one-axis shape is named ``features``; multi-axis shapes keep the layer
``Foreign`` (the axes' meaning is the model's, not the layer's).

Example:
    >>> import jax.numpy as jnp, equinox as eqx
    >>> import pzbridge as pzb
    >>> norm = eqx.nn.RMSNorm(4)
    >>> lifted = pzb.lift(norm)
    >>> bool(jnp.allclose(lifted.positional(jnp.arange(4.0)), norm(jnp.arange(4.0)), atol=1e-6))
    True
"""

from __future__ import annotations

from typing import Any

import equinox as eqx

from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.equinox.adapter import EquinoxAdapter
from pzbridge.bridge.equinox.traversal import (
    EqxOrigin,
    equinox_rule,
    lift_foreign,
    origin_of,
    rebuild_from_origin,
)
from pzbridge.bridge.lifted import CallingConvention
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.normalization import LayerNorm, RMSNorm


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


def _lift_norm(module: Any, ctx: LiftContext, lifted_cls: type) -> Any:
    if len(module.shape) != 1:
        return lift_foreign(module, ctx)
    f = ctx.naming.features
    weight = None if module.weight is None else ctx.child("weight").parameter(module.weight, (f,))
    bias = None if module.bias is None else ctx.child("bias").parameter(module.bias, (f,))
    return lifted_cls(weight, bias, (f,), module.eps, origin=origin_of(module))


def _lower_norm(layer: Any, ctx: LowerContext, eqx_cls: type) -> Any:
    """The Equinox norm for a one-axis norm with Equinox op order, else an adapter."""
    axis = layer.across_axes[0] if len(layer.across_axes) == 1 else None
    params = [p for p in (layer.scale, layer.bias) if p is not None]
    fits = (
        axis is not None and not layer.use_fast_variance and not layer.scale_into_inverse
        and layer.dtype_policy == "input" and all(tuple(p.value.named_axes) == (axis,) for p in params)
    )
    origin = getattr(layer, "origin", None)
    if not fits:  # (an NNX InstanceNorm reaches here too: it reduces over no named axis)
        return EquinoxAdapter.wrap(layer, ctx)
    size = params[0].value.named_shape[axis] if params else (origin.get("shape", (None,))[0] if origin else None)
    if size is None:
        return EquinoxAdapter.wrap(layer, ctx)
    weight = None if layer.scale is None else ctx.child("weight").array(layer.scale, (axis,))
    bias = None if layer.bias is None else ctx.child("bias").array(layer.bias, (axis,))
    return rebuild_from_origin(
        origin, eqx_cls, shape=(size,), eps=layer.epsilon, use_weight=weight is not None,
        use_bias=bias is not None, weight=weight, bias=bias,
    )


def _convention(module: Any, naming: Any) -> CallingConvention:
    names = (naming.features,) if len(module.shape) == 1 else ()
    return CallingConvention((names,), names)


@equinox_rule(source=eqx.nn.LayerNorm, lifted=(EqxLayerNorm, LayerNorm))
class LayerNormRule:
    """``eqx.nn.LayerNorm(d)`` <-> ``EqxLayerNorm``; ``weight``/``bias (d,)`` -> ``{features}``."""

    def lift(self, module: eqx.nn.LayerNorm, ctx: LiftContext) -> Any:
        return _lift_norm(module, ctx, EqxLayerNorm)

    def convention(self, module: eqx.nn.LayerNorm, naming: Any) -> CallingConvention:
        return _convention(module, naming)

    def lower(self, layer: LayerNorm, ctx: LowerContext) -> Any:
        return _lower_norm(layer, ctx, eqx.nn.LayerNorm)


@equinox_rule(source=eqx.nn.RMSNorm, lifted=(EqxRMSNorm, RMSNorm))
class RMSNormRule:
    """``eqx.nn.RMSNorm(d)`` <-> ``EqxRMSNorm`` (weight *and* bias, Equinox's default) over ``{features}``."""

    def lift(self, module: eqx.nn.RMSNorm, ctx: LiftContext) -> Any:
        return _lift_norm(module, ctx, EqxRMSNorm)

    def convention(self, module: eqx.nn.RMSNorm, naming: Any) -> CallingConvention:
        return _convention(module, naming)

    def lower(self, layer: RMSNorm, ctx: LowerContext) -> Any:
        return _lower_norm(layer, ctx, eqx.nn.RMSNorm)
