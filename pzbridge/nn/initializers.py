"""Deterministic parameter creation for ``from_config`` builders.

Every parameter gets its label from the layer's name (``"blocks.0.mlp.in.weights"``)
and its random key from that label folded into the base key, so building
the same model twice gives identical weights regardless of build order, and
renaming one layer changes only that layer's weights. With
``init_base_rng=None`` a builder returns :class:`~pzbridge.ParameterSlot`
placeholders instead, for models whose weights will be bound later (e.g.
restored from a checkpoint) without spending time on initialisation.

Example:
    >>> import jax
    >>> p = make_parameter("dense.weights", jax.random.key(0), lambda k: jax.random.normal(k, (2,)))
    >>> p.label
    'dense.weights'
    >>> make_parameter("dense.weights", None, lambda k: 1 / 0)
    ParameterSlot(label='dense.weights')
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray

from pzbridge.core import named_axes as nx
from pzbridge.core.variables import Parameter, ParameterSlot


def key_for_label(init_base_rng: PRNGKeyArray, label: str) -> PRNGKeyArray:
    """Derives a parameter's random key from the base key and its label.

    A stable hash (CRC-32 of the UTF-8 label) is folded into the base key, so
    the key does not depend on Python's per-process string hashing.

    Example:
        >>> k = jax.random.key(0)
        >>> bool((jax.random.key_data(key_for_label(k, "a")) == jax.random.key_data(key_for_label(k, "a"))).all())
        True
    """
    return jax.random.fold_in(init_base_rng, zlib.crc32(label.encode("utf-8")) & 0x7FFFFFFF)


def make_parameter(
    label: str,
    init_base_rng: jax.Array | None,
    initializer: Callable[[jax.Array], Any],
    metadata: Mapping[str, Any] | None = None,
) -> Parameter | ParameterSlot:
    """Creates a labelled parameter, or a slot when no base key is given.

    Args:
      label: The parameter's label (usually ``f"{layer_name}.{field}"``).
      init_base_rng: The model's base key, or ``None`` for a slot.
      initializer: Called with the derived key; returns the initial value.
      metadata: Optional parameter metadata.

    Returns:
      A :class:`~pzbridge.Parameter` or a :class:`~pzbridge.ParameterSlot`.
    """
    if init_base_rng is None:
        return ParameterSlot(label)
    return Parameter(initializer(key_for_label(init_base_rng, label)), label, metadata)


def variance_scaling(
    key: jax.Array,
    named_shape: Mapping[str, int],
    fan_in_axes: tuple[str, ...],
    dtype: Any = jnp.float32,
    scale: float = 1.0,
) -> nx.NamedArray:
    """Truncation-free normal init with variance ``scale / fan_in`` (LeCun normal).

    Args:
      key: Random key.
      named_shape: Axis names and sizes of the parameter, in storage order.
      fan_in_axes: The axes whose sizes multiply to the fan-in.
      dtype: Parameter dtype.
      scale: Variance scale.

    Returns:
      A NamedArray with exactly ``named_shape``.

    Example:
        >>> w = variance_scaling(jax.random.key(0), {"features": 4, "features_out": 3}, ("features",))
        >>> dict(w.named_shape)
        {'features': 4, 'features_out': 3}
    """
    fan_in = 1
    for name in fan_in_axes:
        fan_in *= named_shape[name]
    shape = tuple(named_shape.values())
    data = jax.random.normal(key, shape, dtype) * jnp.sqrt(scale / max(fan_in, 1)).astype(dtype)
    return nx.wrap(data, *named_shape.keys())


def constant(named_shape: Mapping[str, int], value: float, dtype: Any = jnp.float32) -> nx.NamedArray:
    """A NamedArray filled with ``value`` (zeros for biases, ones for scales).

    Example:
        >>> constant({"features": 2}, 1.0).unwrap("features")
        Array([1., 1.], dtype=float32)
    """
    return nx.wrap(jnp.full(tuple(named_shape.values()), value, dtype), *named_shape.keys())
