"""Lifted forms of Equinox layers that need Equinox-specific configuration.

Most of a lifted Equinox layer is framework-neutral pzbridge vocabulary
(``pzb.nn.Linear``, ``AddBias``, ``Elementwise`` ...). A few Equinox details
have no neutral counterpart but must survive the round trip exactly, such as
``"scalar"`` feature sizes or the way ``eqx.nn.Sequential`` splits its
``key``. Those layers lift to a named ``Sequential`` subclass defined here:
selectors still reach the primitives inside (``at_instances_of(pzb.nn.Linear)``),
and the subclass's static fields carry the Equinox configuration back.

This module imports no framework: the classes are plain pzbridge layers.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> layer = EqxLinear([pzb.nn.Linear.from_config("l", jax.random.key(0), {"features": 1}, {"features": 2})],
    ...                   in_features="scalar", out_features=2)
    >>> dict(layer(pzb.nx.wrap(jnp.ones(3), "batch")).named_shape)
    {'batch': 3, 'features': 2}
"""

from __future__ import annotations

from typing import Any

import jax

from pzbridge.core import named_axes as nx
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.combinators import Sequential


def _add_axis(x: nx.NamedArrayBase, name: str) -> nx.NamedArray:
    canonical = x.with_positional_prefix() if hasattr(x, "with_positional_prefix") else x
    return nx.NamedArray(canonical.data_array[..., None], {**dict(canonical.named_axes), name: 1})


@pytree_dataclass
class EqxLinear(Sequential):
    """``eqx.nn.Linear`` lifted: ``[Linear]`` or ``[Linear, AddBias]`` plus Equinox sizes.

    A ``"scalar"`` input gets a size-1 ``features`` axis before the map; a
    ``"scalar"`` output loses it after, exactly as Equinox does.

    Attributes:
      in_features: ``int`` or ``"scalar"`` (static).
      out_features: ``int`` or ``"scalar"`` (static).
      features_axis: Name of the feature axis (static).
    """

    in_features: Any = static_field(default=None)
    out_features: Any = static_field(default=None)
    features_axis: str = static_field(default="features")

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        if self.in_features == "scalar":
            x = _add_axis(x, self.features_axis)
        x = super().__call__(x, **side_inputs)
        if self.out_features == "scalar":
            x = x[{self.features_axis: 0}]
        return x


@pytree_dataclass
class EqxSequential(Sequential):
    """``eqx.nn.Sequential`` lifted: a ``key`` side input is split per layer, as Equinox does.

    Example:
        >>> import pzbridge as pzb
        >>> EqxSequential([pzb.nn.Identity()])(1, key=jax.random.key(0))
        1
    """

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        key = side_inputs.get("key")
        if key is None:
            return super().__call__(x, **side_inputs)
        keys = jax.random.split(key, len(self.sublayers))
        for layer, layer_key in zip(self.sublayers, keys):
            x = layer(x, **{**side_inputs, "key": layer_key})
        return x
