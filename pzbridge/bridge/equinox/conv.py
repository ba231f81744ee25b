"""Equinox rules for convolutions: ``Conv`` / ``ConvTranspose`` in 1, 2 and 3 dimensions.

Equinox convolves an unbatched ``(channels, *spatial)`` input with a kernel
``(out, in/groups, *kernel)`` and adds a bias ``(out, 1, ..., 1)``. The
lifted :class:`~pzbridge.nn.conv.Conv` / ``ConvTranspose`` keep both buffers
as they are, naming the kernel ``{channels_out, channels, kernel_<spatial>...}``
and the bias ``{channels, unit_<spatial>...}`` (size-1 axes), and take
Equinox's strides, padding (string or ``(lo, hi)`` pairs), padding mode,
dilation, groups and output padding as static fields. The spatial axes are
``width`` (1-d), ``height, width`` (2-d), ``depth, height, width`` (3-d).

Example:
    >>> import jax, jax.numpy as jnp, equinox as eqx
    >>> import pzbridge as pzb
    >>> conv = eqx.nn.Conv2d(3, 4, 3, padding=1, key=jax.random.key(0))
    >>> x = jnp.ones((3, 5, 5))
    >>> bool(jnp.allclose(pzb.lift(conv).positional(x), conv(x), atol=1e-6))
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
from pzbridge.nn.conv import Conv, kernel_axis_name
from pzbridge.nn.conv_transpose import ConvTranspose


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


_CONV_CLASSES = (eqx.nn.Conv, eqx.nn.Conv1d, eqx.nn.Conv2d, eqx.nn.Conv3d)


_TRANSPOSE_CLASSES = (eqx.nn.ConvTranspose, eqx.nn.ConvTranspose1d, eqx.nn.ConvTranspose2d, eqx.nn.ConvTranspose3d)


def _unit_name(spatial: str) -> str:
    return "unit_" + spatial


def _lift_conv(module: Any, ctx: LiftContext, lifted_cls: type, **extra: Any) -> Any:
    c = ctx.naming.channels
    spatial = ctx.naming.spatial(module.num_spatial_dims)
    kernel = ctx.child("weight").parameter(module.weight, (c + "_out", c, *map(kernel_axis_name, spatial)))
    bias = None
    if module.bias is not None:
        bias = ctx.child("bias").parameter(module.bias, (c, *map(_unit_name, spatial)))
    return lifted_cls(
        kernel, bias, spatial_axes=spatial, in_channel_axis=c, out_channel_axis=c, strides=module.stride,
        padding=module.padding, padding_mode=module.padding_mode.lower(), dilation=module.dilation,
        groups=module.groups, origin=origin_of(module), **extra,
    )


def _conv_convention(module: Any, naming: Any) -> CallingConvention:
    names = (naming.channels, *naming.spatial(module.num_spatial_dims))
    return CallingConvention((names,), names)


def _lower_conv(layer: Any, ctx: LowerContext, default_cls: type, **extra: Any) -> Any:
    origin = getattr(layer, "origin", None)
    kernel_value = layer.kernel.value
    c_in, c_out = layer.in_channel_axis, layer.out_channel_axis
    out_stored = c_out + "_out" if c_out == c_in else c_out
    kernel_names = (out_stored, c_in, *map(kernel_axis_name, layer.spatial_axes))
    fits = set(getattr(kernel_value, "named_axes", ())) == set(kernel_names)
    fits = fits and getattr(layer, "precision", None) is None
    if isinstance(layer, Conv) and layer.input_dilation != (1,) * layer.num_spatial_dims:
        fits = False
    if layer.padding == "CAUSAL" or not fits:
        return EquinoxAdapter.wrap(layer, ctx, CallingConvention(((c_in, *layer.spatial_axes),),
                                                                 (c_out, *layer.spatial_axes)))
    weight = ctx.child("weight").array(layer.kernel, kernel_names)
    bias = None
    if layer.bias is not None:
        bias_value = layer.bias.value
        names = tuple(bias_value.named_axes)
        if len(names) == 1:
            bias = ctx.child("bias").array(layer.bias, names).reshape((-1,) + (1,) * layer.num_spatial_dims)
        else:
            bias = ctx.child("bias").array(layer.bias, (c_out, *[n for n in names if n != c_out]))
    n = layer.num_spatial_dims
    padding = layer.padding if isinstance(layer.padding, str) else tuple(tuple(p) for p in layer.padding)
    fields = dict(
        num_spatial_dims=n, weight=weight, bias=bias, in_channels=weight.shape[1] * layer.groups,
        out_channels=weight.shape[0], kernel_size=tuple(weight.shape[2:]), stride=tuple(layer.strides),
        padding=padding, dilation=tuple(layer.dilation), groups=layer.groups, use_bias=bias is not None,
        padding_mode=layer.padding_mode.upper(), **extra,
    )
    if origin is None:
        cls = {1: default_cls[1], 2: default_cls[2], 3: default_cls[3]}[n]
        return rebuild_from_origin(None, cls, **fields)
    return rebuild_from_origin(origin, origin.cls, **fields)


@equinox_rule(lifted=(EqxConv, Conv))
class ConvRule:
    """``eqx.nn.Conv{,1d,2d,3d}`` <-> ``EqxConv`` (kernel ``{channels_out, channels, kernel_<spatial>...}``).

    A ``Conv`` with input dilation, ``CAUSAL`` padding or a re-laid-out
    kernel lowers through an adapter.
    """

    def lift(self, module: Any, ctx: LiftContext) -> EqxConv:
        return _lift_conv(module, ctx, EqxConv)

    def convention(self, module: Any, naming: Any) -> CallingConvention:
        return _conv_convention(module, naming)

    def lower(self, layer: Conv, ctx: LowerContext) -> Any:
        return _lower_conv(layer, ctx, {1: eqx.nn.Conv1d, 2: eqx.nn.Conv2d, 3: eqx.nn.Conv3d})


@equinox_rule(lifted=(EqxConvTranspose, ConvTranspose))
class ConvTransposeRule:
    """``eqx.nn.ConvTranspose{,1d,2d,3d}`` <-> ``EqxConvTranspose`` (forward padding, ``output_padding``)."""

    def lift(self, module: Any, ctx: LiftContext) -> EqxConvTranspose:
        return _lift_conv(module, ctx, EqxConvTranspose, output_padding=module.output_padding)

    def convention(self, module: Any, naming: Any) -> CallingConvention:
        return _conv_convention(module, naming)

    def lower(self, layer: ConvTranspose, ctx: LowerContext) -> Any:
        if layer.flip_kernel:
            c = layer.in_channel_axis
            return EquinoxAdapter.wrap(layer, ctx, CallingConvention(((c, *layer.spatial_axes),),
                                                                     (layer.out_channel_axis, *layer.spatial_axes)))
        classes = {1: eqx.nn.ConvTranspose1d, 2: eqx.nn.ConvTranspose2d, 3: eqx.nn.ConvTranspose3d}
        return _lower_conv(layer, ctx, classes, output_padding=tuple(layer.output_padding))


for _cls in _CONV_CLASSES:
    equinox_rule(source=_cls)(ConvRule)


for _cls in _TRANSPOSE_CLASSES:
    equinox_rule(source=_cls)(ConvTransposeRule)
