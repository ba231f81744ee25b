"""The state one lift or lower traversal carries: path, naming, and sharing.

Sharing is the subtle part. In the original model one array (or one NNX
Variable) can be reached from several places; the lifted model must hold one
:class:`~pzbridge.Parameter` object in all of them, and the lowered model
must again hold one array (one Variable) in all of them. Both contexts
therefore keep an identity-keyed table shared by every child context of one
traversal.

Example:
    >>> import jax.numpy as jnp
    >>> ctx = LiftContext(framework="toy", lift_node=lambda m, c: m)
    >>> w = jnp.ones(2)
    >>> a = ctx.child("a").parameter(w, ("features",), "weight")
    >>> b = ctx.child("b").parameter(w, ("features",), "weight")
    >>> a is b, a.label, a.value.data_array is w
    (True, 'a.weight', True)
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax

from pzbridge.bridge.naming import AxisNaming
from pzbridge.core import named_axes as nx
from pzbridge.core.errors import LiftError, LowerError
from pzbridge.core.variable_base import AbstractVariable
from pzbridge.core.variables import Parameter, StateVariable


def _path_text(path: tuple[str | int, ...]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<root>"


def _label_text(path: tuple[str | int, ...], names: Sequence[str]) -> str:
    return ".".join(str(part) for part in (*path, *names))


@dataclasses.dataclass
class _Shared:
    """Tables shared by all contexts of one traversal."""

    by_identity: dict[int, Any] = dataclasses.field(default_factory=dict)
    keep_alive: list[Any] = dataclasses.field(default_factory=list)
    labels: dict[str, Any] = dataclasses.field(default_factory=dict)
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class LiftContext:
    """Where a lift traversal is, and what it has created so far.

    Attributes:
      framework: ``"equinox"`` or ``"nnx"`` (for messages).
      lift_node: The framework's dispatch function ``(module, ctx) -> lifted``.
      naming: The axis-naming policy.
      strict: Raise instead of producing ``Foreign``.
      path: Attribute path from the root (strings and list indices).
      example: An example call (:class:`~pzbridge.bridge.tracing.example.Example`)
        for the module lifted at this path, or None: with it, a module
        without a rule is traced instead of becoming ``Foreign``.

    Example:
        >>> LiftContext(framework="toy", lift_node=lambda m, c: m).child("blocks", 3).where
        'blocks[3]'
    """

    framework: str
    lift_node: Callable[[Any, LiftContext], Any]
    naming: AxisNaming = dataclasses.field(default_factory=AxisNaming)
    strict: bool = False
    path: tuple[str | int, ...] = ()
    shared: _Shared = dataclasses.field(default_factory=_Shared)
    example: Any = None

    @property
    def where(self) -> str:
        """The model path for messages, e.g. ``blocks[3].attn``."""
        return _path_text(self.path)

    def child(self, *keys: str | int) -> LiftContext:
        """The context of a child at ``keys`` below this one (same shared tables, no example input)."""
        return dataclasses.replace(self, path=(*self.path, *keys), example=None)

    def with_example(self, example: Any) -> LiftContext:
        """The same context carrying an example input for the module lifted here (enables tracing).

        Example:
            >>> ctx = LiftContext(framework="toy", lift_node=lambda m, c: m).with_example("x")
            >>> ctx.example, ctx.child("a").example
            ('x', None)
        """
        return dataclasses.replace(self, example=example)

    def undo_point(self) -> Callable[[], None]:
        """An ``undo()`` that forgets every variable and label registered from now on (for a discarded lift).

        Example:
            >>> import jax.numpy as jnp
            >>> ctx = LiftContext(framework="toy", lift_node=lambda m, c: m)
            >>> undo = ctx.undo_point()
            >>> _ = ctx.parameter(jnp.ones(2), ("features",), "w")
            >>> undo()
            >>> list(ctx.shared.labels)
            []
        """
        shared = self.shared
        sizes = (len(shared.by_identity), len(shared.labels), len(shared.keep_alive))

        def undo() -> None:
            # Dicts keep insertion order: what was added since is what follows the recorded sizes.
            for table, size in ((shared.by_identity, sizes[0]), (shared.labels, sizes[1])):
                for key in list(table)[size:]:
                    del table[key]
            del shared.keep_alive[sizes[2]:]

        return undo

    def lift(self, module: Any, *keys: str | int) -> Any:
        """Lifts a child module found at ``keys`` below this context."""
        return self.lift_node(module, self.child(*keys))

    def label(self, *names: str) -> str:
        """A variable label: the path joined with dots, e.g. ``blocks.3.attn.query.kernel``."""
        return _label_text(self.path, names)

    def variable(self, kind: type, source: Any, value: Callable[[], Any], label: str, metadata: Mapping | None) -> Any:
        """The variable of ``kind`` for ``source`` (shared if ``source`` was seen before).

        Args:
          kind: ``Parameter`` or ``StateVariable``.
          source: The object whose identity defines sharing.
          value: Called once, for a new variable, to make its value.
          label: The label for a new variable (must be unique in the model).
          metadata: Variable metadata.

        Raises:
          LiftError: If ``source`` was lifted as the other kind, or ``label`` is taken.
        """
        existing = self.shared.by_identity.get(id(source))
        if existing is not None:
            if not isinstance(existing, kind):
                raise LiftError(
                    f"{self.where}: the object behind {label!r} was already lifted as a {type(existing).__name__} "
                    f"({existing.label!r}) but is needed here as a {kind.__name__}. "
                    "Fix: do not use one array both as a trainable parameter and as state."
                )
            return existing
        if label in self.shared.labels:
            raise LiftError(
                f"{self.where}: two different arrays would both be labelled {label!r}. "
                "Fix: this is a bug in a lifting rule; register a rule that names its variables uniquely."
            )
        variable = kind(value(), label, metadata)
        self.shared.by_identity[id(source)] = variable
        self.shared.keep_alive.append(source)
        self.shared.labels[label] = variable
        return variable

    def parameter(
        self, array: Any, axis_names: Sequence[str], *label_names: str, metadata: Mapping | None = None,
        source: Any = None,
    ) -> Parameter:
        """The Parameter for ``array`` (named ``axis_names``), shared if seen before.

        Args:
          array: The array, kept as the very buffer (no copy).
          axis_names: A name for each of its axes, in storage order.
          *label_names: Label parts appended to the path (e.g. ``"weight"``).
          metadata: Variable metadata (e.g. NNX sharding annotations).
          source: The object whose identity defines sharing (default: ``array``;
            NNX passes its Variable object).

        Returns:
          A :class:`~pzbridge.Parameter` whose value is a NamedArray over ``array``.
        """
        return self.variable(
            Parameter, array if source is None else source, lambda: _wrap(array, axis_names),
            self.label(*label_names), metadata,
        )

    def raw_parameter(self, array: Any, *label_names: str, metadata: Mapping | None = None,
                      source: Any = None) -> Parameter:
        """A Parameter over an array whose axes have no known meaning (value kept as a plain array).

        ``Foreign`` modules hold such arrays: their code, not pzbridge, gives
        the axes meaning. Sharing works as in :meth:`parameter`.
        """
        return self.variable(
            Parameter, array if source is None else source, lambda: array, self.label(*label_names), metadata
        )

    def state_variable(
        self, value: Any, *label_names: str, metadata: Mapping | None = None, source: Any = None
    ) -> StateVariable:
        """The StateVariable for ``value`` (any pytree), shared if seen before."""
        return self.variable(
            StateVariable, value if source is None else source, lambda: value, self.label(*label_names), metadata
        )


@dataclasses.dataclass
class LowerContext:
    """Where a lower traversal is, and which variables it has lowered so far.

    Attributes:
      framework: Target framework name.
      lower_node: The framework's dispatch function ``(layer, ctx) -> module``.
      path: Attribute path from the root.

    Example:
        >>> import jax.numpy as jnp
        >>> from pzbridge.core.variables import Parameter
        >>> ctx = LowerContext(framework="toy", lower_node=lambda l, c: l)
        >>> p = Parameter(nx.wrap(jnp.ones((2, 3)), "a", "b"), "p")
        >>> ctx.array(p, ("b", "a")).shape
        (3, 2)
    """

    framework: str
    lower_node: Callable[[Any, LowerContext], Any]
    path: tuple[str | int, ...] = ()
    shared: _Shared = dataclasses.field(default_factory=_Shared)

    @property
    def where(self) -> str:
        """The model path for messages."""
        return _path_text(self.path)

    def child(self, *keys: str | int) -> LowerContext:
        """The context of a child at ``keys`` below this one."""
        return dataclasses.replace(self, path=(*self.path, *keys))

    def lower(self, layer: Any, *keys: str | int) -> Any:
        """Lowers a child layer found at ``keys`` below this context."""
        return self.lower_node(layer, self.child(*keys))

    def array(self, variable: Any, axis_names: Sequence[str]) -> Any:
        """The raw array of a parameter-like object, with axes in ``axis_names`` order.

        Accepts a Parameter / StateVariable, a frozen value, or a NamedArray.
        The same variable always lowers to the same array object, so sharing
        survives lowering. No copy is made when the layout already matches.

        Raises:
          LowerError: If the value is a slot or its axes differ from ``axis_names``.
        """
        key = id(variable)
        cached = self.shared.by_identity.get((key, tuple(axis_names)))
        if cached is not None:
            return cached
        if not _has_value(variable):
            raise LowerError(
                f"{self.where}: cannot lower {variable!r}: it is an unbound slot, so there is no array to put "
                f"in the {self.framework} module. Fix: bind variables first with "
                "pzb.bind_variables(model, variables), or lower the model the slots came from."
            )
        value = getattr(variable, "value", variable)
        if value is None:
            raise LowerError(
                f"{self.where}: cannot lower {getattr(variable, 'label', 'value')!r}: it holds None where the "
                f"{self.framework} layer needs an array. Fix: give it an array value before lowering "
                "(variable.value = ...)."
            )
        if not nx.is_namedarray(value):
            array = value
        else:
            if set(value.named_shape) != set(axis_names) or value.positional_shape:
                raise LowerError(
                    f"{self.where}: {getattr(variable, 'label', 'value')!r} has named axes "
                    f"{dict(value.named_shape)} (positional {value.positional_shape}); the {self.framework} "
                    f"layer needs exactly {list(axis_names)}. Fix: rename the axes (pzb.nn.RenameAxes) or "
                    "restore the parameter's shape."
                )
            array = value.untag(*axis_names).unwrap()
        if isinstance(variable, AbstractVariable) or hasattr(variable, "label"):
            self.shared.by_identity[(key, tuple(axis_names))] = array
            self.shared.keep_alive.append(variable)
        return array

    def cached(self, source: Any, make: Callable[[], Any]) -> Any:
        """Returns ``make()`` once per ``source`` object (for lowered Variables, shared submodules)."""
        key = ("cached", id(source))
        if key not in self.shared.by_identity:
            self.shared.by_identity[key] = make()
            self.shared.keep_alive.append(source)
        return self.shared.by_identity[key]


TRAVERSAL_RECURSION_LIMIT = 16_000
"""Python's recursion limit inside :func:`recursion_headroom` (at least; a higher one is kept).

Lifting, lowering and calling recurse about 8 Python frames per level of
module nesting, so the default limit of 1,000 stops at 120-260 nested
wrappers; 16,000 covers about 1,800 levels. Python 3.11+ runs Python-to-Python
calls without growing the C stack (1,000 levels use under 1 MiB of it), and
16,000 frames stay inside an 8 MiB thread stack even where every frame
recurses through C (about 30,000 do). On Python 3.12+ the limit counts Python
frames only; recursion through C has a fixed limit of its own.
"""

_HEADROOM_LOCK = threading.Lock()
_headroom = {"users": 0, "saved": 0, "raised_to": 0}


@contextlib.contextmanager
def recursion_headroom(limit: int = TRAVERSAL_RECURSION_LIMIT) -> Iterator[None]:
    """Raises Python's recursion limit to at least ``limit`` inside the block, and restores it after.

    The limit is process-wide, so concurrent and nested blocks are counted:
    the first raises it, the last one out restores the saved value (unless
    something else changed it meanwhile). Wraps ``lift``, ``lower`` and calls
    of a ``LiftedModel``, whose traversals recurse once per nesting level.

    Example:
        >>> import sys
        >>> before = sys.getrecursionlimit()
        >>> with recursion_headroom(before + 500):
        ...     sys.getrecursionlimit() == before + 500
        True
        >>> sys.getrecursionlimit() == before
        True
    """
    with _HEADROOM_LOCK:
        state = _headroom
        if state["users"] == 0:
            state["saved"] = state["raised_to"] = sys.getrecursionlimit()
        if sys.getrecursionlimit() < limit:
            sys.setrecursionlimit(limit)
            state["raised_to"] = limit
        state["users"] += 1
    try:
        yield
    finally:
        with _HEADROOM_LOCK:
            state["users"] -= 1
            if state["users"] == 0 and sys.getrecursionlimit() == state["raised_to"]:
                sys.setrecursionlimit(state["saved"])


def _wrap(array: Any, axis_names: Sequence[str]) -> nx.NamedArray:
    # Abstract arrays (models built with eqx.filter_eval_shape) are named without jnp.asarray.
    if isinstance(array, jax.ShapeDtypeStruct) and len(axis_names) == len(array.shape):
        return nx.NamedArray(array, dict(zip(axis_names, array.shape)))
    return nx.wrap(array, *axis_names)


def _has_value(obj: Any) -> bool:
    try:
        getattr(obj, "value")
    except Exception:  # noqa: BLE001 - slots raise a VariableError on .value
        return nx.is_namedarray(obj)
    return True
