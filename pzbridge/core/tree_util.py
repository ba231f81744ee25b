"""Small tree helpers shared by the core (equality, keypath lookup).

Example:
    >>> import jax.numpy as jnp
    >>> tree_equal({"a": jnp.ones(2)}, {"a": jnp.ones(2)})
    True
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def _leaves_equal(a: Any, b: Any) -> bool:
    if a is b:
        return True
    a_is_array = isinstance(a, (jax.Array, np.ndarray, np.generic))
    b_is_array = isinstance(b, (jax.Array, np.ndarray, np.generic))
    if a_is_array or b_is_array:
        if not (a_is_array and b_is_array):
            return False
        if isinstance(a, jax.core.Tracer) or isinstance(b, jax.core.Tracer):
            return False  # Tracers have no value to compare; only identity counts.
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        return bool(np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - incomparable objects are simply unequal.
        return False


def tree_equal(a: Any, b: Any) -> bool:
    """Structural equality of two pytrees, comparing array leaves by value.

    Two trees are equal when their tree structures (including static fields)
    are equal and every pair of leaves is equal: arrays by shape, dtype and
    values (NaNs equal), tracers only by identity, other objects with ``==``.

    Args:
      a: A pytree.
      b: Another pytree.

    Returns:
      A Python bool.

    Example:
        >>> import jax.numpy as jnp
        >>> tree_equal([jnp.zeros(2), "x"], [jnp.zeros(2), "y"])
        False
    """
    leaves_a, treedef_a = jax.tree_util.tree_flatten(a)
    leaves_b, treedef_b = jax.tree_util.tree_flatten(b)
    if treedef_a != treedef_b:
        return False
    return all(_leaves_equal(x, y) for x, y in zip(leaves_a, leaves_b))
