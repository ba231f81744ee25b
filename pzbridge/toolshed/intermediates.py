"""Capturing intermediate activations without hooks: insert savers, run, collect.

A lifted model is data, so "record what layer X produced" is an *edit*: put a
:class:`SaveIntermediate` layer after X in a copy of the model, run the copy,
read what the savers stored. No hook API is needed from the model author,
and the user's model is never touched.

Why savers write to a ``StateVariable`` (and not to a Python list or a side
input): a state variable is the one channel out of a layer that the rest of
pzbridge already makes pure. :func:`collect_saved` runs the model through
:func:`~pzbridge.core.variables.stateless_call`, which binds fresh copies of
every variable, so the captured values come back as ordinary return values
and everything works under ``jax.jit`` / ``jax.grad`` with no leaked tracers.
The same channel works for a saver on a child of a ``Foreign`` layer: the
child lowers to an adapter that the original code calls, and the bridges
carry the adapter's state writes back into the lifted variables. A saver
that never ran (its layer sits in a branch that was not taken, or is a child
the ``Foreign``'s original code never calls) is reported as an error instead
of silently returning nothing.

Selections are given as a :class:`~pzbridge.core.selectors.Selection` of the
model, a layer class (or tuple of classes), a predicate on subtrees, or a
:class:`~pzbridge.toolshed.where.Where` (plain data: class, path, label,
module, side and a named-axis index); see :func:`resolve_selection`. Only core and nn are imported (docs/architecture.md,
"Layers of the package").

Example:
    >>> import jax, jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> double = pzb.nn.Elementwise(lambda v: v * 2)
    >>> model = pzb.nn.Sequential([double, pzb.nn.Elementwise(jnp.negative)])
    >>> out, acts = capture_intermediates(model, lambda l: l is double, pzb.nx.wrap(jnp.ones(2), "features"))
    >>> acts["sublayers[0]"].unwrap("features"), out.unwrap("features")
    (Array([2., 2.], dtype=float32), Array([-2., -2.], dtype=float32))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp  # noqa: F401  (used by doctests)

from pzbridge.core.errors import PzbridgeError, SelectionError, format_path
from pzbridge.core.selectors import KeyPath, Selection, select
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.core.variables import (
    AbstractVariable,
    AbstractVariableSlot,
    AbstractVariableValue,
    StateVariableSlot,
    StateVariableValue,
    stateless_call,
)
from pzbridge.nn.combinators import Sequential
from pzbridge.nn.layer import Layer
from pzbridge.toolshed.where import Where

__all__ = [
    "CAPTURE_LABEL_PREFIX",
    "Captured",
    "LayerSelector",
    "SaveIntermediate",
    "capture_intermediates",
    "collect_saved",
    "insert_layers",
    "resolve_selection",
    "side_of",
]

LayerSelector = Where | Selection | type | tuple | Callable[[Any], bool]
"""What the toolshed accepts to say *where*: a Where, a Selection, a class (or tuple of classes), or a predicate."""

CAPTURE_LABEL_PREFIX = "captured:"
"""Prefix of the labels of the savers :func:`capture_intermediates` inserts (kept apart from model labels)."""


def resolve_selection(model: Any, selection: LayerSelector, *, what: str = "the selection") -> Selection:
    """Turns a :data:`LayerSelector` into a non-empty :class:`Selection` of ``model``.

    A :class:`Selection` is re-applied to ``model`` by its keypaths, so a
    selection built on the user's model also works on a traced or frozen copy
    of it (e.g. inside ``jax.jit``).

    Args:
      model: The model to select in.
      selection: A :class:`~pzbridge.toolshed.where.Where`, a ``Selection``
        (of ``model`` or of a tree with the same structure), a class or tuple
        of classes (``at_instances_of``), or a predicate on subtrees
        (``at_subtrees_where``).
      what: How the caller names the argument, for error messages.

    Returns:
      The selection of ``model``.

    Raises:
      SelectionError: If nothing is selected, a keypath does not exist in
        ``model``, or ``selection`` is none of the accepted kinds.

    Example:
        >>> import pzbridge as pzb
        >>> model = pzb.nn.Sequential([pzb.nn.Identity(), pzb.nn.Identity()])
        >>> resolve_selection(model, pzb.nn.Identity).count()
        2
    """
    if isinstance(selection, Where):
        return selection.select(model)
    if isinstance(selection, Selection):
        paths = selection.get_keypaths()
        resolved = select(model).at_keypaths(paths, allow_missing=True)  # Reported below, naming `what`.
        if resolved.count() != len(paths):
            found = {tuple(p) for p in resolved.get_keypaths()}
            lost = [format_path(p) for p in paths if tuple(p) not in found]
            raise SelectionError(
                f"{what}: the Selection names {len(paths)} place(s) but only {resolved.count()} exist in this "
                f"model (missing: {lost[:5]}). Fix: build the selection on this model, e.g. "
                "pzb.select(model).at_instances_of(Linear), or pass a class or predicate instead."
            )
    elif isinstance(selection, type) or (
        isinstance(selection, tuple) and selection and all(isinstance(c, type) for c in selection)
    ):
        resolved = select(model).at_instances_of(selection)
    elif callable(selection):
        resolved = select(model).at_subtrees_where(selection)
    else:
        raise SelectionError(
            f"{what} must be a Where, a pzb.Selection, a layer class (or tuple of classes), or a predicate, "
            f"found {type(selection).__name__} {selection!r:.60}. Fix: pass e.g. pzb.nn.Linear or "
            "pzb.select(model).at_instances_of(pzb.nn.Linear)."
        )
    if resolved.is_empty():
        raise SelectionError(
            f"{what} selects nothing in the model, expected at least one layer, found none (given "
            f"{_describe_selector(selection)}). "
            "Fix: check the class or predicate against the model's structure, e.g. print "
            "pzb.select(model).at_instances_of(pzb.nn.Layer).get_keypaths()."
        )
    return resolved


def side_of(selection: LayerSelector, where: str | None) -> str:
    """The side (``"after"`` / ``"before"``) to act on: ``where``, or the ``Where``'s own side.

    Args:
      selection: What the caller selects with; a ``Where`` carries a side.
      where: The side the caller passed (None: the ``Where``'s, else ``"after"``).

    Returns:
      ``"after"`` or ``"before"``.

    Raises:
      SelectionError: If ``where`` is invalid or contradicts the ``Where``'s side.

    Example:
        >>> side_of(Where(layer="Linear", side="before"), None)
        'before'
    """
    if where is not None and where not in ("after", "before"):
        raise SelectionError(
            f"where must be 'after' or 'before', found {where!r}. Fix: pass where='after' to act on the "
            "selected layer's output, or where='before' to act on its input."
        )
    if isinstance(selection, Where):
        if where is not None and where != selection.side:
            raise SelectionError(
                f"{selection.describe()} has side={selection.side!r} but where={where!r} was passed too. "
                "Fix: give the side once, in the Where (side=...) or as where=..."
            )
        return selection.side
    return where or "after"


def _describe_selector(selection: Any) -> str:
    if isinstance(selection, Selection):
        return "an empty Selection"
    if isinstance(selection, type):
        return f"class {selection.__name__}"
    if isinstance(selection, tuple):
        return "classes " + ", ".join(c.__name__ for c in selection)
    return f"predicate {getattr(selection, '__name__', repr(selection))}"


def insert_layers(
    model: Any,
    selection: LayerSelector,
    make_layer: Callable[[KeyPath, Any], Layer],
    *,
    where: str | None = None,
    share_state: bool = False,
) -> Any:
    """Returns a copy of ``model`` with ``make_layer(keypath, node)`` run after (or before) each selected node.

    A selected node that is an element of a ``sublayers`` list (a
    ``Sequential``'s) gets the new layer spliced into that list next to it,
    so the model stays flat; any other node (a struct field, the root, one
    of a ``Branch``'s parallel ``branches``) is replaced by
    ``Sequential([node, new])`` (or ``[new, node]``).

    Args:
      model: The model (not modified).
      selection: Where to insert (see :func:`resolve_selection`).
      make_layer: Builds the layer to insert from the selected node's
        keypath and the node itself.
      where: ``"after"`` (the new layer sees the node's output) or
        ``"before"`` (it sees the node's input); default: the ``Where``'s
        side, else ``"after"``.
      share_state: Keep the model's ``StateVariable`` objects in the copy
        (default: fresh copies, see ``Selection.apply``).

    Returns:
      The edited model.

    Raises:
      SelectionError: If the selection is empty or ``where`` is invalid.

    Example:
        >>> import pzbridge as pzb
        >>> model = pzb.nn.Sequential([pzb.nn.Elementwise(abs)])
        >>> new = insert_layers(model, pzb.nn.Elementwise, lambda path, node: pzb.nn.Identity())
        >>> [type(l).__name__ for l in new.sublayers]
        ['Elementwise', 'Identity']
    """
    where = side_of(selection, where)
    sel = resolve_selection(model, selection)

    def pair(path: KeyPath, node: Any) -> tuple[Any, Any]:
        new = make_layer(path, node)
        return (node, new) if where == "after" else (new, node)

    # Splice only into lists that run in order (a ``sublayers`` list); an element of a parallel list
    # (a Branch's ``branches``) or a struct field is wrapped in place, so no branch is added.
    paths = sel.get_keypaths()
    spliced = [p for p in paths if _runs_in_order(p)]
    wrapped = [p for p in paths if not _runs_in_order(p)]
    edited = model
    if wrapped:  # First: wrapping in place keeps every other keypath valid.
        edited = select(edited).at_keypaths(wrapped).apply(
            lambda path, node: Sequential(list(pair(path, node))), with_keypath=True, share_state=share_state)
    if spliced:
        edited = select(edited).at_keypaths(spliced).apply_and_inline(pair, with_keypath=True,
                                                                      share_state=share_state)
    return edited


def _runs_in_order(path: KeyPath) -> bool:
    """Whether ``path`` names an element of a ``sublayers`` list (Sequential, NamedGroup, Affine, ...)."""
    return (len(path) >= 2 and isinstance(path[-1], jax.tree_util.SequenceKey)
            and isinstance(path[-2], jax.tree_util.GetAttrKey) and path[-2].name == "sublayers")


@pytree_dataclass
class SaveIntermediate(Layer):
    """Stores its input in a ``StateVariable`` and returns the input unchanged.

    By default the layer holds an unbound ``StateVariableSlot(label)``: run
    the model with :func:`collect_saved` to get what it saw. Pass
    ``saved=pzb.StateVariable(None, label)`` instead for a stateful saver
    whose ``.saved.value`` you read after an ordinary call.

    Attributes:
      label: The label of the state variable (static).
      saved: A ``StateVariableSlot``, ``StateVariable`` or frozen value
        with that label (defaults to the slot).

    Example:
        >>> import pzbridge as pzb
        >>> saver = SaveIntermediate("probe", saved=pzb.StateVariable(None, "probe"))
        >>> saver(3.0), saver.saved.value
        (3.0, 3.0)
    """

    label: str = static_field()
    saved: Any = None

    def __post_init__(self) -> None:
        if self.saved is None:
            object.__setattr__(self, "saved", StateVariableSlot(self.label))
        elif not isinstance(self.saved, (AbstractVariable, AbstractVariableValue, AbstractVariableSlot)):
            raise PzbridgeError(
                f"SaveIntermediate '{self.label}': saved must be a StateVariable or StateVariableSlot, found "
                f"{type(self.saved).__name__}. Fix: omit it (an unbound slot) or pass "
                f"pzb.StateVariable(None, {self.label!r})."
            )
        elif getattr(self.saved, "label", self.label) != self.label:
            raise PzbridgeError(
                f"SaveIntermediate '{self.label}': its saved variable is labelled '{self.saved.label}'. "
                "Fix: give both the same label."
            )

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        self.saved.value = x
        return x


def collect_saved(model: Any, x: Any, /, **side_inputs: Any) -> tuple[Any, dict[str, Any]]:
    """Runs ``model`` on ``x`` and returns what each of its :class:`SaveIntermediate` layers stored.

    Pure: the model runs through ``stateless_call``, so no variable the
    caller holds is written (not even the model's own state such as batch
    statistics, whose updates are discarded).

    Args:
      model: A model containing ``SaveIntermediate`` layers.
      x: The input.
      **side_inputs: Forwarded to the model.

    Returns:
      ``(output, {label: activation})`` for every saver, in model order.

    Raises:
      PzbridgeError: If the model has no saver, or a saver never ran (it
        sits in a branch that was not called, or on a child that a
        ``Foreign`` layer's original code does not call).

    Example:
        >>> import pzbridge as pzb
        >>> model = pzb.nn.Sequential([SaveIntermediate("in"), pzb.nn.Residual(pzb.nn.Identity())])
        >>> collect_saved(model, 1)
        (2, {'in': 1})
    """
    savers = select(model).at_instances_of(SaveIntermediate).get_sequence()
    if not savers:
        raise PzbridgeError(
            "collect_saved: the model contains no SaveIntermediate layer, so there is nothing to collect. "
            "Fix: use capture_intermediates(model, selection, x) to insert savers, or insert them yourself."
        )
    labels = [s.label for s in savers]
    unbound = [StateVariableValue(None, s.label) for s in savers if isinstance(s.saved, AbstractVariableSlot)]
    output, states = stateless_call(model, unbound, x, **side_inputs)
    by_label = {state.label: state.value for state in states}
    silent = [label for label in labels if by_label.get(label) is None]
    if silent:
        raise PzbridgeError(
            f"collect_saved: the saver(s) {silent[:5]} never ran: the layers they follow (or precede) were "
            "not called on this input. Inside a Foreign layer a saver runs only where the original code calls "
            "the child it was inserted at; code that reads a child's weights without calling it, or what the "
            "code computes between its children, is not reached. Fix: select a layer that is called (e.g. "
            "the Foreign layer itself, or a child its code calls), or lift with a rule for that module."
        )
    return output, {label: by_label[label] for label in labels}


class Captured(dict):
    """What a capture returns: a ``dict`` ``{path: value}`` in model order whose repeated values are one pytree child.

    Layers that pass their input on (an ``Identity``, a fan-out branch, a
    cast to the same dtype) make several paths hold the very same value. A
    plain dict would give that value once per path to ``jax.jit``, and XLA
    copies an output buffer for every repeat (on a traced transformer,
    about a third of everything captured). As a pytree, a ``Captured`` has
    one child per *distinct* value (the same object, or an equal structure
    around the same arrays), keyed by the first path holding it; unflattening
    puts it back at every path. Compared with a dict, ``jax.tree.leaves``
    therefore lists a repeated value once, and a tree operation that combines
    several trees needs ``Captured`` with the same paths and repeats: two
    eager captures of one model, or two jitted ones. Which values repeat can
    differ between an eager and a jitted run (jax shares constants
    differently), and a ``Captured`` never matches a plain dict: convert
    with ``dict(...)`` to combine those.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> a = jnp.ones(2)
        >>> acts = Captured({"x": a, "y": a, "z": 2 * a})
        >>> len(jax.tree_util.tree_leaves(acts))
        2
        >>> out = jax.jit(lambda c: c)(acts)
        >>> list(out), out["x"] is out["y"], out["z"].tolist()
        (['x', 'y', 'z'], True, [2.0, 2.0])
    """


@dataclasses.dataclass(frozen=True)
class _Repeats:
    """A ``Captured``'s pytree data: its paths and, per path, which child holds its value."""

    paths: tuple[str, ...]
    slots: tuple[int, ...]

    def __repr__(self) -> str:
        # Shown by jax when two trees do not match: say why, and the fix.
        return (f"Captured({len(self.paths)} paths, {len(set(self.slots))} distinct values: a repeated value is "
                "held once, and which values repeat can differ between an eager and a jitted run; to combine "
                f"such captures in one tree operation, convert both with dict(...); child of each path: {self.slots})")


def _flatten_captured(captured: Captured) -> tuple[list[tuple[Any, Any]], _Repeats]:
    children: list[tuple[Any, Any]] = []
    slots: list[int] = []
    first: dict[Any, int] = {}  # a value's identity, and its structure with its arrays' identities -> its child
    for path, value in captured.items():
        leaves, treedef = jax.tree_util.tree_flatten(value)
        keys = ((id(value),), (treedef, *(id(leaf) for leaf in leaves)))
        slot = next((first[key] for key in keys if key in first), None)
        if slot is None:
            slot = len(children)
            children.append((jax.tree_util.DictKey(path), value))
            first.update(dict.fromkeys(keys, slot))
        slots.append(slot)
    return children, _Repeats(tuple(captured), tuple(slots))


def _flatten_captured_children(captured: Captured) -> tuple[list[Any], _Repeats]:
    children, aux = _flatten_captured(captured)
    return [value for _, value in children], aux


def _unflatten_captured(aux: _Repeats, children: Any) -> Captured:
    values = list(children)
    return Captured((path, values[slot]) for path, slot in zip(aux.paths, aux.slots))


jax.tree_util.register_pytree_with_keys(Captured, _flatten_captured, _unflatten_captured, _flatten_captured_children)


def capture_intermediates(
    model: Any, selection: LayerSelector, x: Any, /, *, where: str | None = None, **side_inputs: Any
) -> tuple[Any, Captured]:
    """Runs ``model`` on ``x`` and returns the activations at the selected layers.

    A copy of the model gets a :class:`SaveIntermediate` after (or before)
    each selected layer; ``model`` itself is unchanged and no variable is
    written. Works under ``jax.jit`` when the model is passed as a pytree of
    arrays (e.g. ``pzb.freeze_params(pzb.freeze_state_vars(model))``) and
    ``selection`` is a class, predicate or Selection (re-applied by keypath).

    Args:
      model: The model (not modified).
      selection: Which layers (see :func:`resolve_selection`).
      x: The input.
      where: ``"after"`` captures each selected layer's output, ``"before"``
        its input (default: the ``Where``'s side, else ``"after"``).
      **side_inputs: Forwarded to the model.

    Returns:
      ``(output, {path: activation})`` keyed by the selected layers' paths
      in ``model`` (e.g. ``"body.sublayers[2]"``), in model order, as a
      :class:`Captured` dict (a value held at several paths is one pytree
      child, so ``jax.jit`` writes it out once). The
      output equals ``model(x, **side_inputs)``. With a ``Where`` that has
      an ``index``, each activation is its indexed part (an int index drops
      its axis, positions and slices keep it).

    Raises:
      SelectionError: If the selection is empty or ``where`` is invalid.
      PzbridgeError: If a selected layer is never called by the lifted model.

    Example:
        >>> import jax.numpy as jnp
        >>> import pzbridge as pzb
        >>> model = pzb.nn.Sequential([pzb.nn.Elementwise(jnp.exp), pzb.nn.Elementwise(jnp.log)])
        >>> _, acts = capture_intermediates(model, pzb.nn.Elementwise, pzb.nx.wrap(jnp.zeros(1), "f"))
        >>> {path: a.unwrap("f").tolist() for path, a in acts.items()}
        {'sublayers[0]': [1.0], 'sublayers[1]': [0.0]}
    """
    paths: dict[str, None] = {}  # Ordered set: insert_layers may build the layers twice.

    def saver(path: KeyPath, node: Any) -> SaveIntermediate:
        text = format_path(path)
        paths.setdefault(text)
        return SaveIntermediate(CAPTURE_LABEL_PREFIX + text)

    instrumented = insert_layers(model, selection, saver, where=where)
    output, saved = collect_saved(instrumented, x, **side_inputs)
    captured = {label[len(CAPTURE_LABEL_PREFIX):]: value for label, value in saved.items()
                if label.startswith(CAPTURE_LABEL_PREFIX)}
    # Model (keypath) order: the order savers were built in depends on how insert_layers placed them.
    ordered = [format_path(p) for p in resolve_selection(model, selection).get_keypaths()]
    ordered += [path for path in paths if path not in set(ordered)]
    if isinstance(selection, Where) and selection.index:
        return output, Captured((path, selection.take(captured[path], path)) for path in ordered)
    return output, Captured((path, captured[path]) for path in ordered)

