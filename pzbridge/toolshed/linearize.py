"""Linearise a layer around a point: its first-order Taylor expansion, adjusted to agree at the point.

Asking "how much of this block's effect is linear?" means replacing the block
by ``f(x0) + J_f(x0) (x - x0)`` at a point ``x0`` captured on a real run (the
idea of Penzai's LinearizeAndAdjust). :class:`Linearized` stores the layer and
the point as data and evaluates the expansion with ``jax.jvp`` at call time,
so the constant term is the layer's own output at the point: at ``x0`` the
linearised layer returns what the layer returns, and its Jacobian equals the
layer's there. Only core and nn are imported (docs/architecture.md, "Layers
of the package").

Example:
    >>> import jax.numpy as jnp, pzbridge as pzb
    >>> layer = Linearized(pzb.nn.Elementwise(jnp.square), pzb.nx.wrap(jnp.array([3.0]), "f"))
    >>> layer(pzb.nx.wrap(jnp.array([4.0]), "f")).unwrap("f").tolist()   # 9 + 6 * (4 - 3)
    [15.0]
"""

from __future__ import annotations

from typing import Any

import jax

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import PzbridgeError, SelectionError, format_path
from pzbridge.core.selectors import KeyPath
from pzbridge.core.struct import pytree_dataclass
from pzbridge.core.variables import unbind_state_vars
from pzbridge.nn.layer import Layer
from pzbridge.toolshed.intermediates import LayerSelector, capture_intermediates, resolve_selection

__all__ = ["Linearized", "linearize"]


@pytree_dataclass
class Linearized(Layer):
    """``layer(point) + J_layer(point) (x - point)``, evaluated with ``jax.jvp`` (side inputs held fixed).

    The point broadcasts by name to the input (a point averaged over
    ``batch`` serves every example).

    Attributes:
      layer: The layer expanded (it must hold no state variables: the expansion is pure).
      point: The expansion point (a ``NamedArray`` or pytree of them, a subset of the input's axes).

    Example:
        >>> import jax.numpy as jnp, pzbridge as pzb
        >>> lin = Linearized(pzb.nn.Elementwise(jnp.exp), pzb.nx.wrap(jnp.zeros(1), "f"))
        >>> lin(pzb.nx.wrap(jnp.array([0.5]), "f")).unwrap("f").tolist()
        [1.5]
    """

    layer: Layer
    point: Any

    def __post_init__(self) -> None:
        if unbind_state_vars(self.layer)[1]:
            raise PzbridgeError(
                f"Linearized: the layer {type(self.layer).__name__} holds state variables, expected none (a "
                "linear expansion cannot update state). Fix: pass pzb.freeze_state_vars(layer) instead."
            )

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        def broadcast(p: Any, a: Any) -> Any:
            return p.broadcast_like(a) if nx.is_namedarray(p) else p

        point = jax.tree_util.tree_map(broadcast, self.point, x, is_leaf=nx.is_namedarray)
        # The tangent must have the point's exact layout: jax.jvp compares pytree structures, and a named array's
        # structure records its axis order (a point averaged over "batch" and broadcast back puts "batch" last).
        tangent = jax.tree_util.tree_map(lambda a, p: (a - p).order_like(p) if nx.is_namedarray(p) else a - p, x,
                                         point, is_leaf=nx.is_namedarray)
        value, change = jax.jvp(lambda p: self.layer(p, **side_inputs), (point,), (tangent,))
        return jax.tree_util.tree_map(lambda v, c: v + c, value, change, is_leaf=nx.is_namedarray)


def linearize(model: Any, at: LayerSelector, x: Any, /, *, average_over: tuple[str, ...] = (),
              **side_inputs: Any) -> Any:
    """Returns a copy of ``model`` with each selected layer replaced by its expansion at the input it got on ``x``.

    Args:
      model: The model (not modified).
      at: Which layers (a ``Where``, selection, class or predicate); ``side``/``index`` are not used.
      x: The input whose run gives the expansion points.
      average_over: Named axes the captured point is averaged over (e.g. ``("batch",)``).
      **side_inputs: Forwarded to the capturing run.

    Returns:
      The edited model; run on ``x`` it gives ``model(x)`` (up to rounding).

    Raises:
      SelectionError: If ``at`` selects nothing or selects a non-layer.

    Example:
        >>> import jax.numpy as jnp, pzbridge as pzb
        >>> model = pzb.nn.Sequential([pzb.nn.Elementwise(jnp.square)])
        >>> lin = linearize(model, pzb.nn.Elementwise, pzb.nx.wrap(jnp.array([2.0]), "f"))
        >>> lin(pzb.nx.wrap(jnp.array([3.0]), "f")).unwrap("f").tolist()
        [8.0]
    """
    selected = resolve_selection(model, at)
    for path, node in selected.get_by_path().items():
        if not isinstance(node, Layer):
            raise SelectionError(
                f"linearize: {format_path(path)} is {type(node).__name__}, expected a pzbridge layer. Fix: select layers."
            )
    _, points = capture_intermediates(model, selected, x, where="before", **side_inputs)

    def point_of(path: KeyPath) -> Any:
        point = points[format_path(path)]
        if average_over:
            point = jax.tree_util.tree_map(lambda p: p.mean(*average_over), point, is_leaf=nx.is_namedarray)
        return point

    return selected.apply(lambda path, node: Linearized(node, point_of(path)), with_keypath=True)
