"""Recorded calls: edits made by a toolshed function (``steer``, ``patch_paths``, ...) kept as its name and data arguments.

Some edits are not one layer at one site: :func:`~pzbridge.toolshed.steering.steer`
gives every site its own decoding counter, :func:`~pzbridge.toolshed.path_patching.patch_paths`
places receivers, freezes and senders at paths of the original model and
wraps it in helper worlds, :func:`~pzbridge.toolshed.ablation.ablate` with
``reference=`` captures activations of the model it edits. A
:class:`SpecCall` records such a call (the function's registered name and
its arguments, every one of them data) and :meth:`SpecCall.apply` makes the
same call on another model, so re-applying it to a fresh lift of the same
architecture builds the same edit.

The functions come from an allow-list (:func:`register_spec_function`);
arguments are checked against the function's signature on load (an
unknown one is a :class:`~pzbridge.toolshed.spec_codec.SpecError`), and a
site must be a :class:`~pzbridge.toolshed.where.Where` (a class or a
predicate is code, not data). Only core and nn are imported, and the
toolshed modules whose functions are recorded.

Example:
    >>> import jax.numpy as jnp, pzbridge as pzb
    >>> from pzbridge.toolshed.where import Where
    >>> call = SpecCall.of(patch_worlds, Where(layer="Identity"), (1, 1))
    >>> call.name, call.arguments
    ('patch_worlds', (('at', Where(layer='Identity', path='', label='', module='', side='after', index=())), ('routes', (1, 1))))
    >>> model = pzb.nn.Sequential([pzb.nn.Identity()])
    >>> call.apply(model)(pzb.nx.wrap(jnp.array([1.0, 2.0]), "worlds")).unwrap("worlds").tolist()
    [2.0, 2.0]
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from pzbridge.toolshed.ablation import ablate, knockout_heads
from pzbridge.toolshed.decoding import add_kv_caches
from pzbridge.toolshed.interventions import insert_intervention
from pzbridge.toolshed.linearize import linearize
from pzbridge.toolshed.path_patching import interchange, patch_paths
from pzbridge.toolshed.sharding import constrain_sharding
from pzbridge.toolshed.spec_codec import SpecError, SpecReader, SpecWriter, check_fields
from pzbridge.toolshed.steering import steer
from pzbridge.toolshed.where import Where
from pzbridge.toolshed.worlds import patch_worlds

__all__ = ["SpecCall", "register_spec_function", "spec_functions"]

# Parameters that name sites: a Where (or a list / pairs of them), never a class or predicate (code).
_SITE_PARAMETERS = ("at", "selection", "sender", "receivers", "freeze", "sites")

_FUNCTIONS: dict[str, Callable[..., Any]] = {}


def register_spec_function(name: str, fn: Callable[..., Any]) -> None:
    """Allows recording calls ``fn(model, ...)`` in specs under ``name``.

    ``fn``'s first parameter is the model; the others become the recorded
    arguments, by name.

    Raises:
      SpecError: If ``name`` or ``fn`` is already registered, or ``fn`` takes ``*args``.

    Example:
        >>> "steer" in spec_functions()
        True
    """
    if name in _FUNCTIONS or any(f is fn for f in _FUNCTIONS.values()):
        raise SpecError(f"register_spec_function: {name!r} / {getattr(fn, '__name__', fn)!r} is already registered. "
                        "Fix: pick another name, or register each function once.")
    if any(p.kind is p.VAR_POSITIONAL for p in inspect.signature(fn).parameters.values()):
        raise SpecError(f"register_spec_function: {name!r} takes *args, which cannot be recorded by name. "
                        "Fix: register a function with named parameters.")
    _FUNCTIONS[name] = fn


def spec_functions() -> list[str]:
    """The registered function names (the allow-list of recorded calls).

    Example:
        >>> sorted(spec_functions())[:3]
        ['ablate', 'add_kv_caches', 'constrain_sharding']
    """
    return list(_FUNCTIONS)


def _name_of(fn: Any) -> str:
    for name, registered in _FUNCTIONS.items():
        if registered is fn:
            return name
    raise SpecError(f"Spec.record: {getattr(fn, '__qualname__', type(fn).__name__)} is not a registered spec "
                    f"function (registered: {spec_functions()}). Fix: pass one of those (pzb.toolshed.steer, ...), "
                    "or register_spec_function(name, fn).")


def _parameters(name: str) -> dict[str, inspect.Parameter]:
    return dict(list(inspect.signature(_FUNCTIONS[name]).parameters.items())[1:])  # Without the model.


def _check_site(name: str, parameter: str, value: Any) -> None:
    """Raises unless a site argument is a Where, a list of them, or (interchange) pairs of a Where and routes."""
    if value is None or isinstance(value, (Where, str)):
        return
    if isinstance(value, (list, tuple)) and value:
        items = [item[0] if parameter == "sites" and isinstance(item, (list, tuple)) else item for item in value]
        if all(isinstance(item, Where) for item in items):
            return
    raise SpecError(
        f"Spec.record({name}): the site {parameter}= is {_kind(value)}, which is code, not data. "
        f"Fix: name it with a Where, e.g. {parameter}=Where(layer='Linear') or Where(path='*.sublayers.1')."
    )


def _kind(value: Any) -> str:
    if isinstance(value, type):
        return f"the class {value.__name__}"
    return f"a {type(value).__name__}"


@dataclasses.dataclass(frozen=True)
class SpecCall:
    """A recorded call ``fn(model, **arguments)`` of a registered function; plain data.

    Attributes:
      name: The function's registered name.
      arguments: ``((parameter, value), ...)`` in the order given.

    Example:
        >>> from pzbridge.toolshed.where import Where
        >>> try:
        ...     SpecCall.of(steer, Where(layer="Identity"), lambda x: 2 * x)
        ... except SpecError as error:
        ...     print(str(error)[:52])
        spec: the Python function <lambda> cannot be written
    """

    name: str
    arguments: tuple[tuple[str, Any], ...]

    @classmethod
    def of(cls, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> SpecCall:
        """Records ``fn(model, *args, **kwargs)``; checks that the function is registered and every argument is data.

        Raises:
          SpecError: For an unregistered function, arguments its signature refuses, a site that is not a
            ``Where`` or a value a spec cannot hold (a function).
        """
        name = _name_of(fn)
        try:
            bound = inspect.signature(fn).bind(None, *args, **kwargs)
        except TypeError as error:
            raise SpecError(f"Spec.record({name}): {error}. Fix: pass the arguments {name} takes after the model.") \
                from None
        arguments = list(bound.arguments.items())[1:]
        call = cls(name, tuple(arguments))
        call.to_json(SpecWriter())  # Refuses code (functions, classes as sites) now, not when saving.
        return call

    def apply(self, model: Any) -> Any:
        """``fn(model, ...)`` with the recorded arguments."""
        given = dict(self.arguments)
        positional: list[Any] = []
        keywords: dict[str, Any] = {}
        for parameter, spec in _parameters(self.name).items():  # Signature order: positional-only ones in place.
            if parameter not in given:
                continue
            if spec.kind is inspect.Parameter.POSITIONAL_ONLY:
                positional.append(given[parameter])
            elif spec.kind is inspect.Parameter.VAR_KEYWORD:
                keywords.update(given[parameter])
            else:
                keywords[parameter] = given[parameter]
        return _FUNCTIONS[self.name](model, *positional, **keywords)

    def to_json(self, put: SpecWriter) -> dict[str, Any]:
        """``{"call": name, "args": {parameter: value}}`` (arrays go to ``put.arrays``)."""
        for parameter, value in self.arguments:
            if parameter in _SITE_PARAMETERS:
                _check_site(self.name, parameter, value)
        return {"call": self.name, "args": {parameter: put.value(value) for parameter, value in self.arguments}}

    @classmethod
    def from_json(cls, data: Any, get: SpecReader) -> SpecCall:
        """The inverse of :meth:`to_json`; the function must be registered and take every argument."""
        check_fields(data, ("call", "args"), get.where, required=("call", "args"))
        name, args = data["call"], data["args"]
        if not isinstance(name, str) or name not in _FUNCTIONS:
            raise SpecError(f"{get.where}.call: {name!r} is not an allowed function (allowed: {spec_functions()}). "
                            "Fix: use a registered name, or register_spec_function(...) before loading.")
        parameters = _parameters(name)
        if not isinstance(args, Mapping):
            raise SpecError(f"{get.where}.args: expected a JSON object, found {type(args).__name__}.")
        check_fields(args, tuple(parameters), f"{get.where}.args")
        arguments = []
        for parameter, ref in args.items():
            value = get.value(ref, f"args.{parameter}")
            if parameters[parameter].kind is inspect.Parameter.VAR_KEYWORD and not isinstance(value, Mapping):
                raise SpecError(f"{get.where}.args.{parameter}: expected a mapping of keyword arguments, found "
                                f"{type(value).__name__}.")
            arguments.append((parameter, value))
        missing = [p for p, spec in parameters.items() if spec.default is inspect.Parameter.empty
                   and spec.kind is not inspect.Parameter.VAR_KEYWORD and p not in args]
        if missing:
            raise SpecError(f"{get.where}.args: missing arguments {missing} of {name}. Fix: save the spec again.")
        return cls(name, tuple(arguments))


# patch_activations is not here: it returns the patched run's output, not an edited model (record
# insert_intervention with a Patch of captured values instead).
for _fn in (steer, ablate, knockout_heads, patch_worlds, patch_paths, interchange, insert_intervention, linearize,
            add_kv_caches, constrain_sharding):
    register_spec_function(_fn.__name__, _fn)
