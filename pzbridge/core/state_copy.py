"""``fresh_state``: give an edited copy its own state variables.

A selector edit returns a new tree, but the variables in it are the source's
objects: a ``StateVariable`` (a KV cache, batch statistics, a counter) reached
from both the source and the edited copy would advance in both when either
runs. So edits replace every state variable that the result shares with its
source by a fresh copy (same label, value and metadata; one copy per object,
so state tied inside the result stays tied) unless the caller passes
``share_state=True``. Parameters stay shared: an edited copy is not a second
set of weights (training a copy and its source together is what tied
parameters are for). See docs/architecture.md ("How state and sharing are
kept").

Example:
    >>> import jax.numpy as jnp
    >>> from pzbridge.core.variables_kinds import Parameter, StateVariable
    >>> w, n = Parameter(jnp.ones(2), "w"), StateVariable(0, "n")
    >>> copy = fresh_state([w, n, n])
    >>> copy[0] is w, copy[1] is n, copy[1] is copy[2], copy[1].value
    (True, False, True, 0)
"""

from __future__ import annotations

from typing import Any

import jax

from pzbridge.core.variables_kinds import StateVariable

__all__ = ["fresh_state", "shared_state"]


def _state_ids(tree: Any) -> set[int]:
    return {id(leaf) for leaf in jax.tree_util.tree_leaves(tree) if isinstance(leaf, StateVariable)}


def fresh_state(tree: Any, *, source: Any = None) -> Any:
    """Replaces the state variables of ``tree`` by fresh copies (those also in ``source`` when given).

    Args:
      tree: Any pytree (a model, a list of models, a selection).
      source: If given, only state variables that ``source`` holds too are
        copied; variables new to ``tree`` are kept as they are.

    Returns:
      ``tree`` with copies in place of the (shared) state variables, or
      ``tree`` itself when there is nothing to copy.

    Example:
        >>> from pzbridge.core.variables_kinds import StateVariable
        >>> old, new = StateVariable(1, "a"), StateVariable(2, "b")
        >>> out = fresh_state([old, new], source=[old])
        >>> out[0] is old, out[1] is new
        (False, True)
    """
    wanted = None if source is None else _state_ids(source)
    if wanted is not None and not wanted:
        return tree
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    copies: dict[int, StateVariable] = {}
    changed = False
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, StateVariable) and (wanted is None or id(leaf) in wanted):
            copy = copies.get(id(leaf))
            if copy is None:
                copy = copies[id(leaf)] = type(leaf)(leaf.value, leaf.label, dict(leaf.metadata))
            leaves[i] = copy
            changed = True
    return treedef.unflatten(leaves) if changed else tree


def shared_state(a: Any, b: Any) -> list[str]:
    """Labels of the state variables that ``a`` and ``b`` hold as the very same objects.

    Example:
        >>> from pzbridge.core.variables_kinds import StateVariable
        >>> n = StateVariable(0, "n")
        >>> shared_state([n], [n]), shared_state([n], fresh_state([n]))
        (['n'], [])
    """
    ids = _state_ids(b)
    seen: dict[int, str] = {}
    for leaf in jax.tree_util.tree_leaves(a):
        if isinstance(leaf, StateVariable) and id(leaf) in ids:
            seen.setdefault(id(leaf), leaf.label)
    return list(seen.values())
