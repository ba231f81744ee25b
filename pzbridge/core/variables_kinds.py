"""The variable kinds: mutable variables, their frozen values, and slots.

Each kind of variable comes in three forms that share one label:

- a *mutable variable* (:class:`Parameter`, :class:`StateVariable`): an
  identity-carrying leaf whose ``.value`` can be reassigned in place;
- a *frozen value* (:class:`ParameterValue`, :class:`StateVariableValue`): an
  immutable :class:`~pzbridge.core.struct.Struct` snapshot that JAX
  transformations can carry (the value is a pytree child, label and metadata
  are static);
- a *slot* (:class:`ParameterSlot`, :class:`StateVariableSlot`): a childless
  placeholder marking where a variable was unbound.

Layers read ``.value`` and work the same on a mutable variable and on its
frozen value, so one model definition runs both in stateful Python code and
inside pure functions. Binding and unbinding live in
:mod:`pzbridge.core.variables_binding`; the public facade is
:mod:`pzbridge.core.variables`. See docs/architecture.md ("The lift / lower
contract", "How state and sharing are kept") for why sharing is carried by
object identity.

Example:
    >>> import jax.numpy as jnp
    >>> w = Parameter(jnp.zeros(2), label="w", metadata={"tag": "dense"})
    >>> frozen = w.freeze()
    >>> frozen.label, dict(frozen.metadata)
    ('w', {'tag': 'dense'})
    >>> frozen.unfreeze_as_copy() is w
    False
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
import types
from collections.abc import Hashable, Iterator, Mapping
from typing import Any, ClassVar

import jax
from jax.core import Tracer
from jax.extend.core import get_opaque_trace_state

from pzbridge.core.errors import VariableError, format_path
from pzbridge.core.struct import Struct, pytree_dataclass, static_field
from pzbridge.core.variable_base import AbstractVariable


class FrozenVariableError(VariableError, dataclasses.FrozenInstanceError):
    """An attribute of a frozen variable value or slot was assigned.

    Example:
        >>> import jax.numpy as jnp
        >>> try:
        ...     ParameterValue(jnp.zeros(()), "w").value = jnp.ones(())
        ... except FrozenVariableError as e:
        ...     print(type(e).__name__)
        FrozenVariableError
    """


AUTO_LABEL_PREFIX = "auto:"
"""Labels of state variables made without one start with this (``auto:3``)."""

_auto_counter = itertools.count()
# The innermost scoped_auto_state_var_labels scope: (group, counter), or None.
_label_scope: contextvars.ContextVar[tuple[Hashable, Iterator[int]] | None] = contextvars.ContextVar(
    "pzbridge_label_scope", default=None)


def _auto_label() -> str:
    """A fresh label for a state variable built without one (scoped if a scope is open)."""
    scope = _label_scope.get()
    if scope is None:
        return f"{AUTO_LABEL_PREFIX}{next(_auto_counter)}"
    group, counter = scope
    prefix = "scoped:" if group is None else f"scoped:{group}:"
    return f"{prefix}{next(counter)}"


@contextlib.contextmanager
def scoped_auto_state_var_labels(group: Hashable = None) -> Iterator[None]:
    """Within this context, state variables made without a label are numbered from 0 in this scope.

    Outside any scope, an unlabelled :class:`StateVariable` gets a
    process-wide unique label (``auto:17``), which differs between runs and
    between two builds of one model. In a scope the labels are
    ``scoped:0``, ``scoped:1``, ... (``scoped:GROUP:0`` with a group), so
    rebuilding the same model gives the same labels, and ``jax.jit`` of its
    unbound form is not retraced. Two scopes with one group can give equal
    labels to different variables; unbinding then raises
    :class:`~pzbridge.core.errors.VariableConflictError`. Parameters always
    need an explicit label.

    Args:
      group: Optional tag put in the labels to tell scopes apart.

    Example:
        >>> with scoped_auto_state_var_labels("cache"):
        ...     a, b = StateVariable(0), StateVariable(1)
        >>> a.label, b.label
        ('scoped:cache:0', 'scoped:cache:1')
    """
    token = _label_scope.set((group, itertools.count()))
    try:
        yield
    finally:
        _label_scope.reset(token)


def _check_label(label: Any, where: str) -> str:
    if not isinstance(label, str) or not label:
        raise VariableError(
            f"{where}: a variable label must be a non-empty string, found {label!r}. "
            "Fix: pass a path-like name such as label='blocks.0.attn.query.kernel'."
        )
    return label


class FrozenMetadata(Mapping):
    """A read-only, hashable mapping holding a frozen variable's metadata.

    Frozen values keep their metadata as a *static* field, so it must be
    hashable and comparable. The items are stored as a tuple; the hash uses
    only the keys, so values (shardings, specs, strings) only need ``==``.

    Args:
      items: A mapping or iterable of ``(key, value)`` pairs.

    Example:
        >>> m = FrozenMetadata({"out_sharding": None})
        >>> dict(m), hash(m) == hash(FrozenMetadata({"out_sharding": None}))
        ({'out_sharding': None}, True)
    """

    __slots__ = ("_items", "_dict")

    def __init__(self, items: Mapping[Any, Any] | Any = ()) -> None:
        as_dict = dict(items)
        object.__setattr__(self, "_dict", as_dict)
        object.__setattr__(self, "_items", tuple(as_dict.items()))

    def __getitem__(self, key: Any) -> Any:
        return self._dict[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._dict)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self._dict == dict(other)
        return NotImplemented

    def __hash__(self) -> int:
        # Keys only: equal mappings have equal keys, and values need not hash.
        return hash(frozenset(self._dict))

    def __setattr__(self, name: str, value: Any) -> None:
        raise FrozenVariableError(f"FrozenMetadata is read-only (tried to set {name!r}).")

    def __reduce__(self) -> tuple:
        return (FrozenMetadata, (self._items,))

    def __repr__(self) -> str:
        return f"FrozenMetadata({self._dict!r})"


def _frozen_setattr(self: Any, name: str, value: Any) -> None:
    raise FrozenVariableError(
        f"{type(self).__name__} '{self.label}' is frozen, so `.{name}` cannot be assigned. "
        "Fix: write to a mutable variable instead: `var = frozen.unfreeze_as_copy()` "
        "(or bind with `bind_variables(..., unfreeze_as_copy=True)`), then `var.value = ...`."
    )


def current_trace() -> Any:
    """An opaque token of the innermost JAX trace (equal tokens: same trace)."""
    return get_opaque_trace_state(convention="pzbridge")


def _holds_tracer(value: Any) -> bool:
    if isinstance(value, Tracer):
        return True
    data = getattr(value, "data_array", None)  # A named array: one leaf, checked without flattening.
    if data is not None:
        return isinstance(data, Tracer)
    if isinstance(value, (int, float, bool, type(None))) or hasattr(value, "__array__"):
        return False
    return any(isinstance(leaf, Tracer) for leaf in jax.tree_util.tree_leaves(value))


def _summarize(value: Any) -> str:
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is not None and dtype is not None:
        return f"{dtype}{list(shape)}".replace(" ", "")
    return repr(value)


class LabeledVariable(AbstractVariable):
    """Common implementation of the mutable variable kinds.

    Holds ``value`` (any pytree, reassignable), ``label`` (read-only) and
    ``metadata`` (a dict, copied at construction). Subclasses name their
    frozen-value and slot classes.

    Example:
        >>> import jax.numpy as jnp
        >>> isinstance(Parameter(jnp.ones(()), "w"), LabeledVariable)
        True
    """

    __slots__ = ("_value", "_label", "_kind_and_label", "metadata", "_trace")
    value_class: ClassVar[type[AbstractVariableValue]]
    slot_class: ClassVar[type[AbstractVariableSlot]]

    # Identity equality exactly as AbstractVariable defines it; restating it
    # with object's own methods tells treescope the object is mutable, so it
    # marks a variable rendered from two places as shared.
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    # `Parameter[jax.Array]` in annotations (the value's type; not checked).
    __class_getitem__ = classmethod(types.GenericAlias)

    def __init__(self, value: Any, label: str | None = None, metadata: Mapping[Any, Any] | None = None) -> None:
        if type(self) is LabeledVariable:
            raise VariableError("LabeledVariable is abstract. Fix: build a Parameter or a StateVariable.")
        if label is None:
            label = self._default_label()
        self._label = _check_label(label, type(self).__name__)
        # Read-only identity of the slot this binds to; variable_jit keys on it.
        self._kind_and_label = (type(self), label)
        self.metadata: dict[Any, Any] = dict(metadata or {})
        # The JAX trace this variable was made under: a traced value written from another trace would leak.
        self._trace = current_trace()
        self.value = value

    def __getstate__(self) -> dict[str, Any]:
        # The trace token holds a weak reference: not picklable, and meaningless in another process.
        return {name: getattr(self, name) for name in ("_value", "_label", "_kind_and_label", "metadata")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)
        self._trace = current_trace()

    def _default_label(self) -> str:
        raise VariableError(
            f"{type(self).__name__}: a label is required (a non-empty string; labels bind values back to their places). "
            f"Fix: pass one, e.g. {type(self).__name__}(value, label='blocks.0.attn.query.kernel'); only a "
            "StateVariable may omit it (see scoped_auto_state_var_labels)."
        )

    @property
    def label(self) -> str:
        """The unique label (read-only; make a new variable to relabel)."""
        return self._label

    @property
    def value(self) -> Any:
        """The current value; assign to update it in place."""
        return self._value

    @value.setter
    def value(self, new_value: Any) -> None:
        # Only a cheap check: a variable nested in a variable would be invisible
        # to bind/unbind and to variable_jit.
        if isinstance(new_value, AbstractVariable):
            raise VariableError(
                f"{type(self).__name__} '{self._label}': a value cannot be another variable "
                f"(found {type(new_value).__name__} '{getattr(new_value, 'label', '?')}'). "
                "Fix: assign `other.value` instead of `other`."
            )
        made_in = getattr(self, "_trace", None)  # None: built without __init__; not checked.
        if made_in is not None and _holds_tracer(new_value) and current_trace() != made_in:
            raise VariableError(
                f"{type(self).__name__} '{self._label}' was made outside the JAX transformation (jax.jit, vmap, "
                "grad, eval_shape, ...) that is assigning it a traced value, so the tracer would leak into the "
                "model and break its next use. Fix: pass the model as an argument of "
                "pzb.variable_jit(lambda model, x: model(x))(model, x) (it binds the variables inside the "
                "trace and writes the new values back), or run it with pzb.stateless_call(model, ...)."
            )
        self._value = new_value

    def freeze(self) -> AbstractVariableValue:
        """Returns an immutable snapshot (label, current value, metadata).

        Example:
            >>> import jax.numpy as jnp
            >>> StateVariable(jnp.zeros(()), "n").freeze().label
            'n'
        """
        return self.value_class(self._value, self._label, self.metadata)

    def slot(self) -> AbstractVariableSlot:
        """Returns the slot this variable binds to.

        Example:
            >>> Parameter(1.0, "w").slot()
            ParameterSlot(label='w')
        """
        return self.slot_class(self._label)

    def __repr__(self) -> str:
        meta = f", metadata={self.metadata!r}" if self.metadata else ""
        return f"{type(self).__name__}(label={self._label!r}, value={_summarize(self._value)}{meta})"

    def __treescope_repr__(self, path: str | None, subtree_renderer: Any) -> Any:
        # Treescope is loaded on first render; the renderer does not import
        # this module, so the variable tells it its kind.
        from pzbridge.core.variables_treescope import render_variable

        return render_variable(self, kind_name(self), path, subtree_renderer)


@pytree_dataclass
class AbstractVariableValue(Struct):
    """Base of the frozen variable values (a pytree: ``value`` is the child).

    Attributes:
      value: The snapshot value (any pytree).
      label: The label of the variable it was frozen from (static).
      metadata: The variable's metadata as a read-only mapping (static).

    Example:
        >>> import jax
        >>> jax.tree_util.tree_leaves(ParameterValue(1.0, "w"))
        [1.0]
    """

    value: Any
    label: str = static_field()
    metadata: FrozenMetadata = static_field(default=FrozenMetadata())
    variable_class: ClassVar[type[LabeledVariable]]
    __class_getitem__ = classmethod(types.GenericAlias)

    def __post_init__(self) -> None:
        if type(self) is AbstractVariableValue:
            raise VariableError(
                "AbstractVariableValue is abstract. Fix: build a ParameterValue or a StateVariableValue."
            )
        _check_label(self.label, type(self).__name__)
        if not isinstance(self.metadata, FrozenMetadata):
            object.__setattr__(self, "metadata", FrozenMetadata(self.metadata or {}))

    def unfreeze_as_copy(self) -> LabeledVariable:
        """Returns a new mutable variable with this label, value and metadata.

        Example:
            >>> v = StateVariableValue(0, "count").unfreeze_as_copy()
            >>> type(v).__name__, v.value
            ('StateVariable', 0)
        """
        return self.variable_class(self.value, self.label, dict(self.metadata))

    def slot(self) -> AbstractVariableSlot:
        """Returns the slot this value binds to.

        Example:
            >>> StateVariableValue(0, "count").slot()
            StateVariableSlot(label='count')
        """
        return self.variable_class.slot_class(self.label)


@pytree_dataclass
class AbstractVariableSlot(Struct):
    """Base of the slots: childless placeholders for unbound variables.

    Attributes:
      label: The label of the variable that binds here (static).

    Example:
        >>> import jax
        >>> jax.tree_util.tree_leaves([ParameterSlot("w")])
        []
    """

    label: str = static_field()
    variable_class: ClassVar[type[LabeledVariable]]

    def __post_init__(self) -> None:
        if type(self) is AbstractVariableSlot:
            raise VariableError("AbstractVariableSlot is abstract. Fix: build a ParameterSlot or a StateVariableSlot.")
        _check_label(self.label, type(self).__name__)

    @property
    def value(self) -> Any:
        """Always raises: a slot holds no value until a variable is bound.

        Raises:
          VariableError: Always, naming the label and the call that binds it.
        """
        raise VariableError(
            f"{type(self).__name__} '{self.label}' is unbound, so it has no value. "
            "Fix: bind it first with `bind_variables(tree, variables)` "
            "or call the model through `stateless_call(model, values, ...)`."
        )


class Parameter(LabeledVariable):
    """A trainable variable: updated by optimizers, read by the model.

    Args:
      value: The initial value (any pytree of arrays, e.g. a NamedArray).
      label: A non-empty unique name, usually the model path.
      metadata: Optional extra information kept through freeze/unfreeze
        (e.g. ``{"out_sharding": ...}``).

    Raises:
      VariableError: If the label is not a non-empty string.

    Example:
        >>> import jax.numpy as jnp
        >>> w = Parameter(jnp.ones(3), label="w")
        >>> w.value = w.value * 2
        >>> w
        Parameter(label='w', value=float32[3])
    """

    __slots__ = ()


class StateVariable(LabeledVariable):
    """A non-trainable variable the model itself updates (counters, statistics).

    Args:
      value: The initial value (any pytree of arrays).
      label: A non-empty unique name, usually the model path. When omitted,
        a unique one is generated (``auto:N``, or numbered within a
        :func:`scoped_auto_state_var_labels` scope).
      metadata: Optional extra information kept through freeze/unfreeze.

    Raises:
      VariableError: If the label is given but is not a non-empty string.

    Example:
        >>> count = StateVariable(0, label="count")
        >>> count.value += 1
        >>> count.value
        1
        >>> StateVariable(0).label.startswith("auto:")
        True
    """

    __slots__ = ()

    def _default_label(self) -> str:
        return _auto_label()


@pytree_dataclass
class ParameterValue(AbstractVariableValue):
    """The frozen value of a :class:`Parameter` (read-only; a JAX pytree).

    Example:
        >>> pv = ParameterValue(2.0, "w", {"tag": "x"})
        >>> pv.value, pv.metadata["tag"]
        (2.0, 'x')
    """

    variable_class: ClassVar[type[LabeledVariable]] = Parameter


@pytree_dataclass
class StateVariableValue(AbstractVariableValue):
    """The frozen value of a :class:`StateVariable` (read-only; a JAX pytree).

    Example:
        >>> StateVariableValue(3, "count").unfreeze_as_copy().value
        3
    """

    variable_class: ClassVar[type[LabeledVariable]] = StateVariable


@pytree_dataclass
class ParameterSlot(AbstractVariableSlot):
    """Marks where an unbound :class:`Parameter` goes (no pytree children).

    Example:
        >>> ParameterSlot("w") == ParameterSlot("w")
        True
    """

    variable_class: ClassVar[type[LabeledVariable]] = Parameter


@pytree_dataclass
class StateVariableSlot(AbstractVariableSlot):
    """Marks where an unbound :class:`StateVariable` goes (no pytree children).

    Example:
        >>> StateVariableSlot("n").label
        'n'
    """

    variable_class: ClassVar[type[LabeledVariable]] = StateVariable


Parameter.value_class, Parameter.slot_class = ParameterValue, ParameterSlot
StateVariable.value_class, StateVariable.slot_class = StateVariableValue, StateVariableSlot
for _cls in (AbstractVariableValue, ParameterValue, StateVariableValue, AbstractVariableSlot, ParameterSlot, StateVariableSlot):
    # Replaces dataclasses' FrozenInstanceError with one that says what to do.
    _cls.__setattr__ = _frozen_setattr  # type: ignore[method-assign]


def kind_name(obj: Any) -> str:
    """The kind of a variable, value or slot: ``"Parameter"`` or ``"StateVariable"``.

    Args:
      obj: A mutable variable, frozen value, slot, or a class of one of them.

    Returns:
      The name of the mutable variable class of that kind.

    Example:
        >>> kind_name(ParameterSlot("w")), kind_name(StateVariableValue(0, "n"))
        ('Parameter', 'StateVariable')
    """
    cls = obj if isinstance(obj, type) else type(obj)
    if issubclass(cls, LabeledVariable):
        return cls.__name__
    variable_class = getattr(cls, "variable_class", None)
    if variable_class is None:
        raise VariableError(f"{cls.__name__} is not a variable, a frozen variable value or a slot.")
    return variable_class.__name__


def describe_at(obj: Any, keypath: tuple) -> str:
    """Renders ``Kind 'label' at path`` for error messages.

    Example:
        >>> from jax.tree_util import GetAttrKey
        >>> describe_at(ParameterSlot("w"), (GetAttrKey("w"),))
        "ParameterSlot 'w' at w"
    """
    return f"{type(obj).__name__} '{obj.label}' at {format_path(keypath)}"
