"""Variables: the mutable, labelled state of a lifted model (public facade).

A lifted model is immutable data except for its variables. Trainable arrays
are :class:`Parameter` objects, non-trainable state (batch statistics,
counters, caches) is :class:`StateVariable`; both are leaves whose identity
carries sharing (see :mod:`pzbridge.core.variable_base`). To run a model
through a pure JAX transformation, its variables are *unbound* into slots and
frozen values, and fresh copies are *bound* back inside the transformation;
:func:`stateless_call` and :func:`~pzbridge.core.variable_jit.variable_jit`
package that round trip.

This module only re-exports; the code lives in small modules with one job:
:mod:`pzbridge.core.variables_kinds` (the classes),
:mod:`pzbridge.core.variables_binding` (bind / unbind / freeze) and
:mod:`pzbridge.core.variables_stateless` (``stateless_call``). See
docs/architecture.md ("The lift / lower contract") for what variables are to
a lifted model.

Example:
    >>> import jax.numpy as jnp
    >>> w = Parameter(jnp.ones(2), label="w")
    >>> model, values = unbind_variables([w, w], freeze=True)
    >>> model
    [ParameterSlot(label='w'), ParameterSlot(label='w')]
    >>> [v.label for v in values]
    ['w']
"""

from __future__ import annotations

from pzbridge.core.variable_base import AbstractVariable
from pzbridge.core.variables_binding import (
    bind_variables,
    freeze_params,
    freeze_state_vars,
    freeze_variables,
    unbind_params,
    unbind_state_vars,
    unbind_variables,
)
from pzbridge.core.variables_kinds import (
    AbstractVariableSlot,
    AbstractVariableValue,
    FrozenMetadata,
    FrozenVariableError,
    LabeledVariable,
    Parameter,
    ParameterSlot,
    ParameterValue,
    StateVariable,
    StateVariableSlot,
    StateVariableValue,
    kind_name,
    scoped_auto_state_var_labels,
)
from pzbridge.core.variables_stateless import StatelessCallable, stateless_call

__all__ = [
    "AbstractVariable",
    "AbstractVariableSlot",
    "AbstractVariableValue",
    "FrozenMetadata",
    "FrozenVariableError",
    "LabeledVariable",
    "Parameter",
    "ParameterSlot",
    "ParameterValue",
    "StateVariable",
    "StateVariableSlot",
    "StateVariableValue",
    "StatelessCallable",
    "bind_variables",
    "freeze_params",
    "freeze_state_vars",
    "freeze_variables",
    "kind_name",
    "scoped_auto_state_var_labels",
    "stateless_call",
    "unbind_params",
    "unbind_state_vars",
    "unbind_variables",
]
