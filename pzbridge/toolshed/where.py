"""``Where``: a small location language for capture and interventions, as plain data.

pyvene names a unit location by a layer, a component and unit indices;
pzbridge's selectors name places in a tree. A :class:`Where` is the bridge
between the two and is deliberately *data*: strings, ints and tuples only, a
frozen dataclass with :meth:`Where.to_json` / :meth:`Where.from_json`, so an
intervention spec can be saved and re-applied to a freshly lifted model
without executing code. It says:

- **which layers**, by any combination (all must hold) of
  ``layer`` (a class name: ``"Linear"``, or qualified
  ``"pzbridge.nn.linear.Linear"``; base classes count), ``path`` (the model
  path pzbridge prints in errors and capture keys, e.g.
  ``body.sublayers[2]``, matched dotted, ``[3]`` read as ``.3``, ``*``
  wildcards as in ``pzb.lift(axis_names=...)``), ``label`` (a pattern on the
  labels of the variables a layer holds directly, such as ``attns.0.W_O``, or
  on a saver's label; ``[i]`` reads as ``.i`` here too) and ``module`` (a pattern on the module path of a
  traced child call, ``attns.1``: the output of that call);
- **which side**: ``"after"`` (the layer's output) or ``"before"`` (its input);
- **which units**: ``index``, a named-axis index such as ``{"seq": 3}``,
  ``{"heads": (0, 2)}`` or ``{"seq": AxisSlice(1, None)}`` (a Python ``slice``
  is accepted and stored as an :class:`AxisSlice`). Interventions act only
  inside the index (a boolean mask built from the activation's sizes at run
  time); capture returns the indexed part.

A ``Where`` that selects nothing is an error naming what the model has, never
a silent no-op. Only core and nn are imported (docs/architecture.md, "Layers
of the package").

Example:
    >>> import jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> model = pzb.nn.Sequential([pzb.nn.Elementwise(jnp.exp), pzb.nn.Elementwise(jnp.negative)])
    >>> at = Where(path="sublayers[1]", index={"f": 0})
    >>> at.select(model).count(), at.to_json()["index"]
    (1, {'f': 0})
    >>> Where.from_json(at.to_json()) == at
    True
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import (
    NamedAxisError,
    PzbridgeError,
    SelectionError,
    format_path,
)
from pzbridge.core.selectors import KeyPath, Selection, select
from pzbridge.core.variables import (
    AbstractVariable,
    AbstractVariableSlot,
    AbstractVariableValue,
)
from pzbridge.nn.dataflow import CallChild
from pzbridge.nn.layer import Layer

__all__ = ["WHERE_FORMAT", "AxisSlice", "IndexEntry", "Where"]

WHERE_FORMAT = 1
"""Version of the JSON form written by :meth:`Where.to_json`."""

_SIDES = ("after", "before")
_VARIABLE_FORMS = (AbstractVariable, AbstractVariableValue, AbstractVariableSlot)
_FIELDS = ("layer", "path", "label", "module", "side", "index", "format")


@dataclasses.dataclass(frozen=True)
class AxisSlice:
    """A slice of one named axis, as data (``slice`` objects are not JSON).

    Attributes:
      start: First position (``None``: the start; negative counts from the end).
      stop: One past the last position (``None``: the end).
      step: Stride (``None``: 1; must not be 0).

    Example:
        >>> AxisSlice(1, None).positions(4)
        (1, 2, 3)
    """

    start: int | None = None
    stop: int | None = None
    step: int | None = None

    def __post_init__(self) -> None:
        for name in ("start", "stop", "step"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise PzbridgeError(
                    f"AxisSlice: {name} must be an int or None, found {type(value).__name__} {value!r}. "
                    "Fix: e.g. AxisSlice(1, 4) or slice(1, 4)."
                )
        if self.step == 0:
            raise PzbridgeError("AxisSlice: step must not be 0. Fix: use step=None or a non-zero int.")

    def positions(self, size: int) -> tuple[int, ...]:
        """The positions of an axis of ``size`` this slice covers."""
        return tuple(range(size)[slice(self.start, self.stop, self.step)])

    def as_slice(self) -> slice:
        """The equivalent Python ``slice``."""
        return slice(self.start, self.stop, self.step)


IndexEntry = int | tuple[int, ...] | AxisSlice
"""One axis's index in a :class:`Where`: a position, several positions, or a slice."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(axis: str, value: Any) -> IndexEntry:
    """Normalizes one index entry to the stored (hashable, JSON-able) form."""
    if _is_int(value):
        return value
    if isinstance(value, slice):
        return AxisSlice(value.start, value.stop, value.step)
    if isinstance(value, AxisSlice):
        return value
    if isinstance(value, (list, tuple)) and all(_is_int(v) for v in value):
        return tuple(value)
    raise PzbridgeError(
        f"Where: index[{axis!r}] must be an int, a list/tuple of ints or a slice, found "
        f"{type(value).__name__} {value!r:.60}. Fix: e.g. index={{'seq': 3}}, {{'heads': [0, 2]}} or "
        "{'seq': slice(1, None)}."
    )


def _normalized_path(text: str) -> str:
    """``body.sublayers[3].delta`` -> ``body.sublayers.3.delta``; ``<root>`` -> ``""``."""
    if text == "<root>":
        return ""
    return re.sub(r"\[([^\]]*)\]", r".\1", text).lstrip(".")


def _class_names(node: Any) -> set[str]:
    names: set[str] = set()
    for cls in type(node).__mro__:
        names.add(cls.__name__)
        names.add(f"{cls.__module__}.{cls.__qualname__}")
    return names


def _labels_held(node: Any) -> list[str]:
    """Labels of the variables ``node`` holds in its own fields (not inside sublayers), and its own label."""
    labels: list[str] = []
    own = getattr(node, "label", None)
    if isinstance(own, str):
        labels.append(own)
    for field in dataclasses.fields(node) if dataclasses.is_dataclass(node) else ():
        value = getattr(node, field.name, None)
        if isinstance(value, _VARIABLE_FORMS) and isinstance(getattr(value, "label", None), str):
            labels.append(value.label)
    return labels


def _module_paths(model: Any) -> dict[KeyPath, str]:
    """The module path (``attns.1``) of every traced child call in ``model``, keyed by its keypath."""
    found: dict[KeyPath, str] = {}
    _collect_calls(model, (), "", found)
    return found


def _collect_calls(node: Any, prefix: KeyPath, module: str, found: dict[KeyPath, str]) -> None:
    for path, call in select(node).at_instances_of(CallChild).get_by_path().items():
        name = _normalized_path(call.name)
        full = f"{module}.{name}" if module and name else (name or module)
        found[prefix + tuple(path)] = full
        _collect_calls(call.layer, prefix + tuple(path) + _attr_key("layer"), full, found)


def _attr_key(name: str) -> KeyPath:
    return (jax.tree_util.GetAttrKey(name),)


@dataclasses.dataclass(frozen=True)
class Where:
    """A location in a lifted model: which layers, which side, which units. Plain data.

    Every given criterion must hold (an empty string means "any"); at least
    one of ``layer``, ``path``, ``label``, ``module`` must be given. Among
    nested matches the outermost layer is selected, as selectors do.

    Attributes:
      layer: Class name of the layer (simple or qualified; base classes match).
      path: Pattern on the layer's model path (dotted, ``*`` wildcards).
      label: Pattern on a label of a variable the layer holds directly (or
        the layer's own ``label``).
      module: Pattern on the module path of a traced child call (``attns.1``).
      side: ``"after"`` (the output) or ``"before"`` (the input).
      index: ``((axis, entry), ...)``; build it from a mapping
        ``{"heads": [0, 2]}``. Empty: every unit.

    Example:
        >>> import pzbridge as pzb
        >>> model = pzb.nn.Sequential([pzb.nn.Identity(), pzb.nn.Residual(pzb.nn.Identity())])
        >>> [pzb.errors.format_path(p) for p in Where(layer="Identity").select(model).get_keypaths()]
        ['sublayers[0]', 'sublayers[1].delta']
    """

    layer: str = ""
    path: str = ""
    label: str = ""
    module: str = ""
    side: str = "after"
    index: tuple[tuple[str, IndexEntry], ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.layer, type):
            object.__setattr__(self, "layer", self.layer.__name__)
        for name in ("layer", "path", "label", "module"):
            if not isinstance(getattr(self, name), str):
                raise PzbridgeError(
                    f"Where: {name} must be a string, found {type(getattr(self, name)).__name__}. "
                    f"Fix: e.g. Where({name}='...')."
                )
        if self.side not in _SIDES:
            raise PzbridgeError(
                f"Where: side must be 'after' or 'before', found {self.side!r}. Fix: side='after' acts on the "
                "layer's output, side='before' on its input."
            )
        if not (self.layer or self.path or self.label or self.module):
            raise PzbridgeError(
                "Where: give at least one of layer=, path=, label=, module= (found none). Fix: e.g. "
                "Where(layer='AttendToValues') or Where(path='*.sublayers[2]')."
            )
        items = self.index.items() if isinstance(self.index, Mapping) else self.index
        index = []
        for pair in items:
            if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)):
                raise PzbridgeError(
                    f"Where: index must map axis names to entries, found {self.index!r:.80}. Fix: e.g. "
                    "index={'heads': [0, 2]}."
                )
            index.append((pair[0], _entry(pair[0], pair[1])))
        names = [axis for axis, _ in index]
        if len(set(names)) != len(names):
            raise PzbridgeError(f"Where: index names an axis twice ({names}). Fix: give each axis once.")
        object.__setattr__(self, "index", tuple(index))

    # -- matching -----------------------------------------------------------------

    def matches(self, keypath: KeyPath, node: Any, module: str | None = None) -> bool:
        """Whether the layer ``node`` at ``keypath`` is one this ``Where`` names.

        Args:
          keypath: The node's keypath in the model.
          node: The node.
          module: The module path of the node when it is a traced child call.

        Example:
            >>> import pzbridge as pzb
            >>> Where(layer="Identity").matches((), pzb.nn.Identity())
            True
        """
        if not isinstance(node, Layer):
            return False
        if self.layer and self.layer not in _class_names(node):
            return False
        if self.path and not fnmatch.fnmatchcase(_normalized_path(format_path(keypath)),
                                                 _normalized_path(self.path)):
            return False
        if self.label and not any(fnmatch.fnmatchcase(_normalized_path(text), _normalized_path(self.label))
                                  for text in _labels_held(node)):
            return False
        return not (self.module and (module is None or not fnmatch.fnmatchcase(module, _normalized_path(self.module))))

    def select(self, model: Any) -> Selection:
        """The layers of ``model`` this ``Where`` names, as a non-empty :class:`Selection`.

        Raises:
          SelectionError: If nothing matches; the message lists a few of the
            model's layer paths, classes and labels to choose from.

        Example:
            >>> import pzbridge as pzb
            >>> model = pzb.nn.Sequential([pzb.nn.Identity()])
            >>> Where(path="sublayers[0]").select(model).get() is model.sublayers[0]
            True
        """
        modules = _module_paths(model) if self.module else {}
        selection = select(model).at_subtrees_where(
            lambda path, node: self.matches(path, node, modules.get(tuple(path))), with_keypath=True
        )
        if selection.is_empty():
            layers = select(model).at_instances_of(Layer, innermost=True).get_by_path()
            sample = [f"{format_path(p)} ({type(n).__name__}{', ' + ', '.join(_labels_held(n)) if _labels_held(n) else ''})"
                      for p, n in list(layers.items())[:8]]
            hint = f"; traced child calls: {sorted(set(modules.values()))[:8]}" if self.module else ""
            raise SelectionError(
                f"{self.describe()} selects nothing in this model: expected at least one layer, found none. "
                f"Some of its layers: {sample}{hint}. Fix: match one of these paths (dotted, * wildcards), "
                "class names or labels."
            )
        return selection

    def describe(self) -> str:
        """A short text form for messages, e.g. ``Where(layer='Linear', side='before')``."""
        parts = [f"{name}={getattr(self, name)!r}" for name in ("layer", "path", "label", "module")
                 if getattr(self, name)]
        if self.side != "after":
            parts.append(f"side={self.side!r}")
        if self.index:
            parts.append(f"index={dict(self.index)}")
        return f"Where({', '.join(parts)})"

    # -- units ----------------------------------------------------------------------

    def index_mask(self, x: Any, where_: str = "") -> Any:
        """A boolean ``NamedArray`` over the indexed axes, true inside the index (None without one).

        Sizes come from ``x`` (the activation), so negative positions and
        slices resolve at run time; the mask is a constant under ``jax.jit``.

        Raises:
          NamedAxisError: If ``x`` lacks an indexed axis or a position is out of range.

        Example:
            >>> import pzbridge as pzb
            >>> Where(layer="Layer", index={"seq": -1}).index_mask(pzb.nx.zeros({"seq": 3})).unwrap("seq").tolist()
            [False, False, True]
        """
        if not self.index:
            return None
        sizes = self._sizes(x, where_)
        mask = None
        for axis, entry in self.index:
            keep = self.positions(axis, entry, sizes[axis], where_)
            vector = nx.wrap(jnp.isin(jnp.arange(sizes[axis]), jnp.asarray(keep, dtype=jnp.int32)), axis)
            mask = vector if mask is None else mask & vector
        return mask

    def take(self, x: Any, where_: str = "") -> Any:
        """The indexed part of ``x``: an int drops its axis, positions and slices keep it.

        Example:
            >>> import jax.numpy as jnp, pzbridge as pzb
            >>> x = pzb.nx.wrap(jnp.arange(4.0), "seq")
            >>> Where(layer="Layer", index={"seq": [0, 2]}).take(x).unwrap("seq").tolist()
            [0.0, 2.0]
        """
        if not self.index:
            return x
        sizes = self._sizes(x, where_)
        index: dict[str, Any] = {}
        for axis, entry in self.index:
            keep = self.positions(axis, entry, sizes[axis], where_)
            # A named index array keeps the axis under its own name (a plain array would make it positional).
            index[axis] = keep[0] if _is_int(entry) else nx.wrap(jnp.asarray(keep, dtype=jnp.int32), axis)
        return x[index]

    def _sizes(self, x: Any, where_: str) -> Mapping[str, int]:
        sizes = dict(x.named_shape) if nx.is_namedarray(x) else {}
        missing = [axis for axis, _ in self.index if axis not in sizes]
        if missing:
            raise NamedAxisError(
                f"{where_ or self.describe()}: the index names axes {missing} but the activation has named axes "
                f"{sizes} (positional shape {getattr(x, 'positional_shape', getattr(x, 'shape', ()))}). Fix: index "
                "axes the activation has (capture it first to see them), or choose another layer or side."
            )
        return sizes

    def positions(self, axis: str, entry: IndexEntry, size: int, where_: str = "") -> tuple[int, ...]:
        """The non-negative positions ``entry`` names on an axis of ``size``.

        Raises:
          NamedAxisError: If a position is outside ``[-size, size)``.

        Example:
            >>> Where(layer="Layer").positions("heads", (0, -1), 4)
            (0, 3)
        """
        if isinstance(entry, AxisSlice):
            return entry.positions(size)
        wanted = (entry,) if _is_int(entry) else entry
        bad = [p for p in wanted if not -size <= p < size]
        if bad:
            raise NamedAxisError(
                f"{where_ or self.describe()}: index[{axis!r}] has positions {bad} outside an axis of size {size}. "
                f"Fix: use positions in [-{size}, {size})."
            )
        return tuple(p % size for p in wanted)

    # -- data form ------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The JSON-compatible form: ``{"format": 1, "layer": ..., "index": {...}}`` (defaults left out).

        Example:
            >>> Where(layer="Linear", index={"heads": [0, 2]}).to_json()
            {'format': 1, 'layer': 'Linear', 'index': {'heads': [0, 2]}}
        """
        out: dict[str, Any] = {"format": WHERE_FORMAT}
        for name in ("layer", "path", "label", "module"):
            if getattr(self, name):
                out[name] = getattr(self, name)
        if self.side != "after":
            out["side"] = self.side
        if self.index:
            out["index"] = {axis: _entry_json(entry) for axis, entry in self.index}
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Where:
        """Rebuilds a ``Where`` from :meth:`to_json`'s form; unknown fields are errors.

        Raises:
          PzbridgeError: For an unknown field, an unsupported format version or a malformed entry.

        Example:
            >>> Where.from_json({"format": 1, "label": "attns.*.W_O", "side": "before"}).side
            'before'
        """
        if not isinstance(data, Mapping):
            raise PzbridgeError(f"Where.from_json: expected a mapping, found {type(data).__name__}. "
                                "Fix: pass what Where.to_json() returned (after json.loads).")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise PzbridgeError(f"Where.from_json: unknown fields {unknown}; expected some of {list(_FIELDS)}. "
                                "Fix: remove them (a Where spec holds only these fields).")
        if data.get("format") != WHERE_FORMAT:
            raise PzbridgeError(f"Where.from_json: format {data.get('format')!r} is not supported, expected "
                                f"{WHERE_FORMAT}. Fix: write the spec with this version of pzbridge.")
        index = data.get("index", {})
        if not isinstance(index, Mapping):
            raise PzbridgeError(f"Where.from_json: index must be a mapping, found {type(index).__name__}. "
                                "Fix: e.g. {'heads': [0, 2]}.")
        fields = {name: data[name] for name in ("layer", "path", "label", "module", "side") if name in data}
        return cls(**fields, index=tuple((axis, _entry_from_json(axis, v)) for axis, v in index.items()))


def _entry_json(entry: IndexEntry) -> Any:
    if isinstance(entry, AxisSlice):
        return {"start": entry.start, "stop": entry.stop, "step": entry.step}
    return list(entry) if isinstance(entry, tuple) else entry


def _entry_from_json(axis: str, value: Any) -> IndexEntry:
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"start", "stop", "step"})
        if unknown:
            raise PzbridgeError(f"Where.from_json: index[{axis!r}] has unknown slice fields {unknown}. "
                                "Fix: a slice is {'start': ..., 'stop': ..., 'step': ...}.")
        return AxisSlice(value.get("start"), value.get("stop"), value.get("step"))
    return _entry(axis, value)
