"""Hypothesis strategies for random pytrees of pzbridge structs.

Tree transforms (selectors, lifting, LoRA, ...) must hold on trees their
authors did not think of. These strategies generate small random trees mixing
:class:`~pzbridge.core.struct.Struct` nodes (with child and static fields),
lists, tuples, dicts, ``None`` and empty containers, with small array leaves,
and optionally the *same* variable object at several places (from a factory
the caller supplies), so that sharing-aware code gets exercised. The struct
classes are module-level so generated trees are ordinary, picklable data.

Example:
    >>> from hypothesis import given, settings
    >>> @settings(max_examples=5, database=None)
    ... @given(random_struct_trees(max_depth=2, max_leaves=4))
    ... def check(tree):
    ...     assert len(jax.tree_util.tree_leaves(tree)) <= 4
    >>> check()
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from hypothesis import strategies as st

from pzbridge.core.struct import Struct, pytree_dataclass, static_field

__all__ = [
    "Empty",
    "Layer",
    "Pair",
    "Sequential",
    "Tagged",
    "Wrapper",
    "array_leaves",
    "random_struct_trees",
    "sequential_like_trees",
]


@pytree_dataclass
class Pair(Struct):
    """A struct with two child fields and a static tag.

    Example:
        >>> jax.tree_util.tree_leaves(Pair(1, 2))
        [1, 2]
    """

    left: Any
    right: Any
    tag: str = static_field(default="pair")


@pytree_dataclass
class Wrapper(Struct):
    """A struct with one child field.

    Example:
        >>> jax.tree_util.tree_leaves(Wrapper([1, 2]))
        [1, 2]
    """

    inner: Any


@pytree_dataclass
class Tagged(Struct):
    """A struct with one child and two static fields.

    Example:
        >>> jax.tree_util.tree_structure(Tagged(1, "a", 2)) == jax.tree_util.tree_structure(Tagged(1, "a", 3))
        False
    """

    value: Any
    name: str = static_field(default="t")
    size: int = static_field(default=0)


@pytree_dataclass
class Empty(Struct):
    """A struct with no children (a childless pytree node).

    Example:
        >>> jax.tree_util.tree_leaves(Empty())
        []
    """

    note: str = static_field(default="empty")


@pytree_dataclass
class Layer(Struct):
    """A layer-like struct: a weight, a bias and a static name.

    Example:
        >>> Layer(np.ones(2), np.zeros(2), name="l0").name
        'l0'
    """

    weight: Any
    bias: Any
    name: str = static_field(default="layer")


@pytree_dataclass
class Sequential(Struct):
    """A struct holding a list (or tuple) of layers, like a sequential model.

    Example:
        >>> len(Sequential([Layer(1, 2), Layer(3, 4)]).sublayers)
        2
    """

    sublayers: Any


def array_leaves(max_dims: int = 2, max_side: int = 3) -> st.SearchStrategy[np.ndarray]:
    """Small float32 numpy arrays with random shapes (including scalars).

    Example:
        >>> array_leaves().example().dtype  # doctest: +SKIP
        dtype('float32')
    """
    shapes = st.lists(st.integers(1, max_side), min_size=0, max_size=max_dims).map(tuple)
    return st.builds(
        lambda shape, seed: np.random.default_rng(seed).standard_normal(shape).astype(np.float32),
        shapes,
        st.integers(0, 2**16),
    )


_STRUCT_KINDS = ("pair", "wrapper", "tagged", "layer", "sequential")
_CONTAINER_KINDS = ("list", "tuple", "dict")


@st.composite
def random_struct_trees(
    draw: Any,
    max_depth: int = 3,
    max_leaves: int = 12,
    variable_factory: Callable[[np.ndarray], Any] | None = None,
    max_variables: int = 3,
) -> Any:
    """Random pytrees of structs, containers and small array leaves.

    Args:
      max_depth: Maximum nesting of nodes above a leaf.
      max_leaves: Maximum number of leaf slots (array, int, variable).
      variable_factory: If given, called on an array to make a variable
        object; a pool of up to ``max_variables`` such objects is drawn first
        and leaves are sometimes drawn from the pool, so one variable can
        occur at several places (shared).
      max_variables: Size bound of the variable pool.

    Returns:
      A hypothesis strategy of trees. Nodes include :class:`Pair`,
      :class:`Wrapper`, :class:`Tagged`, :class:`Empty`, :class:`Layer`,
      :class:`Sequential`, lists, tuples, string-keyed dicts, ``None`` and
      empty containers.

    Example:
        >>> from hypothesis import given, settings
        >>> @settings(max_examples=3, database=None)
        ... @given(random_struct_trees(variable_factory=lambda a: [a]))
        ... def check(tree):
        ...     assert tree is not ...
        >>> check()
    """
    pool = []
    if variable_factory is not None:
        pool = [variable_factory(draw(array_leaves())) for _ in range(draw(st.integers(1, max_variables)))]
    budget = [max_leaves]

    def leaf() -> Any:
        budget[0] -= 1
        choices = ["array", "int"] + (["variable", "variable"] if pool else [])
        kind = draw(st.sampled_from(choices))
        if kind == "array":
            return draw(array_leaves())
        if kind == "int":
            return draw(st.integers(-3, 3))
        return draw(st.sampled_from(pool))

    def node(depth: int) -> Any:
        if budget[0] <= 0 or depth >= max_depth or draw(st.integers(0, 3)) == 0:
            if budget[0] > 0 and draw(st.integers(0, 5)) > 0:
                return leaf()
            return draw(st.sampled_from([None, (), [], {}, Empty()]))
        kind = draw(st.sampled_from(_STRUCT_KINDS + _CONTAINER_KINDS))
        if kind == "pair":
            return Pair(node(depth + 1), node(depth + 1), tag=draw(st.sampled_from(["a", "b"])))
        if kind == "wrapper":
            return Wrapper(node(depth + 1))
        if kind == "tagged":
            return Tagged(node(depth + 1), name=draw(st.sampled_from(["x", "y"])), size=draw(st.integers(0, 2)))
        if kind == "layer":
            return Layer(node(depth + 1), node(depth + 1), name=draw(st.sampled_from(["l0", "l1"])))
        n = draw(st.integers(0, 3))
        children = [node(depth + 1) for _ in range(n)]
        if kind == "sequential":
            return Sequential(children)
        if kind == "list":
            return children
        if kind == "tuple":
            return tuple(children)
        keys = draw(st.lists(st.sampled_from("abcdef"), min_size=n, max_size=n, unique=True))
        return dict(zip(keys, children))

    return node(0)


@st.composite
def sequential_like_trees(
    draw: Any,
    min_layers: int = 1,
    max_layers: int = 6,
    nested: bool = True,
    variable_factory: Callable[[np.ndarray], Any] | None = None,
) -> Sequential:
    """A :class:`Sequential` whose ``sublayers`` list holds layers (maybe nested).

    Layers are :class:`Layer` structs with small array weights; with
    ``nested`` some elements are themselves :class:`Sequential` (holding a
    list or a tuple), so lists of layers appear at several depths. With a
    ``variable_factory``, some weights are one shared variable.

    Args:
      min_layers: Minimum number of elements in the top-level list.
      max_layers: Maximum number of elements in each list.
      nested: Whether elements may be nested sequentials.
      variable_factory: Optional factory for a shared weight variable.

    Returns:
      A hypothesis strategy of :class:`Sequential` trees.

    Example:
        >>> from hypothesis import given, settings
        >>> @settings(max_examples=3, database=None)
        ... @given(sequential_like_trees())
        ... def check(model):
        ...     assert isinstance(model.sublayers, list) and model.sublayers
        >>> check()
    """
    shared = variable_factory(draw(array_leaves())) if variable_factory is not None else None

    def layer(i: int) -> Layer:
        weight = shared if shared is not None and draw(st.booleans()) else draw(array_leaves())
        return Layer(weight, draw(array_leaves()), name=f"l{i}")

    def elements(depth: int, lo: int) -> list:
        out = []
        for i in range(draw(st.integers(lo, max_layers))):
            if nested and depth < 2 and draw(st.integers(0, 3)) == 0:
                inner = elements(depth + 1, 0)
                out.append(Sequential(inner if draw(st.booleans()) else tuple(inner)))
            else:
                out.append(layer(i))
        return out

    return Sequential(elements(0, min_layers))
