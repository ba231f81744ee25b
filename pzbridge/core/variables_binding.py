"""Unbinding variables into slots, binding them back, and freezing them.

``unbind_variables`` and ``bind_variables`` are the single mechanism every
pure transformation rides on: pull the mutable variables out of a model
(leaving labelled slots), pass their frozen values through ``jax.jit`` /
``jax.grad``, and bind fresh variables back inside. Sharing is by identity:
the same variable object reached from two places becomes two slots with one
label, and binding puts one object back in both places. Two *different*
objects with one label would silently merge, so that is an error.

Labels are unique across kinds: a ``Parameter`` and a ``StateVariable``
may not share a label, which lets ``bind_variables`` report a kind mismatch
instead of a missing variable. See docs/architecture.md ("The lift / lower
contract").

Example:
    >>> import jax.numpy as jnp
    >>> from pzbridge.core.variables_kinds import Parameter
    >>> w = Parameter(jnp.ones(2), label="w")
    >>> slots, (v,) = unbind_variables({"a": w, "b": w})
    >>> slots
    {'a': ParameterSlot(label='w'), 'b': ParameterSlot(label='w')}
    >>> again = bind_variables(slots, [v])
    >>> again["a"] is again["b"] is w
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal, overload

import jax

from pzbridge.core.errors import VariableConflictError, VariableError, format_path
from pzbridge.core.variables_kinds import (
    AbstractVariableSlot,
    AbstractVariableValue,
    LabeledVariable,
    Parameter,
    StateVariable,
    describe_at,
)

Predicate = Callable[[LabeledVariable], bool]
AnyVariable = LabeledVariable | AbstractVariableValue


def _is_slot(node: Any) -> bool:
    return isinstance(node, AbstractVariableSlot)


def _paths(tree: Any) -> list[tuple]:
    """Keypaths of the leaves (slots as leaves), computed only for errors."""
    return [path for path, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_slot)[0]]


def _first_index(leaves: list[Any], target: Any) -> int:
    return next(i for i, leaf in enumerate(leaves) if leaf is target)


@overload
def unbind_variables(
    tree: Any, predicate: Predicate | None = None, *, freeze: Literal[False] = False
) -> tuple[Any, tuple[LabeledVariable, ...]]: ...


@overload
def unbind_variables(
    tree: Any, predicate: Predicate | None = None, *, freeze: Literal[True]
) -> tuple[Any, tuple[AbstractVariableValue, ...]]: ...


def unbind_variables(
    tree: Any, predicate: Predicate | None = None, *, freeze: bool = False
) -> tuple[Any, tuple[AnyVariable, ...]]:
    """Replaces the variables in ``tree`` by slots and returns them.

    Each distinct variable object is returned once, in order of first
    occurrence (flattening order). A variable reached from several places
    leaves a slot with the same label in each of them.

    Args:
      tree: Any pytree; variables are its leaves.
      predicate: Unbind only the variables for which this returns ``True``
        (default: all).
      freeze: Return frozen values (``.freeze()``) instead of the variables
        (keyword-only).

    Returns:
      ``(tree_with_slots, variables)``.

    Raises:
      VariableError: If ``predicate`` is not callable (e.g. ``True`` meant
        as ``freeze``).
      VariableConflictError: If two different variable objects have the same
        label, or a variable has the label of a slot already in the tree
        (both paths are named).

    Example:
        >>> from pzbridge.core.variables_kinds import Parameter, StateVariable
        >>> tree = [Parameter(1.0, "w"), StateVariable(0, "n")]
        >>> slots, values = unbind_variables(tree, freeze=True)
        >>> slots[1], values[1]
        (StateVariableSlot(label='n'), StateVariableValue(value=0, label='n', metadata=FrozenMetadata({})))
    """
    _check_predicate("unbind_variables", predicate)
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=_is_slot)
    found: dict[str, LabeledVariable] = {}
    slot_for: dict[str, AbstractVariableSlot] = {}
    existing_slots: dict[str, AbstractVariableSlot] = {}
    new_leaves = []
    for leaf in leaves:
        if isinstance(leaf, LabeledVariable) and (predicate is None or predicate(leaf)):
            label = leaf.label
            first = found.get(label)
            if first is None:
                found[label] = leaf
                slot_for[label] = leaf.slot()
            elif first is not leaf:
                _raise_conflict(tree, leaves, first, leaf)
            new_leaves.append(slot_for[label])
        else:
            if _is_slot(leaf):
                existing_slots.setdefault(leaf.label, leaf)
            new_leaves.append(leaf)
    for label, slot in existing_slots.items():
        if label in found:
            paths = _paths(tree)
            var = found[label]
            raise VariableConflictError(
                f"{describe_at(var, paths[_first_index(leaves, var)])} has the label of "
                f"{describe_at(slot, paths[_first_index(leaves, slot)])}, which is already in the tree; "
                "binding would silently merge them. Fix: give the variable a new label, or bind the "
                "existing slot first with `bind_variables(...)`."
            )
    variables = tuple(found.values())
    if freeze:
        variables = tuple(var.freeze() for var in variables)
    return treedef.unflatten(new_leaves), variables


def _raise_conflict(tree: Any, leaves: list[Any], first: LabeledVariable, second: LabeledVariable) -> None:
    paths = _paths(tree)
    raise VariableConflictError(
        f"Two different variables share the label '{first.label}': "
        f"{type(first).__name__} at {format_path(paths[_first_index(leaves, first)])} and "
        f"{type(second).__name__} at {format_path(paths[_first_index(leaves, second)])}. "
        "Labels identify variables when binding, so they must be unique. Fix: relabel one of them "
        "(make a new variable with `type(v)(v.value, label=..., metadata=v.metadata)`), or put the "
        "same object in both places if they are meant to be shared."
    )


def _check_predicate(name: str, predicate: Any) -> None:
    """A bool where the predicate goes is ``freeze`` passed positionally: say so instead of failing later."""
    if predicate is not None and not callable(predicate):
        raise VariableError(
            f"{name}: the second argument is a predicate (a function from a variable to bool), found "
            f"{type(predicate).__name__} {predicate!r:.40}; pass freeze= as a keyword (`freeze` is keyword-only). "
            f"Fix: call {name}(tree, freeze=True), or {name}(tree, lambda v: ..., freeze=True)."
        )


def _both(kind: type, predicate: Predicate | None) -> Predicate:
    if predicate is None:
        return lambda v: isinstance(v, kind)
    return lambda v: isinstance(v, kind) and predicate(v)


def unbind_params(
    tree: Any, predicate: Callable[[Parameter], bool] | None = None, *, freeze: bool = False
) -> tuple[Any, tuple[AnyVariable, ...]]:
    """Unbinds the :class:`Parameter` variables (those ``predicate`` accepts; see :func:`unbind_variables`).

    ``freeze`` is keyword-only: a bool passed as the second positional
    argument raises instead of being taken as a predicate.

    Args:
      tree: Any pytree.
      predicate: Unbind only the parameters for which this returns ``True``.
      freeze: Return frozen values instead of the parameters.

    Raises:
      VariableError: If ``predicate`` is not callable.

    Example:
        >>> from pzbridge.core.variables_kinds import Parameter, StateVariable
        >>> tree = [Parameter(1.0, "w"), Parameter(2.0, "b"), StateVariable(0, "n")]
        >>> slots, params = unbind_params(tree)
        >>> [p.label for p in params], type(slots[2]).__name__
        (['w', 'b'], 'StateVariable')
        >>> [p.label for p in unbind_params(tree, lambda p: p.label == "b", freeze=True)[1]]
        ['b']
    """
    _check_predicate("unbind_params", predicate)
    return unbind_variables(tree, _both(Parameter, predicate), freeze=freeze)


def unbind_state_vars(
    tree: Any, predicate: Callable[[StateVariable], bool] | None = None, *, freeze: bool = False
) -> tuple[Any, tuple[AnyVariable, ...]]:
    """Unbinds the :class:`StateVariable` variables (those ``predicate`` accepts; see :func:`unbind_variables`).

    ``freeze`` is keyword-only, as for :func:`unbind_params`.

    Raises:
      VariableError: If ``predicate`` is not callable.

    Example:
        >>> from pzbridge.core.variables_kinds import Parameter, StateVariable
        >>> slots, state = unbind_state_vars([Parameter(1.0, "w"), StateVariable(0, "n")])
        >>> [s.label for s in state], slots[1]
        (['n'], StateVariableSlot(label='n'))
    """
    _check_predicate("unbind_state_vars", predicate)
    return unbind_variables(tree, _both(StateVariable, predicate), freeze=freeze)


def _kind_class(entry: AnyVariable) -> type[LabeledVariable]:
    return type(entry) if isinstance(entry, LabeledVariable) else entry.variable_class


def bind_variables(
    tree: Any,
    variables: Iterable[AnyVariable],
    allow_unused: bool = False,
    unfreeze_as_copy: bool = False,
    *,
    allow_missing: bool = False,
) -> Any:
    """Fills the slots in ``tree`` with the variables or values of the same label.

    Mutable variables are inserted as they are (the very same objects). Frozen
    values are inserted as they are (read-only) unless ``unfreeze_as_copy``,
    which makes one fresh mutable variable per label, shared by all of that
    label's slots.

    Args:
      tree: A pytree containing slots.
      variables: Mutable variables and/or frozen values, each label at most once.
      allow_unused: Accept variables that match no slot (they are ignored).
      unfreeze_as_copy: Bind frozen values as new mutable copies.
      allow_missing: Leave slots with no matching variable in place instead
        of raising (for binding one kind at a time).

    Returns:
      A copy of ``tree`` with the slots replaced.

    Raises:
      VariableConflictError: If two entries of ``variables`` have one label.
      VariableError: If a slot has no matching variable (path, label and the
        available labels are named), a variable matches no slot, a slot is
        given a variable of the other kind, or an entry is not a variable.

    Example:
        >>> from pzbridge.core.variables_kinds import ParameterSlot, ParameterValue
        >>> bound = bind_variables([ParameterSlot("w"), ParameterSlot("w")],
        ...                        [ParameterValue(1.0, "w")], unfreeze_as_copy=True)
        >>> bound[0] is bound[1], type(bound[0]).__name__
        (True, 'Parameter')
    """
    by_label: dict[str, AnyVariable] = {}
    for entry in variables:
        if not isinstance(entry, (LabeledVariable, AbstractVariableValue)):
            raise VariableError(
                f"bind_variables expects Parameter/StateVariable objects or their frozen values, "
                f"found {type(entry).__name__}: {entry!r}. Fix: pass the tuple returned by "
                "`unbind_variables(...)`."
            )
        if entry.label in by_label:
            raise VariableConflictError(
                f"bind_variables was given two entries labelled '{entry.label}' "
                f"({type(by_label[entry.label]).__name__} and {type(entry).__name__}); each label "
                "fills its slots once. Fix: pass each variable once."
            )
        by_label[entry.label] = entry
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=_is_slot)
    bound: dict[str, AnyVariable] = {}
    for i, leaf in enumerate(leaves):
        if not _is_slot(leaf):
            continue
        label = leaf.label
        chosen = bound.get(label)
        if chosen is None:
            entry = by_label.get(label)
            if entry is None:
                if allow_missing:
                    continue
                raise VariableError(
                    f"{describe_at(leaf, _paths(tree)[i])} has no variable to bind. "
                    f"Available labels: {sorted(by_label) or 'none'}. Fix: pass a variable or value "
                    f"labelled '{label}' (or use allow_missing=True to leave it unbound)."
                )
            if not issubclass(_kind_class(entry), leaf.variable_class):
                raise VariableError(
                    f"{describe_at(leaf, _paths(tree)[i])} expects a {leaf.variable_class.__name__}, "
                    f"but was given a {type(entry).__name__}. Fix: pass a "
                    f"{leaf.variable_class.__name__} (or its frozen value) for '{label}'."
                )
            if unfreeze_as_copy and isinstance(entry, AbstractVariableValue):
                entry = entry.unfreeze_as_copy()
            bound[label] = chosen = entry
        leaves[i] = chosen
    if not allow_unused and len(bound) < len(by_label):
        unused = [label for label in by_label if label not in bound]
        raise VariableError(
            f"bind_variables: no slot in the tree matches the variables labelled {unused}. "
            "Fix: pass only the variables of this tree, or use allow_unused=True."
        )
    return treedef.unflatten(leaves)


def freeze_variables(tree: Any, predicate: Predicate | None = None) -> Any:
    """Replaces each variable by its frozen value (shared objects -> equal values).

    Args:
      tree: Any pytree.
      predicate: Freeze only the variables for which this returns ``True``.

    Returns:
      A copy of ``tree`` where variables are frozen values.

    Example:
        >>> from pzbridge.core.variables_kinds import Parameter
        >>> w = Parameter(1.0, "w")
        >>> frozen = freeze_variables([w, w])
        >>> frozen[0] == frozen[1], type(frozen[0]).__name__
        (True, 'ParameterValue')
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    memo: dict[int, AbstractVariableValue] = {}
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, LabeledVariable) and (predicate is None or predicate(leaf)):
            frozen = memo.get(id(leaf))
            if frozen is None:
                frozen = memo[id(leaf)] = leaf.freeze()
            leaves[i] = frozen
    return treedef.unflatten(leaves)


def freeze_params(tree: Any, predicate: Callable[[Parameter], bool] | None = None) -> Any:
    """Freezes the :class:`Parameter` variables (those ``predicate`` accepts; see :func:`freeze_variables`).

    Example:
        >>> from pzbridge.core.variables_kinds import Parameter, StateVariable
        >>> tree = [Parameter(1.0, "w"), Parameter(2.0, "b"), StateVariable(0, "n")]
        >>> [type(x).__name__ for x in freeze_params(tree)]
        ['ParameterValue', 'ParameterValue', 'StateVariable']
        >>> [type(x).__name__ for x in freeze_params(tree, lambda p: p.label == "w")]
        ['ParameterValue', 'Parameter', 'StateVariable']
    """
    _check_predicate("freeze_params", predicate)
    return freeze_variables(tree, _both(Parameter, predicate))


def freeze_state_vars(tree: Any, predicate: Callable[[StateVariable], bool] | None = None) -> Any:
    """Freezes the :class:`StateVariable` variables (those ``predicate`` accepts; see :func:`freeze_variables`).

    Example:
        >>> from pzbridge.core.variables_kinds import Parameter, StateVariable
        >>> [type(x).__name__ for x in freeze_state_vars([Parameter(1.0, "w"), StateVariable(0, "n")])]
        ['Parameter', 'StateVariableValue']
    """
    _check_predicate("freeze_state_vars", predicate)
    return freeze_variables(tree, _both(StateVariable, predicate))
