"""The mean over named axes, counting the sizes the input has in this call.

``jnp.mean(x, axis)`` traces to a ``reduce_sum`` followed by a division by
the reduced size *of the example*, a constant. Traced lifting turns that pair
into :class:`MeanAxes`, which divides by the sizes of the axes it reduces at
run time, so a global average pool (``x.mean(axis=(1, 2))``) or a mean over
``seq`` stays a mean at every image size or sequence length. The division is
the same ``lax.div`` by the count ``jnp.mean`` emits, so at the example's
size the value is bit for bit that of the original code.

Example:
    >>> import jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> x = pzb.nx.wrap(jnp.arange(12.0).reshape(3, 4), "height", "width")
    >>> MeanAxes(("width",))(x).unwrap("height").tolist()
    [1.5, 5.5, 9.5]
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from pzbridge.core import named_axes as nx
from pzbridge.core.named_axes_ops import elementwise
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.layer import Layer
from pzbridge.nn.named_ops import ReduceAxes


@pytree_dataclass
class MeanAxes(Layer):
    """The mean over the named ``axes``: their sum divided by the product of their sizes in this input.

    Attributes:
      axes: Names averaged over (static).

    Example:
        >>> import jax.numpy as jnp
        >>> import pzbridge as pzb
        >>> pool = MeanAxes(("height", "width"))
        >>> [pool(pzb.nx.ones({"height": n, "width": n, "channels": 2})).unwrap("channels").tolist() for n in (2, 5)]
        [[1.0, 1.0], [1.0, 1.0]]
    """

    axes: tuple[str, ...] = static_field()

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> Any:
        total = ReduceAxes("reduce_sum", self.axes)(x)
        count = math.prod(int(x.named_shape[a]) for a in self.axes)
        return elementwise(lambda t: jax.lax.div(t, jnp.asarray(count, t.dtype)), total, what="mean")
