"""Calling an edited child the way the original code called the original child.

A ``Foreign`` keeps its module's ``__call__``, which calls each child in its
own way: ``self.attn(x, x, x, mask=mask, key=key)``, ``self.mlp(x)``,
``self.block(x)`` with no ``key`` at all. An edit replaces a child's lifted
layer (``insert_intervention`` makes ``Sequential([attention, ablation])``),
and the replacement's natural lowering need not accept those calls:
``eqx.nn.Sequential`` takes one input and passes ``key=`` to every layer.

So the ``Foreign`` template records, per child, the class the original code
calls and its calling convention, and on rebuild checks the lowered child
with :func:`callable_like`. When the lowering cannot be called like the
original, the child is lowered as a :class:`StandIn`: an adapter that binds
its arguments to the original ``__call__``'s signature (:func:`bind_like`),
names the positional inputs by the original convention, passes every other
argument as a side input and returns the output in the original form.

Example:
    >>> import equinox as eqx
    >>> callable_like(eqx.nn.Identity(), eqx.nn.Linear)          # (x, *, key=None) both
    True
    >>> callable_like(eqx.nn.Identity(), eqx.nn.MultiheadAttention)
    False
    >>> bind_like(eqx.nn.MultiheadAttention, 4, ("q", "k", "v"), {"mask": "m", "key": None})
    (['q', 'k', 'v', 'm'], {'key': None})
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import equinox as eqx

from pzbridge.bridge.lifted import CallingConvention

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


@dataclasses.dataclass(frozen=True)
class StandIn:
    """A lifted layer to lower in place of an original child, callable exactly like it.

    Lowered by the adapter rule (:mod:`pzbridge.bridge.equinox.adapter`) to an
    ``EquinoxAdapter`` that takes ``original.__call__``'s arguments.

    Attributes:
      layer: The lifted layer (e.g. ``Sequential([attention, ZeroAblation()])``).
      original: The class whose call signature must be kept.
      convention: The original class's calling convention (None: inputs unnamed).

    Example:
        >>> StandIn(None, eqx.nn.Linear, None).original.__name__
        'Linear'
    """

    layer: Any
    original: type
    convention: CallingConvention | None


@functools.lru_cache(maxsize=None)
def _parameters(cls: type) -> tuple[inspect.Parameter, ...] | None:
    try:
        return tuple(inspect.signature(cls.__call__).parameters.values())[1:]  # Without self.
    except (TypeError, ValueError, AttributeError):
        return None


def _accepts_calls_of(cls: type, original: type) -> bool:
    """True when every call ``original.__call__`` accepts binds the same way to ``cls.__call__``."""
    mine, theirs = _parameters(cls), _parameters(original)
    if mine is None or theirs is None:
        return False
    kinds = {p.kind for p in mine}
    mine_positional = [p for p in mine if p.kind in _POSITIONAL]
    theirs_positional = [p for p in theirs if p.kind in _POSITIONAL]
    if len(mine_positional) < len(theirs_positional):
        return False
    for index, param in enumerate(mine_positional):
        if index < len(theirs_positional):
            if param.name != theirs_positional[index].name:
                return False  # The original code may pass it by name.
        elif param.default is param.empty:
            return False  # The original code never passes it.
    by_name = {p.name: p for p in mine}
    for param in theirs:
        if param.kind is param.VAR_POSITIONAL or param.kind is param.VAR_KEYWORD:
            if param.kind not in kinds:
                return False
        elif param.kind is param.KEYWORD_ONLY:
            match = by_name.get(param.name)
            if match is None and param.VAR_KEYWORD not in kinds:
                return False
            if match is not None and match.kind not in (param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD):
                return False
    theirs_names = {p.name for p in theirs}
    return all(p.default is not p.empty for p in mine if p.kind is p.KEYWORD_ONLY and p.name not in theirs_names)


def _takes_key(module: Any) -> bool:
    params = _parameters(type(module)) or ()
    return any((p.name == "key" and p.kind is not p.POSITIONAL_ONLY) or p.kind is p.VAR_KEYWORD for p in params)


def _layers_take_key(sequential: eqx.nn.Sequential) -> bool:
    return all(_takes_key(layer) and (not isinstance(layer, eqx.nn.Sequential) or _layers_take_key(layer))
               for layer in sequential.layers)


def callable_like(module: Any, original: type) -> bool:
    """True when ``module`` accepts every call an ``original`` instance accepts, with the same meaning.

    The original class itself, or a class whose ``__call__`` takes the same
    parameters (names, kinds, order; extra ones optional), such as
    ``LoRALinear`` for ``Linear`` or ``eqx.nn.Sequential`` for ``MLP``. An
    ``eqx.nn.Sequential`` also passes ``key=`` to each of its layers, so
    every layer must take one.

    Args:
      module: The lowered child.
      original: The class the original code calls at that place.

    Returns:
      Whether the original code can call ``module`` unchanged.

    Example:
        >>> import jax
        >>> class NoKey(eqx.Module):
        ...     def __call__(self, x): return x
        >>> callable_like(eqx.nn.Sequential([eqx.nn.Identity()]), eqx.nn.MLP)
        True
        >>> callable_like(eqx.nn.Sequential([NoKey()]), NoKey)   # NoKey() would be passed key=...
        False
    """
    if type(module) is original:
        return True
    if not _accepts_calls_of(type(module), original):
        return False
    return not isinstance(module, eqx.nn.Sequential) or _layers_take_key(module)


def bind_like(original: type, n_inputs: int, args: Sequence[Any],
              kwargs: Mapping[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """Splits a call made as to ``original`` into positional inputs and side inputs.

    The arguments are bound to ``original.__call__``'s signature. Its leading
    positional parameters are the inputs (the first ``n_inputs`` of them
    that were given, or, with ``n_inputs == 0``, as many as were passed
    positionally), however they were passed; every other argument given is a
    side input under its parameter name (``mask``, ``key``, ``inference``).

    Args:
      original: The class whose calls are accepted.
      n_inputs: How many positional inputs the original calling convention names (0: unknown).
      args: The positional arguments of the call.
      kwargs: Its keyword arguments.

    Returns:
      ``(inputs, side_inputs)``.

    Raises:
      TypeError: If ``original.__call__`` would reject the arguments (naming the class).

    Example:
        >>> bind_like(eqx.nn.MultiheadAttention, 4, (), {"query": 1, "key_": 2, "value": 3})
        ([1, 2, 3], {})
        >>> bind_like(eqx.nn.Linear, 0, ("x",), {"key": "k"})
        (['x'], {'key': 'k'})
    """
    try:
        signature = inspect.signature(original.__call__)
        bound = signature.bind(None, *args, **kwargs)  # None stands for self.
    except TypeError as err:
        raise TypeError(
            f"an edited {original.__qualname__} (an EquinoxAdapter standing in for it) is called as the original "
            f"is, and {original.__qualname__}.__call__ rejects these arguments: {err}."
        ) from None
    limit = n_inputs or len(args)
    inputs: list[Any] = []
    side: dict[str, Any] = {}
    for param in list(signature.parameters.values())[1:]:
        if param.name not in bound.arguments:
            limit = min(limit, len(inputs))  # A gap ends the inputs.
            continue
        value = bound.arguments[param.name]
        if param.kind is param.VAR_POSITIONAL:
            inputs.extend(value)
        elif param.kind is param.VAR_KEYWORD:
            side.update(value)
        elif param.kind in _POSITIONAL and len(inputs) < limit:
            inputs.append(value)
        else:
            side[param.name] = value
    return inputs, side
