"""Hypothesis strategies for named arrays.

Anyone writing code over ``pzb.nx`` named arrays can property-test it with
these: random axis names and sizes, random dtypes, and random *storage
layouts* (a :class:`~pzbridge.core.named_axes.NamedArrayView` with axes in a
random data order is the same logical array as a :class:`NamedArray`, so code
must treat them alike). :func:`named_array_cases` also returns an independent
numpy reference laid out canonically, so tests can compare against numpy
instead of against the code under test.

Example:
    >>> from hypothesis import given, settings
    >>> @settings(max_examples=5)
    ... @given(named_arrays(max_named_axes=2))
    ... def check(x):
    ...     assert len(x.named_shape) <= 2
    >>> check()
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from hypothesis import strategies as st
from jaxtyping import Shaped

from pzbridge.core.named_axes_core import AxisMap, NamedArray, NamedArrayBase, NamedArrayView

DTYPES: tuple[str, ...] = ("float32", "int32", "bool")


def axis_names() -> st.SearchStrategy[str]:
    """Short identifier-like axis names (``"a"``, ``"seq2"``, ...).

    Example:
        >>> from hypothesis import given, settings
        >>> @settings(max_examples=5)
        ... @given(axis_names())
        ... def check(name):
        ...     assert name.isidentifier()
        >>> check()
    """
    return st.from_regex(r"[a-z][a-z0-9_]{0,4}", fullmatch=True)


def named_shapes(
    min_axes: int = 0,
    max_axes: int = 3,
    min_size: int = 1,
    max_size: int = 4,
    names: Sequence[str] | None = None,
) -> st.SearchStrategy[dict[str, int]]:
    """Ordered dicts name -> size with distinct names.

    Args:
      min_axes: Fewest named axes.
      max_axes: Most named axes.
      min_size: Smallest axis size.
      max_size: Largest axis size.
      names: Draw names from this pool instead of :func:`axis_names`.

    Returns:
      A strategy of ``dict[str, int]``.

    Example:
        >>> from hypothesis import given, settings
        >>> @settings(max_examples=5)
        ... @given(named_shapes(min_axes=1, max_axes=2))
        ... def check(shape):
        ...     assert 1 <= len(shape) <= 2
        >>> check()
    """
    name_strategy = st.sampled_from(list(names)) if names is not None else axis_names()
    if names is not None:
        max_axes = min(max_axes, len(set(names)))
    return st.lists(
        st.tuples(name_strategy, st.integers(min_size, max_size)),
        min_size=min_axes,
        max_size=max_axes,
        unique_by=lambda pair: pair[0],
    ).map(dict)


def positional_shapes(min_axes: int = 0, max_axes: int = 2, min_size: int = 1, max_size: int = 4
                      ) -> st.SearchStrategy[tuple[int, ...]]:
    """Tuples of positional axis sizes.

    Example:
        >>> from hypothesis import given, settings
        >>> @settings(max_examples=5)
        ... @given(positional_shapes(max_axes=1))
        ... def check(shape):
        ...     assert len(shape) <= 1
        >>> check()
    """
    return st.lists(st.integers(min_size, max_size), min_size=min_axes, max_size=max_axes).map(tuple)


def _random_data(seed: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.random(shape) < 0.5
    if np.issubdtype(np.dtype(dtype), np.integer):
        return rng.integers(-5, 6, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


@dataclasses.dataclass(frozen=True)
class NamedArrayCase:
    """A random named array together with an independent numpy reference.

    Attributes:
      array: The named array (either storage form, any data layout).
      reference: A numpy array with axes ``(positional..., names...)``.
      names: The axis names in the order they appear in ``reference``.

    Example:
        >>> import jax.numpy as jnp
        >>> case = NamedArrayCase(NamedArray(jnp.zeros(2), {"a": 2}), np.zeros(2), ("a",))
        >>> case.names
        ('a',)
    """

    array: NamedArrayBase
    reference: np.ndarray
    names: tuple[str, ...]


def build_named_array(reference: Shaped[np.ndarray, "*shape"], names: Sequence[str],
                      permutation: Sequence[int] | None = None) -> NamedArrayBase:
    """Builds a named array from a canonical reference ``(positional..., names...)``.

    With a ``permutation`` of the data axes the result is a
    :class:`NamedArrayView` storing the data in that (transposed) order.

    Example:
        >>> x = build_named_array(np.zeros((2, 3)), ["s"], permutation=[1, 0])
        >>> type(x).__name__, x.positional_shape
        ('NamedArrayView', (2,))
    """
    import jax.numpy as jnp

    names = tuple(names)
    p = reference.ndim - len(names)
    if permutation is None:
        return NamedArray(jnp.asarray(reference), AxisMap(zip(names, reference.shape[p:])))
    perm = list(permutation)
    data = jnp.asarray(np.transpose(reference, perm))
    return NamedArrayView(
        data,
        tuple(data.shape),
        tuple(perm.index(k) for k in range(p)),
        AxisMap((n, perm.index(p + i)) for i, n in enumerate(names)),
    )


@st.composite
def named_array_cases(
    draw: Any,
    dtype: str | st.SearchStrategy[str] | None = None,
    named_shape: dict[str, int] | None = None,
    positional_shape: tuple[int, ...] | None = None,
    min_named_axes: int = 0,
    max_named_axes: int = 3,
    min_positional_axes: int = 0,
    max_positional_axes: int = 2,
    views: bool = True,
) -> NamedArrayCase:
    """Random named arrays with their numpy reference (see :class:`NamedArrayCase`).

    Args:
      draw: Supplied by hypothesis.
      dtype: A dtype name, a strategy of names, or None for float32/int32/bool.
      named_shape: Fix the named shape instead of drawing it.
      positional_shape: Fix the positional shape instead of drawing it.
      min_named_axes: Fewest named axes when drawn.
      max_named_axes: Most named axes when drawn.
      min_positional_axes: Fewest positional axes when drawn.
      max_positional_axes: Most positional axes when drawn.
      views: Also produce :class:`NamedArrayView` objects with shuffled data axes.

    Returns:
      A :class:`NamedArrayCase`.

    Example:
        >>> from hypothesis import given, settings
        >>> @settings(max_examples=5)
        ... @given(named_array_cases(dtype="int32"))
        ... def check(case):
        ...     assert case.array.dtype == np.int32
        >>> check()
    """
    if dtype is None:
        dtype = draw(st.sampled_from(DTYPES))
    elif not isinstance(dtype, str):
        dtype = draw(dtype)
    if named_shape is None:
        named_shape = draw(named_shapes(min_named_axes, max_named_axes))
    if positional_shape is None:
        positional_shape = draw(positional_shapes(min_positional_axes, max_positional_axes))
    names = tuple(named_shape)
    shape = tuple(positional_shape) + tuple(named_shape.values())
    reference = _random_data(draw(st.integers(0, 2**32 - 1)), shape, dtype)
    permutation = draw(st.permutations(range(len(shape)))) if views and draw(st.booleans()) else None
    return NamedArrayCase(build_named_array(reference, names, permutation), reference, names)


def named_arrays(**kwargs: Any) -> st.SearchStrategy[NamedArrayBase]:
    """Random named arrays (``NamedArray`` or ``NamedArrayView``).

    Takes the same keyword arguments as :func:`named_array_cases`.

    Example:
        >>> from hypothesis import given, settings
        >>> @settings(max_examples=5)
        ... @given(named_arrays(dtype="bool", min_named_axes=1))
        ... def check(x):
        ...     assert x.named_shape
        >>> check()
    """
    return named_array_cases(**kwargs).map(lambda case: case.array)


@st.composite
def broadcastable_named_array_cases(
    draw: Any,
    count: int = 2,
    dtype: str | st.SearchStrategy[str] | None = "float32",
    max_named_axes: int = 3,
    max_positional_axes: int = 2,
    views: bool = True,
) -> tuple[dict[str, int], tuple[int, ...], list[NamedArrayCase]]:
    """Several named arrays whose shapes broadcast together.

    Each array carries a random subset of one shared named shape (so names
    agree in size; the returned union lists only names some array carries) and a positional shape that broadcasts numpy-style to a
    shared positional shape (a suffix of it, some sizes replaced by 1).

    Returns:
      ``(union_named_shape, broadcast_positional_shape, cases)``.

    Example:
        >>> from hypothesis import given, settings
        >>> @settings(max_examples=5)
        ... @given(broadcastable_named_array_cases(count=3))
        ... def check(drawn):
        ...     union, positional, cases = drawn
        ...     assert all(set(c.names) <= set(union) for c in cases)
        >>> check()
    """
    union = draw(named_shapes(0, max_named_axes))
    full_positional = draw(positional_shapes(0, max_positional_axes))
    if not isinstance(dtype, str) and dtype is not None:
        dtype = draw(dtype)
    cases = []
    for _ in range(count):
        subset = [n for n in union if draw(st.booleans())]
        order = draw(st.permutations(subset)) if subset else []
        rank = draw(st.integers(0, len(full_positional)))
        suffix = full_positional[len(full_positional) - rank :]
        positional = tuple(s if draw(st.booleans()) else 1 for s in suffix)
        cases.append(
            draw(
                named_array_cases(
                    dtype=dtype, named_shape={n: union[n] for n in order}, positional_shape=positional, views=views
                )
            )
        )
    used = {n: size for n, size in union.items() if any(n in case.names for case in cases)}
    return used, full_positional, cases
