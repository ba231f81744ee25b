"""``Standardize``: zero mean and unit variance over named axes, with no parameters.

The parameter-free half of a layer norm, as Penzai's ``Standardize``:
``(x - mean) / sqrt(var + epsilon)`` with the statistics taken over
``across``. Composing it with a ``Linear`` scale and an ``AddBias`` gives a
layer norm whose pieces selectors can reach one by one.

Example:
    >>> import jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> y = Standardize(("features",))(pzb.nx.wrap(jnp.array([1.0, 3.0]), "features"))
    >>> y.unwrap("features").round(3).tolist()
    [-1.0, 1.0]
"""

from __future__ import annotations

from typing import Any

import jax

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.layer import Layer


@pytree_dataclass
class Standardize(Layer):
    """Standardizes the input over ``across`` (mean 0, variance 1; population variance).

    Attributes:
      across: Axis names the statistics are taken over (static).
      epsilon: Added to the variance before the square root (static).

    Raises:
      NamedAxisError: If the input lacks one of ``across``.

    Example:
        >>> x = pzb.nx.wrap(jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]]), "batch", "f")
        >>> Standardize(("f",))(x).mean("f").unwrap("batch").round(6).tolist()
        [0.0, 0.0]
    """

    across: tuple[str, ...] = static_field()
    epsilon: float = static_field(default=1e-6)

    def __post_init__(self) -> None:
        across = (self.across,) if isinstance(self.across, str) else tuple(self.across)
        object.__setattr__(self, "across", across)

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        missing = [n for n in self.across if n not in x.named_shape]
        if missing:
            raise NamedAxisError(
                f"Standardize over {list(self.across)}: input lacks axes {missing} (named shape "
                f"{dict(x.named_shape)}). Fix: standardize over axes the input has, or rename its axes."
            )
        mean = x.mean(*self.across)
        centred = x - mean
        variance = (centred * centred).mean(*self.across)
        return centred * nx.nmap(jax.lax.rsqrt)(variance + self.epsilon)
