"""The layer protocol every lifted layer follows.

A lifted model is a tree of :class:`Layer` structs. Each layer is a frozen
pytree dataclass whose trainable arrays are :class:`~pzbridge.Parameter`
objects (or their frozen values / slots) and whose configuration (axis
names, epsilons) is static. A layer maps one ``NamedArray`` (or a pytree of
them) to another: ``layer(x, **side_inputs)``. Side inputs carry what some
layers need besides the activation (token positions, an attention mask, a
random stream, ``train=...``); every layer accepts and ignores the ones it
does not use, so combinators simply forward all of them.

Named axes a layer does not use pass through untouched, so a batch is just an
extra name: no ``jax.vmap`` is needed around a lifted model.

See docs/architecture.md ("Axis naming and calling conventions").

Example:
    >>> import pzbridge as pzb
    >>> from pzbridge.nn.layer import Layer
    >>> @pzb.pytree_dataclass
    ... class Double(Layer):
    ...     def __call__(self, x, /, **side_inputs):
    ...         return x * 2
    >>> Double()(pzb.nx.wrap(jnp.ones(3), "features")).unwrap("features")
    Array([2., 2., 2.], dtype=float32)
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp  # noqa: F401  (used by doctests)

from pzbridge.core.struct import Struct, pytree_dataclass
from pzbridge.core.variables import AbstractVariableValue, StateVariableValue, stateless_call


@pytree_dataclass
class Layer(Struct, abc.ABC):
    """Base class of lifted layers: a frozen pytree that is called on named arrays.

    Subclasses implement ``__call__(self, x, /, **side_inputs)`` and ignore
    side inputs they do not use.

    Example:
        >>> isinstance(pzb.nn.Identity(), Layer)
        True
    """

    @abc.abstractmethod
    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        """Applies the layer to ``x``; unused ``side_inputs`` are ignored."""

    def stateless_call(
        self, frozen_vars: Sequence[AbstractVariableValue], x: Any, /, **side_inputs: Any
    ) -> tuple[Any, tuple[StateVariableValue, ...]]:
        """Calls the layer as a pure function of its variable values.

        Args:
          frozen_vars: ``ParameterValue`` / ``StateVariableValue`` objects for
            the layer's slots (and substitutes for bound variables).
          x: The input.
          **side_inputs: Side inputs forwarded to ``__call__``.

        Returns:
          ``(output, new_state_values)``; nothing the caller holds changes.

        Example:
            >>> slots, values = pzb.unbind_variables(pzb.nn.Identity(), freeze=True)
            >>> slots.stateless_call(values, 3)
            (3, ())
        """
        return stateless_call(self, frozen_vars, x, **side_inputs)
