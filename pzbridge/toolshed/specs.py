"""Intervention specs as data: a JSON file (and an ``.npz`` of arrays) that re-applies to a fresh lift.

A :class:`Spec` is a list of edits of two kinds:

- an intervention layer at a site (a :class:`~pzbridge.toolshed.where.Where`,
  written with ``Where.to_json``): :meth:`Spec.add`, re-applied with
  ``insert_intervention``;
- a recorded call of a toolshed function (``steer``, ``ablate``,
  ``patch_worlds``, ``patch_paths``, ``interchange``, ``constrain_sharding``,
  ...) with data arguments: :meth:`Spec.record`, re-applied by making the same
  call on the new model (see :mod:`pzbridge.toolshed.spec_calls`).

:func:`save_spec` writes ``spec.json`` (format version, sites, operation
and function names, scalar parameters) and ``arrays.npz`` (vectors, masks,
keys, variables' values) into a directory; :func:`load_spec` reads them back
and :meth:`Spec.apply` makes the edits on a model, e.g. a freshly lifted one
of the same architecture.

Loading executes no code: JSON only, ``np.load(allow_pickle=False)``, and
operations and functions come from allow-lists (:func:`register_spec_operation`,
:func:`~pzbridge.toolshed.spec_calls.register_spec_function`) keyed by name,
never from an import path. Anything unexpected (an unknown field, operation,
function or array, a wrong type, another format version) raises
:class:`SpecError` naming the field and the fix; so does adding something
that is code rather than data (a Python function). Only core and nn are
imported, and the toolshed modules the operations describe
(docs/architecture.md, "Layers of the package").

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

import numpy as np

from pzbridge.core.state_copy import fresh_state
from pzbridge.nn.layer import Layer
from pzbridge.toolshed import spec_layers  # noqa: F401 - registers the built-in operations.
from pzbridge.toolshed.interventions import insert_intervention
from pzbridge.toolshed.spec_calls import (
    SpecCall,
    register_spec_function,
    spec_functions,
)
from pzbridge.toolshed.spec_codec import (
    SpecError,
    SpecReader,
    SpecWriter,
    check_fields,
    operation_of,
    register_spec_operation,
    registered_operation,
    spec_operations,
)
from pzbridge.toolshed.steering import Steer
from pzbridge.toolshed.where import Where

__all__ = [
    "Spec",
    "SpecCall",
    "SpecError",
    "load_spec",
    "register_spec_function",
    "register_spec_operation",
    "save_spec",
    "spec_functions",
    "spec_operations",
]

SPEC_FORMAT = "pzbridge.intervention_spec"
SPEC_VERSION = 1
_TOP_FIELDS = ("format", "version", "edits")
_EDIT_FIELDS = ("site", "operation", "params", "side")

Edit = tuple[Where, Layer, str] | SpecCall
"""One edit of a :class:`Spec`: ``(site, layer, side)`` or a recorded call."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """An ordered list of edits that re-applies to any model of the same architecture.

    Attributes:
      edits: ``(Where, layer, side)`` triples (``side`` is ``"after"`` or
        ``"before"``) and :class:`~pzbridge.toolshed.spec_calls.SpecCall` s, applied in order.

    Example:
        >>> import pzbridge as pzb
        >>> from pzbridge.toolshed import ZeroAblation
        >>> model = pzb.nn.Sequential([pzb.nn.Identity()])
        >>> edited = Spec().add(Where(layer="Identity"), ZeroAblation()).apply(model)
        >>> [type(l).__name__ for l in edited.sublayers]
        ['Identity', 'ZeroAblation']
    """

    edits: tuple[Edit, ...] = ()

    def add(self, site: Where, intervention: Layer, *, side: str | None = None) -> Spec:
        """A new spec with one more edit (the intervention's class must be registered).

        ``side`` (``"after"`` / ``"before"``) defaults to the ``Where``'s own side.

        Raises:
          SpecError: If ``site`` is not a ``Where``, the class (or one nested in it) is not registered or
            holds a function, or ``side`` is invalid.
        """
        if not isinstance(site, Where):
            raise SpecError(f"Spec.add: the site must be a Where, found {type(site).__name__}. "
                            "Fix: Where(layer=...), Where(path=...) or Where(label=...).")
        SpecWriter().layer(intervention)  # Refuses what cannot be data now, not when saving.
        side = site.side if side is None else side
        if side not in ("after", "before"):
            raise SpecError(f"Spec.add: side must be 'after' or 'before', found {side!r}.")
        return Spec((*self.edits, (dataclasses.replace(site, side=side), intervention, side)))

    def record(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Spec:
        """A new spec with one more edit: the call ``fn(model, *args, **kwargs)`` of a registered function.

        Example:
            >>> import jax.numpy as jnp, pzbridge as pzb
            >>> from pzbridge.toolshed import steer
            >>> model = pzb.nn.Sequential([pzb.nn.Identity()])
            >>> spec = Spec().record(steer, Where(layer="Identity"), pzb.nx.wrap(jnp.ones(1), "f"), positions="last")
            >>> spec.apply(model)(pzb.nx.zeros({"seq": 2, "f": 1})).unwrap("seq", "f").tolist()
            [[0.0], [1.0]]

        Raises:
          SpecError: For an unregistered function, arguments it does not take, a site that is not a
            ``Where``, or an argument that is code (a function).
        """
        return Spec((*self.edits, SpecCall.of(fn, *args, **kwargs)))

    def apply(self, model: Any, *, share_state: bool = False) -> Any:
        """Makes every edit, in order, on a copy of ``model``.

        A layer edit inserts the layer with fresh copies of its state variables (a steering counter), so
        running the result never moves the spec's values and every ``apply`` starts from the saved state.
        ``share_state=True`` keeps the model's and the spec's state objects instead.
        """
        for edit in self.edits:
            if isinstance(edit, SpecCall):
                model = edit.apply(model)
            else:
                site, intervention, _ = edit  # site.side is the side.
                _check_one_counter(model, site, intervention)
                layer = intervention if share_state else fresh_state(intervention)
                model = insert_intervention(model, site, layer, share_state=share_state)
        return model

    def to_json(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """``(JSON-compatible dict, {name: array})``: what :func:`save_spec` writes."""
        put = SpecWriter()
        edits = []
        for edit in self.edits:
            if isinstance(edit, SpecCall):
                edits.append(edit.to_json(put))
                continue
            site, intervention, side = edit
            op = operation_of(intervention)
            edits.append({"site": site.to_json(), "operation": op.name, "params": op.to_json(intervention, put),
                          "side": side})
        return {"format": SPEC_FORMAT, "version": SPEC_VERSION, "edits": edits}, put.arrays

    @classmethod
    def from_json(cls, data: Any, arrays: Mapping[str, np.ndarray]) -> Spec:
        """Rebuilds a spec from :meth:`to_json`'s output; executes no code.

        Raises:
          SpecError: For anything malformed, naming the field and the fix.
        """
        check_fields(data, _TOP_FIELDS, "spec", required=_TOP_FIELDS)
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
        # Equal data form: layers holding variables (identity-equal objects) compare by their values and labels.
        if not isinstance(other, Spec):
            return NotImplemented
        (mine, my_arrays), (theirs, their_arrays) = self.to_json(), other.to_json()
        return mine == theirs and my_arrays.keys() == their_arrays.keys() and all(
            my_arrays[k].dtype == their_arrays[k].dtype and np.array_equal(my_arrays[k], their_arrays[k], equal_nan=True)
            for k in my_arrays)

    __hash__ = None  # type: ignore[assignment]


def _check_one_counter(model: Any, site: Where, layer: Layer) -> None:
    """A decoding counter advances once per call: one object at several sites would advance several times."""
    if isinstance(layer, Steer) and layer.position is not None:
        count = site.select(model).count()
        if count > 1:
            raise SpecError(
                f"Spec.apply: {site.describe()} selects {count} layers, but the Steer holds one decoding counter "
                f"({layer.position.label!r}), which every site would advance. Fix: record the call instead, "
                "Spec().record(steer, site, vector, positions=...), which gives each site its own counter, or "
                "narrow the Where to one layer.")


def _edit_from_json(i: int, edit: Any, arrays: Mapping[str, np.ndarray], used: set[str]) -> Edit:
    where = f"spec.edits[{i}]"
    get = SpecReader(arrays, where, used)
    try:
        if isinstance(edit, Mapping) and "call" in edit:
            return SpecCall.from_json(edit, get)
        check_fields(edit, _EDIT_FIELDS, where, required=_EDIT_FIELDS)
        name, side, params = edit["operation"], edit["side"], edit["params"]
        op = registered_operation(name, where)
        if side not in ("after", "before"):
            raise SpecError(f"{where}.side: expected 'after' or 'before', found {side!r}.")
        if not isinstance(params, Mapping):
            raise SpecError(f"{where}.params: expected a JSON object, found {type(params).__name__}.")
        site = Where.from_json(edit["site"])
        if site.side != side:
            raise SpecError(f"{where}: site.side {site.side!r} differs from side {side!r}. Fix: make them agree.")
        layer = op.from_json(params, SpecReader(arrays, f"{where}.params", used))
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
