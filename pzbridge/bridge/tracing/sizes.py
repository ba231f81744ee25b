"""Which constants of a trace are input sizes: a second trace at other sizes (a mixin of the graph converter).

A jaxpr is traced at the example's shapes, so anything the code computes
from a shape is baked in: ``x[-1]`` is ``slice(5, 6)`` at length 6,
``x[i]`` normalises a negative ``i`` with ``i + 6``, ``for t in
range(x.shape[0])`` unrolls six steps. Most glue is expressed by name and
follows every call's sizes anyway (reshapes, broadcasts, ``iota``, means,
scans); these constants are not. So after the first pass the converter
traces the module again with every *free* input axis (one that no weight,
constant or rule child fixes) enlarged, a different factor per axis, and
compares the two traces equation by equation:

- a ``slice`` bound that moved with its axis counts from the end
  (``x[-1]``, ``x[1:]`` keep their meaning at every length);
- a scalar constant that is an axis's size becomes an
  :class:`~pzbridge.nn.named_ops.AxisSize`, read at call time;
- an operation that changes otherwise, or code whose operations differ
  between the traces (Python reading shapes), is :class:`Untraceable`: the
  module stays ``Foreign``, which runs the original code at every size.

When the module cannot be traced at the other sizes at all, nothing is
compared (the graph is as correct as its name-based ops).

Example:
    >>> import jax, jax.numpy as jnp
    >>> a = jax.make_jaxpr(lambda x: x[-1])(jnp.ones((6, 2))).eqns[0].params["start_indices"]
    >>> b = jax.make_jaxpr(lambda x: x[-1])(jnp.ones((12, 2))).eqns[0].params["start_indices"]
    >>> a, b
    ((5, 0), (11, 0))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr

from pzbridge.bridge.tracing.graph_types import FlatEqn, Lit, Untraceable
from pzbridge.nn.named_ops import AxisSize

Retrace = Callable[[Mapping[int, Mapping[int, int]]], Any]
"""``{input position: {axis: new size}} -> ClosedJaxpr`` of the same call at other sizes, or None."""

# Primitives whose size-dependent parameters the converter expresses by name (they follow every call's sizes).
_BY_NAME = {
    "reshape", "broadcast_in_dim", "iota", "scan", "cond", "pzb_child_call", "squeeze", "expand_dims",
    "concatenate", "dot_general", "transpose", "argmax", "argmin", "reduce_sum", "reduce_max", "reduce_min",
    "reduce_prod", "reduce_and", "reduce_or", "convert_element_type",
}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (ClosedJaxpr, Jaxpr)) or isinstance(b, (ClosedJaxpr, Jaxpr)):
        return True  # bodies are converted (and compared) on their own
    if isinstance(a, (float, np.floating)) and isinstance(b, (float, np.floating)):
        return bool(np.array_equal(a, b, equal_nan=True))  # a gather's fill value may be NaN
    try:
        return bool(np.array_equal(np.asarray(a), np.asarray(b), equal_nan=np.asarray(a).dtype.kind == "f")
                    if hasattr(a, "shape") else a == b)
    except Exception:  # noqa: BLE001 - parameters without a usable equality
        return a is b


def mark_variation(first: Sequence[FlatEqn], second: Sequence[FlatEqn], axes: str) -> None:
    """Records on each equation of ``first`` what differs in ``second`` (the same code at other sizes).

    Raises:
      Untraceable: If the two traces run different operations.
    """
    if len(first) != len(second) or any(a.primitive is not b.primitive for a, b in zip(first, second)):
        raise Untraceable(f"its operations change with the size of {axes} (Python code that reads shapes)")
    for a, b in zip(first, second):
        differs: set[Any] = {k for k, v in a.params.items() if not _same(v, b.params.get(k))}
        for position, (x, y) in enumerate(zip(a.ins, b.ins)):
            if isinstance(x, Lit) and isinstance(y, Lit) and (
                    np.shape(x.value) != np.shape(y.value) or not _same(x.value, y.value)):
                differs.add(position)
        a.varies, a.other = frozenset(differs), b


class SizeVariation:
    """The converter's second-trace check (mixed into the converter class)."""

    table: Any
    roles: list[Any]
    avals: dict[int, Any]
    dims: dict[int, list[Any]]
    input_ids: dict[int, int]
    param_dims: dict[int, list[Any]]
    lit_dims: dict[int, list[Any]]
    size_bound: set[Any]
    eqns: list[FlatEqn]
    final: dict[int, str]

    def check_sizes(self, retrace: Retrace, flatten: Callable[[Any], tuple[list[FlatEqn], dict[int, Any]]]) -> None:
        """Traces again at other sizes and marks what moved (see the module docstring)."""
        free = self._free_axes()
        roots = sorted({root.order: root for root in free.values()}.values(), key=lambda r: r.order)
        factors = {root.order: 2 + k for k, root in enumerate(roots)}  # distinct, so a size names its axis
        for chosen in ([roots, *([r] for r in roots)] if len(roots) > 1 else [roots] if roots else []):
            orders = {r.order for r in chosen}
            sizes: dict[int, dict[int, int]] = {}
            for (position, axis), root in free.items():
                if root.order in orders:
                    sizes.setdefault(position, {})[axis] = self._size_at(position, axis) * factors[root.order]
            closed = retrace(sizes)
            if closed is None:
                continue
            eqns, self.other_avals = flatten(closed)
            mark_variation(self.eqns, eqns, ", ".join(sorted({r.name for r in chosen})))
            self.size_axes = [(root, self._size_at(*key), factors[root.order])
                              for key, root in free.items() if root.order in orders]
            return

    def _positions(self) -> list[int]:
        """Role indices of the traced inputs (the retrace's dynamic positions), computed once."""
        if not hasattr(self, "input_positions"):
            self.input_positions = [i for i, role in enumerate(self.roles) if role.kind not in ("param", "const")]
        return self.input_positions

    def _size_at(self, position: int, axis: int) -> int:
        return int(self.avals[self.input_ids[self._positions()[position]]].shape[axis])

    def _free_axes(self) -> dict[tuple[int, int], Any]:
        """``(input position, axis) -> class`` of input axes no weight, constant or rule child fixes."""
        bound = {self.table.find(d).order for dims in (*self.param_dims.values(), *self.lit_dims.values())
                 for d in dims}
        bound |= {self.table.find(d).order for d in self.size_bound}
        free: dict[tuple[int, int], Any] = {}
        for position, index in enumerate(self._positions()):
            value = self.input_ids[index]
            for axis, (d, size) in enumerate(zip(self.dims.get(value, ()), self.avals[value].shape)):
                if d is not None and size > 1 and self.table.find(d).order not in bound:
                    free[(position, axis)] = self.table.find(d)
        return free

    def size_constant(self, eqn: FlatEqn, position: int, value: Any) -> AxisSize | None:
        """The :class:`AxisSize` a scalar constant of ``eqn`` stands for (None: a plain number).

        Raises:
          Untraceable: For a constant that moves with the sizes but is no axis's size.
        """
        if position not in eqn.varies:
            return None
        other = eqn.other.ins[position].value
        if np.ndim(value) == 0:
            for root, size, factor in getattr(self, "size_axes", ()):
                name = self._input_axis_name(root)
                if name and float(value) == size and float(other) == size * factor:
                    return AxisSize(name, size, str(np.asarray(value).dtype))
        raise Untraceable(f"a constant of `{eqn.primitive.name}` depends on the input's size in a way traced "
                          "lifting cannot follow")

    def shape_follows(self, eqn: FlatEqn, index: int) -> str:
        """The input axis whose size entry ``index`` of ``eqn``'s ``shape`` parameter follows, "" when fixed.

        Raises:
          Untraceable: For an entry that moved with the sizes but by no input axis's factor.
        """
        if "shape" not in getattr(eqn, "varies", ()):
            return ""
        size, other = int(eqn.params["shape"][index]), int(eqn.other.params["shape"][index])
        if size == other:
            return ""
        for root, root_size, factor in getattr(self, "size_axes", ()):
            name = self._input_axis_name(root)
            if name and size == root_size and other == root_size * factor:
                return name
        raise Untraceable(f"`{eqn.primitive.name}` makes an axis of size {size} that changes with the input's "
                          "sizes in a way traced lifting cannot follow")

    def _input_axis_name(self, root: Any) -> str:
        """The name of an input axis (main or side input) of class ``root``, read from ``AXIS_SIZES`` at call time."""
        for index in self._positions():
            for d in self.dims.get(self.input_ids[index], ()):
                if d is not None and self.table.find(d) is root:
                    return self.table.name_of(root, self.final) or ""
        return ""

    def slice_bounds(self, eqn: FlatEqn, axis: int) -> tuple[str, str]:
        """How a ``slice``'s start and stop behave at other sizes: ``"start"`` (fixed), ``"end"`` (counts from
        the end of the axis) or ``"follow"`` (moves with another axis: the slice is that long).

        Raises:
          Untraceable: For a bound that moved by an amount traced lifting cannot follow.
        """
        operand, other = eqn.ins[0], eqn.other.ins[0]
        grown = (int(self.other_avals[other].shape[axis]) - int(self.avals[operand].shape[axis])
                 if isinstance(operand, int) and isinstance(other, int) else 0)
        kinds = []
        for key in ("start_indices", "limit_indices"):
            moved = int(eqn.other.params[key][axis]) - int(eqn.params[key][axis])
            if moved == 0:
                kinds.append("start")
            elif grown and moved == grown:
                kinds.append("end")
            elif not grown and key == "limit_indices":
                kinds.append("follow")
            else:
                raise Untraceable(f"a slice of axis {axis} moves with the input's size in a way traced lifting "
                                  "cannot follow")
        return kinds[0], kinds[1]

    def assert_sizes_followed(self, eqn: FlatEqn, handled: bool) -> None:
        """Raises for an equation whose size-dependent constants no node follows.

        Raises:
          Untraceable: Naming the primitive and what moved.
        """
        if eqn.varies and not handled and eqn.primitive.name not in _BY_NAME:
            what = ", ".join(str(k) for k in sorted(eqn.varies, key=str))
            raise Untraceable(f"`{eqn.primitive.name}` uses the input's size as a constant ({what}); at other "
                              "sizes the traced graph would compute something else")
