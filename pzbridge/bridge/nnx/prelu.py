"""Flax NNX ``PReLU`` rule.

``nnx.PReLU`` holds one scalar ``negative_slope`` and, with ``dtype=None``,
casts it to the input dtype before ``where(x >= 0, x, slope * x)``. It lifts
to :class:`pzbridge.nn.activations.PReLU` with ``cast_slope_to_input=True``
(the same ops, so bit-for-bit equal) and a scalar (axis-free) slope; being
elementwise, every axis passes through. Non-default ``dtype`` /
``promote_dtype`` or extra data attributes stay ``Foreign``.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import pzbridge as pzb
    >>> act = nnx.PReLU(0.1)
    >>> pzb.lift(act).positional(jnp.array([-2.0, 3.0])).tolist()
    [-0.20000000298023224, 3.0]
"""

from __future__ import annotations

import functools
from typing import Any

from flax import nnx

from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.lifted import CallingConvention
from pzbridge.bridge.naming import AxisNaming
from pzbridge.bridge.nnx.adapter import NnxAdapter
from pzbridge.bridge.nnx.statics import (
    NnxStatics,
    build_module,
    fresh_statics,
    has_data,
    statics_match,
)
from pzbridge.bridge.nnx.traversal import lift_foreign, nnx_rule
from pzbridge.bridge.nnx.variables import lift_variable, nnx_variable, storage_names
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.activations import PReLU


@pytree_dataclass
class NnxPReLU(PReLU):
    """``nnx.PReLU`` lifted: a pzbridge ``PReLU`` plus the NNX statics.

    Attributes:
      config: The original module's statics (static; None if built in pzbridge).

    Example:
        >>> NnxPReLU(None).config is None
        True
    """

    config: Any = static_field(default=None)


@functools.lru_cache(maxsize=None)
def _defaults() -> NnxStatics:
    return fresh_statics(lambda: nnx.PReLU())


@nnx_rule(source=nnx.PReLU, lifted=(NnxPReLU,))
class PReLURule:
    """``nnx.PReLU`` <-> ``NnxPReLU``; ``negative_slope ()`` -> scalar ``alpha`` (no axes).

    Acts elementwise: names pass through it in a sequence.
    """

    elementwise = True

    def _supported(self, module: nnx.PReLU) -> bool:
        return (has_data(module, ("negative_slope",)) and statics_match(module, _defaults(), ("dtype", "promote_dtype"))
                and module.negative_slope.get_raw_value().ndim == 0)

    def lift(self, module: nnx.PReLU, ctx: LiftContext) -> Any:
        if not self._supported(module):
            return lift_foreign(module, ctx)
        alpha = lift_variable(module.negative_slope, ctx.child("negative_slope"), ())
        return NnxPReLU(alpha, cast_slope_to_input=True, dtype=None, config=NnxStatics.of(module))

    def convention(self, module: nnx.PReLU, naming: AxisNaming) -> CallingConvention | None:
        return CallingConvention(((),), ()) if self._supported(module) else None

    def lower(self, layer: NnxPReLU, ctx: LowerContext) -> Any:
        if (layer.config is None or not layer.cast_slope_to_input or layer.dtype is not None
                or storage_names(layer.alpha) != () or getattr(layer.alpha.value, "ndim", 0) != 0):
            return NnxAdapter.wrap(layer, ctx, CallingConvention(((),), ()))
        return build_module(nnx.PReLU, layer.config,
                            {"negative_slope": nnx_variable(layer.alpha, ctx.child("negative_slope"), ())})
