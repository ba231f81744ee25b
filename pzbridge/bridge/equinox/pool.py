"""Equinox rules for pooling: ``MaxPool`` / ``AvgPool`` and the adaptive pools, 1 to 3 dimensions.

Equinox pools an unbatched ``(channels, *spatial)`` input with
``lax.reduce_window``; the lifted :mod:`pzbridge.nn.pooling` layers run the
same reduction over the named spatial axes (``width``; ``height, width``;
``depth, height, width``), with Equinox's ``use_ceil`` as ``ceil_mode`` and
``AvgPool`` dividing by the full window. The ``init`` and ``operation``
leaves Equinox stores are carried as static fields so lowering restores
them. A bare ``eqx.nn.Pool`` (any operation) stays ``Foreign``.

Example:
    >>> import jax.numpy as jnp, equinox as eqx
    >>> import pzbridge as pzb
    >>> pool = eqx.nn.MaxPool2d(2, stride=2)
    >>> x = jnp.arange(32.0).reshape(2, 4, 4)
    >>> bool(jnp.all(pzb.lift(pool).positional(x) == pool(x)))
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
    origin_of,
    rebuild_from_origin,
)
from pzbridge.bridge.lifted import CallingConvention
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.pooling import AdaptiveAvgPool, AdaptiveMaxPool, AvgPool, MaxPool


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


_MAX = (eqx.nn.MaxPool1d, eqx.nn.MaxPool2d, eqx.nn.MaxPool3d)


_AVG = (eqx.nn.AvgPool1d, eqx.nn.AvgPool2d, eqx.nn.AvgPool3d)


_ADAPTIVE_MAX = (eqx.nn.AdaptiveMaxPool1d, eqx.nn.AdaptiveMaxPool2d, eqx.nn.AdaptiveMaxPool3d)


_ADAPTIVE_AVG = (eqx.nn.AdaptiveAvgPool1d, eqx.nn.AdaptiveAvgPool2d, eqx.nn.AdaptiveAvgPool3d)


def _convention(n: int, naming: Any) -> CallingConvention:
    names = (naming.channels, *naming.spatial(n))
    return CallingConvention((names,), names)


class WindowPoolRule:
    """``eqx.nn.MaxPool*`` / ``AvgPool*`` <-> ``EqxMaxPool`` / ``EqxAvgPool`` over the spatial names."""

    def lift(self, module: Any, ctx: LiftContext) -> Any:
        cls = EqxMaxPool if isinstance(module, _MAX) else EqxAvgPool
        return cls(module.kernel_size, module.stride, module.padding, ceil_mode=module.use_ceil,
                   spatial_axes=ctx.naming.spatial(module.num_spatial_dims), origin=origin_of(module),
                   init=module.init, operation=module.operation)

    def convention(self, module: Any, naming: Any) -> CallingConvention:
        return _convention(module.num_spatial_dims, naming)

    def lower(self, layer: Any, ctx: LowerContext) -> Any:
        n = len(layer.spatial_axes)
        exact = getattr(layer, "origin", None) is not None and layer.dilation == (1,) * n and (
            isinstance(layer, MaxPool) or layer.count_include_pad)
        if not exact:
            return EquinoxAdapter.wrap(layer, ctx, CallingConvention(((layer.spatial_axes),), layer.spatial_axes))
        padding = layer.padding if isinstance(layer.padding, str) else tuple(tuple(p) for p in layer.padding)
        return rebuild_from_origin(
            layer.origin, layer.origin.cls, init=layer.init, operation=layer.operation, num_spatial_dims=n,
            kernel_size=tuple(layer.window), stride=tuple(layer.strides), padding=padding, use_ceil=layer.ceil_mode,
        )


class AdaptivePoolRule:
    """``eqx.nn.Adaptive{Max,Avg}Pool*d`` <-> ``EqxAdaptive{Max,Avg}Pool`` (Equinox's window split)."""

    def lift(self, module: Any, ctx: LiftContext) -> Any:
        cls = EqxAdaptiveMaxPool if isinstance(module, _ADAPTIVE_MAX) else EqxAdaptiveAvgPool
        n = len(module.target_shape)
        return cls(module.target_shape, spatial_axes=ctx.naming.spatial(n), origin=origin_of(module),
                   operation=module.operation)

    def convention(self, module: Any, naming: Any) -> CallingConvention:
        return _convention(len(module.target_shape), naming)

    def lower(self, layer: Any, ctx: LowerContext) -> Any:
        if getattr(layer, "origin", None) is None:
            return EquinoxAdapter.wrap(layer, ctx, CallingConvention(((layer.spatial_axes),), layer.spatial_axes))
        return rebuild_from_origin(layer.origin, layer.origin.cls, target_shape=tuple(layer.output_size),
                                   operation=layer.operation)


for _cls in _MAX + _AVG:
    equinox_rule(source=_cls)(WindowPoolRule)


for _cls in _ADAPTIVE_MAX + _ADAPTIVE_AVG:
    equinox_rule(source=_cls)(AdaptivePoolRule)


equinox_rule(lifted=(EqxMaxPool, EqxAvgPool, MaxPool, AvgPool))(WindowPoolRule)


equinox_rule(lifted=(EqxAdaptiveMaxPool, EqxAdaptiveAvgPool, AdaptiveMaxPool, AdaptiveAvgPool))(AdaptivePoolRule)
