"""Intervention specs as data: a JSON file (and an ``.npz`` of arrays) that re-applies to a fresh lift.

A :class:`Spec` is a list of edits, each a site (a
:class:`~pzbridge.toolshed.where.Where`, written with ``Where.to_json``) and
an intervention layer. :func:`save_spec` writes ``spec.json`` (format
version, sites, operation names, scalar parameters) and ``arrays.npz`` (the
vectors and masks) into a directory; :func:`load_spec` reads them back and
:meth:`Spec.apply` inserts the edits into a model, e.g. a freshly lifted one
of the same architecture.

Loading executes no code: JSON only, ``np.load(allow_pickle=False)``, and
operations come from an allow-list registry (:func:`register_spec_operation`)
keyed by name, never from an import path. Anything unexpected (an unknown
field, operation or array, a wrong type, another format version) raises
:class:`SpecError` naming the field and the fix. Other interventions register
themselves with ``register_spec_operation(name, cls, to_json, from_json)``.
Only core and nn are imported (docs/architecture.md, "Layers of the package").

Example:
    >>> import jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> from pzbridge.toolshed import AddVector, Where
    >>> spec = Spec().add(Where(layer="Identity"), AddVector(pzb.nx.wrap(jnp.ones(2), "f")))
    >>> data, arrays = spec.to_json()
    >>> data["edits"][0]["operation"], sorted(arrays)
    ('AddVector', ['a0'])
    >>> Spec.from_json(data, arrays) == spec
    True
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import PzbridgeError
from pzbridge.core.tree_util import tree_equal
from pzbridge.nn.layer import Layer
from pzbridge.toolshed.interventions import Ablate, AddVector, Patch, ZeroAblation, insert_intervention
from pzbridge.toolshed.where import Where

__all__ = ["Spec", "SpecError", "load_spec", "register_spec_operation", "save_spec", "spec_operations"]

SPEC_FORMAT = "pzbridge.intervention_spec"
SPEC_VERSION = 1
_TOP_FIELDS = ("format", "version", "edits")
_EDIT_FIELDS = ("site", "operation", "params", "side")
_ARRAY_FIELDS = ("array", "axes")

ToJson = Callable[[Layer, Callable[[Any], Any]], dict[str, Any]]
FromJson = Callable[[Mapping[str, Any], Callable[[Any, str], Any]], Layer]


class SpecError(PzbridgeError, ValueError):
    """A spec file or dictionary cannot be read: malformed, unknown field, operation or array.

    Example:
        >>> isinstance(SpecError("x"), PzbridgeError)
        True
    """


@dataclasses.dataclass(frozen=True)
class _Operation:
    name: str
    cls: type
    to_json: ToJson
    from_json: FromJson


_REGISTRY: dict[str, _Operation] = {}


def register_spec_operation(name: str, cls: type, to_json: ToJson, from_json: FromJson) -> None:
    """Allows intervention class ``cls`` in specs under ``name``.

    Args:
      name: The operation name written to JSON.
      cls: The layer class (matched exactly, so subclasses register their own).
      to_json: ``to_json(layer, put_array) -> params``: JSON-compatible parameters;
        ``put_array(array)`` stores an array (or named array) and returns its JSON reference.
      from_json: ``from_json(params, get_array) -> layer``; ``get_array(ref, field)`` returns
        the stored array. Raise :class:`SpecError` (or any pzbridge error) on bad params.

    Raises:
      SpecError: If ``name`` or ``cls`` is already registered.

    Example:
        >>> "AddVector" in spec_operations()
        True
    """
    if name in _REGISTRY or any(op.cls is cls for op in _REGISTRY.values()):
        raise SpecError(f"register_spec_operation: {name!r} / {cls.__name__} is already registered. "
                        "Fix: pick another name, or register each class once.")
    _REGISTRY[name] = _Operation(name, cls, to_json, from_json)


def spec_operations() -> list[str]:
    """The registered operation names (the allow-list).

    Example:
        >>> sorted(spec_operations())[:2]
        ['Ablate', 'AddVector']
    """
    return list(_REGISTRY)


def _check_fields(data: Any, allowed: tuple[str, ...], where: str, required: tuple[str, ...] = ()) -> None:
    if not isinstance(data, Mapping):
        raise SpecError(f"{where}: expected a JSON object, found {type(data).__name__}. "
                        "Fix: write specs with Spec.to_json / save_spec.")
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        raise SpecError(f"{where}: unknown fields {unknown}; expected some of {list(allowed)}. Fix: remove them.")
    missing = [k for k in required if k not in data]
    if missing:
        raise SpecError(f"{where}: missing fields {missing}. Fix: add them (see docs/specs.md).")


@dataclasses.dataclass(frozen=True)
class Spec:
    """An ordered list of ``(site, intervention, side)`` edits that re-applies to any model.

    Attributes:
      edits: ``(Where, layer, side)`` triples; ``side`` is ``"after"`` or ``"before"``.

    Example:
        >>> import pzbridge as pzb
        >>> from pzbridge.toolshed import ZeroAblation
        >>> model = pzb.nn.Sequential([pzb.nn.Identity()])
        >>> edited = Spec().add(Where(layer="Identity"), ZeroAblation()).apply(model)
        >>> [type(l).__name__ for l in edited.sublayers]
        ['Identity', 'ZeroAblation']
    """

    edits: tuple[tuple[Where, Layer, str], ...] = ()

    def add(self, site: Where, intervention: Layer, *, side: str | None = None) -> Spec:
        """A new spec with one more edit (the intervention's class must be registered).

        ``side`` (``"after"`` / ``"before"``) defaults to the ``Where``'s own side.

        Raises:
          SpecError: If ``site`` is not a ``Where``, the class is not registered or ``side`` is invalid.
        """
        if not isinstance(site, Where):
            raise SpecError(f"Spec.add: the site must be a Where, found {type(site).__name__}. "
                            "Fix: Where(layer=...), Where(path=...) or Where(label=...).")
        _operation_of(intervention)
        side = site.side if side is None else side
        if side not in ("after", "before"):
            raise SpecError(f"Spec.add: side must be 'after' or 'before', found {side!r}.")
        return Spec((*self.edits, (dataclasses.replace(site, side=side), intervention, side)))

    def apply(self, model: Any, *, share_state: bool = False) -> Any:
        """Inserts every edit, in order, into a copy of ``model`` (see ``insert_intervention``)."""
        for site, intervention, side in self.edits:
            model = insert_intervention(model, site, intervention, share_state=share_state)  # site.side is side.
        return model

    def to_json(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """``(JSON-compatible dict, {name: array})``: what :func:`save_spec` writes."""
        arrays: dict[str, np.ndarray] = {}

        def put_array(value: Any) -> dict[str, Any]:
            name = f"a{len(arrays)}"
            if nx.is_namedarray(value):
                if value.positional_shape:
                    raise SpecError("Spec.to_json: a named array with positional axes cannot be saved. "
                                    "Fix: tag every axis (pzb.nx.wrap(data, *names)).")
                names = list(value.named_shape)  # Kept in order: the rebuilt array equals the saved one.
                arrays[name] = np.asarray(value.unwrap(*names))
                return {"array": name, "axes": names}
            arrays[name] = np.asarray(value)
            return {"array": name, "axes": None}

        edits = []
        for site, intervention, side in self.edits:
            op = _operation_of(intervention)
            edits.append({"site": site.to_json(), "operation": op.name, "params": op.to_json(intervention, put_array),
                          "side": side})
        return {"format": SPEC_FORMAT, "version": SPEC_VERSION, "edits": edits}, arrays

    @classmethod
    def from_json(cls, data: Any, arrays: Mapping[str, np.ndarray]) -> Spec:
        """Rebuilds a spec from :meth:`to_json`'s output; executes no code.

        Raises:
          SpecError: For anything malformed, naming the field and the fix.
        """
        _check_fields(data, _TOP_FIELDS, "spec", required=_TOP_FIELDS)
        if data["format"] != SPEC_FORMAT or data["version"] != SPEC_VERSION or type(data["version"]) is not int:
            raise SpecError(f"spec: format/version {data['format']!r}/{data['version']!r} is not supported, expected "
                            f"{SPEC_FORMAT!r}/{SPEC_VERSION}. Fix: write the spec with this version of pzbridge.")
        if not isinstance(data["edits"], list):
            raise SpecError(f"spec.edits: expected a list, found {type(data['edits']).__name__}.")
        used: set[str] = set()
        edits = [_edit_from_json(i, edit, arrays, used) for i, edit in enumerate(data["edits"])]
        unused = sorted(set(arrays) - used)
        if unused:
            raise SpecError(f"spec: arrays {unused} are not referenced by any edit. Fix: save the spec again.")
        return cls(tuple(edits))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Spec) or len(self.edits) != len(other.edits):
            return NotImplemented if not isinstance(other, Spec) else False
        return all(a[0] == b[0] and a[2] == b[2] and tree_equal(a[1], b[1]) for a, b in zip(self.edits, other.edits))

    __hash__ = None  # type: ignore[assignment]


def _operation_of(layer: Any) -> _Operation:
    for op in _REGISTRY.values():
        if type(layer) is op.cls:
            return op
    raise SpecError(f"spec: {type(layer).__name__} is not a registered spec operation (registered: "
                    f"{spec_operations()}). Fix: register it with register_spec_operation(name, cls, to_json, "
                    "from_json).")


def _edit_from_json(i: int, edit: Any, arrays: Mapping[str, np.ndarray], used: set[str]) -> tuple[Where, Layer, str]:
    where = f"spec.edits[{i}]"
    _check_fields(edit, _EDIT_FIELDS, where, required=_EDIT_FIELDS)
    name, side, params = edit["operation"], edit["side"], edit["params"]
    if not isinstance(name, str) or name not in _REGISTRY:
        raise SpecError(f"{where}.operation: {name!r} is not an allowed operation (allowed: {spec_operations()}). "
                        "Fix: use a registered name, or register_spec_operation(...) before loading.")
    if side not in ("after", "before"):
        raise SpecError(f"{where}.side: expected 'after' or 'before', found {side!r}.")
    if not isinstance(params, Mapping):
        raise SpecError(f"{where}.params: expected a JSON object, found {type(params).__name__}.")

    def get_array(ref: Any, field: str) -> Any:
        _check_fields(ref, _ARRAY_FIELDS, f"{where}.params.{field}", required=_ARRAY_FIELDS)
        key, axes = ref["array"], ref["axes"]
        if not isinstance(key, str) or key not in arrays:
            raise SpecError(f"{where}.params.{field}: array {key!r} is not in the arrays file. Fix: keep "
                            "spec.json and arrays.npz from the same save_spec call.")
        data = np.asarray(arrays[key])
        if data.dtype == object:
            raise SpecError(f"{where}.params.{field}: object arrays are not allowed.")
        used.add(key)
        if axes is None:
            return jnp.asarray(data)
        if (not isinstance(axes, list) or len(axes) != data.ndim or len(set(map(str, axes))) != len(axes)
                or not all(isinstance(a, str) and a for a in axes)):
            raise SpecError(f"{where}.params.{field}.axes: expected {data.ndim} distinct axis names for an array of "
                            f"shape {data.shape}, found {axes!r}.")
        return nx.wrap(jnp.asarray(data), *axes)

    try:
        site = Where.from_json(edit["site"])
        if site.side != side:
            raise SpecError(f"{where}: site.side {site.side!r} differs from side {side!r}. Fix: make them agree.")
        layer = _REGISTRY[name].from_json(params, get_array)
    except SpecError:
        raise
    except Exception as error:  # noqa: BLE001 - constructors reject bad values; report them as spec errors.
        raise SpecError(f"{where}: {type(error).__name__}: {error}") from None
    return site, layer, side


def save_spec(spec: Spec, directory: str | os.PathLike) -> None:
    """Writes ``spec.json`` and ``arrays.npz`` into ``directory`` (created if needed).

    Example:
        >>> import tempfile
        >>> from pzbridge.toolshed import ZeroAblation
        >>> with tempfile.TemporaryDirectory() as d:
        ...     save_spec(Spec().add(Where(layer="Linear"), ZeroAblation()), d)
        ...     load_spec(d).edits[0][1]
        ZeroAblation(mode='zero', axes=(), mask=None)
    """
    data, arrays = spec.to_json()
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "spec.json"), "w") as f:
        json.dump(data, f, indent=1)
    np.savez(os.path.join(directory, "arrays.npz"), **arrays)


def load_spec(directory: str | os.PathLike) -> Spec:
    """Reads what :func:`save_spec` wrote; no pickle, no code.

    Raises:
      SpecError: If a file is missing or malformed.
    """
    try:
        with open(os.path.join(directory, "spec.json")) as f:
            data = json.load(f)
        with np.load(os.path.join(directory, "arrays.npz"), allow_pickle=False) as stored:
            arrays = {k: stored[k] for k in stored.files}
    except (OSError, ValueError) as error:
        raise SpecError(f"load_spec({os.fspath(directory)!r}): {error}. Fix: point at a directory save_spec wrote.") \
            from None
    return Spec.from_json(data, arrays)


# -- The built-in operations ------------------------------------------------------------

def _check_params(params: Mapping[str, Any], allowed: tuple[str, ...], name: str) -> None:
    _check_fields(params, allowed, f"{name}.params")


def _number(params: Mapping[str, Any], field: str, default: float) -> float:
    value = params.get(field, default)
    if type(value) not in (int, float):
        raise SpecError(f"params.{field}: expected a number, found {value!r}.")
    return float(value)


def _maybe_array(params: Mapping[str, Any], field: str, get_array: Callable[[Any, str], Any]) -> Any:
    ref = params.get(field)
    return None if ref is None else get_array(ref, field)


def _ablate_to_json(layer: Ablate, put_array: Callable[[Any], Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"mode": layer.mode, "axes": list(layer.axes)}
    if layer.mask is not None:
        out["mask"] = put_array(layer.mask)
    return out


def _ablate_from_json(params: Mapping[str, Any], get_array: Callable[[Any, str], Any]) -> Ablate:
    _check_params(params, ("mode", "axes", "mask"), "Ablate")
    axes = params.get("axes", [])
    if not isinstance(axes, list) or not all(isinstance(a, str) for a in axes):
        raise SpecError(f"Ablate.params.axes: expected a list of axis names, found {axes!r}.")
    mode = params.get("mode", "zero")
    if not isinstance(mode, str):
        raise SpecError(f"Ablate.params.mode: expected a string, found {mode!r}.")
    return Ablate(mode, tuple(axes), _maybe_array(params, "mask", get_array))


def _zero_from_json(params: Mapping[str, Any], get_array: Callable[[Any, str], Any]) -> ZeroAblation:
    _check_params(params, ("mode", "axes", "mask"), "ZeroAblation")
    if params.get("mode", "zero") != "zero" or params.get("axes", []) != []:
        raise SpecError("ZeroAblation.params: mode must be 'zero' and axes empty. Fix: use Ablate for mean ablation.")
    return ZeroAblation(mask=_maybe_array(params, "mask", get_array))


def _add_to_json(layer: AddVector, put_array: Callable[[Any], Any]) -> dict[str, Any]:
    return {"vector": put_array(layer.vector), "scale": float(layer.scale)}


def _add_from_json(params: Mapping[str, Any], get_array: Callable[[Any, str], Any]) -> AddVector:
    _check_params(params, ("vector", "scale"), "AddVector")
    if "vector" not in params:
        raise SpecError("AddVector.params: missing field 'vector'.")
    return AddVector(get_array(params["vector"], "vector"), _number(params, "scale", 1.0))


def _patch_to_json(layer: Patch, put_array: Callable[[Any], Any]) -> dict[str, Any]:
    out = {"values": put_array(layer.values)}
    if layer.mask is not None:
        out["mask"] = put_array(layer.mask)
    return out


def _patch_from_json(params: Mapping[str, Any], get_array: Callable[[Any, str], Any]) -> Patch:
    _check_params(params, ("values", "mask"), "Patch")
    if "values" not in params:
        raise SpecError("Patch.params: missing field 'values'.")
    return Patch(get_array(params["values"], "values"), _maybe_array(params, "mask", get_array))


register_spec_operation("Ablate", Ablate, _ablate_to_json, _ablate_from_json)
register_spec_operation("ZeroAblation", ZeroAblation, _ablate_to_json, _zero_from_json)
register_spec_operation("AddVector", AddVector, _add_to_json, _add_from_json)
register_spec_operation("Patch", Patch, _patch_to_json, _patch_from_json)
