"""Convolution over named spatial and channel axes: ``Conv``.

A convolution slides a kernel over the axes named in ``spatial_axes`` and
mixes the ``in_channel_axis`` into the ``out_channel_axis``; every other axis
(named or positional) is a batch axis and passes through. The kernel is a
named array with one ``"kernel_" + spatial`` axis per spatial axis, the
input-channel axis (per group) and the output-channel axis, stored in any
order: lifted kernels keep the framework's own buffer (Equinox
``(out, in/groups, kh, kw)``, Flax NNX ``(kh, kw, in/groups, out)``) and are
never transposed. As in :class:`~pzbridge.nn.linear.Linear`, an output
channel name equal to the input one is stored in the kernel with an ``_out``
suffix (``channels_out``).

Why one ``lax.conv_general_dilated`` on raw data: the batch axes are moved
to the front (a no-op for the usual batch-first layouts) and merged into one,
and the dimension numbers are computed from the names, so the channel and
spatial axes stay where the input stores them. That is the same single XLA
convolution Equinox and Flax emit, so lifted models cost nothing extra.

The bias is an optional field of the layer rather than a separate
``AddBias``, because every framework treats it as part of the convolution
(``use_bias``) and a one-to-one layer keeps lift and lower rules trivial.
It may carry extra size-1 axes (Equinox stores it as ``(out, 1, 1)``) so the
original buffer can be kept as is.

See docs/architecture.md ("Axis naming and calling conventions").

Example:
    >>> import jax, jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> conv = Conv.from_config("conv", jax.random.key(0), 3, 8, (3, 3), padding="SAME")
    >>> x = pzb.nx.zeros({"batch": 2, "height": 5, "width": 5, "channels": 3})
    >>> dict(conv(x).named_shape)
    {'batch': 2, 'height': 5, 'width': 5, 'channels': 8}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError, StructError
from pzbridge.core.named_axes_core import make_named
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.contraction import data_layout
from pzbridge.nn.initializers import constant, make_parameter, variance_scaling
from pzbridge.nn.layer import Layer
from pzbridge.nn.linear import weight_output_name
from pzbridge.nn.padding import (
    Padding,
    PaddingLike,
    normalize_padding,
    normalize_padding_mode,
    normalize_tuple,
    pad_with_mode,
    resolve_padding,
)

KERNEL_PREFIX = "kernel_"


def kernel_axis_name(spatial_axis: str) -> str:
    """The kernel's name for the window axis sliding along ``spatial_axis``.

    Example:
        >>> kernel_axis_name("height")
        'kernel_height'
    """
    return KERNEL_PREFIX + spatial_axis


def default_spatial_axes(num_spatial_dims: int) -> tuple[str, ...]:
    """Default spatial axis names: ``width``; ``height, width``; ``depth, height, width``.

    Raises:
      StructError: For other dimensionalities (pass ``spatial_axes`` explicitly).

    Example:
        >>> default_spatial_axes(3)
        ('depth', 'height', 'width')
    """
    defaults = {1: ("width",), 2: ("height", "width"), 3: ("depth", "height", "width")}
    if num_spatial_dims not in defaults:
        raise StructError(
            f"No default spatial axis names for {num_spatial_dims} spatial dimensions. "
            "Fix: pass spatial_axes=(...) with one name per spatial dimension."
        )
    return defaults[num_spatial_dims]


def _check_axis_config(what: str, spatial_axes: Any, in_channel_axis: str, out_channel_axis: str) -> tuple[str, ...]:
    spatial = (spatial_axes,) if isinstance(spatial_axes, str) else tuple(spatial_axes)
    if not spatial or not all(isinstance(a, str) for a in spatial) or len(set(spatial)) != len(spatial):
        raise StructError(
            f"{what}: spatial_axes must be distinct axis names, found {spatial_axes!r}. "
            "Fix: pass e.g. spatial_axes=('height', 'width')."
        )
    for field, name in (("in_channel_axis", in_channel_axis), ("out_channel_axis", out_channel_axis)):
        if name in spatial:
            raise StructError(
                f"{what}: {field} {name!r} is also a spatial axis {spatial}. "
                "Fix: name the channel axis differently (default 'channels')."
            )
    return spatial


def _describe(x: nx.NamedArrayBase) -> str:
    return f"named shape {dict(x.named_shape)}" + (
        f", positional shape {x.positional_shape}" if x.positional_shape else ""
    )


def conv_by_names(
    x: nx.NamedArrayBase,
    kernel: nx.NamedArrayBase,
    bias: nx.NamedArrayBase | None,
    *,
    what: str,
    spatial_axes: tuple[str, ...],
    in_channel_axis: str,
    out_channel_axis: str,
    strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int],
    rhs_dilation: Sequence[int],
    groups: int,
    pre_pads: Sequence[tuple[int, int]] | None = None,
    pre_pad_mode: str = "zeros",
    flip_kernel: bool = False,
    precision: Any = None,
) -> nx.NamedArrayBase:
    """One ``lax.conv_general_dilated`` on raw data, laid out by axis names.

    Batch axes (everything but the spatial and input-channel axes) are moved
    to the front in their stored order and merged; channel and spatial axes
    keep their stored order, and the dimension numbers point at them. The
    result stores the batch axes first, then the channel and spatial axes in
    the input's order (a batch-first input keeps its exact layout), with
    ``out_channel_axis`` where the input channel axis was.

    Args:
      x: Input with ``spatial_axes`` and ``in_channel_axis``.
      kernel: Kernel with ``kernel_<spatial>`` axes, ``in_channel_axis`` (per
        group) and the output channel axis (``_out``-suffixed on a clash).
      bias: Optional bias with ``out_channel_axis`` and size-1 extra axes.
      what: The layer, for error messages.
      spatial_axes: Spatial axis names.
      in_channel_axis: Input channel name.
      out_channel_axis: Output channel name.
      strides: Window strides.
      padding: A ``lax`` padding string or explicit pairs for the convolution.
      lhs_dilation: Input dilation.
      rhs_dilation: Kernel dilation.
      groups: ``feature_group_count``.
      pre_pads: Optional pairs applied with ``jnp.pad`` before convolving.
      pre_pad_mode: Padding mode of ``pre_pads``.
      flip_kernel: Reverse the kernel along its spatial axes first.
      precision: ``lax`` precision.

    Returns:
      The convolved named array.

    Raises:
      NamedAxisError: If axes are missing or sizes disagree.

    Example:
        >>> x = nx.wrap(jnp.ones((4, 2)), "width", "channels")
        >>> k = nx.wrap(jnp.ones((3, 2, 1)), "kernel_width", "channels", "channels_out")
        >>> conv_by_names(x, k, None, what="Conv", spatial_axes=("width",), in_channel_axis="channels",
        ...     out_channel_axis="channels", strides=(1,), padding="VALID", lhs_dilation=(1,), rhs_dilation=(1,),
        ...     groups=1).unwrap("width", "channels")
        Array([[6.],
               [6.]], dtype=float32)
    """
    used = spatial_axes + (in_channel_axis,)
    missing = [name for name in used if name not in x.named_shape]
    if missing:
        raise NamedAxisError(
            f"{what}: input lacks axes {missing} (expects spatial axes {list(spatial_axes)} and channel axis "
            f"{in_channel_axis!r}; found {_describe(x)}). Fix: tag the input, e.g. "
            f"pzb.nx.wrap(x, 'batch', {', '.join(repr(n) for n in used)}), or configure the layer's axis names."
        )
    if out_channel_axis != in_channel_axis and out_channel_axis in x.named_shape:
        raise NamedAxisError(
            f"{what}: the output channel axis {out_channel_axis!r} is already an axis of the input ({_describe(x)}), "
            "so the result would have it twice. Fix: rename that input axis or choose another out_channel_axis."
        )
    kernel_out = weight_output_name(out_channel_axis, (in_channel_axis,))
    kernel_names = tuple(kernel_axis_name(s) for s in spatial_axes) + (in_channel_axis, kernel_out)
    if kernel.positional_shape or set(kernel.named_shape) != set(kernel_names):
        raise NamedAxisError(
            f"{what}: kernel must have exactly the named axes {list(kernel_names)}, found {_describe(kernel)}. "
            "Fix: name the kernel's axes with those names (any order), e.g. pzb.nx.wrap(w, *names)."
        )
    in_size = x.named_shape[in_channel_axis]
    per_group, out_size = kernel.named_shape[in_channel_axis], kernel.named_shape[kernel_out]
    if in_size != per_group * groups or out_size % groups:
        raise NamedAxisError(
            f"{what}: with groups={groups} the input's {in_channel_axis!r} axis (size {in_size}) must be "
            f"groups * the kernel's {in_channel_axis!r} axis (size {per_group}) and the kernel's {kernel_out!r} "
            f"axis (size {out_size}) a multiple of groups. Fix: feed {per_group * groups} channels or rebuild the "
            "layer with matching in_channels / groups."
        )

    data, positional, by_name = data_layout(x)
    role = {axis: ("p", k) for k, axis in enumerate(positional)}
    role.update({axis: ("n", name) for name, axis in by_name.items()})
    core_axes = {by_name[name] for name in used}
    batch = [a for a in range(data.ndim) if a not in core_axes]
    rest = [a for a in range(data.ndim) if a in core_axes]
    order = batch + rest
    if order != list(range(data.ndim)):
        data = jnp.transpose(data, order)
    batch_shape = tuple(data.shape[: len(batch)])
    data = data.reshape((math.prod(batch_shape),) + tuple(data.shape[len(batch) :]))
    position = {axis: 1 + i for i, axis in enumerate(rest)}
    spatial_positions = tuple(position[by_name[s]] for s in spatial_axes)
    lhs_spec = (0, position[by_name[in_channel_axis]]) + spatial_positions

    if pre_pads is not None:
        data = pad_with_mode(data, spatial_positions, pre_pads, pre_pad_mode, what)

    kdata, _, kaxes = data_layout(kernel)
    kernel_spatial = tuple(kaxes[kernel_axis_name(s)] for s in spatial_axes)
    if flip_kernel:
        kdata = jnp.flip(kdata, kernel_spatial)
    rhs_spec = (kaxes[kernel_out], kaxes[in_channel_axis]) + kernel_spatial
    y = jax.lax.conv_general_dilated(
        data,
        kdata,
        window_strides=tuple(strides),
        padding=padding if isinstance(padding, str) else tuple(tuple(p) for p in padding),
        lhs_dilation=tuple(lhs_dilation),
        rhs_dilation=tuple(rhs_dilation),
        dimension_numbers=jax.lax.ConvDimensionNumbers(lhs_spec, rhs_spec, lhs_spec),
        feature_group_count=groups,
        precision=precision,
    )
    if bias is not None:
        y = y + _bias_for(bias, out_channel_axis, out_size, y.ndim, lhs_spec[1], what)
    y = y.reshape(batch_shape + tuple(y.shape[1:]))

    logical = [0] * len(positional)
    names: dict[str, int] = {}
    for new_axis, old_axis in enumerate(order):
        kind, key = role[old_axis]
        if kind == "p":
            logical[key] = new_axis
        else:
            names[out_channel_axis if key == in_channel_axis else key] = new_axis
    return make_named(y, tuple(logical), names)


def _bias_for(bias: nx.NamedArrayBase, channel: str, size: int, ndim: int, axis: int, what: str) -> jax.Array:
    """The bias as a raw array broadcasting against the output along data axis ``axis``."""
    extra = {n: s for n, s in bias.named_shape.items() if n != channel}
    if bias.positional_shape or bias.named_shape.get(channel) != size or any(s != 1 for s in extra.values()):
        raise NamedAxisError(
            f"{what}: bias must have the axis {channel!r} of size {size} (plus only size-1 axes), found "
            f"{_describe(bias)}. Fix: build it with pzb.nx.wrap(b, {channel!r})."
        )
    flat = bias.unwrap(*extra, channel).reshape((size,))
    return flat.reshape((1,) * axis + (size,) + (1,) * (ndim - axis - 1))


@pytree_dataclass
class ConvLayerBase(Layer):
    """Fields and validation shared by :class:`Conv` and ``ConvTranspose``.

    Not a layer by itself (``__call__`` is abstract); it exists so the two
    convolutions are siblings, not one a subclass of the other, and a
    selector for ``Conv`` never matches a ``ConvTranspose``.

    Example:
        >>> issubclass(Conv, ConvLayerBase)
        True
    """

    kernel: Any
    bias: Any = None
    spatial_axes: tuple[str, ...] = static_field(default=("height", "width"))
    in_channel_axis: str = static_field(default="channels")
    out_channel_axis: str = static_field(default="channels")
    strides: tuple[int, ...] = static_field(default=1)
    padding: Padding = static_field(default="VALID")
    padding_mode: str = static_field(default="zeros")
    dilation: tuple[int, ...] = static_field(default=1)
    groups: int = static_field(default=1)
    precision: Any = static_field(default=None)

    def __post_init__(self) -> None:
        what = type(self).__name__
        spatial = _check_axis_config(what, self.spatial_axes, self.in_channel_axis, self.out_channel_axis)
        n = len(spatial)
        set_ = object.__setattr__
        set_(self, "spatial_axes", spatial)
        set_(self, "strides", normalize_tuple(self.strides, n, what, "strides"))
        set_(self, "padding", normalize_padding(self.padding, n, what))
        set_(self, "padding_mode", normalize_padding_mode(self.padding_mode, what))
        set_(self, "dilation", normalize_tuple(self.dilation, n, what, "dilation"))
        if not isinstance(self.groups, int) or self.groups < 1:
            raise StructError(f"{what}: groups must be a positive int, found {self.groups!r}. Fix: pass groups=1.")

    @property
    def num_spatial_dims(self) -> int:
        """Number of spatial axes.

        Example:
            >>> Conv.from_config("c", None, 1, 1, 3, spatial_axes=("seq",)).num_spatial_dims
            1
        """
        return len(self.spatial_axes)

    def _what(self) -> str:
        return f"{type(self).__name__} {getattr(self.kernel, 'label', '?')!r}"

    def _window(self, kernel: nx.NamedArrayBase) -> list[int]:
        return [kernel.named_shape.get(kernel_axis_name(s), 1) for s in self.spatial_axes]


@pytree_dataclass
class Conv(ConvLayerBase):
    """An N-d convolution over named spatial axes, with an optional bias.

    Computes ``lax.conv_general_dilated`` with the given strides, padding,
    input (``lhs``) and kernel (``rhs``) dilation and feature groups, then
    adds the bias. ``padding_mode`` other than ``"zeros"`` (and ``"CAUSAL"``
    padding) pads the undilated input with ``jnp.pad`` first — string padding
    resolved as ``lax.padtype_to_pads`` does — and then convolves unpadded,
    which is what Equinox (``padding_mode``) and Flax (``"CIRCULAR"``,
    ``"REFLECT"``, ``"CAUSAL"``) do. With zero padding, ``SAME`` / ``VALID``
    are resolved on the dilated input size (``lax`` itself refuses padding
    strings together with input dilation).

    Attributes:
      kernel: A ``Parameter`` (or frozen value / slot) holding a NamedArray
        with axes ``kernel_<spatial>``..., ``in_channel_axis`` (size
        ``in_channels // groups``) and ``out_channel_axis`` (stored as
        ``<name>_out`` if it equals ``in_channel_axis``), in any order.
      bias: ``None`` or a ``Parameter`` holding a NamedArray with
        ``out_channel_axis`` (other axes must have size 1).
      spatial_axes: Names of the spatial axes, in kernel-size order (static).
      in_channel_axis: Input channel axis name (static).
      out_channel_axis: Output channel axis name (static).
      strides: Window strides per spatial axis (static; an int broadcasts).
      padding: ``"VALID"``, ``"SAME"``, ``"SAME_LOWER"``, ``"CAUSAL"``, an
        int, or per-axis ints / ``(before, after)`` pairs (static).
      padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or
        ``"circular"`` (static).
      dilation: Kernel dilation per spatial axis (static).
      groups: Feature group count (static).
      precision: ``lax`` precision of the convolution (static).
      input_dilation: Input dilation per spatial axis (static).

    Example:
        >>> k = pzb.Parameter(pzb.nx.wrap(jnp.ones((1, 1, 2)), "channels_out", "channels", "kernel_width"), "k")
        >>> conv = Conv(k, spatial_axes=("width",))
        >>> conv(pzb.nx.wrap(jnp.array([[1.0, 2.0, 3.0]]), "channels", "width")).unwrap("channels", "width")
        Array([[3., 5.]], dtype=float32)
    """

    input_dilation: tuple[int, ...] = static_field(default=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        what = type(self).__name__
        n = self.num_spatial_dims
        object.__setattr__(self, "input_dilation", normalize_tuple(self.input_dilation, n, what, "input_dilation"))

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        kernel = self.kernel.value
        what = self._what()
        conv_padding: Any = self.padding
        pre_pads = None
        prepad = self.padding_mode != "zeros" or self.padding == "CAUSAL"
        dilated_input = any(i != 1 for i in self.input_dilation)
        if prepad or (isinstance(self.padding, str) and dilated_input):
            missing = [s for s in self.spatial_axes if s not in x.named_shape]
            if missing:
                raise NamedAxisError(
                    f"{what}: input lacks spatial axes {missing} (found {_describe(x)}). "
                    f"Fix: tag the input with {list(self.spatial_axes)}."
                )
            sizes = [x.named_shape[s] for s in self.spatial_axes]
            if prepad:
                pre_pads = resolve_padding(self.padding, sizes, self._window(kernel), self.strides, self.dilation)
                conv_padding = ((0, 0),) * self.num_spatial_dims
            else:
                # lax rejects padding strings with input dilation: resolve them on the dilated size.
                dilated = [(n - 1) * i + 1 for n, i in zip(sizes, self.input_dilation)]
                conv_padding = resolve_padding(self.padding, dilated, self._window(kernel), self.strides, self.dilation)
        return conv_by_names(
            x,
            kernel,
            None if self.bias is None else self.bias.value,
            what=what,
            spatial_axes=self.spatial_axes,
            in_channel_axis=self.in_channel_axis,
            out_channel_axis=self.out_channel_axis,
            strides=self.strides,
            padding=conv_padding,
            lhs_dilation=self.input_dilation,
            rhs_dilation=self.dilation,
            groups=self.groups,
            pre_pads=pre_pads,
            pre_pad_mode=self.padding_mode,
            precision=self.precision,
        )

    @classmethod
    def from_config(
        cls,
        name: str,
        init_base_rng: jax.Array | None,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        *,
        spatial_axes: Sequence[str] | None = None,
        strides: int | Sequence[int] = 1,
        padding: PaddingLike = "VALID",
        padding_mode: str = "zeros",
        dilation: int | Sequence[int] = 1,
        input_dilation: int | Sequence[int] = 1,
        groups: int = 1,
        use_bias: bool = True,
        in_channel_axis: str = "channels",
        out_channel_axis: str = "channels",
        initializer: Callable[..., nx.NamedArray] = variance_scaling,
        dtype: Any = jnp.float32,
    ) -> Conv:
        """Builds a convolution with deterministically initialised parameters.

        The kernel (labelled ``f"{name}.kernel"``) is stored as
        ``(kernel_<spatial>..., in_channel_axis, out)`` and initialised with
        fan-in ``in_channels // groups * prod(kernel_size)``; the bias
        (``f"{name}.bias"``) starts at zero.

        Args:
          name: Layer name, prefix of the parameter labels.
          init_base_rng: Base key, or None for parameter slots.
          in_channels: Input channels.
          out_channels: Output channels.
          kernel_size: Kernel size per spatial axis (an int broadcasts).
          spatial_axes: Spatial axis names; default from the number of
            dimensions in ``kernel_size`` (2 for an int): see
            :func:`default_spatial_axes`.
          strides: See the class attributes.
          padding: See the class attributes.
          padding_mode: See the class attributes.
          dilation: See the class attributes.
          input_dilation: See the class attributes.
          groups: See the class attributes; must divide both channel counts.
          use_bias: Whether to add a bias.
          in_channel_axis: See the class attributes.
          out_channel_axis: See the class attributes.
          initializer: ``f(key, named_shape, fan_in_axes, dtype)``.
          dtype: Parameter dtype.

        Returns:
          The layer.

        Raises:
          StructError: If ``groups`` does not divide the channel counts.

        Example:
            >>> c = Conv.from_config("c", None, 4, 6, (3, 3), groups=2)
            >>> c.kernel, c.bias
            (ParameterSlot(label='c.kernel'), ParameterSlot(label='c.bias'))
        """
        if spatial_axes is None:
            spatial_axes = default_spatial_axes(2 if isinstance(kernel_size, int) else len(kernel_size))
        spatial = _check_axis_config(cls.__name__, spatial_axes, in_channel_axis, out_channel_axis)
        window = normalize_tuple(kernel_size, len(spatial), f"{cls.__name__} {name!r}", "kernel_size")
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise StructError(
                f"{cls.__name__} {name!r}: groups={groups} must divide in_channels={in_channels} and "
                f"out_channels={out_channels}. Fix: choose a common divisor."
            )
        shape = {kernel_axis_name(s): k for s, k in zip(spatial, window)}
        shape[in_channel_axis] = in_channels // groups
        shape[weight_output_name(out_channel_axis, (in_channel_axis,))] = out_channels
        fan_in_axes = tuple(shape)[:-1]
        kernel = make_parameter(
            f"{name}.kernel", init_base_rng, lambda key: initializer(key, shape, fan_in_axes, dtype)
        )
        bias = None
        if use_bias:
            bias = make_parameter(
                f"{name}.bias", init_base_rng, lambda _: constant({out_channel_axis: out_channels}, 0.0, dtype)
            )
        return cls(
            kernel,
            bias,
            spatial_axes=spatial,
            in_channel_axis=in_channel_axis,
            out_channel_axis=out_channel_axis,
            strides=strides,
            padding=padding,
            padding_mode=padding_mode,
            dilation=dilation,
            input_dilation=input_dilation,
            groups=groups,
        )


__all__ = ["Conv", "ConvLayerBase", "conv_by_names", "default_spatial_axes", "kernel_axis_name"]
