"""The data the traced-lifting converter works on: operands, equations, roles, nodes, graphs.

Kept apart from the converter (:mod:`pzbridge.bridge.tracing.graph`) so
that its helpers (:mod:`pzbridge.bridge.tracing.scan`) and the structure
builder can share them without importing each other.

Example:
    >>> InputRole("data", names=("seq", "features")).kind
    'data'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


class Untraceable(Exception):
    """The traced code uses something the converter cannot express (the message says what)."""


@dataclasses.dataclass(frozen=True)
class Lit:
    """A constant operand: a literal scalar or a closed-over array."""

    value: Any


@dataclasses.dataclass(frozen=True)
class ParamAtom:
    """One of the module's arrays (or a transposed view of it) used as an operand."""

    role: int
    perm: tuple[int, ...]


@dataclasses.dataclass
class FlatEqn:
    """An equation of the inlined jaxpr: operands are value ids, :class:`Lit` s or :class:`ParamAtom` s."""

    primitive: Any
    params: dict[str, Any]
    ins: list[Any]
    outs: list[int]
    positional: bool = False  # applied by axis position (an ApplyPositional node)
    varies: frozenset = frozenset()  # params / literal positions that differ when traced at other sizes
    other: Any = None  # this equation in that second trace


@dataclasses.dataclass
class Node:
    """One layer of the graph: reads the values ``ins`` (a tuple input when several), makes value ``out``."""

    layer: Any
    ins: tuple[int, ...]
    out: int
    kind: str = "op"


@dataclasses.dataclass
class ChildSpec:
    """What the bridge tells the converter about one lifted child call.

    Attributes:
      layer: The lifted child.
      data_count: How many of the call's array arguments are positional inputs.
      side_names: Names of the remaining array arguments (keyword side inputs).
      static_side: Non-array keyword arguments.
      input_names: Per positional input, the names the child gives its
        trailing axes (None where it has no convention).
      output_names: Per flat output, names of its trailing axes (None: unknown).
    """

    layer: Any
    data_count: int
    side_names: tuple[str, ...]
    static_side: tuple[tuple[str, Any], ...]
    input_names: tuple[tuple[str, ...] | None, ...]
    output_names: tuple[tuple[str, ...] | None, ...]


@dataclasses.dataclass
class InputRole:
    """What a jaxpr input is: the main ``data`` input, a ``side`` input, or a ``param`` (the module's array).

    Attributes:
      kind: ``"data"``, ``"side"``, ``"param"``, or ``"const"`` (a value
        known at conversion time, inlined as a literal).
      name: The side input's name, or the parameter's key (for labels).
      names: For ``data``: the names of its axes (fixed); for ``side``: the
        names of its axes when known (else they are made from ``name``).
      array: For ``param``: the original array (identity defines sharing);
        for a ``stacked`` one the shape of one slice; for ``const``: the value.
      path: For ``param``: its key path in the module (for labels).
      fixed: For ``data``: the names were given (else they are suggestions
        a child's calling convention may replace).
      stacked: For ``param``: the whole stacked array when the jaxpr sees one
        slice of it per step of a scan (a layer stack), else None.
      stack_axis: For a ``stacked`` param: the name of its stack axis.
    """

    kind: str
    name: str = ""
    names: tuple[str | None, ...] = ()
    array: Any = None
    path: tuple[str | int, ...] = ()
    fixed: bool = True
    stacked: Any = None
    stack_axis: str = ""


ChildHandler = Callable[..., ChildSpec]
"""``(call, arg structs, arg names, stack=None) -> ChildSpec``; ``stack`` is ``(axis, size)`` for a stacked child."""
ParamHandler = Callable[[InputRole, tuple[str, ...]], Any]
ParamHint = Callable[[InputRole], "tuple[str, ...] | None"]


@dataclasses.dataclass
class Graph:
    """The converted module: nodes in order, the input value, the flat output values and their names."""

    nodes: list[Node]
    input_id: int | None
    output_ids: list[int]
    names: dict[int, tuple[str | None, ...]]
    unused_params: list[int]
    # Each output's axis names in the order the code returns them (an output id may be a value before the
    # transpose that produced the returned layout, so its names can be in another order).
    output_names: list[tuple[str | None, ...]] | None = None


@dataclasses.dataclass
class NestedGraph:
    """A node's layer still to be made from converted sub-graphs (a scan body, the branches of a cond).

    The structure builder turns each of ``graphs`` into a layer (one output
    per ``output_count``, a tuple when several) and uses ``make(layers)``.
    """

    graphs: list[Graph]
    output_count: int
    make: Callable[[list[Any]], Any]
