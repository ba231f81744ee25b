"""Axis classes: which dimensions of a traced computation are the same named axis.

Names flow through a traced graph the way a reader would name them: a
dimension keeps its name through elementwise code, contracted dimensions of
a weight take the name of the activation axis they meet, a head split makes
``heads`` and ``projection``, and the second ``seq`` of an attention score
becomes ``kv_seq``. Each dimension of each traced value points to an
:class:`AxisClass`; classes merge (union-find) when the code shows two
dimensions are the same axis, unless that would give one value the same axis
twice. Fixed classes carry a name that comes from the model (the input's
names, a child layer's calling convention, a head split); unfixed classes
(a raw weight's dimensions, an ``iota``) take a name from what they meet.

Example:
    >>> table = AxisTable()
    >>> seq, weight_dim = table.new("seq", fixed=True), table.new("axis")
    >>> table.unify(weight_dim, seq)
    True
    >>> table.find(weight_dim).name
    'seq'
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Sequence

_KV_PREFIX = "kv_"


@dataclasses.dataclass(eq=False)
class AxisClass:
    """One named axis of a traced computation (a union-find node).

    Attributes:
      name: The name the axis will get (suggested or fixed).
      fixed: The name comes from the model and wins over unfixed names.
      order: Creation order (the final naming is deterministic).
      size_like: Another class this axis always has the size of (the
        ``seq`` a ``kv_seq`` was split from), for sizes read at call time.
    """

    name: str
    fixed: bool
    order: int
    parent: AxisClass | None = None
    together: set[int] = dataclasses.field(default_factory=set)
    size_like: AxisClass | None = None


class AxisTable:
    """Creates, merges and finally names :class:`AxisClass` es.

    Example:
        >>> table = AxisTable()
        >>> a, b = table.new("seq", True), table.new("seq", True)
        >>> table.record_value([a, b])  # one value holds both: they can never merge
        >>> table.unify(a, b), sorted(table.final_names([[a, b]]).values())
        (False, ['kv_seq', 'seq'])
    """

    def __init__(self) -> None:
        self._counter = itertools.count()
        self._classes: list[AxisClass] = []

    def new(self, name: str, fixed: bool = False, size_like: AxisClass | None = None) -> AxisClass:
        """A fresh class named ``name``."""
        cls = AxisClass(name, fixed, next(self._counter), size_like=size_like)
        self._classes.append(cls)
        return cls

    def find(self, cls: AxisClass) -> AxisClass:
        """The representative of ``cls``'s set."""
        while cls.parent is not None:
            if cls.parent.parent is not None:
                cls.parent = cls.parent.parent
            cls = cls.parent
        return cls

    def record_value(self, dims: Iterable[AxisClass | None]) -> None:
        """Notes that these classes are the axes of one value (so they stay distinct)."""
        roots = [self.find(d) for d in dims if d is not None]
        orders = {r.order for r in roots}
        for root in roots:
            root.together |= orders - {root.order}

    def unify(self, a: AxisClass, b: AxisClass) -> bool:
        """Merges ``a`` and ``b`` when compatible; returns whether they are now one class.

        Two fixed classes merge only when their names agree; classes that are
        axes of one value never merge.
        """
        ra, rb = self.find(a), self.find(b)
        if ra is rb:
            return True
        if ra.order in rb.together or rb.order in ra.together:
            return False
        if ra.fixed and rb.fixed and ra.name != rb.name:
            return False
        keep, drop = (ra, rb) if (ra.fixed or not rb.fixed) else (rb, ra)
        if keep.order > drop.order and keep.fixed == drop.fixed:
            keep, drop = drop, keep
        drop.parent = keep
        keep.together |= drop.together
        for other in self._classes:
            if drop.order in other.together:
                other.together.add(keep.order)
        return True

    def same(self, a: AxisClass | None, b: AxisClass | None) -> bool:
        """True when both are the same class (or both absent)."""
        if a is None or b is None:
            return a is b
        return self.find(a) is self.find(b)

    def final_names(self, values: Sequence[Sequence[AxisClass | None]]) -> dict[int, str]:
        """One name per class (by creation order) such that no value has two axes of one name.

        The later of two clashing classes gets the ``kv_`` prefix (``seq`` ->
        ``kv_seq``, the key side of attention scores); when that is taken too,
        ``_2``, ``_3`` ... in creation order.
        """
        roots: dict[int, AxisClass] = {}
        together: dict[int, set[int]] = {}
        for dims in values:
            present = [self.find(d) for d in dims if d is not None]
            for root in present:
                roots[root.order] = root
                together.setdefault(root.order, set()).update(r.order for r in present if r is not root)
        names: dict[int, str] = {}
        for order in sorted(roots):
            root = roots[order]
            taken = {names[o] for o in together.get(order, ()) if o in names}
            name = root.name
            if name in taken:
                candidates = [_KV_PREFIX + name] if not name.startswith(_KV_PREFIX) else []
                candidates += [f"{name}_{i}" for i in range(2, len(taken) + 3)]
                name = next(c for c in candidates if c not in taken)
            names[order] = name
        return names

    def name_of(self, cls: AxisClass | None, names: dict[int, str]) -> str | None:
        """The final name of ``cls`` (None for an absent unit axis)."""
        if cls is None:
            return None
        root = self.find(cls)
        return names.get(root.order, root.name)
