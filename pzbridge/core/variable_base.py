"""The identity-carrying base of pzbridge variables.

A variable (``Parameter``, ``StateVariable``) is a *mutable* object that sits
as a leaf inside otherwise immutable model trees. Its identity is what makes
sharing explicit: when the same variable object is reached from two places in
a model (tied embeddings, ``eqx.nn.Shared``, an NNX submodule referenced
twice), both places hold the very same object. Selectors use this base class
to deduplicate selected variables and to keep edits shared; the concrete
classes live in :mod:`pzbridge.core.variables`.

This module exists separately so that :mod:`pzbridge.core.selectors` can know
what a variable is without depending on the whole variable system.

Example:
    >>> from pzbridge.core.variables import Parameter
    >>> import jax.numpy as jnp
    >>> isinstance(Parameter(jnp.zeros(2), label="w"), AbstractVariable)
    True
"""

from __future__ import annotations

import abc
from typing import Any


class AbstractVariable(abc.ABC):
    """A mutable, labelled container whose identity defines sharing.

    Equality and hashing are by identity: two distinct variables are never
    equal, even with equal values, because editing one must not edit the
    other. JAX sees a variable as an opaque leaf (it is not a pytree node).

    Example:
        >>> from pzbridge.core.variables import StateVariable
        >>> import jax.numpy as jnp
        >>> a, b = StateVariable(jnp.zeros(()), label="n"), StateVariable(jnp.zeros(()), label="n")
        >>> a == b, a == a
        (False, True)
    """

    label: str

    @property
    @abc.abstractmethod
    def value(self) -> Any:
        """The current value (any pytree, usually an array)."""

    def __eq__(self, other: object) -> bool:
        return self is other

    def __hash__(self) -> int:
        return id(self)
