"""The data form of specs: the operation allow-list and how values become JSON (arrays into a side table).

:mod:`pzbridge.toolshed.specs` writes edits; this module is what every
operation's ``to_json`` / ``from_json`` works with:

- the registry of intervention layer classes (:func:`register_spec_operation`,
  keyed by name and matched by exact class) and of value types that are
  not plain JSON (:func:`register_spec_value`, e.g. sharding rules);
- :class:`SpecWriter`, handed to ``to_json``: ``put(array)`` stores an
  array, named array, key or variable beside the JSON and returns its
  reference; ``put.value(v)`` writes any supported value (tuples, slices,
  ``Where``, nested layers, ...); ``put.layer(layer)`` a nested layer;
- :class:`SpecReader`, handed to ``from_json``: the inverse, checking every
  field (an unknown field, tag or array is a :class:`SpecError`).

Nothing here runs code on read: values are rebuilt from tags in a fixed
table, layers from the allow-list. A Python function is not data, so
writing one is a :class:`SpecError` naming the fix. Only core and nn are
imported, and the toolshed's own ``where`` (docs/architecture.md, "Layers
of the package").

Example:
    >>> import jax.numpy as jnp
    >>> put = SpecWriter()
    >>> ref = put.value((1, slice(2, None), jnp.arange(3)))
    >>> ref
    {'tuple': [1, {'slice': [2, None, None]}, {'array': 'a0', 'axes': None}]}
    >>> SpecReader(put.arrays, "spec").value(ref, "x")[2].tolist()
    [0, 1, 2]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import PzbridgeError
from pzbridge.core.variables import (
    AbstractVariableSlot,
    AbstractVariableValue,
    Parameter,
    StateVariable,
)
from pzbridge.nn.layer import Layer
from pzbridge.toolshed.where import AxisSlice, Where

__all__ = [
    "SpecError",
    "SpecReader",
    "SpecWriter",
    "check_fields",
    "operation_of",
    "refuse_in_specs",
    "register_spec_operation",
    "register_spec_value",
    "registered_operation",
    "spec_operations",
]

ToJson = Callable[[Layer, "SpecWriter"], dict[str, Any]]
FromJson = Callable[[Mapping[str, Any], "SpecReader"], Layer]

_ARRAY_FIELDS = ("array", "axes")
_KEY_FIELDS = ("key", "impl")
_VARIABLE_FIELDS = ("variable", "label", "value", "metadata")
_VARIABLES = {"Parameter": Parameter, "StateVariable": StateVariable}
_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class SpecError(PzbridgeError, ValueError):
    """A spec file or dictionary cannot be read or written: malformed, unknown field, operation or array.

    Example:
        >>> isinstance(SpecError("x"), PzbridgeError)
        True
    """


def check_fields(data: Any, allowed: tuple[str, ...], where: str, required: tuple[str, ...] = ()) -> None:
    """Raises :class:`SpecError` unless ``data`` is a mapping with only ``allowed`` and every ``required`` field.

    Example:
        >>> check_fields({"mode": "zero"}, ("mode", "axes"), "Ablate.params")
    """
    if not isinstance(data, Mapping):
        raise SpecError(f"{where}: expected a JSON object, found {type(data).__name__}. "
                        "Fix: write specs with Spec.to_json / save_spec.")
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        raise SpecError(f"{where}: unknown fields {unknown}; expected some of {list(allowed)}. Fix: remove them.")
    missing = [k for k in required if k not in data]
    if missing:
        raise SpecError(f"{where}: missing fields {missing}. Fix: add them (see docs/specs.md).")


# -- the registries -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Operation:
    name: str
    cls: type
    to_json: ToJson
    from_json: FromJson


@dataclasses.dataclass(frozen=True)
class _ValueType:
    tag: str
    cls: type
    encode: Callable[[Any, SpecWriter], Any]
    decode: Callable[[Any, SpecReader, str], Any]


_OPERATIONS: dict[str, _Operation] = {}
_VALUE_TYPES: dict[str, _ValueType] = {}
# Classes that hold code (a Python function) and so can never be data: the reason names the fix.
_NOT_DATA: dict[type, str] = {}


def register_spec_operation(name: str, cls: type, to_json: ToJson, from_json: FromJson) -> None:
    """Allows intervention class ``cls`` in specs under ``name``.

    Args:
      name: The operation name written to JSON.
      cls: The layer class (matched exactly, so subclasses register their own).
      to_json: ``to_json(layer, put) -> params``: JSON-compatible parameters;
        ``put(array)`` stores an array (named array, key or variable) and
        returns its JSON reference, ``put.value(v)`` writes any supported
        value, ``put.layer(l)`` a nested intervention layer.
      from_json: ``from_json(params, get) -> layer``; ``get(ref, field)``
        returns the stored array, ``get.value(ref, field)`` / ``get.layer(ref,
        field)`` the inverses of ``put.value`` / ``put.layer``. Raise
        :class:`SpecError` (or any pzbridge error) on bad params.

    Raises:
      SpecError: If ``name`` or ``cls`` is already registered.

    Example:
        >>> "AddVector" in spec_operations()
        True
    """
    if name in _OPERATIONS or any(op.cls is cls for op in _OPERATIONS.values()):
        raise SpecError(f"register_spec_operation: {name!r} / {cls.__name__} is already registered. "
                        "Fix: pick another name, or register each class once.")
    _OPERATIONS[name] = _Operation(name, cls, to_json, from_json)


def register_spec_value(tag: str, cls: type, encode: Callable[[Any, SpecWriter], Any],
                        decode: Callable[[Any, SpecReader, str], Any]) -> None:
    """Allows values of ``cls`` (not plain JSON) in specs, written as ``{tag: encode(value, put)}``.

    ``decode(data, get, field)`` rebuilds the value from ``data``.

    Raises:
      SpecError: If ``tag`` or ``cls`` is already registered.

    Example:
        >>> try:
        ...     register_spec_value("tuple", tuple, lambda v, put: [], lambda d, get, f: ())
        ... except SpecError as error:
        ...     print(error)
        register_spec_value: 'tuple' / tuple is taken. Fix: pick another tag.
    """
    if tag in _VALUE_TYPES or tag in _BUILTIN_TAGS or any(v.cls is cls for v in _VALUE_TYPES.values()):
        raise SpecError(f"register_spec_value: {tag!r} / {cls.__name__} is taken. Fix: pick another tag.")
    _VALUE_TYPES[tag] = _ValueType(tag, cls, encode, decode)


def refuse_in_specs(cls: type, reason: str) -> None:
    """Marks ``cls`` as a layer that holds code: writing it to a spec raises ``SpecError(reason)``.

    Example:
        >>> from pzbridge.toolshed.interventions import InterveneWith  # refused by pzbridge.toolshed.spec_layers
        >>> try:
        ...     SpecWriter().layer(InterveneWith(abs))
        ... except SpecError as error:
        ...     print(str(error)[:48])
        spec: InterveneWith holds a Python function, whi
    """
    _NOT_DATA[cls] = reason


def spec_operations() -> list[str]:
    """The registered operation names (the allow-list).

    Example:
        >>> sorted(spec_operations())[:2]
        ['Ablate', 'AddVector']
    """
    return list(_OPERATIONS)


def operation_of(layer: Any) -> _Operation:
    """The registered operation of ``layer``'s exact class.

    Raises:
      SpecError: If the class is not registered (or holds code), naming the fix.

    Example:
        >>> from pzbridge.toolshed.interventions import ZeroAblation
        >>> operation_of(ZeroAblation()).name
        'ZeroAblation'
    """
    for op in _OPERATIONS.values():
        if type(layer) is op.cls:
            return op
    if type(layer) in _NOT_DATA:
        raise SpecError(_NOT_DATA[type(layer)])
    raise SpecError(f"spec: {type(layer).__name__} is not a registered spec operation (registered: "
                    f"{spec_operations()}). Fix: register it with register_spec_operation(name, cls, to_json, "
                    "from_json).")


def registered_operation(name: Any, where: str) -> _Operation:
    """The operation registered under ``name``.

    Raises:
      SpecError: If ``name`` is not in the allow-list.

    Example:
        >>> registered_operation("Patch", "spec").name
        'Patch'
    """
    if not isinstance(name, str) or name not in _OPERATIONS:
        raise SpecError(f"{where}.operation: {name!r} is not an allowed operation (allowed: {spec_operations()}). "
                        "Fix: use a registered name, or register_spec_operation(...) before loading.")
    return _OPERATIONS[name]


# -- writing ------------------------------------------------------------------------------------

_BUILTIN_TAGS = ("tuple", "mapping", "slice", "axis_slice", "where", "float", "dtype", "layer", "array", "key",
                 "variable")


def _function_error(value: Any) -> SpecError:
    name = getattr(value, "__qualname__", type(value).__name__)
    return SpecError(
        f"spec: the Python function {name} cannot be written to a spec (a spec is data; loading runs no code). "
        "Fix: use a vector (e.g. steer(..., pzb.nx.wrap(v, 'features')) or AddVector), or write an intervention "
        "layer class holding data and register it with register_spec_operation(name, cls, to_json, from_json)."
    )


class SpecWriter:
    """Collects arrays into ``arrays`` (names ``a0``, ``a1``, ...) and writes values as JSON references.

    Calling it stores an array-valued leaf (a ``jax.Array`` / numpy array, a
    ``NamedArray`` without positional axes, a typed random key, a
    ``Parameter`` / ``StateVariable``); :meth:`value` writes anything a spec
    may hold; :meth:`layer` a registered intervention layer.

    Example:
        >>> import pzbridge as pzb
        >>> put = SpecWriter()
        >>> put(pzb.nx.wrap(jnp.ones(2), "f")), list(put.arrays)
        ({'array': 'a0', 'axes': ['f']}, ['a0'])
    """

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def _store(self, array: Any) -> str:
        name = f"a{len(self.arrays)}"
        self.arrays[name] = np.asarray(array)
        return name

    def __call__(self, value: Any) -> dict[str, Any]:
        if isinstance(value, (Parameter, StateVariable)) and type(value) in _VARIABLES.values():
            out = {"variable": type(value).__name__, "label": value.label, "value": self.value(value.value)}
            if value.metadata:
                out["metadata"] = self.value(dict(value.metadata))
            return out
        if isinstance(value, (AbstractVariableSlot, AbstractVariableValue)):
            raise SpecError(
                f"spec: a {type(value).__name__} (label {getattr(value, 'label', '?')!r}) is an unbound slot or a "
                "frozen value, not data. Fix: write the layer of the bound model (pzb.bind_variables first), whose "
                "variables hold their values.")
        if nx.is_namedarray(value):
            if value.positional_shape:
                raise SpecError("Spec.to_json: a named array with positional axes cannot be saved. "
                                "Fix: tag every axis (pzb.nx.wrap(data, *names)).")
            names = list(value.named_shape)  # Kept in order: the rebuilt array equals the saved one.
            return {"array": self._store(value.unwrap(*names)), "axes": names}
        if isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
            return {"key": {"array": self._store(jax.random.key_data(value)), "axes": None},
                    "impl": str(jax.random.key_impl(value))}
        if isinstance(value, (jax.Array, np.ndarray, np.generic)):
            if isinstance(value, jax.core.Tracer):
                raise SpecError("spec: a traced value cannot be saved. Fix: write the spec outside jax.jit / grad.")
            if np.asarray(value).dtype == object:
                raise SpecError("spec: object arrays cannot be saved. Fix: use numeric or boolean arrays.")
            return {"array": self._store(value), "axes": None}
        raise SpecError(f"spec: expected an array, named array, key or variable, found {type(value).__name__}. "
                        "Fix: wrap it with pzb.nx.wrap or jnp.asarray.")

    def value(self, value: Any) -> Any:
        """The JSON form of ``value``: plain JSON as is, everything else a one-key tagged object.

        Raises:
          SpecError: For a function or a value of a type specs do not know.
        """
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, (int, np.integer)) and not isinstance(value, np.bool_):
            return int(value)
        if isinstance(value, (float, np.floating)):
            value = float(value)
            return value if math.isfinite(value) else {"float": "nan" if math.isnan(value) else repr(value)}
        if isinstance(value, list):
            return [self.value(v) for v in value]
        if isinstance(value, tuple):
            return {"tuple": [self.value(v) for v in value]}
        if isinstance(value, slice):
            return {"slice": [self.value(v) for v in (value.start, value.stop, value.step)]}
        if isinstance(value, AxisSlice):
            return {"axis_slice": [value.start, value.stop, value.step]}
        if isinstance(value, Where):
            return {"where": value.to_json()}
        if isinstance(value, np.dtype) or (isinstance(value, type) and issubclass(value, np.generic)):
            return {"dtype": np.dtype(value).name}
        for kind in _VALUE_TYPES.values():
            if isinstance(value, kind.cls):
                return {kind.tag: kind.encode(value, self)}
        if isinstance(value, Layer):
            return {"layer": self.layer(value)}
        if isinstance(value, Mapping):
            if not all(isinstance(k, str) for k in value):
                raise SpecError(f"spec: mapping keys must be strings, found {sorted(map(repr, value))[:4]}.")
            return {"mapping": {k: self.value(v) for k, v in value.items()}}
        if isinstance(value, (jax.Array, np.ndarray, np.generic, Parameter, StateVariable, AbstractVariableSlot,
                              AbstractVariableValue)) or nx.is_namedarray(value):
            return self(value)
        if callable(value):
            raise _function_error(value)
        raise SpecError(f"spec: a {type(value).__name__} cannot be written to a spec. Fix: pass arrays, named "
                        "arrays, numbers, strings, Where values, tuples, lists or str-keyed mappings of them.")

    def layer(self, layer: Layer) -> dict[str, Any]:
        """``{"operation": name, "params": ...}`` of a registered intervention layer."""
        op = operation_of(layer)
        return {"operation": op.name, "params": op.to_json(layer, self)}


# -- reading ------------------------------------------------------------------------------------


class SpecReader:
    """Rebuilds values from :class:`SpecWriter` references; ``used`` collects the array names read.

    Example:
        >>> import numpy as np
        >>> get = SpecReader({"a0": np.ones(2)}, "spec.edits[0]")
        >>> dict(get({"array": "a0", "axes": ["f"]}, "vector").named_shape)
        {'f': 2}
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], where: str, used: set[str] | None = None) -> None:
        self.arrays = arrays
        self.where = where
        self.used = set() if used is None else used

    def _array(self, ref: Any, field: str) -> Any:
        check_fields(ref, _ARRAY_FIELDS, f"{self.where}.{field}", required=_ARRAY_FIELDS)
        key, axes = ref["array"], ref["axes"]
        if not isinstance(key, str) or key not in self.arrays:
            raise SpecError(f"{self.where}.{field}: array {key!r} is not in the arrays file. Fix: keep "
                            "spec.json and arrays.npz from the same save_spec call.")
        data = np.asarray(self.arrays[key])
        if data.dtype == object:
            raise SpecError(f"{self.where}.{field}: object arrays are not allowed.")
        self.used.add(key)
        if axes is None:
            return jnp.asarray(data)
        if (not isinstance(axes, list) or len(axes) != data.ndim or len(set(map(str, axes))) != len(axes)
                or not all(isinstance(a, str) and a for a in axes)):
            raise SpecError(f"{self.where}.{field}.axes: expected {data.ndim} distinct axis names for an array of "
                            f"shape {data.shape}, found {axes!r}.")
        return nx.wrap(jnp.asarray(data), *axes)

    def __call__(self, ref: Any, field: str) -> Any:
        """The array (named array, key or variable) ``ref`` names."""
        if isinstance(ref, Mapping) and "key" in ref:
            check_fields(ref, _KEY_FIELDS, f"{self.where}.{field}", required=_KEY_FIELDS)
            data = self._array(ref["key"], f"{field}.key")
            if not isinstance(ref["impl"], str) or nx.is_namedarray(data) or data.dtype != jnp.uint32:
                raise SpecError(f"{self.where}.{field}: a key needs uint32 key data and an impl name, found "
                                f"{ref['impl']!r}. Fix: save the spec again.")
            return jax.random.wrap_key_data(data, impl=ref["impl"])
        if isinstance(ref, Mapping) and "variable" in ref:
            check_fields(ref, _VARIABLE_FIELDS, f"{self.where}.{field}", required=("variable", "label", "value"))
            kind = _VARIABLES.get(ref["variable"]) if isinstance(ref["variable"], str) else None
            if kind is None or not isinstance(ref["label"], str):
                raise SpecError(f"{self.where}.{field}: variable kind {ref['variable']!r} / label {ref['label']!r} "
                                f"is not valid; expected one of {sorted(_VARIABLES)} and a string label.")
            metadata = self.value(ref.get("metadata", {"mapping": {}}), f"{field}.metadata")
            if not isinstance(metadata, dict):
                raise SpecError(f"{self.where}.{field}.metadata: expected a mapping, found {type(metadata).__name__}.")
            return kind(self.value(ref["value"], f"{field}.value"), ref["label"], metadata)
        return self._array(ref, field)

    def value(self, data: Any, field: str) -> Any:
        """The inverse of :meth:`SpecWriter.value`."""
        if data is None or isinstance(data, (bool, int, float, str)):
            return data
        if isinstance(data, list):
            return [self.value(v, f"{field}[{i}]") for i, v in enumerate(data)]
        if not isinstance(data, Mapping) or not data:
            raise SpecError(f"{self.where}.{field}: expected a JSON value written by save_spec, found "
                            f"{type(data).__name__}.")
        if set(data) & {"array", "key", "variable"}:
            return self(data, field)
        if len(data) != 1:
            raise SpecError(f"{self.where}.{field}: expected one tag among "
                            f"{sorted((*_BUILTIN_TAGS, *_VALUE_TYPES))}, found {sorted(map(str, data))}.")
        (tag, inner), = data.items()
        at = f"{field}.{tag}"
        if tag == "tuple" and isinstance(inner, list):
            return tuple(self.value(v, f"{at}[{i}]") for i, v in enumerate(inner))
        if tag == "mapping" and isinstance(inner, Mapping):
            return {str(k): self.value(v, f"{at}.{k}") for k, v in inner.items()}
        if tag in ("slice", "axis_slice") and isinstance(inner, list) and len(inner) == 3:
            parts = [self.value(v, at) for v in inner]
            if not all(p is None or (isinstance(p, int) and not isinstance(p, bool)) for p in parts):
                raise SpecError(f"{self.where}.{at}: expected ints or None, found {inner!r}.")
            return slice(*parts) if tag == "slice" else AxisSlice(*parts)
        if tag == "where":
            try:
                return Where.from_json(inner)
            except PzbridgeError as error:
                raise SpecError(f"{self.where}.{at}: {error}") from None
        if tag == "float" and inner in _FLOATS:
            return _FLOATS[inner]
        if tag == "dtype" and isinstance(inner, str):
            try:
                return np.dtype(inner)
            except TypeError:
                raise SpecError(f"{self.where}.{at}: {inner!r} is not a dtype name.") from None
        if tag == "layer":
            return self.layer(inner, at)
        if tag in _VALUE_TYPES:
            return _VALUE_TYPES[tag].decode(inner, self, at)
        raise SpecError(f"{self.where}.{at}: the tag {tag!r} with {type(inner).__name__} is not a known value "
                        f"form (known: {sorted((*_BUILTIN_TAGS, *_VALUE_TYPES))}). Fix: save the spec again.")

    def layer(self, data: Any, field: str) -> Layer:
        """The intervention layer ``data`` (``{"operation", "params"}``) describes, from the allow-list."""
        where = f"{self.where}.{field}"
        check_fields(data, ("operation", "params"), where, required=("operation", "params"))
        op = registered_operation(data["operation"], where)
        if not isinstance(data["params"], Mapping):
            raise SpecError(f"{where}.params: expected a JSON object, found {type(data['params']).__name__}.")
        layer = op.from_json(data["params"], SpecReader(self.arrays, f"{where}.params", self.used))
        if not isinstance(layer, Layer):
            raise SpecError(f"{where}: operation {op.name!r} built a {type(layer).__name__}, expected a layer.")
        return layer
