"""Transposed convolution over named axes: ``ConvTranspose``.

A transposed convolution is a convolution of the stride-dilated input
(``lhs_dilation = strides``) with unit window strides, so it reuses
:func:`~pzbridge.nn.conv.conv_by_names` and its layout-by-name machinery.

Its configuration follows ``eqx.nn.ConvTranspose``: ``strides``, ``padding``
and ``dilation`` are those of the *forward* convolution whose shape this
layer inverts, and ``output_padding`` resolves the ambiguity of the output
size when ``strides > 1``. That description is general: any explicit padding
of the underlying convolution (what ``lax.conv_transpose`` and Flax NNX's
``ConvTranspose`` take) is expressible with (possibly negative) forward
padding, and :func:`padding_from_lax_conv_transpose` does the conversion, so
both frameworks lift to this one layer. Flax's ``transpose_kernel=True`` is
``flip_kernel=True`` plus naming the stored axes by their role.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> up = ConvTranspose.from_config("up", jax.random.key(0), 4, 2, 3, strides=2, padding=1, output_padding=1)
    >>> x = pzb.nx.zeros({"batch": 1, "channels": 4, "height": 5, "width": 5})
    >>> dict(up(x).named_shape)
    {'batch': 1, 'channels': 2, 'height': 10, 'width': 10}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import StructError
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.conv import Conv, ConvLayerBase, _check_axis_config, conv_by_names, default_spatial_axes
from pzbridge.nn.initializers import variance_scaling
from pzbridge.nn.padding import Padding, PaddingLike, dilated_size, normalize_padding, normalize_tuple


def transposed_padding(
    padding: Padding,
    kernel_size: Sequence[int],
    strides: Sequence[int],
    output_padding: Sequence[int],
    dilation: Sequence[int],
) -> tuple[tuple[int, int], ...]:
    """The explicit padding of the convolution that implements the transpose.

    With ``e = dilation * (kernel - 1)`` and forward padding ``(p0, p1)`` the
    underlying convolution pads ``(e - p0, e - p1 + output_padding)``
    (relationship 14 of Dumoulin & Visin, arXiv:1603.07285). For ``SAME`` /
    ``SAME_LOWER`` the forward padding is the total ``e + 1 - stride +
    output_padding`` split as for a convolution (extra at the end / start),
    with ``output_padding`` consumed by that total unless it is negative:
    Equinox's definition.

    Example:
        >>> transposed_padding(((1, 1),), (3,), (2,), (1,), (1,))
        ((1, 2),)
        >>> transposed_padding("SAME", (3,), (2,), (0,), (1,))
        ((2, 1),)
    """
    pairs = []
    for i, (k, s, a, d) in enumerate(zip(kernel_size, strides, output_padding, dilation)):
        extent = dilated_size(k, d) - 1
        if padding == "VALID":
            p0 = p1 = 0
        elif padding in ("SAME", "SAME_LOWER"):
            total = extent + 1 - s + a
            a = -total if total < 0 else 0
            total = max(total, 0)
            p0 = (total + (padding == "SAME_LOWER")) // 2
            p1 = total - p0
        else:
            p0, p1 = padding[i]
        pairs.append((extent - p0, extent - p1 + a))
    return tuple(pairs)


def padding_from_lax_conv_transpose(
    padding: str | Sequence[tuple[int, int]],
    kernel_size: Sequence[int],
    strides: Sequence[int],
    dilation: Sequence[int] | None = None,
) -> tuple[tuple[int, int], ...]:
    """Converts ``lax.conv_transpose`` padding to this layer's forward padding.

    ``lax.conv_transpose`` (and Flax NNX ``ConvTranspose``) takes either
    ``"SAME"`` / ``"VALID"`` or explicit pairs used as the padding of the
    underlying convolution. This returns the forward padding ``(p0, p1)``
    that :class:`ConvTranspose` (with ``output_padding=0``) turns back into
    exactly that convolution padding.

    Args:
      padding: ``"SAME"``, ``"VALID"`` or one pair per spatial dimension.
      kernel_size: Kernel size per spatial dimension.
      strides: Strides per spatial dimension.
      dilation: Kernel dilation per spatial dimension (default 1).

    Returns:
      Forward padding pairs (possibly negative).

    Raises:
      StructError: For other padding strings.

    Example:
        >>> padding_from_lax_conv_transpose("SAME", (3,), (2,))
        ((0, 1),)
    """
    dilation = tuple(dilation) if dilation is not None else (1,) * len(kernel_size)
    pairs = []
    for i, (k, s, d) in enumerate(zip(kernel_size, strides, dilation)):
        k_eff = dilated_size(k, d)
        # lax's own rule for the underlying convolution's padding.
        if isinstance(padding, str):
            upper = padding.upper()
            if upper == "SAME":
                total = k_eff + s - 2
                before = k_eff - 1 if s > k_eff - 1 else -(-total // 2)
            elif upper == "VALID":
                total = k_eff + s - 2 + max(k_eff - s, 0)
                before = k_eff - 1
            else:
                raise StructError(
                    f"padding_from_lax_conv_transpose: padding must be 'SAME', 'VALID' or pairs, found {padding!r}. "
                    "Fix: pass explicit (before, after) pairs."
                )
            lax_pair = (before, total - before)
        else:
            lax_pair = tuple(padding[i])
        pairs.append((k_eff - 1 - lax_pair[0], k_eff - 1 - lax_pair[1]))
    return tuple(pairs)


@pytree_dataclass
class ConvTranspose(ConvLayerBase):
    """An N-d transposed convolution over named axes (``eqx.nn.ConvTranspose`` semantics).

    The kernel has the same named axes as :class:`~pzbridge.nn.conv.Conv`'s
    (``kernel_<spatial>``, ``in_channel_axis`` per group, output channels)
    and is applied without flipping unless ``flip_kernel``. ``padding`` is
    the forward convolution's padding (see :func:`transposed_padding`);
    ``padding_mode`` is ``"zeros"`` or ``"circular"`` (the latter only with
    ``SAME`` / ``SAME_LOWER`` padding and zero ``output_padding``, where the
    input is wrapped so border outputs see the periodic neighbours, as in
    Equinox).

    Attributes:
      kernel: See :class:`~pzbridge.nn.conv.Conv`.
      bias: See :class:`~pzbridge.nn.conv.Conv`.
      spatial_axes: See :class:`~pzbridge.nn.conv.Conv`.
      in_channel_axis: See :class:`~pzbridge.nn.conv.Conv`.
      out_channel_axis: See :class:`~pzbridge.nn.conv.Conv`.
      strides: Strides of the equivalent forward convolution (the input
        dilation of this one).
      padding: Padding of the equivalent forward convolution.
      padding_mode: ``"zeros"`` or ``"circular"``.
      dilation: Kernel dilation.
      groups: Feature group count.
      precision: ``lax`` precision.
      output_padding: Extra size at the end of each spatial axis; each must
        be smaller than its stride.
      flip_kernel: Reverse the kernel's spatial axes (Flax
        ``transpose_kernel=True``; gives the exact adjoint of a ``Conv``
        with the same kernel).

    Example:
        >>> k = pzb.Parameter(pzb.nx.wrap(jnp.ones((1, 1, 2)), "channels_out", "channels", "kernel_width"), "k")
        >>> up = ConvTranspose(k, spatial_axes=("width",), strides=2)
        >>> up(pzb.nx.wrap(jnp.array([[1.0, 2.0]]), "channels", "width")).unwrap("channels", "width")
        Array([[1., 1., 2., 2.]], dtype=float32)
    """

    output_padding: tuple[int, ...] = static_field(default=0)
    flip_kernel: bool = static_field(default=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        what = type(self).__name__
        n = self.num_spatial_dims
        object.__setattr__(self, "output_padding", normalize_tuple(self.output_padding, n, what, "output_padding"))
        if any(a < 0 or a >= s for a, s in zip(self.output_padding, self.strides)):
            raise StructError(
                f"{what}: output_padding {self.output_padding} must satisfy 0 <= output_padding < strides "
                f"{self.strides} on every axis. Fix: reduce output_padding."
            )
        if self.padding == "CAUSAL":
            raise StructError(f"{what}: 'CAUSAL' padding is not defined for transposed convolutions. Fix: use pairs.")
        if self.padding_mode in ("reflect", "replicate"):
            raise NotImplementedError(
                f"{what}: padding_mode {self.padding_mode!r} has no transposed definition (Equinox does not define "
                "it either); only 'zeros' and 'circular' are implemented."
            )
        if self.padding_mode == "circular" and (
            self.padding not in ("SAME", "SAME_LOWER") or any(self.output_padding)
        ):
            raise NotImplementedError(
                f"{what}: padding_mode='circular' is implemented only for padding 'SAME' / 'SAME_LOWER' with "
                f"output_padding 0 (found padding={self.padding!r}, output_padding={self.output_padding}), "
                "as in Equinox."
            )

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        kernel = self.kernel.value
        pads = transposed_padding(self.padding, self._window(kernel), self.strides, self.output_padding, self.dilation)
        pre_pads = None
        if self.padding_mode == "circular":
            # Wrap whole input cells into the border, leave the remainder to the convolution's zero padding.
            pre_pads = tuple((lo // s, hi // s) for (lo, hi), s in zip(pads, self.strides))
            pads = tuple((lo % s, hi % s) for (lo, hi), s in zip(pads, self.strides))
        return conv_by_names(
            x,
            kernel,
            None if self.bias is None else self.bias.value,
            what=self._what(),
            spatial_axes=self.spatial_axes,
            in_channel_axis=self.in_channel_axis,
            out_channel_axis=self.out_channel_axis,
            strides=(1,) * self.num_spatial_dims,
            padding=pads,
            lhs_dilation=self.strides,
            rhs_dilation=self.dilation,
            groups=self.groups,
            pre_pads=pre_pads,
            pre_pad_mode="circular",
            flip_kernel=self.flip_kernel,
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
        output_padding: int | Sequence[int] = 0,
        padding_mode: str = "zeros",
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        use_bias: bool = True,
        flip_kernel: bool = False,
        in_channel_axis: str = "channels",
        out_channel_axis: str = "channels",
        initializer: Callable[..., nx.NamedArray] = variance_scaling,
        dtype: Any = jnp.float32,
    ) -> ConvTranspose:
        """Builds a transposed convolution with deterministic parameters.

        Parameters are created exactly as by :meth:`Conv.from_config`
        (``f"{name}.kernel"``, ``f"{name}.bias"``).

        Args:
          name: Layer name, prefix of the parameter labels.
          init_base_rng: Base key, or None for parameter slots.
          in_channels: Input channels.
          out_channels: Output channels.
          kernel_size: Kernel size per spatial axis (an int broadcasts).
          spatial_axes: Spatial axis names (default from ``kernel_size``).
          strides: See the class attributes.
          padding: See the class attributes.
          output_padding: See the class attributes.
          padding_mode: See the class attributes.
          dilation: See the class attributes.
          groups: Must divide both channel counts.
          use_bias: Whether to add a bias.
          flip_kernel: See the class attributes.
          in_channel_axis: Input channel axis name.
          out_channel_axis: Output channel axis name.
          initializer: ``f(key, named_shape, fan_in_axes, dtype)``.
          dtype: Parameter dtype.

        Returns:
          The layer.

        Example:
            >>> ConvTranspose.from_config("t", None, 2, 2, 3, spatial_axes=("seq",)).spatial_axes
            ('seq',)
        """
        if spatial_axes is None:
            spatial_axes = default_spatial_axes(2 if isinstance(kernel_size, int) else len(kernel_size))
        spatial = _check_axis_config(cls.__name__, spatial_axes, in_channel_axis, out_channel_axis)
        conv = Conv.from_config(
            name,
            init_base_rng,
            in_channels,
            out_channels,
            kernel_size,
            spatial_axes=spatial,
            groups=groups,
            use_bias=use_bias,
            in_channel_axis=in_channel_axis,
            out_channel_axis=out_channel_axis,
            initializer=initializer,
            dtype=dtype,
        )
        return cls(
            conv.kernel,
            conv.bias,
            spatial_axes=spatial,
            in_channel_axis=in_channel_axis,
            out_channel_axis=out_channel_axis,
            strides=strides,
            padding=normalize_padding(padding, len(spatial), cls.__name__),
            padding_mode=padding_mode,
            dilation=dilation,
            groups=groups,
            output_padding=output_padding,
            flip_kernel=flip_kernel,
        )


__all__ = ["ConvTranspose", "padding_from_lax_conv_transpose", "transposed_padding"]
