"""Example calls: the inputs a module is traced with, and the axis names they carry.

``pzb.lift(model, x, mask, example_kwargs={"key": k})`` records one
:class:`Example` for the root; tracing then derives the example of every
custom child from the shapes at its call site. Arrays may be real arrays or
``jax.ShapeDtypeStruct`` s (nothing is computed); named arrays give their
axis names, and ``input_names=`` names positional inputs explicitly.

Example:
    >>> import jax, jax.numpy as jnp
    >>> ex = Example.of((jnp.ones((5, 8)),), {}, input_names=(("seq", "features"),))
    >>> ex.args[0].shape, ex.input_names
    ((5, 8), (('seq', 'features'),))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import LiftError


def _abstract(value: Any) -> Any:
    if nx.is_namedarray(value):
        value = value.unwrap(*value.named_shape) if not value.positional_shape else value.data_array
    if isinstance(value, jax.ShapeDtypeStruct):
        return value
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return jax.ShapeDtypeStruct(tuple(value.shape), value.dtype)
    return value


@dataclasses.dataclass(frozen=True)
class Example:
    """One example call of a module.

    Attributes:
      args: Positional arguments: ``ShapeDtypeStruct`` s for arrays, other values as given.
      kwargs: Keyword arguments, the same way.
      input_names: Per positional argument, names of its axes (None: choose).
    """

    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    input_names: tuple[tuple[str, ...] | None, ...] = ()

    @classmethod
    def of(cls, args: Sequence[Any], kwargs: Mapping[str, Any] | None = None,
           input_names: Sequence[Sequence[str] | None] | None = None) -> Example:
        """An example from user inputs (arrays, named arrays or shape structs).

        Named arrays supply their names (all axes must be named); ``input_names``
        overrides them.

        Raises:
          LiftError: If ``input_names`` does not match an argument's rank.
        """
        names: list[tuple[str, ...] | None] = []
        for index, arg in enumerate(args):
            given = input_names[index] if input_names is not None and index < len(input_names) else None
            if given is None and nx.is_namedarray(arg) and not arg.positional_shape:
                given = tuple(arg.named_shape)
            if given is not None and hasattr(arg, "shape") and len(tuple(given)) != len(arg.shape):
                raise LiftError(
                    f"<root>: input_names[{index}] = {list(given)} names {len(tuple(given))} axes but example "
                    f"argument {index} has shape {tuple(arg.shape)}. Fix: give one name per axis."
                )
            names.append(tuple(given) if given is not None else None)
        return cls(tuple(_abstract(a) for a in args),
                   {k: _abstract(v) for k, v in (kwargs or {}).items()}, tuple(names))
