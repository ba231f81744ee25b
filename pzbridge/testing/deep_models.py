"""Deeply nested Equinox and NNX models, for depth tests of tree transforms (and pzbridge's own).

Each builder nests one ``Linear(4, 4)`` ``depth`` times: in the framework's
``Sequential`` or in a user wrapper module whose ``__call__`` calls what it
holds. Building happens inside
:func:`~pzbridge.bridge.context.recursion_headroom`: at depth 1,000
Equinox's module constructor and NNX's graph functions recurse past
Python's default limit.

Example:
    >>> model = eqx_wrappers(3)
    >>> type(model).__name__, type(model.inner.inner.inner).__name__
    ('EqxWrapper', 'Linear')
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
from flax import nnx

from pzbridge.bridge.context import recursion_headroom


class EqxWrapper(eqx.Module):
    """A user wrapper: calls the module it holds (lifted as ``Foreign``).

    Example:
        >>> EqxWrapper(eqx.nn.Identity())(jax.numpy.ones(2)).shape
        (2,)
    """

    inner: eqx.Module

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.inner(x)


class NnxWrapper(nnx.Module):
    """A user wrapper: calls the module it holds (lifted as ``Foreign``).

    Example:
        >>> NnxWrapper(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))(jax.numpy.ones((1, 2))).shape
        (1, 3)
    """

    def __init__(self, inner: nnx.Module) -> None:
        self.inner = inner

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.inner(x)


def nest(base: Any, wrap: Callable[[Any], Any], depth: int) -> Any:
    """``wrap`` applied ``depth`` times to ``base``.

    Example:
        >>> nest(1, lambda m: [m], 2)
        [[1]]
    """
    with recursion_headroom():  # Equinox's constructor flattens its fields: deep nesting needs headroom.
        for _ in range(depth):
            base = wrap(base)
    return base


def eqx_sequentials(depth: int) -> eqx.nn.Sequential:
    """``eqx.nn.Sequential([...])`` nested ``depth`` times around a ``Linear(4, 4)``.

    Example:
        >>> type(eqx_sequentials(2).layers[0]).__name__
        'Sequential'
    """
    return nest(eqx.nn.Linear(4, 4, key=jax.random.key(0)), lambda m: eqx.nn.Sequential([m]), depth)


def eqx_wrappers(depth: int) -> EqxWrapper:
    """:class:`EqxWrapper` nested ``depth`` times around a ``Linear(4, 4)``."""
    return nest(eqx.nn.Linear(4, 4, key=jax.random.key(0)), EqxWrapper, depth)


def nnx_sequentials(depth: int) -> nnx.Sequential:
    """``nnx.Sequential(...)`` nested ``depth`` times around an ``nnx.Linear(4, 4)``.

    Example:
        >>> type(nnx_sequentials(2).layers[0]).__name__
        'Sequential'
    """
    return nest(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), nnx.Sequential, depth)


def nnx_wrappers(depth: int) -> NnxWrapper:
    """:class:`NnxWrapper` nested ``depth`` times around an ``nnx.Linear(4, 4)``."""
    return nest(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), NnxWrapper, depth)
