"""``NamedGroup`` and ``inline_anonymous_sequentials``: naming and flattening groups of layers.

A lifted or hand-built model often nests plain :class:`~pzbridge.nn.Sequential`
lists inside one another (a builder returns a ``Sequential`` that the caller
puts into another). The nesting carries no meaning, but it lengthens keypaths
and hides siblings from ``insert_after``. :func:`inline_anonymous_sequentials`
splices every *plain* ``Sequential`` (not a subclass: a subclass is a named
group, e.g. ``Affine``) into the group that holds it. :class:`NamedGroup` is
a group whose name is data (shown in renderings, matched by selectors), for
when a subclass per group would be overkill, as Penzai's ``NamedGroup``.

Example:
    >>> import pzbridge as pzb
    >>> inner = pzb.nn.Sequential([pzb.nn.Identity(), pzb.nn.Identity()])
    >>> flat = inline_anonymous_sequentials(NamedGroup("mlp", [inner, pzb.nn.Identity()]))
    >>> flat.name, len(flat.sublayers)
    ('mlp', 3)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.combinators import Sequential
from pzbridge.nn.layer import Layer


@pytree_dataclass
class NamedGroup(Layer):
    """Runs ``sublayers`` in order, like ``Sequential``, under a name kept as static data.

    Attributes:
      name: The group's name (static), e.g. ``"block_3.mlp"``.
      sublayers: The layers, a list.

    Example:
        >>> g = NamedGroup("double", [pzb.nn.ConstantRescale(2.0)])
        >>> g(pzb.nx.wrap(jnp.ones(2), "f")).unwrap("f").tolist()
        [2.0, 2.0]
        >>> pzb.select([g]).at_subtrees_where(lambda x: isinstance(x, NamedGroup) and x.name == "double").count()
        1
    """

    name: str = static_field()
    sublayers: list[Layer]

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        for layer in self.sublayers:
            x = layer(x, **side_inputs)
        return x


_GROUPS = (Sequential, NamedGroup)


def _is_plain_sequential(node: Any) -> bool:
    # Only the exact class: a Sequential subclass (Affine, a TransformerBlock) means something.
    return type(node) is Sequential


def _inline_tree(tree: Any, parent: Callable[[Any], bool], child: Callable[[Any], bool]) -> Any:
    def inline(node: Any) -> Any:
        sublayers: list[Any] = []
        for layer in (_inline_tree(layer, parent, child) for layer in node.sublayers):
            if isinstance(layer, _GROUPS) and child(layer):
                sublayers.extend(layer.sublayers)
            else:
                sublayers.append(layer)
        return node.replace(sublayers=sublayers)

    def is_group(x: Any) -> bool:
        return isinstance(x, _GROUPS) and parent(x)

    return jax.tree_util.tree_map(lambda x: inline(x) if is_group(x) else x, tree, is_leaf=is_group)


def inline_groups(tree: Any, parent_filter: Callable[[Any], bool], child_filter: Callable[[Any], bool]) -> Any:
    """Splices each group accepted by ``child_filter`` into the group accepted by ``parent_filter`` that holds it.

    Groups are ``Sequential`` (and subclasses) and :class:`NamedGroup`;
    inner groups are processed first, so chains collapse in one call.

    Args:
      tree: A model or any pytree containing layers.
      parent_filter: Which groups may absorb their children.
      child_filter: Which child groups are absorbed.

    Returns:
      The tree with the accepted groups inlined.

    Example:
        >>> model = NamedGroup("a", [NamedGroup("b", [pzb.nn.Identity()]), pzb.nn.Identity()])
        >>> len(inline_groups(model, lambda g: True, lambda g: isinstance(g, NamedGroup)).sublayers)
        2
    """
    return _inline_tree(tree, parent_filter, child_filter)


def inline_anonymous_sequentials(tree: Any) -> Any:
    """Splices every plain ``Sequential`` that sits in a ``Sequential`` or ``NamedGroup`` into its parent.

    Works at any depth (inner groups first) and anywhere in ``tree``; the
    order of layers is kept, so the model computes the same function.
    ``Sequential`` subclasses and ``NamedGroup`` are kept as they are (only
    their contents are inlined). A plain ``Sequential`` at the root stays.

    Args:
      tree: A model or any pytree containing layers.

    Returns:
      The tree with anonymous nesting removed.

    Example:
        >>> s = pzb.nn.Sequential
        >>> model = s([s([s([pzb.nn.Identity()]), pzb.nn.Identity()]), pzb.nn.Affine([])])
        >>> [type(layer).__name__ for layer in inline_anonymous_sequentials(model).sublayers]
        ['Identity', 'Identity', 'Affine']
    """
    return _inline_tree(tree, lambda group: True, _is_plain_sequential)
