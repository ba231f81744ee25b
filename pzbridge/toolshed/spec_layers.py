"""The intervention layers specs can hold: one ``to_json`` / ``from_json`` pair per class, registered on import.

Covered: ``Ablate``, ``ZeroAblation``, ``AddVector``, ``Patch``, ``AtIndex``
(the intervention nested inside it), ``Resample`` (reference values and its
random key), ``Steer`` (the edit inside, positions and the decoding counter),
``RouteWorlds``, ``SelectWorlds``, ``TransferWorlds`` and
``ConstrainSharding`` (its rules and mesh). The trainable interchange layers
register themselves in :mod:`pzbridge.toolshed.trainable`. ``InterveneWith``
holds a Python function and is refused with the fix. Every ``from_json``
checks each field before a constructor sees it. Only core and nn are
imported, and the toolshed modules whose layers are described here.

Example:
    >>> from pzbridge.toolshed.spec_codec import SpecReader, SpecWriter
    >>> put = SpecWriter()
    >>> ref = put.layer(RouteWorlds((1, 1)))
    >>> ref
    {'operation': 'RouteWorlds', 'params': {'routes': [1, 1], 'axis': 'worlds'}}
    >>> SpecReader(put.arrays, "spec").layer(ref, "layer")
    RouteWorlds(routes=(1, 1), axis='worlds')
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh

from pzbridge.core.variables import StateVariable
from pzbridge.toolshed.ablation import Resample
from pzbridge.toolshed.interventions import (
    Ablate,
    AddVector,
    AtIndex,
    InterveneWith,
    Patch,
    ZeroAblation,
)
from pzbridge.toolshed.path_patching import SelectWorlds, TransferWorlds
from pzbridge.toolshed.sharding import ConstrainSharding, ShardingRules
from pzbridge.toolshed.spec_codec import (
    SpecError,
    SpecReader,
    SpecWriter,
    check_fields,
    refuse_in_specs,
    register_spec_operation,
    register_spec_value,
)
from pzbridge.toolshed.steering import Steer
from pzbridge.toolshed.where import AxisSlice, Where
from pzbridge.toolshed.worlds import RouteWorlds

__all__: list[str] = []  # Importing the module registers the operations; it exports nothing.


# -- field readers: each names the field and what was expected -------------------------------------


def _params(params: Mapping[str, Any], name: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> None:
    check_fields(params, allowed, f"{name}.params", required)


def _number(params: Mapping[str, Any], field: str, default: float) -> float:
    value = params.get(field, default)
    if type(value) not in (int, float):
        raise SpecError(f"params.{field}: expected a number, found {value!r}.")
    return float(value)


def _string(params: Mapping[str, Any], field: str, name: str, default: str | None = None) -> str:
    value = params.get(field, default)
    if not isinstance(value, str):
        raise SpecError(f"{name}.params.{field}: expected a string, found {value!r}.")
    return value


def _ints(params: Mapping[str, Any], field: str, name: str) -> tuple[int, ...]:
    value = params.get(field)
    if not isinstance(value, list) or not all(type(v) is int for v in value):
        raise SpecError(f"{name}.params.{field}: expected a list of ints, found {value!r:.80}.")
    return tuple(value)


def _maybe_array(params: Mapping[str, Any], field: str, get: SpecReader) -> Any:
    ref = params.get(field)
    return None if ref is None else get(ref, field)


def _where(params: Mapping[str, Any], field: str, get: SpecReader, name: str) -> Where | None:
    value = get.value(params.get(field), field)
    if value is not None and not isinstance(value, Where):
        raise SpecError(f"{name}.params.{field}: expected a Where, found {type(value).__name__}.")
    return value


# -- interventions.py -----------------------------------------------------------------------------


def _ablate_to_json(layer: Ablate, put: SpecWriter) -> dict[str, Any]:
    out: dict[str, Any] = {"mode": layer.mode, "axes": list(layer.axes)}
    if layer.mask is not None:
        out["mask"] = put(layer.mask)
    return out


def _ablate_from_json(params: Mapping[str, Any], get: SpecReader) -> Ablate:
    _params(params, "Ablate", ("mode", "axes", "mask"))
    axes = params.get("axes", [])
    if not isinstance(axes, list) or not all(isinstance(a, str) for a in axes):
        raise SpecError(f"Ablate.params.axes: expected a list of axis names, found {axes!r}.")
    return Ablate(_string(params, "mode", "Ablate", "zero"), tuple(axes), _maybe_array(params, "mask", get))


def _zero_from_json(params: Mapping[str, Any], get: SpecReader) -> ZeroAblation:
    _params(params, "ZeroAblation", ("mode", "axes", "mask"))
    if params.get("mode", "zero") != "zero" or params.get("axes", []) != []:
        raise SpecError("ZeroAblation.params: mode must be 'zero' and axes empty. Fix: use Ablate for mean ablation.")
    return ZeroAblation(mask=_maybe_array(params, "mask", get))


def _add_to_json(layer: AddVector, put: SpecWriter) -> dict[str, Any]:
    return {"vector": put(layer.vector), "scale": float(layer.scale)}


def _add_from_json(params: Mapping[str, Any], get: SpecReader) -> AddVector:
    _params(params, "AddVector", ("vector", "scale"), ("vector",))
    return AddVector(get(params["vector"], "vector"), _number(params, "scale", 1.0))


def _patch_to_json(layer: Patch, put: SpecWriter) -> dict[str, Any]:
    out = {"values": put(layer.values)}
    if layer.mask is not None:
        out["mask"] = put(layer.mask)
    return out


def _patch_from_json(params: Mapping[str, Any], get: SpecReader) -> Patch:
    _params(params, "Patch", ("values", "mask"), ("values",))
    return Patch(get(params["values"], "values"), _maybe_array(params, "mask", get))


def _at_index_to_json(layer: AtIndex, put: SpecWriter) -> dict[str, Any]:
    return {"intervention": put.layer(layer.intervention), "at": put.value(layer.at)}


def _at_index_from_json(params: Mapping[str, Any], get: SpecReader) -> AtIndex:
    _params(params, "AtIndex", ("intervention", "at"), ("intervention", "at"))
    at = _where(params, "at", get, "AtIndex")
    if at is None:
        raise SpecError("AtIndex.params.at: expected a Where, found null.")
    return AtIndex(get.layer(params["intervention"], "intervention"), at)


# -- ablation.py, steering.py --------------------------------------------------------------------


def _resample_to_json(layer: Resample, put: SpecWriter) -> dict[str, Any]:
    return {"values": put(layer.values), "key": put(layer.key), "axis": layer.axis}


def _resample_from_json(params: Mapping[str, Any], get: SpecReader) -> Resample:
    _params(params, "Resample", ("values", "key", "axis"), ("values", "key"))
    key = get(params["key"], "key")
    if not (isinstance(key, jax.Array) and jax.numpy.issubdtype(key.dtype, jax.dtypes.prng_key)):
        raise SpecError("Resample.params.key: expected a random key (saved with its impl), found an array. "
                        "Fix: build the layer with jax.random.key(...).")
    return Resample(get(params["values"], "values"), key, _string(params, "axis", "Resample", "batch"))


def _steer_to_json(layer: Steer, put: SpecWriter) -> dict[str, Any]:
    out = {"edit": put.layer(layer.edit), "positions": put.value(layer.positions), "seq_axis": layer.seq_axis}
    if layer.position is not None:
        out["position"] = put(layer.position)
    return out


def _positions(value: Any) -> Any:
    if value in ("all", "last") or isinstance(value, AxisSlice):
        return value
    if isinstance(value, tuple) and all(type(p) is int for p in value):
        return value
    raise SpecError(f"Steer.params.positions: expected 'all', 'last', a tuple of ints or an axis slice, found "
                    f"{value!r:.80}. Fix: save the spec again.")


def _steer_from_json(params: Mapping[str, Any], get: SpecReader) -> Steer:
    _params(params, "Steer", ("edit", "positions", "position", "seq_axis"), ("edit", "positions"))
    counter = params.get("position")
    if counter is not None:
        counter = get(counter, "position")
        if not isinstance(counter, StateVariable):
            raise SpecError(f"Steer.params.position: expected a StateVariable counter, found {type(counter).__name__}.")
    return Steer(get.layer(params["edit"], "edit"), _positions(get.value(params["positions"], "positions")), counter,
                 _string(params, "seq_axis", "Steer", "seq"))


# -- worlds.py, path_patching.py -----------------------------------------------------------------


def _route_to_json(layer: RouteWorlds, put: SpecWriter) -> dict[str, Any]:
    return {"routes": list(layer.routes), "axis": layer.axis}


def _route_from_json(params: Mapping[str, Any], get: SpecReader) -> RouteWorlds:
    _params(params, "RouteWorlds", ("routes", "axis"), ("routes",))
    return RouteWorlds(_ints(params, "routes", "RouteWorlds"), _string(params, "axis", "RouteWorlds", "worlds"))


def _select_to_json(layer: SelectWorlds, put: SpecWriter) -> dict[str, Any]:
    return {"indices": list(layer.indices), "size": layer.size, "axis": layer.axis}


def _select_from_json(params: Mapping[str, Any], get: SpecReader) -> SelectWorlds:
    _params(params, "SelectWorlds", ("indices", "size", "axis"), ("indices", "size"))
    if type(params["size"]) is not int:
        raise SpecError(f"SelectWorlds.params.size: expected an int, found {params['size']!r}.")
    return SelectWorlds(_ints(params, "indices", "SelectWorlds"), params["size"],
                        _string(params, "axis", "SelectWorlds", "worlds"))


def _transfer_to_json(layer: TransferWorlds, put: SpecWriter) -> dict[str, Any]:
    return {"targets": list(layer.targets), "plus": list(layer.plus), "minus": list(layer.minus),
            "at": put.value(layer.at), "site": layer.site, "axis": layer.axis}


def _transfer_from_json(params: Mapping[str, Any], get: SpecReader) -> TransferWorlds:
    name = "TransferWorlds"
    _params(params, name, ("targets", "plus", "minus", "at", "site", "axis"), ("targets", "plus", "minus"))
    return TransferWorlds(_ints(params, "targets", name), _ints(params, "plus", name), _ints(params, "minus", name),
                          _where(params, "at", get, name), _string(params, "site", name, ""),
                          _string(params, "axis", name, "worlds"))


# -- sharding.py: the rules as pairs, a mesh by axis names, sizes and device ids ------------------


def _rules_encode(rules: ShardingRules, put: SpecWriter) -> Any:
    return [[name, put.value(axes)] for name, axes in rules.rules]


def _rules_decode(data: Any, get: SpecReader, field: str) -> ShardingRules:
    if not isinstance(data, list) or not all(isinstance(p, list) and len(p) == 2 for p in data):
        raise SpecError(f"{get.where}.{field}: expected [[axis name, mesh axes], ...], found {data!r:.80}.")
    return ShardingRules(tuple((name, get.value(axes, f"{field}.{name}")) for name, axes in data))


def _axis_types(names: Any, field: str, get: SpecReader) -> tuple[AxisType, ...]:
    if not isinstance(names, list) or not all(isinstance(n, str) and n in AxisType.__members__ for n in names):
        raise SpecError(f"{get.where}.{field}.axis_types: expected names among {list(AxisType.__members__)}, "
                        f"found {names!r:.80}.")
    return tuple(AxisType[n] for n in names)


def _mesh_shape(data: Any, get: SpecReader, field: str, fields: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    check_fields(data, fields, f"{get.where}.{field}", required=fields)
    names, shape = data["axis_names"], data["shape"]
    if (not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not isinstance(shape, list)
            or len(shape) != len(names) or not all(type(s) is int and s > 0 for s in shape)):
        raise SpecError(f"{get.where}.{field}: expected axis names and as many positive sizes, found {names!r} and "
                        f"{shape!r}.")
    return tuple(names), tuple(shape)


def _mesh_encode(mesh: Mesh, put: SpecWriter) -> Any:
    return {"axis_names": list(mesh.axis_names), "shape": list(mesh.devices.shape),
            "devices": [int(d.id) for d in mesh.devices.flat], "axis_types": [t.name for t in mesh.axis_types]}


def _mesh_decode(data: Any, get: SpecReader, field: str) -> Mesh:
    names, shape = _mesh_shape(data, get, field, ("axis_names", "shape", "devices", "axis_types"))
    ids = data["devices"]
    by_id = {d.id: d for d in jax.devices()}
    if not isinstance(ids, list) or len(ids) != int(np.prod(shape)) or not all(i in by_id for i in ids):
        raise SpecError(f"{get.where}.{field}: the mesh needs devices {ids!r:.80} in shape {shape}, but this process "
                        f"has devices {sorted(by_id)}. Fix: load the spec where those devices exist, or save it with "
                        "mesh=None and call the model under jax.set_mesh(mesh).")
    devices = np.array([by_id[i] for i in ids], dtype=object).reshape(shape)
    return Mesh(devices, names, axis_types=_axis_types(data["axis_types"], field, get))


def _abstract_mesh_encode(mesh: AbstractMesh, put: SpecWriter) -> Any:
    return {"axis_names": list(mesh.axis_names), "shape": list(mesh.axis_sizes),
            "axis_types": [t.name for t in mesh.axis_types]}


def _abstract_mesh_decode(data: Any, get: SpecReader, field: str) -> AbstractMesh:
    names, shape = _mesh_shape(data, get, field, ("axis_names", "shape", "axis_types"))
    return AbstractMesh(shape, names, axis_types=_axis_types(data["axis_types"], field, get))


def _constrain_to_json(layer: ConstrainSharding, put: SpecWriter) -> dict[str, Any]:
    return {"rules": put.value(layer.rules), "mesh": put.value(layer.mesh), "name": layer.name}


def _constrain_from_json(params: Mapping[str, Any], get: SpecReader) -> ConstrainSharding:
    _params(params, "ConstrainSharding", ("rules", "mesh", "name"), ("rules",))
    rules = get.value(params["rules"], "rules")
    mesh = get.value(params.get("mesh"), "mesh")
    if not isinstance(rules, ShardingRules) or not (mesh is None or isinstance(mesh, (Mesh, AbstractMesh))):
        raise SpecError(f"ConstrainSharding.params: expected sharding rules and a mesh or null, found "
                        f"{type(rules).__name__} and {type(mesh).__name__}.")
    return ConstrainSharding(rules, mesh, _string(params, "name", "ConstrainSharding", "ConstrainSharding"))


register_spec_value("sharding_rules", ShardingRules, _rules_encode, _rules_decode)
register_spec_value("mesh", Mesh, _mesh_encode, _mesh_decode)
register_spec_value("abstract_mesh", AbstractMesh, _abstract_mesh_encode, _abstract_mesh_decode)

register_spec_operation("Ablate", Ablate, _ablate_to_json, _ablate_from_json)
register_spec_operation("ZeroAblation", ZeroAblation, _ablate_to_json, _zero_from_json)
register_spec_operation("AddVector", AddVector, _add_to_json, _add_from_json)
register_spec_operation("Patch", Patch, _patch_to_json, _patch_from_json)
register_spec_operation("AtIndex", AtIndex, _at_index_to_json, _at_index_from_json)
register_spec_operation("Resample", Resample, _resample_to_json, _resample_from_json)
register_spec_operation("Steer", Steer, _steer_to_json, _steer_from_json)
register_spec_operation("RouteWorlds", RouteWorlds, _route_to_json, _route_from_json)
register_spec_operation("SelectWorlds", SelectWorlds, _select_to_json, _select_from_json)
register_spec_operation("TransferWorlds", TransferWorlds, _transfer_to_json, _transfer_from_json)
register_spec_operation("ConstrainSharding", ConstrainSharding, _constrain_to_json, _constrain_from_json)
refuse_in_specs(InterveneWith, (
    "spec: InterveneWith holds a Python function, which a spec cannot carry (a spec is data; loading runs no "
    "code). Fix: use a vector (steer(model, at, pzb.nx.wrap(v, 'features')) or AddVector), or write an "
    "intervention layer class holding data and register it with register_spec_operation(name, cls, to_json, "
    "from_json)."))
