"""Activations with learned parameters: ``PReLU``.

Parameter-free activations are :class:`~pzbridge.nn.basic.Elementwise`
layers; this module holds those with a weight. The negative slope is a named
array broadcast by name (a scalar, or one slope per channel), so a lifted
slope keeps the original buffer.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> prelu = PReLU.from_config("act", jax.random.key(0))
    >>> prelu(pzb.nx.wrap(jnp.array([-4.0, 2.0]), "features")).unwrap("features")
    Array([-1.,  2.], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from pzbridge.core import named_axes as nx
from pzbridge.core.named_axes_core import make_named
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.contraction import data_layout
from pzbridge.nn.initializers import constant, make_parameter
from pzbridge.nn.layer import Layer
from pzbridge.nn.normalization import align_to_layout, require_axes


@pytree_dataclass
class PReLU(Layer):
    """``where(x >= 0, x, alpha * x)`` with a learned negative slope ``alpha``.

    Attributes:
      alpha: A ``Parameter`` (or frozen value / slot) holding a scalar or a
        NamedArray over some of the input's axes.
      cast_slope_to_input: Cast ``alpha`` to the input dtype first (NNX with
        ``dtype=None``); otherwise standard promotion (Equinox; static).
      dtype: If set, input and slope are cast to it (NNX ``dtype``; static).

    Example:
        >>> a = pzb.Parameter(pzb.nx.wrap(jnp.array([0.1, 0.5]), "channels"), "a")
        >>> PReLU(a)(pzb.nx.wrap(jnp.array([-1.0, -1.0]), "channels")).unwrap("channels")
        Array([-0.1, -0.5], dtype=float32)
    """

    alpha: Any
    cast_slope_to_input: bool = static_field(default=False)
    dtype: Any = static_field(default=None)

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        where = f"PReLU {getattr(self.alpha, 'label', '?')!r}"
        require_axes(x, (), where)
        data, positional, name_axes = data_layout(x)
        alpha = align_to_layout(self.alpha.value, data.ndim, name_axes, data.shape, f"{where} alpha")
        if self.dtype is not None:
            data, alpha = data.astype(self.dtype), alpha.astype(self.dtype)
        elif self.cast_slope_to_input:
            alpha = alpha.astype(data.dtype)
        with jax.numpy_dtype_promotion("standard"):
            out = jnp.where(data >= 0, data, alpha * data)
        return make_named(out, positional, name_axes)

    @classmethod
    def from_config(
        cls,
        name: str,
        init_base_rng: jax.Array | None,
        slope_axes: Mapping[str, int] | None = None,
        init_alpha: float = 0.25,
        dtype: Any = jnp.float32,
    ) -> PReLU:
        """Builds a PReLU with slope ``init_alpha`` (Equinox 0.25, NNX 0.01), labelled ``f"{name}.alpha"``.

        Args:
          name: Layer name.
          init_base_rng: Base key, or None for a slot.
          slope_axes: Axes with one slope each (e.g. ``{"channels": c}``); None for a scalar slope.
          init_alpha: Initial slope.
          dtype: Slope dtype.

        Example:
            >>> PReLU.from_config("p", None).alpha
            ParameterSlot(label='p.alpha')
        """
        alpha = make_parameter(f"{name}.alpha", init_base_rng, lambda _: constant(slope_axes or {}, init_alpha, dtype))
        return cls(alpha)
