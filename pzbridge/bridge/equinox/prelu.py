"""Equinox ``PReLU``, both directions side by side.

``eqx.nn.PReLU`` lifts to :class:`EqxPReLU`, a pzbridge ``PReLU`` whose slope is
a ``Parameter``; a scalar slope (Equinox's default ``0.25``) keeps its shape.

Example:
    >>> import jax.numpy as jnp, equinox as eqx
    >>> import pzbridge as pzb
    >>> prelu = eqx.nn.PReLU()
    >>> pzb.lift(prelu).positional(jnp.array([-4.0, 1.0])).tolist()
    [-1.0, 1.0]
"""

from __future__ import annotations

from typing import Any

import equinox as eqx

from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.equinox.traversal import (
    EqxOrigin,
    equinox_rule,
    is_array,
    lift_foreign,
    origin_of,
    rebuild_from_origin,
)
from pzbridge.bridge.lifted import CallingConvention
from pzbridge.core.errors import LowerError
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.activations import PReLU


@pytree_dataclass
class EqxPReLU(PReLU):
    """``eqx.nn.PReLU`` lifted (ignores a ``key`` side input, unlike the original).

    Attributes:
      origin: The original class and static fields (static).
    """

    origin: EqxOrigin | None = static_field(default=None)


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
