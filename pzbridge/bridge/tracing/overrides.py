"""User overrides of traced axis names, by module path: ``pzb.lift(..., axis_names=...)``.

Traced lifting names every axis it meets (see
:mod:`~pzbridge.bridge.tracing.axes`); a user who prefers other names for
one module's axes gives ``{path pattern: {traced name: new name}}``. The
pattern is a module path in label form (``blocks.3.attn``; ``blocks[3].attn``
is accepted too), with ``*`` wildcards (``blocks.*.attn``; ``*`` is every
traced module, ``""`` the root). A rename applies to the whole traced graph of
each matching module: its glue, its own weights' axes and its inputs and
outputs (a parent renames at the call, so the axes outside keep their names).

Every pattern must match a traced module and every renamed name must occur
in one, so a typo is an error, not a silent no-op.

Example:
    >>> overrides = AxisOverrides.of({"blocks.*.attn": {"projection": "head_dim"}})
    >>> rename = overrides.for_path(("blocks", 0, "attn"))
    >>> rename.apply({0: "seq", 1: "projection"})
    {0: 'seq', 1: 'head_dim'}
    >>> overrides.for_path(("blocks", 0, "mlp")) is None
    True
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Mapping, Sequence
from typing import Any

from pzbridge.core.errors import LiftError

OVERRIDES_KEY = "axis_name_overrides"


def _label(path: Sequence[str | int]) -> str:
    return ".".join(str(part) for part in path)


def _normalized(pattern: str) -> str:
    """``blocks[3].attn`` -> ``blocks.3.attn``; ``<root>`` -> ``""``."""
    if pattern == "<root>":
        return ""
    return re.sub(r"\[([^\]]*)\]", r".\1", pattern).lstrip(".")


@dataclasses.dataclass
class ModuleRenames:
    """The renames for one traced module (the union of every matching pattern's).

    Attributes:
      where: The module's path (for messages).
      mapping: Traced name -> the user's name.
      seen: Every traced name the module's graphs produced (filled by :meth:`apply`).

    Example:
        >>> ModuleRenames("mlp", {"axis0": "hidden"}).apply({3: "axis0", 4: "seq"})
        {3: 'hidden', 4: 'seq'}
    """

    where: str
    mapping: Mapping[str, str]
    seen: set[str] = dataclasses.field(default_factory=set)

    def apply(self, names: Mapping[int, str]) -> dict[int, str]:
        """Renames the final names of one graph (axis-class order -> name)."""
        self.seen.update(names.values())
        return {order: self.mapping.get(name, name) for order, name in names.items()}

    def check_value(self, names: Sequence[str | None]) -> None:
        """Raises when the renames gave one value the same axis name twice.

        Raises:
          LiftError: Naming the module, the clashing name and the value's axes.
        """
        present = [n for n in names if n is not None]
        clash = sorted({n for n in present if present.count(n) > 1})
        if clash:
            raise LiftError(
                f"{self.where or '<root>'}: axis_names renames {dict(self.mapping)} give one value the axes "
                f"{present}: expected distinct names, found {clash} twice. Fix: rename to a name the value "
                "does not already have."
            )


@dataclasses.dataclass
class AxisOverrides:
    """Every ``axis_names`` pattern of one lift, with what each matched (for the final check).

    Example:
        >>> AxisOverrides.of({"": {"seq": "tokens"}}).for_path(()).mapping
        {'seq': 'tokens'}
    """

    patterns: dict[str, dict[str, str]]
    given: dict[str, str]  # normalized pattern -> the pattern as the user wrote it
    modules: dict[str, list[ModuleRenames]] = dataclasses.field(default_factory=dict)
    traced: list[str] = dataclasses.field(default_factory=list)

    @classmethod
    def of(cls, table: Mapping[str, Mapping[str, str]]) -> AxisOverrides:
        """Validates ``axis_names`` as the user gave it.

        Raises:
          LiftError: For a key or name that is not a string, or an empty name.
        """
        if not isinstance(table, Mapping):
            raise LiftError(f"<root>: axis_names: expected a mapping {{path: {{name: new name}}}}, found "
                            f"{type(table).__name__}. Fix: e.g. axis_names={{'blocks.*.attn': {{'projection': 'head_dim'}}}}.")
        patterns: dict[str, dict[str, str]] = {}
        given: dict[str, str] = {}
        for pattern, renames in table.items():
            if not isinstance(pattern, str) or not isinstance(renames, Mapping):
                raise LiftError(f"<root>: axis_names[{pattern!r}]: expected a path string mapped to "
                                f"{{name: new name}}, found {type(renames).__name__}. Fix: e.g. "
                                f"{{'blocks.*.attn': {{'projection': 'head_dim'}}}}.")
            for old, new in renames.items():
                if not (isinstance(old, str) and isinstance(new, str) and old and new):
                    raise LiftError(f"<root>: axis_names[{pattern!r}]: expected non-empty names, found "
                                    f"{old!r} -> {new!r}. Fix: map each traced axis name to a new string.")
            key = _normalized(pattern)
            patterns.setdefault(key, {}).update(renames)
            given[key] = pattern
        return cls(patterns, given)

    def for_path(self, path: Sequence[str | int]) -> ModuleRenames | None:
        """The renames of the traced module at ``path`` (None: no pattern matches)."""
        label = _label(path)
        self.traced.append(label)
        matching = [key for key in self.patterns if fnmatch.fnmatchcase(label, key)]
        if not matching:
            return None
        mapping: dict[str, str] = {}
        for key in matching:
            mapping.update(self.patterns[key])
        renames = ModuleRenames(label, mapping)
        for key in matching:
            self.modules.setdefault(key, []).append(renames)
        return renames

    def check_used(self) -> None:
        """Raises for a pattern that matched no traced module or a name no matched module has.

        Raises:
          LiftError: Naming the pattern, what the lift traced or named, and a fix.
        """
        traced = list(dict.fromkeys(self.traced))  # first-seen order, once each
        for key, renames in self.patterns.items():
            pattern = self.given[key]
            matched = self.modules.get(key, [])
            if not matched:
                raise LiftError(
                    f"{pattern or '<root>'}: axis_names pattern matches no traced module: expected one of "
                    f"{[t or '<root>' for t in traced]} (dotted paths, * wildcards), found none. Fix: use "
                    "the path of a module lifted by tracing (modules with a rule keep their layers' names; "
                    "rename those with pzb.nn.RenameAxes)."
                )
            seen = set().union(*(m.seen for m in matched))
            missing = sorted(set(renames) - seen)
            if missing:
                raise LiftError(
                    f"{pattern or '<root>'}: axis_names renames {missing}, but the traced modules matched "
                    f"({[m.where or '<root>' for m in matched]}) have the axes {sorted(seen)}. Fix: rename "
                    "names the tracer gives (see the lifted model's treescope view)."
                )


def renames_for(ctx: Any) -> ModuleRenames | None:
    """The renames for the module traced at ``ctx.path`` in this lift (None: none given or none match).

    Example:
        >>> from pzbridge.bridge.context import LiftContext
        >>> ctx = LiftContext(framework="toy", lift_node=lambda m, c: m)
        >>> renames_for(ctx) is None
        True
    """
    overrides = ctx.shared.extras.get(OVERRIDES_KEY)
    return overrides.for_path(ctx.path) if overrides is not None else None
