"""A parameter-free einsum over axis names: ``named_einsum`` and the ``InputEinsum`` layer.

``contract`` (and the weighted :class:`~pzbridge.nn.NamedEinsum`) sums over
*names*: two axes meet when they have the same name. Some contractions need
more: axes with different names that share an index (attention's
``tokens`` against ``kv_tokens``), or an axis paired with another axis of the
same array (a diagonal). Here each input maps its axis names to *indices*
(any hashable, usually a letter), as an einsum subscript does by position::

    named_einsum(({"seq": "t", "heads": "h"}, {"kv_seq": "s", "heads": "h"}),
                 {"heads": "h", "seq": "t", "kv_seq": "s"}, q, k)

A tuple of names means "each name is its own index". Named axes that every
input has and no spec mentions are batch axes, kept in the output. This is
Penzai's parameter-free ``NamedEinsum``; in pzbridge that name is the layer
with learned weights, so this one is :class:`InputEinsum`.

Example:
    >>> import jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> m = pzb.nx.wrap(jnp.arange(4.0).reshape(2, 2), "row", "col")
    >>> named_einsum(({"row": "i", "col": "i"},), {"diag": "i"}, m).unwrap("diag").tolist()
    [0.0, 3.0]
"""

from __future__ import annotations

import string
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.layer import Layer

AxesSpec = Mapping[str, Hashable] | Sequence[str]


def _as_mapping(spec: AxesSpec, what: str) -> dict[str, Hashable]:
    if isinstance(spec, Mapping):
        return dict(spec)
    if isinstance(spec, str):
        raise NamedAxisError(f"named_einsum: {what} must be a tuple of names or a mapping, found the string {spec!r}. "
                             f"Fix: write ({spec!r},).")
    return {name: name for name in spec}


def _freeze(spec: Any) -> tuple[tuple[str, Hashable], ...]:
    if isinstance(spec, tuple) and spec and all(isinstance(p, tuple) and len(p) == 2 for p in spec):
        return spec  # Already the stored ((name, index), ...) form (a rebuilt copy).
    return tuple(_as_mapping(spec, "a spec").items())


def named_einsum(input_axes: Sequence[AxesSpec], output_axes: AxesSpec, *arrays: nx.NamedArrayBase) -> nx.NamedArray:
    """Einsum of named arrays, with each input's axis names mapped to shared indices.

    Args:
      input_axes: One spec per array: ``{axis name: index}``, or a tuple of
        names (each its own index). An index used twice in one spec takes a
        diagonal.
      output_axes: ``{output axis name: index}`` or a tuple of names; indices
        used by no output axis are summed over.
      *arrays: Named arrays without positional axes.

    Returns:
      A named array with the batch axes and ``output_axes``.

    Raises:
      NamedAxisError: On a spec/array count mismatch, an axis the spec names
        that the array lacks (or vice versa), an unknown output index, sizes
        that disagree for one index, or positional axes.

    Example:
        >>> q = pzb.nx.ones({"seq": 3, "heads": 2, "proj": 4})
        >>> k = pzb.nx.ones({"kv_seq": 5, "heads": 2, "proj": 4})
        >>> logits = named_einsum(({"seq": "t", "heads": "h", "proj": "p"}, {"kv_seq": "s", "heads": "h", "proj": "p"}),
        ...                       {"heads": "h", "seq": "t", "kv_seq": "s"}, q, k)
        >>> sorted(logits.named_shape.items()), float(logits[{"heads": 0, "seq": 0, "kv_seq": 0}].unwrap())
        ([('heads', 2), ('kv_seq', 5), ('seq', 3)], 4.0)
    """
    specs = [_as_mapping(spec, f"input_axes[{i}]") for i, spec in enumerate(input_axes)]
    output = _as_mapping(output_axes, "output_axes")
    if len(specs) != len(arrays):
        raise NamedAxisError(
            f"named_einsum: {len(specs)} input specs for {len(arrays)} arrays. Fix: give one spec per array."
        )
    for i, array in enumerate(arrays):
        if not nx.is_namedarray(array) or array.positional_shape:
            shape = getattr(array, "positional_shape", getattr(array, "shape", None))
            raise NamedAxisError(
                f"named_einsum: input {i} must be a named array without positional axes, found positional shape "
                f"{shape}. Fix: name them first, e.g. pzb.nx.wrap(x).tag(...)."
            )
        missing = [n for n in specs[i] if n not in array.named_shape]
        if missing:
            raise NamedAxisError(
                f"named_einsum: input {i} lacks axes {missing} named by its spec (named shape "
                f"{dict(array.named_shape)}). Fix: correct the spec or rename the array's axes."
            )
    mentioned = {n for spec in specs for n in spec}
    batch = [n for n in arrays[0].named_shape if n not in mentioned and all(n in a.named_shape for a in arrays)]
    for i, array in enumerate(arrays):
        stray = [n for n in array.named_shape if n not in specs[i] and n not in batch]
        if stray:
            raise NamedAxisError(
                f"named_einsum: input {i} has axes {stray} that its spec does not name and that are not batch axes "
                "(in every input, in no spec). Fix: add them to the spec (with their own index to sum them)."
            )
    sizes: dict[Hashable, tuple[int, str]] = {}
    for i, (spec, array) in enumerate(zip(specs, arrays)):
        for name, index in spec.items():
            size = array.named_shape[name]
            if index in sizes and sizes[index][0] != size:
                raise NamedAxisError(
                    f"named_einsum: index {index!r} has size {size} at input {i} axis {name!r}, but "
                    f"{sizes[index][0]} at {sizes[index][1]}. Fix: pair only axes of equal size."
                )
            sizes.setdefault(index, (size, f"input {i} axis {name!r}"))
    unknown = [index for index in output.values() if index not in sizes]
    if unknown:
        raise NamedAxisError(
            f"named_einsum: output indices {unknown} appear in no input spec (inputs use {list(sizes)}). "
            "Fix: use indices of the inputs."
        )
    clash = [n for n in output if n in batch]
    if clash:
        raise NamedAxisError(f"named_einsum: output axes {clash} are also batch axes. Fix: rename the output axes.")
    if len(sizes) > len(string.ascii_letters):
        raise NamedAxisError(f"named_einsum: {len(sizes)} distinct indices, at most 52 are supported. "
                             "Fix: split the contraction into steps.")
    letters = {index: string.ascii_letters[k] for k, index in enumerate(sizes)}
    subscripts = ",".join("".join(letters[i] for i in spec.values()) for spec in specs)
    equation = f"{subscripts}->{''.join(letters[i] for i in output.values())}"
    positional = [array.untag_prefix(*spec) for array, spec in zip(arrays, specs)]
    result = nx.nmap(lambda *xs: jnp.einsum(equation, *xs))(*positional)
    return result.tag_prefix(*output)


@pytree_dataclass
class InputEinsum(Layer):
    """A layer applying :func:`named_einsum` to its input, a tuple of named arrays (no parameters).

    Attributes:
      input_axes: One spec per input, stored as ``((name, index), ...)`` (static).
      output_axes: The output spec, stored the same way (static).

    Example:
        >>> layer = InputEinsum((("a", "b"), ("b", "c")), ("a", "c"))
        >>> x, y = pzb.nx.ones({"a": 2, "b": 3}), pzb.nx.ones({"b": 3, "c": 4})
        >>> layer((x, y)).unwrap("a", "c")[0].tolist()
        [3.0, 3.0, 3.0, 3.0]
    """

    input_axes: tuple[tuple[tuple[str, Hashable], ...], ...] = static_field()
    output_axes: tuple[tuple[str, Hashable], ...] = static_field()

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_axes", tuple(_freeze(spec) for spec in self.input_axes))
        object.__setattr__(self, "output_axes", _freeze(self.output_axes))

    def __call__(self, x: Sequence[nx.NamedArrayBase], /, **side_inputs: Any) -> nx.NamedArray:
        return named_einsum([dict(s) for s in self.input_axes], dict(self.output_axes), *x)
