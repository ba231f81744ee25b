"""Calling a stateful model as a pure function of its variable values.

``stateless_call`` is the bridge from the mutable-variable world to
``jax.jit`` / ``jax.grad`` / optax: it takes frozen values in and returns
the output plus the new state values, and never touches the caller's
objects. Inside, it binds *fresh* mutable copies, so the model code can keep
writing ``self.count.value += 1`` as usual.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from pzbridge.core.struct import Struct, pytree_dataclass
    >>> from pzbridge.core.variables_kinds import Parameter
    >>> from pzbridge.core.variables_binding import unbind_variables
    >>> @pytree_dataclass
    ... class Scale(Struct):
    ...     w: Any
    ...     def __call__(self, x): return self.w.value * x
    >>> slots, values = unbind_variables(Scale(Parameter(jnp.float32(3.0), "w")), freeze=True)
    >>> jax.grad(lambda vs: stateless_call(slots, vs, 2.0)[0])(values)[0].value
    Array(2., dtype=float32)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import jax

from pzbridge.core.errors import VariableError, format_path
from pzbridge.core.variables_binding import bind_variables, unbind_variables
from pzbridge.core.variables_kinds import AbstractVariableValue, LabeledVariable, StateVariable, StateVariableValue


@runtime_checkable
class StatelessCallable(Protocol):
    """A model called as a pure function of its variable values.

    ``functools.partial(stateless_call, model)`` satisfies it.

    Example:
        >>> import functools
        >>> isinstance(functools.partial(stateless_call, lambda x: x), StatelessCallable)
        True
    """

    def __call__(
        self, frozen_values: Sequence[AbstractVariableValue], /, *args: Any, **kwargs: Any
    ) -> tuple[Any, tuple[StateVariableValue, ...]]:
        """Returns ``(output, new_state_values)``."""
        ...


def stateless_call(
    model: Any, frozen_values: Sequence[AbstractVariableValue], /, *args: Any, **kwargs: Any
) -> tuple[Any, tuple[StateVariableValue, ...]]:
    """Calls ``model(*args, **kwargs)`` on fresh copies of its variables.

    Every slot in ``model`` (and in ``args`` / ``kwargs``) is bound to a new
    mutable copy of the value with its label in ``frozen_values``. Variables
    still bound in ``model`` or the arguments are copied too, so nothing the
    caller holds is mutated; a value in ``frozen_values`` with the label of
    such a variable takes its place (a way to substitute parameters).

    Args:
      model: A callable pytree (e.g. a Struct) with slots (from ``unbind_variables``) and/or
        variables.
      frozen_values: ``ParameterValue`` / ``StateVariableValue`` objects.
      *args: Positional arguments of the model.
      **kwargs: Keyword arguments of the model.

    Returns:
      ``(output, new_state_values)``: the new ``StateVariableValue`` of every
      state variable involved, in order: those of ``frozen_values`` in their
      order, then those still bound in the model and arguments, in order of
      first occurrence.

    Raises:
      VariableError: If an entry is not a frozen value, a slot has no value,
        a value has no slot, kinds mismatch, or the output contains a
        variable (return ``unbind_variables(..., freeze=True)`` instead).
      VariableConflictError: If labels repeat.

    Example:
        >>> from pzbridge.core.struct import Struct, pytree_dataclass
        >>> from pzbridge.core.variables_kinds import StateVariableSlot, StateVariableValue
        >>> @pytree_dataclass
        ... class Counter(Struct):
        ...     n: Any
        ...     def __call__(self):
        ...         self.n.value = self.n.value + 1
        ...         return self.n.value * 10
        >>> stateless_call(Counter(StateVariableSlot("n")), [StateVariableValue(4, "n")])
        (50, (StateVariableValue(value=5, label='n', metadata=FrozenMetadata({})),))
    """
    given = tuple(frozen_values)
    for value in given:
        if not isinstance(value, AbstractVariableValue):
            raise VariableError(
                f"stateless_call expects frozen values (ParameterValue / StateVariableValue), found "
                f"{type(value).__name__} labelled {getattr(value, 'label', '?')!r}. Fix: pass "
                "`unbind_variables(model, freeze=True)[1]` or call `.freeze()` on each variable."
            )
    (model, args, kwargs), held = unbind_variables((model, args, kwargs), freeze=True)
    given_labels = {value.label for value in given}
    merged = given + tuple(value for value in held if value.label not in given_labels)
    fresh = [value.unfreeze_as_copy() for value in merged]
    model, args, kwargs = bind_variables((model, args, kwargs), fresh)
    output = model(*args, **kwargs)
    _check_no_variables(output)
    return output, tuple(var.freeze() for var in fresh if isinstance(var, StateVariable))


def _check_no_variables(output: Any) -> None:
    leaves = jax.tree_util.tree_leaves(output)
    if any(isinstance(leaf, LabeledVariable) for leaf in leaves):
        for path, leaf in jax.tree_util.tree_flatten_with_path(output)[0]:
            if isinstance(leaf, LabeledVariable):
                raise VariableError(
                    f"The output of stateless_call contains {type(leaf).__name__} '{leaf.label}' at "
                    f"output {format_path(path)}: a temporary copy that would escape the call. Fix: "
                    "return `unbind_variables(x, freeze=True)` and rebuild outside with "
                    "`bind_variables(..., unfreeze_as_copy=True)`."
                )
