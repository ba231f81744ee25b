"""Flax NNX convolution rules: ``Conv`` and ``ConvTranspose``.

NNX convolves channels-last inputs ``(*batch, *spatial, features)`` with a
kernel stored ``(*kernel_size, in/groups, out)``. Both lift to the pzbridge
layers of :mod:`pzbridge.nn.conv` / :mod:`pzbridge.nn.conv_transpose`, which
lay the convolution out by axis names, keep the original kernel buffer and
emit the same single ``lax.conv_general_dilated`` NNX emits, so the lifted
layer is bit-for-bit the NNX layer. The NNX statics ride along in a static
``config`` (as in :mod:`pzbridge.bridge.nnx.norm`), so lowering rebuilds the
very same module (``nnx.graphdef`` equal).

Padding translation: ``"SAME"`` / ``"VALID"`` / pairs as they are;
``"CIRCULAR"`` / ``"REFLECT"`` become explicit pairs ``((k-1)//2, k//2)``
(dilated ``k``) with ``padding_mode`` ``circular`` / ``reflect`` (NNX pads
with ``jnp.pad`` and convolves ``VALID``, and so does pzbridge);
``"CAUSAL"`` stays ``"CAUSAL"``. For ``ConvTranspose`` the ``lax`` padding
becomes the equivalent forward padding
(:func:`~pzbridge.nn.conv_transpose.padding_from_lax_conv_transpose`) and
``transpose_kernel=True`` becomes ``flip_kernel=True`` with the stored kernel
axes named by role (``(*k, channels_out, channels)``).

Kept ``Foreign`` (exact, not editable as pzbridge layers): a ``mask``,
non-default ``dtype`` / ``promote_dtype`` / ``preferred_element_type`` /
``conv_general_dilated``, string padding with input dilation, ``CIRCULAR``
transposed convolutions, more than 3 spatial dimensions, and modules with
extra data attributes. A lifted layer whose configuration was edited lowers
to an ``NnxAdapter``.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import pzbridge as pzb
    >>> conv = nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0))
    >>> lifted = pzb.lift(conv)
    >>> type(lifted.body).__name__, lifted.body.spatial_axes
    ('NnxConv', ('height', 'width'))
    >>> x = jax.random.normal(jax.random.key(0), (2, 5, 5, 3))
    >>> bool(jnp.all(lifted.positional(x) == conv(x)))
    True
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from flax import nnx
from flax.nnx.nn.linear import canonicalize_padding

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
from pzbridge.nn.conv import Conv, kernel_axis_name
from pzbridge.nn.conv_transpose import ConvTranspose, padding_from_lax_conv_transpose
from pzbridge.nn.linear import weight_output_name
from pzbridge.nn.padding import dilated_size, normalize_padding


@pytree_dataclass
class NnxConv(Conv):
    """``nnx.Conv`` lifted: a pzbridge ``Conv`` plus the NNX statics.

    Attributes:
      config: The original module's statics (static; None if built in pzbridge).

    Example:
        >>> NnxConv.__mro__[1].__name__
        'Conv'
    """

    config: Any = static_field(default=None)


@pytree_dataclass
class NnxConvTranspose(ConvTranspose):
    """``nnx.ConvTranspose`` lifted: a pzbridge ``ConvTranspose`` plus the NNX statics.

    Attributes:
      config: The original module's statics (static).

    Example:
        >>> NnxConvTranspose.__mro__[1].__name__
        'ConvTranspose'
    """

    config: Any = static_field(default=None)


_KNOBS = ("dtype", "promote_dtype", "preferred_element_type")


@functools.lru_cache(maxsize=None)
def _defaults(kind: str) -> NnxStatics:
    make: dict[str, Callable[[], Any]] = {
        "conv": lambda: nnx.Conv(1, 1, (1,), rngs=nnx.Rngs(0)),
        "transpose": lambda: nnx.ConvTranspose(1, 1, (1,), rngs=nnx.Rngs(0)),
    }
    return fresh_statics(make[kind])


def _tuple(value: Any, n: int) -> tuple[int, ...]:
    """NNX's ``maybe_broadcast``: None -> 1, an int broadcasts."""
    if value is None:
        value = 1
    return (value,) * n if isinstance(value, int) else tuple(value)


def _kernel_size(get: Callable[[str], Any]) -> tuple[int, ...]:
    size = get("kernel_size")
    return (size,) if isinstance(size, int) else tuple(size)


def _conv_fields(get: Callable[[str], Any]) -> dict[str, Any] | None:
    """The pzbridge ``Conv`` static fields reproducing an NNX ``Conv`` config, or None if inexpressible."""
    window = _kernel_size(get)
    n = len(window)
    if not 1 <= n <= 3:
        return None
    dilation, input_dilation = _tuple(get("kernel_dilation"), n), _tuple(get("input_dilation"), n)
    try:
        padding = canonicalize_padding(get("padding"), n)
    except ValueError:
        return None
    mode = "zeros"
    if padding in ("CIRCULAR", "REFLECT"):
        mode = {"CIRCULAR": "circular", "REFLECT": "reflect"}[padding]
        padding = tuple(((e - 1) // 2, e // 2) for e in map(dilated_size, window, dilation))
    elif padding == "CAUSAL":
        if n != 1:
            return None  # NNX itself raises here.
    elif padding in ("SAME", "VALID"):
        if any(i != 1 for i in input_dilation):
            return None  # lax's own string padding with input dilation: keep NNX's code path.
    elif isinstance(padding, str):
        return None
    else:
        padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    return {"strides": _tuple(get("strides"), n), "padding": normalize_padding(padding, n, "NnxConv"),
            "padding_mode": mode, "dilation": dilation, "input_dilation": input_dilation,
            "groups": get("feature_group_count"), "precision": get("precision"), "num_spatial": n}


def _transpose_fields(get: Callable[[str], Any]) -> dict[str, Any] | None:
    """The pzbridge ``ConvTranspose`` static fields reproducing an NNX ``ConvTranspose`` config."""
    window = _kernel_size(get)
    n = len(window)
    if not 1 <= n <= 3:
        return None
    strides, dilation = _tuple(get("strides"), n), _tuple(get("kernel_dilation"), n)
    try:
        padding = canonicalize_padding(get("padding"), n)
    except ValueError:
        return None
    if isinstance(padding, str) and padding not in ("SAME", "VALID"):
        return None  # CIRCULAR folds the output: no pzbridge counterpart.
    forward = padding_from_lax_conv_transpose(padding, window, strides, dilation)
    return {"strides": strides, "padding": normalize_padding(forward, n, "NnxConvTranspose"),
            "padding_mode": "zeros", "dilation": dilation, "groups": 1, "output_padding": (0,) * n,
            "flip_kernel": bool(get("transpose_kernel")), "precision": get("precision"), "num_spatial": n}


def _kernel_names(spatial: tuple[str, ...], channel_in: str, channel_out: str, swapped: bool) -> tuple[str, ...]:
    """Storage names of an NNX kernel ``(*k, in, out)`` (``(*k, out, in)`` roles when ``swapped``)."""
    out = weight_output_name(channel_out, (channel_in,))
    pair = (out, channel_in) if swapped else (channel_in, out)
    return (*map(kernel_axis_name, spatial), *pair)


def _supported(module: Any, kind: str) -> bool:
    return (has_data(module, ("kernel", "bias", "mask")) and getattr(module, "mask", None) is None
            and statics_match(module, _defaults(kind), _KNOBS + (("conv_general_dilated",) if kind == "conv" else ())))


def _convention(n: int, naming: AxisNaming) -> CallingConvention:
    names = (*naming.spatial(n), naming.channels)
    return CallingConvention((names,), names)


def _lift_params(module: Any, ctx: LiftContext, spatial: tuple[str, ...], swapped: bool) -> tuple[Any, Any]:
    c = ctx.naming.channels
    kernel = lift_variable(module.kernel, ctx.child("kernel"), _kernel_names(spatial, c, c, swapped))
    bias = None if module.bias is None else lift_variable(module.bias, ctx.child("bias"), (c,))
    return kernel, bias


def _adapter(layer: Any, ctx: LowerContext) -> NnxAdapter:
    """An adapter called channels-last, as NNX convolutions are."""
    names = (*layer.spatial_axes, layer.in_channel_axis)
    return NnxAdapter.wrap(layer, ctx, CallingConvention((names,), (*layer.spatial_axes, layer.out_channel_axis)))


def _lower_if_unchanged(layer: Any, ctx: LowerContext, cls: type, fields: dict[str, Any] | None,
                        swapped: bool) -> Any:
    """Rebuilds the NNX module if the lifted layer still has exactly the fields its config gives."""
    if fields is None or len(layer.spatial_axes) != fields.pop("num_spatial"):
        return _adapter(layer, ctx)
    names = _kernel_names(layer.spatial_axes, layer.in_channel_axis, layer.out_channel_axis, swapped)
    bias_names = (layer.out_channel_axis,)
    same = all(getattr(layer, k) == v for k, v in fields.items())
    if (not same or set(storage_names(layer.kernel)) != set(names)
            or (layer.bias is None) != (not layer.config["use_bias"])
            or (layer.bias is not None and set(storage_names(layer.bias)) != set(bias_names))):
        return _adapter(layer, ctx)
    return build_module(cls, layer.config, {
        "kernel": nnx_variable(layer.kernel, ctx.child("kernel"), names),
        "bias": None if layer.bias is None else nnx_variable(layer.bias, ctx.child("bias"), bias_names),
    })


@nnx_rule(source=nnx.Conv, lifted=(NnxConv,))
class ConvRule:
    """``nnx.Conv`` <-> ``NnxConv``; ``kernel (*k, in/groups, out)`` -> ``{kernel_<spatial>..., channels, channels_out}``.

    ``bias (out,)`` -> ``{channels}``; input ``(*batch, *spatial, channels)``
    with spatial names ``width`` / ``height, width`` / ``depth, height, width``.
    """

    def _fields(self, module: nnx.Conv) -> dict[str, Any] | None:
        return _conv_fields(lambda name: getattr(module, name)) if _supported(module, "conv") else None

    def lift(self, module: nnx.Conv, ctx: LiftContext) -> Any:
        fields = self._fields(module)
        if fields is None:
            return lift_foreign(module, ctx)
        spatial = ctx.naming.spatial(fields.pop("num_spatial"))
        kernel, bias = _lift_params(module, ctx, spatial, swapped=False)
        c = ctx.naming.channels
        return NnxConv(kernel, bias, spatial_axes=spatial, in_channel_axis=c, out_channel_axis=c,
                       config=NnxStatics.of(module), **fields)

    def convention(self, module: nnx.Conv, naming: AxisNaming) -> CallingConvention | None:
        fields = self._fields(module)
        return None if fields is None else _convention(fields["num_spatial"], naming)

    def lower(self, layer: NnxConv, ctx: LowerContext) -> Any:
        if layer.config is None:
            return _adapter(layer, ctx)
        return _lower_if_unchanged(layer, ctx, nnx.Conv, _conv_fields(layer.config.__getitem__), swapped=False)


@nnx_rule(source=nnx.ConvTranspose, lifted=(NnxConvTranspose,))
class ConvTransposeRule:
    """``nnx.ConvTranspose`` <-> ``NnxConvTranspose``; ``kernel (*k, in, out)`` -> ``{kernel_<spatial>..., channels, channels_out}``.

    With ``transpose_kernel=True`` the stored kernel is ``(*k, out, in)`` in
    the roles of the underlying convolution, named
    ``{kernel_<spatial>..., channels_out, channels}`` and flipped
    (``flip_kernel=True``). ``bias (out,)`` -> ``{channels}``.
    """

    def _fields(self, module: nnx.ConvTranspose) -> dict[str, Any] | None:
        return _transpose_fields(lambda name: getattr(module, name)) if _supported(module, "transpose") else None

    def lift(self, module: nnx.ConvTranspose, ctx: LiftContext) -> Any:
        fields = self._fields(module)
        if fields is None:
            return lift_foreign(module, ctx)
        spatial = ctx.naming.spatial(fields.pop("num_spatial"))
        kernel, bias = _lift_params(module, ctx, spatial, swapped=fields["flip_kernel"])
        c = ctx.naming.channels
        return NnxConvTranspose(kernel, bias, spatial_axes=spatial, in_channel_axis=c, out_channel_axis=c,
                                config=NnxStatics.of(module), **fields)

    def convention(self, module: nnx.ConvTranspose, naming: AxisNaming) -> CallingConvention | None:
        fields = self._fields(module)
        return None if fields is None else _convention(fields["num_spatial"], naming)

    def lower(self, layer: NnxConvTranspose, ctx: LowerContext) -> Any:
        if layer.config is None:
            return _adapter(layer, ctx)
        fields = _transpose_fields(layer.config.__getitem__)
        swapped = bool(layer.config["transpose_kernel"])
        return _lower_if_unchanged(layer, ctx, nnx.ConvTranspose, fields, swapped)
