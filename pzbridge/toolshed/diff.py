"""``diff``: what changed between two models, as a value that prints and renders.

An edit (a selector ``.set``, an inserted intervention, a fine-tuning run)
turns one model into another; :func:`diff` says what the edit did. Both
trees are walked together: nodes at the same key are compared; lists and
tuples of one length are paired by index, and of different lengths are first
*aligned* (a longest-common-subsequence match on each child's structure and
variable labels, as ``difflib`` does for lines), so that inserting one layer
into a ``Sequential`` reports one added layer rather than every later layer as
replaced. Variables are compared by value (never by
identity: two lifts of one module hold distinct but equal variables, and
compare equal), and auto-generated state labels (``auto:3``) are ignored, as
they differ between lifts.

The result, :class:`ModelDiff`, lists layers added / removed / replaced (a
different class at the same place), layers whose static configuration
changed, and parameters, state and plain arrays whose shape, dtype or values
changed (with the largest absolute change). It is falsy when nothing
changed, prints as text and renders in treescope. Only core and nn are
imported (docs/architecture.md, "Layers of the package").

Example:
    >>> import jax, jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> model = pzb.nn.Sequential([pzb.nn.Identity(), pzb.nn.Elementwise(jnp.exp)])
    >>> edited = pzb.select(model).at_instances_of(pzb.nn.Identity).insert_after(pzb.nn.Elementwise(jnp.tanh))
    >>> print(diff(model, edited))
    ModelDiff: 1 added
      + added      sublayers[1]: Elementwise
    >>> bool(diff(model, model))
    False
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from pzbridge.core.errors import format_path
from pzbridge.core.variable_base import AbstractVariable
from pzbridge.core.variables_kinds import AUTO_LABEL_PREFIX, Parameter
from pzbridge.nn.layer import Layer

__all__ = ["LayerChange", "ModelDiff", "ValueChange", "diff"]

_AUTO_PREFIXES = (AUTO_LABEL_PREFIX, "scoped:")


@dataclasses.dataclass(frozen=True)
class LayerChange:
    """One layer added, removed, replaced or reconfigured.

    Attributes:
      path: Where (in the second model for added / replaced / modified, in the first for removed).
      old_class: Class name in the first model (``None`` if added).
      new_class: Class name in the second model (``None`` if removed).
      detail: For a reconfigured layer, which static fields changed and how.

    Example:
        >>> LayerChange("sublayers[0]", None, "Identity").new_class
        'Identity'
    """

    path: str
    old_class: str | None
    new_class: str | None
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class ValueChange:
    """One parameter, state variable or plain array whose shape, dtype or values changed.

    Attributes:
      path: Where (in the second model; the first for one removed).
      label: The variable's label (``None`` for a plain array).
      kind: ``"Parameter"``, ``"StateVariable"`` (any other variable class by name) or ``"array"``.
      old_shape / new_shape: Shapes as text (named axes as ``{name: size}``); ``None`` if absent.
      old_dtype / new_dtype: Dtypes as text; ``None`` if absent.
      max_abs_change: The largest ``|new - old|`` when shapes and dtypes agree, else ``None``
        (``nan`` when a value turned NaN).
      old_label: The first model's label when the label changed, else ``None``.

    Example:
        >>> ValueChange("w", "w", "Parameter", "(2,)", "(2,)", "float32", "float32", 0.5).max_abs_change
        0.5
    """

    path: str
    label: str | None
    kind: str
    old_shape: str | None
    new_shape: str | None
    old_dtype: str | None
    new_dtype: str | None
    max_abs_change: float | None
    old_label: str | None = None

    def describe(self) -> str:
        """One line of text for this change.

        Example:
            >>> ValueChange("w", "w", "Parameter", "(2,)", "(3,)", "float32", "float32", None).describe()
            'w [w]: shape (2,) -> (3,)'
        """
        name = self.path if self.label is None else f"{self.path} [{self.label}]"
        parts = []
        if self.old_shape is None:
            parts.append(f"new {self.new_dtype}{self.new_shape}")
        elif self.new_shape is None:
            parts.append(f"was {self.old_dtype}{self.old_shape}")
        else:
            if self.old_shape != self.new_shape:
                parts.append(f"shape {self.old_shape} -> {self.new_shape}")
            if self.old_dtype != self.new_dtype:
                parts.append(f"dtype {self.old_dtype} -> {self.new_dtype}")
            if self.max_abs_change is not None:
                parts.append(f"max |change| = {self.max_abs_change:.6g}")
        if self.old_label is not None:
            parts.append(f"label {self.old_label!r} -> {self.label!r}")
        return f"{name}: {', '.join(parts)}"


@dataclasses.dataclass(frozen=True)
class ModelDiff:
    """What changed between two models (see :func:`diff`); falsy when nothing did.

    Attributes:
      added / removed / replaced / modified: :class:`LayerChange` tuples, in model order.
      parameters / state / arrays: :class:`ValueChange` tuples for ``Parameter`` s,
        state variables and plain (non-variable) arrays.

    Example:
        >>> bool(ModelDiff()), str(ModelDiff())
        (False, 'ModelDiff: no changes')
    """

    added: tuple[LayerChange, ...] = ()
    removed: tuple[LayerChange, ...] = ()
    replaced: tuple[LayerChange, ...] = ()
    modified: tuple[LayerChange, ...] = ()
    parameters: tuple[ValueChange, ...] = ()
    state: tuple[ValueChange, ...] = ()
    arrays: tuple[ValueChange, ...] = ()

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) for f in dataclasses.fields(self))

    def _sections(self) -> Iterator[tuple[str, str, list[str]]]:
        """(symbol, title, lines) per non-empty section."""
        def layer_line(change: LayerChange) -> str:
            if change.old_class is None:
                return f"{change.path}: {change.new_class}"
            if change.new_class is None:
                return f"{change.path}: {change.old_class}"
            if change.detail:
                return f"{change.path} ({change.new_class}): {change.detail}"
            return f"{change.path}: {change.old_class} -> {change.new_class}"

        for symbol, title, changes in (
            ("+", "added", self.added), ("-", "removed", self.removed), ("~", "replaced", self.replaced),
            ("*", "modified", self.modified),
        ):
            if changes:
                yield symbol, title, [layer_line(c) for c in changes]
        for symbol, title, values in (
            ("=", "parameter", self.parameters), ("=", "state", self.state), ("=", "array", self.arrays)
        ):
            if values:
                yield symbol, title, [v.describe() for v in values]

    def summary(self) -> str:
        """The first line: counts per kind of change.

        Example:
            >>> ModelDiff(added=(LayerChange("x", None, "Identity"),)).summary()
            'ModelDiff: 1 added'
        """
        counts = [
            (len(self.added), "added"), (len(self.removed), "removed"), (len(self.replaced), "replaced"),
            (len(self.modified), "modified"), (len(self.parameters), "parameters changed"),
            (len(self.state), "state changed"), (len(self.arrays), "arrays changed"),
        ]
        text = ", ".join(f"{n} {what}" for n, what in counts if n)
        return f"ModelDiff: {text or 'no changes'}"

    def __str__(self) -> str:
        lines = [self.summary()]
        for symbol, title, entries in self._sections():
            lines.extend(f"  {symbol} {title:<10} {entry}" for entry in entries)
        return "\n".join(lines)

    def __treescope_repr__(self, path: str | None, subtree_renderer: Any) -> Any:
        from treescope import rendering_parts as rp  # noqa: PLC0415 - rendering is optional work.

        colours = {"+": "#2a8a2a", "-": "#b03030", "~": "#b07000", "*": "#7040a0", "=": "#206090"}
        rows = [
            rp.custom_style(rp.text(f"{symbol} {title:<10} {entry}"), css_style=f"color: {colours[symbol]};")
            for symbol, title, entries in self._sections()
            for entry in entries
        ]
        header = rp.custom_style(rp.text(self.summary()), css_style="font-weight: bold;")
        if not rows:
            return rp.build_one_line_tree_node(header, path)
        return rp.build_custom_foldable_tree_node(
            label=header,
            contents=rp.indented_children([rp.on_separate_lines(rows)]),
            path=path,
            expand_state=rp.ExpandState.EXPANDED,
        )


def _shape_text(value: Any) -> str:
    named = getattr(value, "named_shape", None)
    if named is not None:
        positional = tuple(getattr(value, "positional_shape", ()))
        names = ", ".join(f"{k}: {v}" for k, v in sorted(dict(named).items()))  # Order is not meaning.
        return f"{positional}{{{names}}}" if positional else f"{{{names}}}"
    return str(tuple(np.shape(value)))


def _is_named(value: Any) -> bool:
    return hasattr(value, "named_shape") and hasattr(value, "data_array")


def _is_array(value: Any) -> bool:
    return isinstance(value, (jax.Array, np.ndarray, np.generic)) or _is_named(value)


def _canonical(value: Any) -> np.ndarray:
    """A NumPy copy of an array, or of a named array in canonical axis order (sorted names)."""
    if _is_named(value):
        return np.asarray(value.canonicalize().data_array)
    return np.asarray(value)


def _max_abs_change(old: np.ndarray, new: np.ndarray) -> float:
    if old.dtype == bool:
        return float(np.max(old != new)) if old.size else 0.0
    a, b = old.astype(np.float64), new.astype(np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    delta = np.where(both_nan, 0.0, np.abs(a - b))
    return float(np.max(delta)) if delta.size else 0.0


def _value_leaves(value: Any) -> list[Any]:
    return jax.tree_util.tree_leaves(value, is_leaf=_is_array)


def _compare_values(old: Any, new: Any) -> tuple[bool, str, str, str, str, float | None]:
    """(changed, old shape, new shape, old dtype, new dtype, max abs change) of two variable values."""
    old_leaves, new_leaves = _value_leaves(old), _value_leaves(new)
    if len(old_leaves) == 1 and len(new_leaves) == 1 and _is_array(old_leaves[0]) and _is_array(new_leaves[0]):
        o, n = old_leaves[0], new_leaves[0]
        shapes = (_shape_text(o), _shape_text(n))
        dtypes = (str(np.asarray(_data(o)).dtype), str(np.asarray(_data(n)).dtype))
        if shapes[0] != shapes[1] or dtypes[0] != dtypes[1]:
            return True, *shapes, *dtypes, None
        a, b = _canonical(o), _canonical(n)
        if np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"):
            return False, *shapes, *dtypes, None
        return True, *shapes, *dtypes, _max_abs_change(a, b)
    # A pytree value (rare: a cache tuple, a counter dict): compare leaf by leaf.
    structure = (jax.tree_util.tree_structure(old, is_leaf=_is_array), jax.tree_util.tree_structure(new, is_leaf=_is_array))
    shape_of = lambda leaves: "[" + ", ".join(_shape_text(x) if _is_array(x) else repr(x) for x in leaves) + "]"  # noqa: E731
    old_shape, new_shape = shape_of(old_leaves), shape_of(new_leaves)
    kind = lambda leaves: ",".join(str(np.asarray(_data(x)).dtype) if _is_array(x) else type(x).__name__ for x in leaves)  # noqa: E731
    if structure[0] != structure[1] or old_shape != new_shape or kind(old_leaves) != kind(new_leaves):
        return True, old_shape, new_shape, kind(old_leaves), kind(new_leaves), None
    worst, changed = 0.0, False
    for o, n in zip(old_leaves, new_leaves):
        if _is_array(o):
            a, b = _canonical(o), _canonical(n)
            if not np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"):
                changed, worst = True, max(worst, _max_abs_change(a, b))
        elif o != n:
            changed = True
    return changed, old_shape, new_shape, kind(old_leaves), kind(new_leaves), worst if changed else None


def _data(x: Any) -> Any:
    return x.data_array if _is_named(x) else x


def _is_auto(label: str) -> bool:
    return label.startswith(_AUTO_PREFIXES)


def _children(node: Any) -> tuple[list[tuple[Any, Any]], Any]:
    """One level of ``node``: ([(key, child)], treedef with the children as leaves)."""
    pairs, treedef = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda y: y is not node)
    return [(path[0], child) for path, child in pairs], treedef


def _fingerprint(node: Any) -> Any:
    """What list alignment matches on: the node's type and structure, not its values."""
    if isinstance(node, AbstractVariable):
        return (type(node).__name__,)
    if _is_array(node):
        return ("array", _shape_text(node))
    try:
        leaves, treedef = jax.tree_util.tree_flatten(node)
    except Exception:  # noqa: BLE001 - an unflattenable leaf is matched by type alone.
        return (type(node).__name__,)
    # Variable labels tell equal-structured layers apart (two Linears in a row); auto labels differ per lift.
    labels = tuple(x.label for x in leaves if isinstance(x, AbstractVariable) and not _is_auto(x.label))
    return (type(node).__name__, str(treedef), labels)


def _static_fields(node: Any) -> dict[str, Any]:
    if not dataclasses.is_dataclass(node):
        return {}
    return {
        f.name: getattr(node, f.name)
        for f in dataclasses.fields(node)
        if f.metadata.get("pytree_node", True) is False
    }


def _safe_equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - arrays in static fields: compare by identity then.
        return a is b


class _Walker:
    """Collects the changes of one ``diff`` call."""

    def __init__(self) -> None:
        self.out: dict[str, list] = {f.name: [] for f in dataclasses.fields(ModelDiff)}
        self._seen_variables: set[tuple[int, int]] = set()

    def result(self) -> ModelDiff:
        return ModelDiff(**{name: tuple(items) for name, items in self.out.items()})

    def compare(self, old: Any, new: Any, path_old: tuple, path_new: tuple) -> None:
        if old is new and not isinstance(old, AbstractVariable):
            return
        if isinstance(old, AbstractVariable) and isinstance(new, AbstractVariable) and type(old) is type(new):
            self._compare_variables(old, new, path_new)
        elif _is_array(old) and _is_array(new) and (_is_named(old) == _is_named(new)):
            changed, *info, worst = _compare_values(old, new)
            if changed:
                self.out["arrays"].append(ValueChange(format_path(path_new), None, "array", *info, worst))
        elif type(old) is not type(new):
            self.out["replaced"].append(
                LayerChange(format_path(path_new), type(old).__name__, type(new).__name__)
            )
        elif isinstance(old, (list, tuple)):
            self._compare_sequences(old, new, path_old, path_new)
        else:
            self._compare_nodes(old, new, path_old, path_new)

    def _compare_variables(self, old: AbstractVariable, new: AbstractVariable, path: tuple) -> None:
        if (id(old), id(new)) in self._seen_variables:  # A shared variable, reached again.
            return
        self._seen_variables.add((id(old), id(new)))
        changed, *info, worst = _compare_values(old.value, new.value)
        relabelled = old.label != new.label and not (_is_auto(old.label) and _is_auto(new.label))
        if changed or relabelled:
            kind = type(new).__name__
            bucket = "parameters" if isinstance(new, Parameter) else "state"
            self.out[bucket].append(
                ValueChange(format_path(path), new.label, kind, *info, worst, old.label if relabelled else None)
            )

    def _compare_nodes(self, old: Any, new: Any, path_old: tuple, path_new: tuple) -> None:
        try:
            old_children, old_def = _children(old)
            new_children, new_def = _children(new)
        except Exception:  # noqa: BLE001 - an opaque leaf (a function, a string): compare it whole.
            if not _safe_equal(old, new):
                self.out["modified"].append(
                    LayerChange(format_path(path_new), type(old).__name__, type(new).__name__, f"{old!r} -> {new!r}")
                )
            return
        if not old_children and not new_children:  # A leaf (None, a number) or a childless layer.
            if dataclasses.is_dataclass(old):
                if old_def != new_def:
                    self._report_static_change(old, new, path_new)
            elif not _safe_equal(old, new):
                self.out["modified"].append(
                    LayerChange(format_path(path_new), type(old).__name__, type(new).__name__, f"{old!r} -> {new!r}")
                )
            return
        if old_def.num_leaves == new_def.num_leaves and old_def != new_def:
            self._report_static_change(old, new, path_new)
        new_by_key = dict(new_children)
        old_keys = {key for key, _ in old_children}
        for key, child in old_children:
            if key in new_by_key:
                self.compare(child, new_by_key[key], (*path_old, key), (*path_new, key))
            else:
                self.report_subtree(child, (*path_old, key), "removed")
        for key, child in new_children:
            if key not in old_keys:
                self.report_subtree(child, (*path_new, key), "added")

    def _report_static_change(self, old: Any, new: Any, path: tuple) -> None:
        old_static, new_static = _static_fields(old), _static_fields(new)
        changes = [
            f"{name}: {old_static.get(name)!r} -> {new_static.get(name)!r}"
            for name in dict.fromkeys([*old_static, *new_static])
            if not _safe_equal(old_static.get(name), new_static.get(name))
        ]
        detail = "; ".join(changes) or "static structure changed"
        self.out["modified"].append(LayerChange(format_path(path), type(old).__name__, type(new).__name__, detail))

    def _compare_sequences(self, old: Any, new: Any, path_old: tuple, path_new: tuple) -> None:
        key = jax.tree_util.SequenceKey
        if len(old) == len(new):  # Same length: an in-place edit; pairing by index is what the user did.
            for i, (o, n) in enumerate(zip(old, new)):
                self.compare(o, n, (*path_old, key(i)), (*path_new, key(i)))
            return
        matcher = difflib.SequenceMatcher(
            None, [_fingerprint(x) for x in old], [_fingerprint(x) for x in new], autojunk=False
        )
        for tag, i1, i2, j1, j2 in matcher.get_opcodes():
            paired = (i2 - i1) if tag in ("equal", "replace") and (i2 - i1) == (j2 - j1) else 0
            for offset in range(paired):
                i, j = i1 + offset, j1 + offset
                self.compare(old[i], new[j], (*path_old, key(i)), (*path_new, key(j)))
            for i in range(i1 + paired, i2):
                self.report_subtree(old[i], (*path_old, key(i)), "removed")
            for j in range(j1 + paired, j2):
                self.report_subtree(new[j], (*path_new, key(j)), "added")

    def report_subtree(self, node: Any, path: tuple, side: str) -> None:
        """Reports a subtree present on one side only: its outermost layers, or its variables and arrays."""
        if isinstance(node, Layer):
            old_class, new_class = (None, type(node).__name__) if side == "added" else (type(node).__name__, None)
            self.out[side].append(LayerChange(format_path(path), old_class, new_class))
            return
        if isinstance(node, AbstractVariable) or _is_array(node):
            value = node.value if isinstance(node, AbstractVariable) else node
            leaves = _value_leaves(value)
            shape = _shape_text(leaves[0]) if len(leaves) == 1 and _is_array(leaves[0]) else repr(type(value).__name__)
            dtype = str(np.asarray(_data(leaves[0])).dtype) if len(leaves) == 1 and _is_array(leaves[0]) else "pytree"
            label = getattr(node, "label", None)
            kind = type(node).__name__ if isinstance(node, AbstractVariable) else "array"
            bucket = "arrays" if kind == "array" else "parameters" if isinstance(node, Parameter) else "state"
            info = (None, shape, None, dtype) if side == "added" else (shape, None, dtype, None)
            self.out[bucket].append(ValueChange(format_path(path), label, kind, *info, None))
            return
        try:
            children, _ = _children(node)
        except Exception:  # noqa: BLE001 - an opaque leaf carries no layer or variable.
            return
        for key, child in children:
            if child is not node:
                self.report_subtree(child, (*path, key), side)


def diff(a: Any, b: Any, /) -> ModelDiff:
    """What changed from model ``a`` to model ``b``.

    Works on any pytree of pzbridge layers: ``pzb.nn`` models and lifted
    Equinox / NNX models (stock layers and traced custom modules alike).
    Neither model is modified.

    Args:
      a: The model before.
      b: The model after.

    Returns:
      A :class:`ModelDiff`: empty (falsy) when the models have the same
      layers, configuration and values; ``diff(a, b).added`` lists what
      ``diff(b, a).removed`` does.

    Example:
        >>> import jax
        >>> import pzbridge as pzb
        >>> model = pzb.nn.Linear.from_config("w", jax.random.key(0), {"f": 2}, {"g": 3})
        >>> edited = pzb.select(model).at_instances_of(pzb.Parameter).apply(
        ...     lambda p: pzb.Parameter(p.value * 2, label=p.label))
        >>> change = diff(model, edited).parameters[0]
        >>> change.path, change.label, change.new_shape
        ('weights', 'w.weights', '{f: 2, g: 3}')
    """
    walker = _Walker()
    walker.compare(a, b, (), ())
    return walker.result()
