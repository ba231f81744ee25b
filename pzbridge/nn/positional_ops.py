"""A JAX primitive that works on axis positions, applied to named arrays.

Most glue of a traced module is elementwise or a contraction and aligns axes
by name (:mod:`pzbridge.nn.named_ops`). Some primitives act on *positions*:
a convolution on raw kernels, ``cumsum`` along one axis, ``dynamic_slice`` /
``dynamic_update_slice`` (a hand-written KV cache), ``pad``, ``sort``,
``reduce_window`` (hand-written pooling), general gathers and scatters. For
those, :class:`ApplyPositional` records which named axis sits at each
position of each operand and of each result; at call time it puts those axes
in place, runs the primitive, and names the results. Every other named axis
(a ``batch`` the traced code never saw) is mapped over with
:func:`~pzbridge.core.named_axes.nmap`, so it passes through as for any layer.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> cumsum = ApplyPositional(jax.lax.cumsum_p, (("axis", 0), ("reverse", False)), (("input", 0),),
    ...                          operand_axes=(("seq",),), output_axes=(("seq",),))
    >>> x = pzb.nx.wrap(jnp.ones((2, 3)), "batch", "seq")
    >>> cumsum(x).unwrap("batch", "seq").tolist()
    [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from pzbridge.core import named_axes as nx
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.layer import Layer
from pzbridge.nn.named_ops import constant_value

AxisNames = tuple[str | None, ...]
"""Per position, the named axis there (None: a size-one axis the named array does not carry)."""


def _with_units(array: Any, axes: AxisNames) -> Any:
    """Puts the size-one axes a named value drops back at their positions."""
    units = [i for i, name in enumerate(axes) if name is None]
    if not units or jnp.ndim(array) == len(axes):
        return array
    return jnp.expand_dims(array, units)


def _without_units(array: jax.Array, axes: AxisNames) -> jax.Array:
    units = tuple(i for i, name in enumerate(axes) if name is None)
    return jnp.squeeze(array, units) if units else array


@pytree_dataclass
class ApplyPositional(Layer):
    """Applies one position-based JAX primitive to named operands (see the module docstring).

    Attributes:
      primitive: The primitive (``jax.lax.conv_general_dilated_p``, ``cumsum_p`` ...) (static).
      params: Its parameters as ``((name, value), ...)`` (static).
      operand_order: Where each operand comes from: ``("input", i)`` is the
        ``i``-th element of the (tuple) input, ``("constant", j)`` is
        ``constants[j]`` (static).
      constants: Plain arrays (used as they are) or named arrays and
        ``ParameterUse`` s (a raw weight stays a selectable ``Parameter``).
      operand_axes: Per operand, the named axis at each position (static);
        ``()`` for a plain constant.
      output_axes: Per result, the name to give each position (static).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import pzbridge as pzb
        >>> take = ApplyPositional(jax.lax.dynamic_slice_p, (("slice_sizes", (2,)),),
        ...                        (("input", 0), ("constant", 0)), (jnp.int32(1),), (("seq",), ()), (("seq",),))
        >>> take(pzb.nx.wrap(jnp.arange(4.0), "seq")).unwrap("seq").tolist()
        [1.0, 2.0]
    """

    primitive: Any = static_field()
    params: tuple[tuple[str, Any], ...] = static_field()
    operand_order: tuple[tuple[str, int], ...] = static_field()
    constants: tuple[Any, ...] = ()
    operand_axes: tuple[AxisNames, ...] = static_field(default=())
    output_axes: tuple[AxisNames, ...] = static_field(default=())

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        inputs = x if isinstance(x, tuple) else (x,)
        operands = []
        for (source, index), axes in zip(self.operand_order, self.operand_axes):
            value = inputs[index] if source == "input" else constant_value(self.constants[index])
            if nx.is_namedarray(value):
                value = value.untag(*(name for name in axes if name is not None))
            operands.append(value)
        results = nx.nmap(self._positional)(*operands)
        named = tuple(result.tag(*(name for name in axes if name is not None))
                      for result, axes in zip(results, self.output_axes))
        return named if len(named) > 1 else named[0]

    def _positional(self, *arrays: Any) -> tuple[jax.Array, ...]:
        arrays = tuple(_with_units(a, axes) if axes else a for a, axes in zip(arrays, self.operand_axes))
        out = self.primitive.bind(*arrays, **dict(self.params))
        outs: Sequence[jax.Array] = out if self.primitive.multiple_results else (out,)
        return tuple(_without_units(o, axes) for o, axes in zip(outs, self.output_axes))
