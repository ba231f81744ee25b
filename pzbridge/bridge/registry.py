"""The rule tables that drive lifting and lowering.

Lifting and lowering are each one traversal driven by a table (see
``docs/architecture.md``): a *rule* knows one framework class and the lifted
class(es) it becomes, with both directions side by side:

- ``lift(module, ctx)`` turns a framework module into a lifted layer;
- ``lower(layer, ctx)`` turns a lifted layer back into a framework module.

Lift rules match the module's exact class: a user subclass of
``eqx.nn.Linear`` may override ``__call__``, so it is treated as unknown
(``Foreign``) until someone registers a rule for it. Lower rules match along
the lifted layer's MRO, so a rule for ``pzb.nn.Sequential`` also lowers
user-defined ``Sequential`` subclasses.

Example:
    >>> registry = RuleRegistry("toy")
    >>> @registry.rule(source=int, lifted=(str,))
    ... class IntRule:
    ...     def lift(self, module, ctx): return str(module)
    ...     def lower(self, layer, ctx): return int(layer)
    >>> registry.lift_rule_for(int).lift(3, None), registry.lower_rule_for(str).lower("4", None)
    ('3', 4)
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

_R = TypeVar("_R")

# One table per memo block: (tag, id(obj), *ids of extra keys) -> (obj, extras, result). Keeping obj and
# extras in the value keeps them alive, so an id cannot be reused by another object inside the block.
# A ContextVar keeps concurrent lifts in different threads apart.
_MEMO: contextvars.ContextVar[dict[tuple[Any, ...], tuple[Any, Any, Any]] | None] = contextvars.ContextVar(
    "pzbridge_memo", default=None)


@contextlib.contextmanager
def memo_block() -> Iterator[None]:
    """Within this block :func:`memoised` computes each value once per object (one lift runs in one block).

    Nested blocks share the outermost block's table; it is dropped when that block ends.

    Example:
        >>> calls = []
        >>> with memo_block():
        ...     for _ in range(3):
        ...         _ = memoised("demo", calls, lambda: calls.append(1))
        >>> len(calls)
        1
    """
    if _MEMO.get() is not None:
        yield
        return
    token = _MEMO.set({})
    try:
        yield
    finally:
        _MEMO.reset(token)


def memoised(tag: str, obj: Any, compute: Callable[[], _R], *extra: Any) -> _R:
    """``compute()``, computed once per ``(tag, obj, *extra)`` identity within the current :func:`memo_block`.

    Outside any block one is opened for the duration of the call, so a
    recursive computation (a convention of nested containers) is memoised
    across its own recursion. Only for values that depend on nothing but the
    objects' identities (modules are not mutated during a lift).

    Example:
        >>> memoised("demo", [1, 2], lambda: "computed")
        'computed'
    """
    memo = _MEMO.get()
    if memo is None:
        with memo_block():
            return memoised(tag, obj, compute, *extra)
    key = (tag, id(obj), *map(id, extra))
    hit = memo.get(key)
    if hit is not None:
        return hit[2]
    result = compute()
    memo[key] = (obj, extra, result)
    return result


class Rule(Protocol):
    """A pair of conversions between one framework class and its lifted form.

    Example:
        >>> class Noop:
        ...     def lift(self, module, ctx): return module
        ...     def lower(self, layer, ctx): return layer
        >>> Noop().lower(Noop().lift(1, None), None)
        1
    """

    def lift(self, module: Any, ctx: Any) -> Any:
        """Framework module -> lifted layer."""
        ...

    def lower(self, layer: Any, ctx: Any) -> Any:
        """Lifted layer -> framework module."""
        ...


class RuleRegistry:
    """A framework's table of lift and lower rules.

    Args:
      framework: The framework's name, used in messages (``"equinox"``, ``"nnx"``).

    Example:
        >>> RuleRegistry("equinox").framework
        'equinox'
    """

    def __init__(self, framework: str) -> None:
        self.framework = framework
        self._lift: dict[type, Any] = {}
        self._lower: dict[type, Any] = {}
        self._unknown: Callable[[Any, Any], Any] | None = None
        self._stacked: Callable[[Any, Any], Any] | None = None
        self._stack_shaped: Callable[[Any], bool] = lambda module: False

    def rule(self, source: type | None = None, lifted: Sequence[type] = ()) -> Callable[[type[_R]], type[_R]]:
        """Class decorator registering a rule (an instance is created once).

        Args:
          source: The framework class the rule lifts (exact match), or None
            for a lower-only rule (lifted layers with no source class, such as
            generic pzbridge layers that lower to a native module).
          lifted: The lifted classes the rule lowers (matched along the MRO).

        Returns:
          The decorator; it returns the class unchanged.

        Example:
            >>> registry = RuleRegistry("toy")
            >>> @registry.rule(lifted=(float,))
            ... class FloatRule:
            ...     def lower(self, layer, ctx): return round(layer)
            >>> registry.lower_rule_for(float).lower(2.6, None)
            3
        """

        def register(cls: type[_R]) -> type[_R]:
            self.add(cls(), source, lifted)
            return cls

        return register

    def add(self, rule: Any, source: type | None = None, lifted: Sequence[type] = ()) -> None:
        """Registers a rule object (see :meth:`rule`); later rules override earlier ones.

        Example:
            >>> registry = RuleRegistry("toy")
            >>> class R:
            ...     def lift(self, module, ctx): return "lifted"
            >>> registry.add(R(), source=bytes)
            >>> registry.lift_rule_for(bytes).lift(b"", None)
            'lifted'
        """
        if source is not None:
            self._lift[source] = rule
        for cls in lifted:
            self._lower[cls] = rule

    def lift_rule_for(self, cls: type) -> Any | None:
        """The rule lifting exactly ``cls``, or None.

        Example:
            >>> RuleRegistry("toy").lift_rule_for(int) is None
            True
        """
        return self._lift.get(cls)

    def lower_rule_for(self, cls: type) -> Any | None:
        """The rule lowering ``cls`` or its nearest registered base class, or None.

        Example:
            >>> registry = RuleRegistry("toy")
            >>> class R:
            ...     def lower(self, layer, ctx): return "base"
            >>> registry.add(R(), lifted=(Exception,))
            >>> registry.lower_rule_for(KeyError).lower(None, None)
            'base'
        """
        for base in cls.__mro__:
            rule = self._lower.get(base)
            if rule is not None:
                return rule
        return None

    def set_unknown_handler(self, handler: Callable[[Any, Any], Any]) -> None:
        """Sets how a module without a lift rule is lifted (``Foreign``, or traced when examples are given).

        Example:
            >>> registry = RuleRegistry("toy")
            >>> registry.set_unknown_handler(lambda module, ctx: ("unknown", module))
            >>> registry.lift_unknown(3, None)
            ('unknown', 3)
        """
        self._unknown = handler

    def lift_unknown(self, module: Any, ctx: Any) -> Any:
        """Lifts a module that has no rule with the handler set by :meth:`set_unknown_handler`.

        Raises:
          LookupError: If no handler is set.
        """
        if self._unknown is None:
            raise LookupError(f"the {self.framework} rule table has no handler for modules without a rule")
        return self._unknown(module, ctx)

    def set_stacked_handler(self, handler: Callable[[Any, Any], Any],
                            stack_shaped: Callable[[Any], bool] = lambda module: True) -> None:
        """Sets how a module whose rule failed is tried as a stack of blocks (None: it is not one).

        ``stack_shaped(module)`` is a cheap test (its arrays share a leading
        size) deciding whether a module its rule declined is worth trying.

        Example:
            >>> registry = RuleRegistry("toy")
            >>> registry.set_stacked_handler(lambda module, ctx: None)
            >>> registry.lift_if_stacked(3, None) is None
            True
        """
        self._stacked = handler
        self._stack_shaped = stack_shaped

    def lift_if_stacked(self, module: Any, ctx: Any) -> Any | None:
        """The module lifted as a layer stack when its arrays have a common stack axis, else None."""
        return None if self._stacked is None else self._stacked(module, ctx)

    def lift_with_rule(self, rule: Any, module: Any, ctx: Any, declined: Callable[[Any], bool]) -> Any:
        """``rule.lift(module, ctx)``, or the module as a layer stack when the rule fails or declines.

        A module whose arrays carry an extra leading stack axis (layers made by
        ``eqx.filter_vmap`` / ``nnx.vmap``) makes its rule raise or decline
        (``declined(lifted)``, e.g. a ``Foreign``); it is then tried as a
        stack (:meth:`lift_if_stacked`) with the failed attempt's variables
        forgotten. Otherwise the rule's error or result stands.

        Example:
            >>> from pzbridge.bridge.context import LiftContext
            >>> registry = RuleRegistry("toy")
            >>> class Rule:
            ...     def lift(self, module, ctx): return str(module)
            >>> registry.lift_with_rule(Rule(), 3, LiftContext("toy", lambda m, c: m), lambda lifted: False)
            '3'
        """
        undo = ctx.undo_point()
        try:
            lifted = rule.lift(module, ctx)
        except (ValueError, TypeError):  # LiftError is a TypeError
            undo()
            stacked = self.lift_if_stacked(module, ctx)
            if stacked is None:
                raise
            return stacked
        if not declined(lifted) or not self._stack_shaped(module):
            return lifted
        undo()
        stacked = self.lift_if_stacked(module, ctx)
        return stacked if stacked is not None else rule.lift(module, ctx)

    def convention_of(self, module: Any, naming: Any) -> Any | None:
        """The calling convention the lift rule of ``module``'s class records, or None.

        Rules may define ``convention(module, naming)`` to say what the
        module's positional inputs and output are called. The result is
        memoised per module and naming object (see :func:`memoised`): a
        container's convention reads its children's, so nested containers
        would otherwise recompute them exponentially often.

        Example:
            >>> registry = RuleRegistry("toy")
            >>> class R:
            ...     def convention(self, module, naming): return ("features",)
            >>> registry.add(R(), source=int)
            >>> registry.convention_of(3, None), registry.convention_of("x", None)
            (('features',), None)
        """
        rule = self.lift_rule_for(type(module))
        if rule is None or not hasattr(rule, "convention"):
            return None
        return memoised(f"{self.framework}-convention", module, lambda: rule.convention(module, naming), naming)

    def lowered_convention(self, layer: Any, module: Any, naming: Any) -> Any | None:
        """The convention of ``module``, the native ``layer`` lowered to, where it depends on ``layer``; else None.

        A lowering rule defines ``native_convention(layer, module, naming)``
        when the native class takes inputs of any rank (``eqx.nn.GroupNorm``:
        ``(channels, *spatial)``), so only the lifted layer says how its
        call's axes are named; other natives use :meth:`convention_of`.

        Example:
            >>> registry = RuleRegistry("toy")
            >>> class R:
            ...     def lower(self, layer, ctx): return layer
            ...     def native_convention(self, layer, module, naming): return ("channels",)
            >>> registry.add(R(), lifted=(int,))
            >>> registry.lowered_convention(3, 3, None), registry.lowered_convention("x", "x", None)
            (('channels',), None)
        """
        own = getattr(self.lower_rule_for(type(layer)), "native_convention", None)
        return own(layer, module, naming) if own is not None else None

    def known_sources(self) -> list[str]:
        """Names of the framework classes with lift rules (for error messages).

        Example:
            >>> RuleRegistry("toy").known_sources()
            []
        """
        return sorted(f"{cls.__module__}.{cls.__qualname__}" for cls in self._lift)
