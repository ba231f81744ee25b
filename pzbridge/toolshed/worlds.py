"""Activation patching between runs stacked on a named ``worlds`` axis, in one forward pass.

Patching usually takes two runs: capture on the source, then run the target
with the capture patched in. With named axes the runs can be one: stack the
inputs of every run (clean, corrupted, N sources) on a new ``worlds`` axis,
which every pzbridge layer passes through like a batch, and at the patch
site let each world read the activation of another world. This is the idea
behind Penzai's worlds axis; here it is a single layer,
:class:`RouteWorlds`, placed with the same location language as every other
intervention (a :class:`~pzbridge.toolshed.where.Where`, whose index limits
the patch to some units).

``routes[w]`` names the world whose activation world ``w`` reads at the
site: ``(0, 0)`` with worlds ``[clean, corrupt]`` patches the clean
activation into the corrupted run and leaves the clean run alone; the
identity ``(0, 1, ...)`` changes nothing. One pass under ``jax.jit`` gives,
for every world, what a separate patched run would give (the law tested in
``tests/toolshed/test_worlds.py``). Only core and nn are imported
(docs/architecture.md, "Layers of the package").

Example:
    >>> import jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> model = pzb.nn.Sequential([pzb.nn.Elementwise(jnp.square), pzb.nn.Elementwise(jnp.negative)])
    >>> worlds = stack_worlds([pzb.nx.wrap(jnp.array([3.0]), "f"), pzb.nx.wrap(jnp.array([5.0]), "f")])
    >>> patched = patch_worlds(model, Where(path="sublayers[0]"), routes=(0, 0))
    >>> patched(worlds).unwrap("worlds", "f").tolist()
    [[-9.0], [-9.0]]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError, PzbridgeError
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.layer import Layer
from pzbridge.toolshed.intermediates import LayerSelector, insert_layers, side_of
from pzbridge.toolshed.interventions import AtIndex
from pzbridge.toolshed.where import Where

__all__ = ["WORLDS", "RouteWorlds", "patch_worlds", "stack_worlds", "unstack_worlds"]

WORLDS = "worlds"
"""The default name of the axis that stacks runs."""


def stack_worlds(inputs: Sequence[Any], axis: str = WORLDS) -> Any:
    """Stacks the inputs of several runs on a new named ``axis`` (leaf by leaf for pytrees of named arrays).

    Raises:
      PzbridgeError: For fewer than one input or a leaf that is not a named array.

    Example:
        >>> import jax.numpy as jnp, pzbridge as pzb
        >>> sorted(stack_worlds([pzb.nx.zeros({"seq": 3})] * 2).named_shape.items())
        [('seq', 3), ('worlds', 2)]
    """
    if not inputs:
        raise PzbridgeError("stack_worlds: expected at least one input, found none. Fix: pass [clean, corrupt, ...].")

    def stack(*leaves: Any) -> Any:
        if not all(nx.is_namedarray(leaf) for leaf in leaves):
            raise PzbridgeError(
                f"stack_worlds: every input leaf must be a NamedArray, found "
                f"{[type(leaf).__name__ for leaf in leaves]}. Fix: wrap inputs, e.g. pzb.nx.wrap(x, 'batch', 'seq')."
            )
        return nx.stack(list(leaves), axis)

    return jax.tree_util.tree_map(stack, *inputs, is_leaf=nx.is_namedarray)


def unstack_worlds(output: Any, axis: str = WORLDS) -> list[Any]:
    """Splits a worlds-stacked output back into one output per world.

    Example:
        >>> import jax.numpy as jnp, pzbridge as pzb
        >>> [w.unwrap("f").tolist() for w in unstack_worlds(pzb.nx.wrap(jnp.eye(2), "worlds", "f"))]
        [[1.0, 0.0], [0.0, 1.0]]
    """
    leaves, treedef = jax.tree_util.tree_flatten(output, is_leaf=nx.is_namedarray)
    per_leaf = [nx.unstack(leaf, axis) for leaf in leaves]
    return [jax.tree_util.tree_unflatten(treedef, list(world)) for world in zip(*per_leaf)]


@pytree_dataclass
class RouteWorlds(Layer):
    """World ``w`` of the output is world ``routes[w]`` of the input.

    Attributes:
      routes: One source world per world (static); ``tuple(range(n))`` is the identity.
      axis: The worlds axis (static).

    Example:
        >>> import jax.numpy as jnp, pzbridge as pzb
        >>> RouteWorlds((1, 1))(pzb.nx.wrap(jnp.array([4.0, 7.0]), "worlds")).unwrap("worlds").tolist()
        [7.0, 7.0]
    """

    routes: tuple[int, ...] = static_field()
    axis: str = static_field(default=WORLDS)

    def __post_init__(self) -> None:
        routes = tuple(self.routes)
        if not routes or not all(isinstance(r, int) and not isinstance(r, bool) and 0 <= r < len(routes)
                                 for r in routes):
            raise PzbridgeError(
                f"RouteWorlds: routes must name, for each of the {len(routes)} worlds, a world in "
                f"[0, {len(routes)}), found {routes}. Fix: e.g. routes=(0, 0) patches world 0 into world 1."
            )
        object.__setattr__(self, "routes", routes)

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        source = nx.wrap(jnp.asarray(self.routes, dtype=jnp.int32), self.axis)

        def route(leaf: Any) -> Any:
            if not nx.is_namedarray(leaf) or leaf.named_shape.get(self.axis) != len(self.routes):
                raise NamedAxisError(
                    f"RouteWorlds: expected an activation with the axis {self.axis!r} of size {len(self.routes)}, "
                    f"found named shape {dict(getattr(leaf, 'named_shape', {}))}. Fix: run the model on "
                    f"stack_worlds([...]) of {len(self.routes)} inputs, or give one route per world."
                )
            return leaf[{self.axis: source}]

        return jax.tree_util.tree_map(route, x, is_leaf=nx.is_namedarray)

    def reads_across(self) -> tuple[str, ...]:
        """The worlds axis: the layer mixes its entries (an adapter runs it on all of them at once)."""
        return (self.axis,)


def patch_worlds(
    model: Any, at: LayerSelector, routes: Sequence[int], *, where: str | None = None, axis: str = WORLDS
) -> Any:
    """Returns a copy of ``model`` in which, at ``at``, world ``w`` reads world ``routes[w]``'s activation.

    Run the result on :func:`stack_worlds` of one input per world; every
    world's output equals a separate run of ``model`` on that world's input
    with the activation at ``at`` patched in from world ``routes[w]``'s run.

    Args:
      model: The model (not modified).
      at: Where (a ``Where``, whose index limits the patch to those units; a
        selection, class or predicate).
      routes: One source world per world.
      where: ``"after"`` / ``"before"`` (default: the ``Where``'s side, else after).
      axis: The worlds axis name.

    Returns:
      The edited model.

    Raises:
      PzbridgeError: If ``routes`` is not one valid world per world.
      SelectionError: If ``at`` selects nothing.

    Example:
        >>> import jax.numpy as jnp, pzbridge as pzb
        >>> model = pzb.nn.Sequential([pzb.nn.Identity()])
        >>> x = stack_worlds([pzb.nx.wrap(jnp.array([1.0, 2.0]), "seq"), pzb.nx.wrap(jnp.array([3.0, 4.0]), "seq")])
        >>> patch_worlds(model, Where(layer="Identity", index={"seq": 0}), (1, 1))(x).unwrap("worlds", "seq").tolist()
        [[3.0, 2.0], [3.0, 4.0]]
    """
    layer: Layer = RouteWorlds(tuple(routes), axis)
    if isinstance(at, Where) and at.index:
        layer = AtIndex(layer, at)
    return insert_layers(model, at, lambda path, node: layer, where=side_of(at, where))
