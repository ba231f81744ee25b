"""Spatial padding for convolutions and pooling: parsing, resolution, modes.

Equinox, Flax and PyTorch describe padding in slightly different ways (an
int, per-dimension ints, per-dimension ``(before, after)`` pairs, or a
string such as ``"SAME"``), and they pad with zeros or by reflecting,
replicating or wrapping the border. Lifted layers store padding in one
canonical, hashable form (:func:`normalize_padding`) so that their static
configuration is explicit and comparable, and resolve strings into explicit
pairs only when the input size is known (:func:`resolve_padding`), with the
same arithmetic as ``jax.lax`` so results match the frameworks bit for bit.

Example:
    >>> normalize_padding(1, 2, "Conv")
    ((1, 1), (1, 1))
    >>> resolve_padding("SAME", (5,), (3,), (2,), (1,))
    ((1, 1),)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import jax
import jax.numpy as jnp

from pzbridge.core.errors import StructError

#: What users may pass as padding: a string, one int for every side, one int
#: per dimension (both sides), or one ``(before, after)`` pair per dimension.
PaddingLike = Union[str, int, Sequence[int], Sequence[tuple[int, int]]]
#: The canonical stored form: an upper-case string or one pair per dimension.
Padding = Union[str, tuple[tuple[int, int], ...]]

PADDING_STRINGS = ("SAME", "SAME_LOWER", "VALID", "CAUSAL")

# Canonical padding-mode names and the ``jnp.pad`` mode each one means; the
# aliases let bridges pass Equinox / PyTorch / numpy spellings unchanged.
_MODE_ALIASES = {
    "zeros": "zeros",
    "constant": "zeros",
    "reflect": "reflect",
    "replicate": "replicate",
    "edge": "replicate",
    "circular": "circular",
    "wrap": "circular",
}
_JNP_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def normalize_tuple(value: int | Sequence[int], num_spatial: int, what: str, field: str) -> tuple[int, ...]:
    """Broadcasts an int to ``num_spatial`` dims, or checks a sequence's length.

    Args:
      value: An int or one int per spatial dimension.
      num_spatial: Number of spatial dimensions.
      what: The layer, for error messages.
      field: The field name, for error messages.

    Returns:
      A tuple of ``num_spatial`` Python ints.

    Raises:
      StructError: If a sequence has the wrong length or holds non-ints.

    Example:
        >>> normalize_tuple(2, 3, "Conv", "strides")
        (2, 2, 2)
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return (int(value),) * num_spatial
    if isinstance(value, Sequence) and len(value) == num_spatial and all(isinstance(v, int) for v in value):
        return tuple(int(v) for v in value)
    raise StructError(
        f"{what}: {field} must be an int or {num_spatial} ints (one per spatial axis), found {value!r}. "
        f"Fix: pass e.g. {field}={(1,) * num_spatial}."
    )


def normalize_padding(padding: PaddingLike, num_spatial: int, what: str) -> Padding:
    """Canonicalises padding into an upper-case string or per-dimension pairs.

    Strings: ``"SAME"`` (output size ``ceil(n / stride)``, odd padding extra
    at the end), ``"SAME_LOWER"`` (extra at the start), ``"VALID"`` (none),
    ``"CAUSAL"`` (all of ``dilation * (kernel - 1)`` before: Flax's causal
    1-d padding, generalised per dimension).

    Args:
      padding: See :data:`PaddingLike`.
      num_spatial: Number of spatial dimensions.
      what: The layer, for error messages.

    Returns:
      The canonical, hashable form.

    Raises:
      StructError: For unknown strings or malformed sequences.

    Example:
        >>> normalize_padding("same", 2, "Conv"), normalize_padding([1, (0, 2)], 2, "Conv")
        ('SAME', ((1, 1), (0, 2)))
    """
    if isinstance(padding, str):
        upper = padding.upper()
        if upper not in PADDING_STRINGS:
            raise StructError(
                f"{what}: padding string must be one of {list(PADDING_STRINGS)}, found {padding!r}. "
                "Fix: use one of those, or explicit (before, after) pairs per spatial axis."
            )
        return upper
    if isinstance(padding, int) and not isinstance(padding, bool):
        return ((int(padding), int(padding)),) * num_spatial
    if isinstance(padding, Sequence) and len(padding) == num_spatial:
        pairs = []
        for entry in padding:
            if isinstance(entry, int) and not isinstance(entry, bool):
                pairs.append((int(entry), int(entry)))
            elif isinstance(entry, Sequence) and len(entry) == 2 and all(isinstance(v, int) for v in entry):
                pairs.append((int(entry[0]), int(entry[1])))
            else:
                break
        else:
            return tuple(pairs)
    raise StructError(
        f"{what}: padding must be a string, an int, or {num_spatial} ints / (before, after) pairs "
        f"(one per spatial axis), found {padding!r}. Fix: pass e.g. padding={((1, 1),) * num_spatial}."
    )


def normalize_padding_mode(mode: str, what: str) -> str:
    """Canonicalises a padding mode to ``zeros``, ``reflect``, ``replicate`` or ``circular``.

    Accepts any case and the aliases ``constant``, ``edge`` and ``wrap``.

    Raises:
      StructError: For an unknown mode.

    Example:
        >>> normalize_padding_mode("REPLICATE", "Conv"), normalize_padding_mode("wrap", "Conv")
        ('replicate', 'circular')
    """
    canonical = _MODE_ALIASES.get(str(mode).lower())
    if canonical is None:
        raise StructError(
            f"{what}: padding_mode must be one of 'zeros', 'reflect', 'replicate', 'circular', found {mode!r}. "
            "Fix: pick one of those (aliases 'constant', 'edge', 'wrap' are accepted too)."
        )
    return canonical


def dilated_size(size: int, dilation: int) -> int:
    """The extent of a window of ``size`` taps spaced ``dilation`` apart.

    Example:
        >>> dilated_size(3, 2)
        5
    """
    return 0 if size == 0 else (size - 1) * dilation + 1


def resolve_padding(
    padding: Padding,
    in_sizes: Sequence[int],
    window_sizes: Sequence[int],
    strides: Sequence[int],
    dilation: Sequence[int],
) -> tuple[tuple[int, int], ...]:
    """Turns canonical padding into explicit ``(before, after)`` pairs.

    ``SAME`` / ``SAME_LOWER`` / ``VALID`` follow ``jax.lax.padtype_to_pads``
    on the dilated window, so they match what ``lax.conv_general_dilated``
    and ``lax.reduce_window`` do with the same string.

    Args:
      padding: Canonical padding (see :func:`normalize_padding`).
      in_sizes: Spatial input sizes.
      window_sizes: Kernel / window sizes (undilated).
      strides: Window strides.
      dilation: Window (kernel) dilation.

    Returns:
      One pair per spatial dimension.

    Example:
        >>> resolve_padding("CAUSAL", (8,), (3,), (1,), (2,))
        ((4, 0),)
    """
    if not isinstance(padding, str):
        return tuple(padding)
    extents = [dilated_size(k, d) for k, d in zip(window_sizes, dilation)]
    if padding == "CAUSAL":
        return tuple((e - 1, 0) for e in extents)
    return tuple((int(lo), int(hi)) for lo, hi in jax.lax.padtype_to_pads(in_sizes, extents, strides, padding))


def pad_with_mode(
    data: jax.Array, axes: Sequence[int], pads: Sequence[tuple[int, int]], mode: str, what: str
) -> jax.Array:
    """Pads ``data`` along ``axes`` with ``jnp.pad`` in the given padding mode.

    Args:
      data: The raw array.
      axes: Data axes to pad, matching ``pads``.
      pads: ``(before, after)`` per axis; must be non-negative.
      mode: ``zeros``, ``reflect``, ``replicate`` or ``circular``.
      what: The layer, for error messages.

    Returns:
      The padded array.

    Raises:
      StructError: For negative pads, or reflect padding as wide as the axis.

    Example:
        >>> pad_with_mode(jnp.arange(1, 5), (0,), ((2, 2),), "circular", "Conv")
        Array([3, 4, 1, 2, 3, 4, 1, 2], dtype=int32)
    """
    widths: list[tuple[int, int]] = [(0, 0)] * data.ndim
    for axis, (lo, hi) in zip(axes, pads):
        if lo < 0 or hi < 0:
            raise StructError(
                f"{what}: padding_mode {mode!r} needs non-negative padding, found {(lo, hi)} on data axis {axis}. "
                "Fix: use explicit padding with padding_mode='zeros' for negative (cropping) padding."
            )
        if mode == "reflect" and max(lo, hi) >= data.shape[axis]:
            raise StructError(
                f"{what}: reflect padding {(lo, hi)} must be smaller than the padded axis (size "
                f"{data.shape[axis]}). Fix: use a larger input or less padding."
            )
        widths[axis] = (lo, hi)
    return jnp.pad(data, widths, mode=_JNP_MODE[mode])


__all__ = [
    "PADDING_STRINGS",
    "Padding",
    "PaddingLike",
    "dilated_size",
    "normalize_padding",
    "normalize_padding_mode",
    "normalize_tuple",
    "pad_with_mode",
    "resolve_padding",
]
