"""Widened examples: the example call with every size-1 axis grown, for tracing a module that names axes by size.

Traced lifting tells axes apart by the code's dataflow *and* by their sizes:
a size-1 axis is what broadcasting makes of a missing one, so the converter
treats it as absent (:mod:`~pzbridge.bridge.tracing.graph`). An example whose
token ids have shape ``(1,)``, or an NNX batch of one, therefore loses its
``seq`` or ``batch`` axis in the traced graph: the lifted model returns the
wrong shape, or a later layer finds no ``seq`` to attend over.

``pzb.lift`` therefore traces such a module on a *widened* copy of the
example (:func:`widened_examples`): every size-1 axis of every array input
grows to a fresh size, a prime that divides none of the sizes of the example
and of the module's arrays, so no size-matching rule (``x.shape[0]`` as a
number, a reshape's factors) can confuse it with another axis. The trace is
abstract, so only shapes change: token ids and boolean masks need no values.
The first candidate gives every size-1 axis the *same* size (a sequence of
one and its ``(1, 1)`` mask stay consistent); with several size-1 axes a
second candidate gives each its own size. The lifted graph names its axes
and follows every call's sizes, so ``pzb.lift`` then checks it on the
*original* example against the module (shapes, and values when the example
is concrete) and falls back to tracing the original example when a widened
trace fails or disagrees: some models do need an axis of size 1.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from pzbridge.bridge.tracing.example import Example
    >>> ex = Example.of((jnp.zeros((1,), jnp.int32), jnp.ones((1, 1), bool)), {})
    >>> [[a.shape for a in c.args] for c in widened_examples(ex, {5, 2})]
    [[(3,), (3, 3)], [(3,), (7, 11)]]
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import jax

from pzbridge.bridge.tracing.example import Example

__all__ = ["example_sizes", "fresh_sizes", "size_one_count", "widened_examples"]


def _structs(example: Example) -> list[jax.ShapeDtypeStruct]:
    """The array inputs of the example (positional, then keyword), in a fixed order."""
    leaves = jax.tree_util.tree_leaves((example.args, dict(example.kwargs)))
    return [leaf for leaf in leaves if isinstance(leaf, jax.ShapeDtypeStruct)]


def size_one_count(example: Example) -> int:
    """How many axes of the example's array inputs have size 1.

    Example:
        >>> import jax.numpy as jnp
        >>> size_one_count(Example.of((jnp.ones((1, 4)), jnp.ones((1, 1))), {}))
        3
    """
    return sum(size == 1 for struct in _structs(example) for size in struct.shape)


def example_sizes(example: Example) -> set[int]:
    """Every axis size of the example's array inputs.

    Example:
        >>> import jax.numpy as jnp
        >>> sorted(example_sizes(Example.of((jnp.ones((1, 4)),), {"mask": jnp.ones((6,))})))
        [1, 4, 6]
    """
    return {int(size) for struct in _structs(example) for size in struct.shape}


def _primes() -> Iterator[int]:
    found: list[int] = []
    for n in itertools.count(3, 2):  # odd numbers: 2 divides the most sizes
        if all(n % p for p in found):
            found.append(n)
            yield n


def fresh_sizes(taken: Iterable[int], count: int) -> list[int]:
    """The ``count`` smallest odd primes that divide none of the ``taken`` sizes.

    A size that divides or equals no other size cannot be mistaken for that
    axis, nor for a factor or a product of axes in a reshape.

    Example:
        >>> fresh_sizes({2, 4, 6, 10}, 2)
        [7, 11]
    """
    sizes = [int(s) for s in taken if int(s) > 1]
    return list(itertools.islice((p for p in _primes() if all(s % p for s in sizes)), count))


def _grown(struct: jax.ShapeDtypeStruct, sizes: Iterator[int]) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(next(sizes) if size == 1 else size for size in struct.shape), struct.dtype)


def _replace_structs(example: Example, sizes: Iterator[int]) -> Example:
    def grow(value: Any) -> Any:
        return _grown(value, sizes) if isinstance(value, jax.ShapeDtypeStruct) else value

    # The same traversal order as _structs: positional arguments first, then keywords in their order.
    args, kwargs = jax.tree_util.tree_map(grow, (example.args, dict(example.kwargs)))
    return dataclasses.replace(example, args=tuple(args), kwargs=kwargs)


def widened_examples(example: Example, module_sizes: Iterable[int]) -> list[Example]:
    """The widened copies of ``example`` to trace, in the order to try them (empty without size-1 axes).

    Args:
      example: The example call, as recorded by :meth:`Example.of`.
      module_sizes: The axis sizes of the module's own arrays (the fresh
        sizes avoid them too).

    Returns:
      First every size-1 axis at one common fresh size; then, when there are
      several, each at its own fresh size.

    Example:
        >>> import jax.numpy as jnp
        >>> [c.args[0].shape for c in widened_examples(Example.of((jnp.ones((1, 2)),), {}), {2})]
        [(3, 2)]
    """
    count = size_one_count(example)
    if not count:
        return []
    fresh = fresh_sizes(example_sizes(example) | set(module_sizes), count)
    candidates = [_replace_structs(example, itertools.repeat(fresh[0]))]
    if count > 1:
        candidates.append(_replace_structs(example, iter(fresh)))
    return candidates
