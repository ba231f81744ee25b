"""Pooling over named spatial axes: window, adaptive and global pools.

Pooling reduces windows of the axes named in ``spatial_axes`` and leaves
every other axis (batch, channels, anything named) alone. Window pools run
one ``lax.reduce_window`` directly on the stored data with a window of 1 on
every non-spatial axis, so no transpose or reshape happens whatever the
layout; the output keeps the input's layout.

Semantics follow the frameworks lifted into these layers: ``MaxPool`` pads
with ``-inf``; ``AvgPool`` divides by the full window size by default
(``count_include_pad=True``: Equinox, Flax) or by the number of real
elements; ``ceil_mode`` is Equinox's ``use_ceil``. Adaptive pools split each
axis into contiguous windows as ``eqx.nn.AdaptivePool`` does: with ``n =
q * target + r`` the first ``r`` windows have ``q + 1`` elements and the rest
``q``.

See docs/architecture.md ("Axis naming and calling conventions").

Example:
    >>> import jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> x = pzb.nx.wrap(jnp.arange(16.0).reshape(4, 4), "height", "width")
    >>> MaxPool((2, 2))(x).unwrap("height", "width")
    Array([[ 5.,  7.],
           [13., 15.]], dtype=float32)
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError, StructError
from pzbridge.core.named_axes_core import make_named
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.contraction import data_layout
from pzbridge.nn.layer import Layer
from pzbridge.nn.padding import Padding, dilated_size, normalize_padding, normalize_tuple, resolve_padding


def _spatial_names(what: str, spatial_axes: Any) -> tuple[str, ...]:
    spatial = (spatial_axes,) if isinstance(spatial_axes, str) else tuple(spatial_axes)
    if not spatial or not all(isinstance(a, str) for a in spatial) or len(set(spatial)) != len(spatial):
        raise StructError(
            f"{what}: spatial_axes must be distinct axis names, found {spatial_axes!r}. "
            "Fix: pass e.g. spatial_axes=('height', 'width')."
        )
    return spatial


def _spatial_data_axes(what: str, x: nx.NamedArrayBase, spatial_axes: tuple[str, ...]) -> tuple[Any, tuple, dict]:
    missing = [name for name in spatial_axes if name not in x.named_shape]
    if missing:
        raise NamedAxisError(
            f"{what}: input lacks spatial axes {missing} (expects {list(spatial_axes)}; found named shape "
            f"{dict(x.named_shape)}). Fix: tag the input with those names or set spatial_axes=(...)."
        )
    return data_layout(x)


@pytree_dataclass
class WindowPool(Layer):
    """Shared configuration and ``reduce_window`` driver of ``MaxPool`` / ``AvgPool``.

    Attributes:
      window: Window size per spatial axis (static; an int broadcasts).
      strides: Window strides (static); ``None`` means equal to ``window``.
      padding: ``"VALID"``, ``"SAME"``, ``"SAME_LOWER"``, an int, or
        per-axis ints / ``(before, after)`` pairs (static).
      dilation: Window dilation (static).
      ceil_mode: If true and the padded size does not fit a whole number of
        strides, ``stride`` extra padding is added at the end so the last
        partial window is kept (Equinox's ``use_ceil``) (static).
      spatial_axes: Names of the pooled axes (static).

    Example:
        >>> MaxPool(2, spatial_axes=("seq",)).strides
        (2,)
    """

    window: tuple[int, ...] = static_field()
    strides: tuple[int, ...] | None = static_field(default=None)
    padding: Padding = static_field(default="VALID")
    dilation: tuple[int, ...] = static_field(default=1)
    ceil_mode: bool = static_field(default=False)
    spatial_axes: tuple[str, ...] = static_field(default=("height", "width"))

    def __post_init__(self) -> None:
        what = type(self).__name__
        spatial = _spatial_names(what, self.spatial_axes)
        n = len(spatial)
        set_ = object.__setattr__
        set_(self, "spatial_axes", spatial)
        set_(self, "window", normalize_tuple(self.window, n, what, "window"))
        strides = self.window if self.strides is None else self.strides
        set_(self, "strides", normalize_tuple(strides, n, what, "strides"))
        set_(self, "padding", normalize_padding(self.padding, n, what))
        set_(self, "dilation", normalize_tuple(self.dilation, n, what, "dilation"))
        if self.padding == "CAUSAL":
            raise StructError(f"{what}: 'CAUSAL' padding is for convolutions. Fix: pass explicit pairs.")

    @abc.abstractmethod
    def _pool(self, data: jax.Array, dims: tuple[int, ...], strides: tuple[int, ...],
              pads: tuple[tuple[int, int], ...], dilation: tuple[int, ...], spatial: tuple[int, ...]) -> jax.Array:
        """Reduces ``data`` with the per-data-axis window configuration."""

    def padding_for(self, in_sizes: Sequence[int]) -> tuple[tuple[int, int], ...]:
        """The explicit padding used for spatial input sizes ``in_sizes`` (after ``ceil_mode``).

        Example:
            >>> MaxPool(2, ceil_mode=True, spatial_axes=("seq",)).padding_for((5,))
            ((0, 2),)
        """
        pads = resolve_padding(self.padding, in_sizes, self.window, self.strides, self.dilation)
        if not self.ceil_mode:
            return pads
        adjusted = []
        for n, (lo, hi), k, s, d in zip(in_sizes, pads, self.window, self.strides, self.dilation):
            if (n + lo + hi - dilated_size(k, d)) % s:
                hi += s
            adjusted.append((lo, hi))
        return tuple(adjusted)

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        data, positional, by_name = _spatial_data_axes(type(self).__name__, x, self.spatial_axes)
        spatial = tuple(by_name[s] for s in self.spatial_axes)
        pads = self.padding_for([data.shape[a] for a in spatial])
        dims, strides, dilation = [1] * data.ndim, [1] * data.ndim, [1] * data.ndim
        full_pads = [(0, 0)] * data.ndim
        for i, axis in enumerate(spatial):
            dims[axis], strides[axis], dilation[axis] = self.window[i], self.strides[i], self.dilation[i]
            full_pads[axis] = pads[i]
        y = self._pool(data, tuple(dims), tuple(strides), tuple(full_pads), tuple(dilation), spatial)
        return make_named(y, tuple(positional), by_name)


@pytree_dataclass
class MaxPool(WindowPool):
    """Maximum over sliding windows of the spatial axes (padding counts as ``-inf``).

    Example:
        >>> x = pzb.nx.wrap(jnp.array([1.0, 3.0, 2.0, 5.0, 4.0]), "seq")
        >>> MaxPool(3, strides=1, padding=1, spatial_axes=("seq",))(x).unwrap("seq")
        Array([3., 3., 5., 5., 5.], dtype=float32)
    """

    def _pool(self, data: jax.Array, dims: tuple[int, ...], strides: tuple[int, ...],
              pads: tuple[tuple[int, int], ...], dilation: tuple[int, ...], spatial: tuple[int, ...]) -> jax.Array:
        dtype = data.dtype
        if jnp.issubdtype(dtype, jnp.floating):
            init = np.array(-np.inf, dtype)
        elif jnp.issubdtype(dtype, jnp.integer):
            init = np.array(jnp.iinfo(dtype).min, dtype)
        else:
            init = np.array(False, dtype)
        return jax.lax.reduce_window(data, init, jax.lax.max, dims, strides, pads, window_dilation=dilation)


@pytree_dataclass
class AvgPool(WindowPool):
    """Mean over sliding windows of the spatial axes.

    Attributes:
      count_include_pad: If true (default; Equinox, Flax) every window sum
        is divided by the window size; if false, by the number of input
        elements the window covers (padding excluded) (static).

    Example:
        >>> x = pzb.nx.wrap(jnp.array([2.0, 4.0, 6.0]), "seq")
        >>> AvgPool(2, strides=1, padding=(1,), count_include_pad=False, spatial_axes=("seq",))(x).unwrap("seq")
        Array([2., 3., 5., 6.], dtype=float32)
    """

    count_include_pad: bool = static_field(default=True)

    def _pool(self, data: jax.Array, dims: tuple[int, ...], strides: tuple[int, ...],
              pads: tuple[tuple[int, int], ...], dilation: tuple[int, ...], spatial: tuple[int, ...]) -> jax.Array:
        zero = np.array(0, data.dtype)
        total = jax.lax.reduce_window(data, zero, jax.lax.add, dims, strides, pads, window_dilation=dilation)
        if self.count_include_pad:
            return total / math.prod(self.window)
        # Counts depend only on the spatial layout: reduce a ones array of that shape and broadcast.
        shape = [data.shape[a] if a in spatial else 1 for a in range(data.ndim)]
        ones = jnp.ones(shape, data.dtype)
        counts = jax.lax.reduce_window(ones, zero, jax.lax.add, dims, strides, pads, window_dilation=dilation)
        return total / counts


@pytree_dataclass
class AdaptivePool(Layer):
    """Shared configuration of ``AdaptiveMaxPool`` / ``AdaptiveAvgPool``.

    Each spatial axis of size ``n`` is cut into ``target`` contiguous windows:
    with ``n = q * target + r``, the first ``r`` windows hold ``q + 1``
    elements and the others ``q`` (``eqx.nn.AdaptivePool``'s split). Axes are
    reduced one after another in ``spatial_axes`` order, by reshaping on the
    stored data (no transposes).

    Attributes:
      output_size: Target size per spatial axis (static; an int broadcasts).
      spatial_axes: Names of the pooled axes (static).

    Example:
        >>> AdaptiveAvgPool(1, spatial_axes=("seq",)).output_size
        (1,)
    """

    output_size: tuple[int, ...] = static_field()
    spatial_axes: tuple[str, ...] = static_field(default=("height", "width"))

    def __post_init__(self) -> None:
        what = type(self).__name__
        spatial = _spatial_names(what, self.spatial_axes)
        object.__setattr__(self, "spatial_axes", spatial)
        sizes = normalize_tuple(self.output_size, len(spatial), what, "output_size")
        if any(s < 1 for s in sizes):
            raise StructError(f"{what}: output_size {sizes} must be positive. Fix: pass sizes >= 1.")
        object.__setattr__(self, "output_size", sizes)

    @abc.abstractmethod
    def _reduce(self, data: jax.Array, axis: int) -> jax.Array:
        """Reduces ``data`` over one data axis."""

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        what = type(self).__name__
        data, positional, by_name = _spatial_data_axes(what, x, self.spatial_axes)
        for name, target in zip(self.spatial_axes, self.output_size):
            axis = by_name[name]
            n = data.shape[axis]
            if target > n:
                raise NamedAxisError(
                    f"{what}: cannot pool axis {name!r} of size {n} to {target} windows (found named shape "
                    f"{dict(x.named_shape)}). Fix: use an output_size <= {n} or a larger input."
                )
            q, r = divmod(n, target)
            pieces = []
            for start, count, width in ((0, r, q + 1), (r * (q + 1), target - r, q)):
                if count:
                    part = jax.lax.slice_in_dim(data, start, start + count * width, axis=axis)
                    part = part.reshape(part.shape[:axis] + (count, width) + part.shape[axis + 1 :])
                    pieces.append(self._reduce(part, axis + 1))
            data = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=axis)
        return make_named(data, tuple(positional), by_name)


@pytree_dataclass
class AdaptiveMaxPool(AdaptivePool):
    """Maximum over adaptive windows (see :class:`AdaptivePool`).

    Example:
        >>> x = pzb.nx.wrap(jnp.array([1.0, 5.0, 2.0, 4.0, 3.0]), "seq")
        >>> AdaptiveMaxPool(2, spatial_axes=("seq",))(x).unwrap("seq")
        Array([5., 4.], dtype=float32)
    """

    def _reduce(self, data: jax.Array, axis: int) -> jax.Array:
        return jnp.max(data, axis=axis)


@pytree_dataclass
class AdaptiveAvgPool(AdaptivePool):
    """Mean over adaptive windows (see :class:`AdaptivePool`).

    Example:
        >>> x = pzb.nx.wrap(jnp.array([1.0, 5.0, 3.0, 4.0, 2.0]), "seq")
        >>> AdaptiveAvgPool(2, spatial_axes=("seq",))(x).unwrap("seq")
        Array([3., 3.], dtype=float32)
    """

    def _reduce(self, data: jax.Array, axis: int) -> jax.Array:
        return jnp.mean(data, axis=axis)


@pytree_dataclass
class GlobalPool(Layer):
    """Shared configuration of ``GlobalAvgPool`` / ``GlobalMaxPool``: reduce away all spatial axes.

    Attributes:
      spatial_axes: Names of the pooled axes (static).

    Example:
        >>> GlobalMaxPool(("seq",)).spatial_axes
        ('seq',)
    """

    spatial_axes: tuple[str, ...] = static_field(default=("height", "width"))

    def __post_init__(self) -> None:
        object.__setattr__(self, "spatial_axes", _spatial_names(type(self).__name__, self.spatial_axes))

    @abc.abstractmethod
    def _reduce(self, x: nx.NamedArrayBase) -> nx.NamedArrayBase:
        """Reduces ``x`` over ``spatial_axes``."""

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        _spatial_data_axes(type(self).__name__, x, self.spatial_axes)
        return self._reduce(x)


@pytree_dataclass
class GlobalAvgPool(GlobalPool):
    """Mean over all spatial axes, which are removed from the result.

    Example:
        >>> x = pzb.nx.wrap(jnp.arange(6.0).reshape(2, 3), "channels", "width")
        >>> GlobalAvgPool(("width",))(x).unwrap("channels")
        Array([1., 4.], dtype=float32)
    """

    def _reduce(self, x: nx.NamedArrayBase) -> nx.NamedArrayBase:
        return x.mean(*self.spatial_axes)


@pytree_dataclass
class GlobalMaxPool(GlobalPool):
    """Maximum over all spatial axes, which are removed from the result.

    Example:
        >>> x = pzb.nx.wrap(jnp.arange(6.0).reshape(2, 3), "channels", "width")
        >>> GlobalMaxPool(("width",))(x).unwrap("channels")
        Array([2., 5.], dtype=float32)
    """

    def _reduce(self, x: nx.NamedArrayBase) -> nx.NamedArrayBase:
        return x.max(*self.spatial_axes)


__all__ = [
    "AdaptiveAvgPool",
    "AdaptiveMaxPool",
    "AdaptivePool",
    "AvgPool",
    "GlobalAvgPool",
    "GlobalMaxPool",
    "GlobalPool",
    "MaxPool",
    "WindowPool",
]
