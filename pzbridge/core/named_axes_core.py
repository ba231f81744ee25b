"""Named arrays: the two storage forms and the metadata-only axis moves.

A named array has *positional* axes (indexed by position, like numpy) and
*named* axes (addressed only by name, order-free). Two storage forms exist:

- :class:`NamedArray` keeps positional axes as a *prefix* of ``data_array``
  and named axes as the trailing axes, in the order of ``named_axes``. This is
  the form to store in models: ``jax.lax.scan`` / ``jax.vmap`` / tree maps that
  act on leading axes act on positional axes.
- :class:`NamedArrayView` records, for the same data, which data axis each
  positional axis and each name is. ``tag`` / ``untag`` and friends then only
  rewrite static metadata: they never transpose. Transposes happen once, when
  an operation actually needs a particular layout (``nmap``, ``unwrap``,
  ``with_positional_prefix``).

Operations that return an array whose layout happens to be a positional
prefix return a :class:`NamedArray`, so views only exist while they save work.
The vectorised operations (``astype``, ``reshape``, ``broadcast_to``,
arithmetic, reductions, indexing) are methods of :class:`NamedArrayBase` that
:mod:`pzbridge.core.named_axes_ops` installs: it builds on the classes here,
so this module never imports it, and ``pzbridge/core/__init__.py`` imports it
so the methods are in place whichever core module is imported first. See
docs/architecture.md ("Axis naming and calling conventions").

Example:
    >>> import jax.numpy as jnp
    >>> x = NamedArray(jnp.zeros((2, 3)), named_axes={"seq": 3})
    >>> x.positional_shape, dict(x.named_shape)
    ((2,), {'seq': 3})
    >>> x.untag("seq").positional_shape
    (2, 3)
"""

from __future__ import annotations

import abc
import operator
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pzbridge.core.errors import NamedAxisError
from pzbridge.core.struct import Struct, pytree_dataclass, static_field

AxisName = str


class AxisMap(Mapping[str, int]):
    """An immutable, hashable, ordered mapping from axis names to integers.

    Used for the static metadata of named arrays (name -> size, name -> data
    axis). Two ``AxisMap`` objects are equal only when their items are equal
    *in the same order* (so equal metadata means equal data layout); against a
    plain mapping, equality ignores order like ``dict`` equality.

    Args:
      items: A mapping or an iterable of ``(name, value)`` pairs.

    Example:
        >>> m = AxisMap({"seq": 4, "batch": 2})
        >>> m["seq"], list(m), m == {"batch": 2, "seq": 4}
        (4, ['seq', 'batch'], True)
    """

    __slots__ = ("_dict", "_items")

    def __init__(self, items: Mapping[str, int] | Iterable[tuple[str, int]] = ()) -> None:
        pairs = tuple(items.items()) if isinstance(items, Mapping) else tuple(items)
        self._dict = dict(pairs)
        if len(self._dict) != len(pairs):
            names = [name for name, _ in pairs]
            duplicates = sorted({n for n in names if names.count(n) > 1})
            raise NamedAxisError(f"duplicate axis names {duplicates} in {names}. Fix: give every axis a distinct name.")
        self._items = tuple(self._dict.items())

    def __getitem__(self, key: str) -> int:
        return self._dict[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._dict)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._dict

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AxisMap):
            return self._items == other._items
        if isinstance(other, Mapping):
            return self._dict == dict(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._items)

    def __repr__(self) -> str:
        return f"AxisMap({self._dict!r})"


def _check_names(names: tuple[Any, ...], what: str) -> None:
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise NamedAxisError(
            f"{what}: axis names must be strings, found {bad!r}. "
            "Fix: name axes with strings such as 'batch' or 'seq'."
        )
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise NamedAxisError(f"{what}: duplicate axis names {duplicates} in {list(names)}. Fix: pass each name once.")


def _axis_map(value: Any, what: str, field: str) -> AxisMap:
    """``value`` as an :class:`AxisMap`; a clear error for what is not a name -> int mapping (``None``, a list)."""
    try:
        result = AxisMap(value)
    except NamedAxisError:
        raise
    except (TypeError, ValueError):
        raise NamedAxisError(
            f"{what}: {field} must map axis names to {_KIND[field]}, found {type(value).__name__} {value!r:.60}. "
            "Fix: pass a dict such as {'seq': 4} ({} for no named axes), or build the array with "
            "pzb.nx.wrap(array, *names)."
        ) from None
    bad = {n: v for n, v in result.items() if not _is_index(v)}
    if bad:
        raise NamedAxisError(
            f"{what}: {field} values must be non-negative ints ({_KIND[field]}), found {bad}. "
            "Fix: pass ints, e.g. {'seq': 4}, or build the array with pzb.nx.wrap(array, *names)."
        )
    return result


_KIND = {"named_axes": "sizes", "data_axis_for_name": "data axes"}


def _is_index(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0


def _int_tuple(value: Any, what: str, field: str) -> tuple[int, ...]:
    """``value`` as a tuple of non-negative ints; a NamedAxisError naming the field otherwise."""
    try:
        items = tuple(value)
    except TypeError:
        items = None
    if items is None or not all(_is_index(v) for v in items):
        raise NamedAxisError(
            f"{what}: {field} must be a tuple of non-negative ints, found {type(value).__name__} {value!r:.60}. "
            "Fix: build views with .untag / .tag (or pzb.nx.wrap) instead of by hand."
        )
    return tuple(int(v) for v in items)


def _check_data(data: Any, what: str) -> None:
    if isinstance(data, (list, tuple)):
        raise NamedAxisError(
            f"{what}: data_array must be an array, found a Python {type(data).__name__}. "
            "Fix: convert it first, e.g. pzb.nx.wrap(jnp.asarray(data), *names)."
        )


def _shape_of(data: Any) -> tuple[int, ...] | None:
    shape = getattr(data, "shape", None)
    return None if shape is None else tuple(shape)


def _describe(x: NamedArrayBase) -> str:
    named = ", ".join(f"{n}:{s}" for n, s in x.named_shape.items())
    return f"(positional {x.positional_shape} | named {{{named}}})"


def make_named(data: jax.Array, logical: tuple[int, ...], names: Mapping[str, int]) -> NamedArrayBase:
    """Builds the cheapest named array for a data layout (no data movement).

    Returns a :class:`NamedArray` when the positional axes are exactly the
    leading data axes in order (names then sit on the trailing axes, listed in
    data order), and a :class:`NamedArrayView` otherwise.

    Args:
      data: The data array.
      logical: ``logical[k]`` is the data axis of positional axis ``k``.
      names: Maps each axis name to its data axis.

    Returns:
      A named array over ``data``.

    Example:
        >>> import jax.numpy as jnp
        >>> type(make_named(jnp.zeros((2, 3)), (1,), {"a": 0})).__name__
        'NamedArrayView'
        >>> type(make_named(jnp.zeros((2, 3)), (0,), {"a": 1})).__name__
        'NamedArray'
    """
    shape = tuple(data.shape)
    if logical == tuple(range(len(logical))):
        ordered = sorted(names.items(), key=lambda item: item[1])
        return NamedArray(data, AxisMap((name, shape[axis]) for name, axis in ordered))
    return NamedArrayView(data, shape, tuple(logical), AxisMap(names))


class NamedArrayBase(abc.ABC):
    """The interface shared by :class:`NamedArray` and :class:`NamedArrayView`.

    Positional axes behave like numpy axes; named axes are addressed by name
    and vectorised over by every operation (see :func:`nmap`). Arithmetic
    broadcasts named axes by name and positional axes numpy-style.

    Example:
        >>> import jax.numpy as jnp
        >>> x = NamedArray(jnp.arange(6.0).reshape(2, 3), named_axes={"b": 2, "s": 3})
        >>> isinstance(x.untag("s"), NamedArrayBase)
        True
    """

    # Make numpy defer to our reflected operators instead of building object arrays.
    __array_ufunc__ = None

    data_array: jax.Array

    @property
    @abc.abstractmethod
    def positional_shape(self) -> tuple[int, ...]:
        """Sizes of the positional axes, in positional order."""

    @property
    @abc.abstractmethod
    def named_shape(self) -> AxisMap:
        """Sizes of the named axes (an immutable mapping name -> size)."""

    @abc.abstractmethod
    def as_namedarrayview(self) -> NamedArrayView:
        """Returns the same array as a :class:`NamedArrayView` (no data movement).

        Example:
            >>> import jax.numpy as jnp
            >>> v = wrap(jnp.zeros((2, 3)), "a", "b").as_namedarrayview()
            >>> v.data_axis_for_name["b"]
            1
        """

    @abc.abstractmethod
    def check_valid(self) -> None:
        """Raises :class:`NamedAxisError` if the metadata does not match the data.

        Example:
            >>> import jax.numpy as jnp
            >>> wrap(jnp.zeros(3), "a").check_valid()
        """

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the data array.

        Example:
            >>> import jax.numpy as jnp
            >>> wrap(jnp.zeros(2, jnp.int32)).dtype
            dtype('int32')
        """
        return self.data_array.dtype

    # Metadata-only axis moves. -------------------------------------------------

    def tag(self, *names: AxisName) -> NamedArray:
        """Names every positional axis, in order.

        Args:
          *names: One new name per positional axis.

        Returns:
          A named array with no positional axes.

        Raises:
          NamedAxisError: If the number of names differs from the number of
            positional axes, or a name is duplicated or already in use.

        Example:
            >>> import jax.numpy as jnp
            >>> dict(wrap(jnp.zeros((2, 3))).tag("b", "s").named_shape)
            {'b': 2, 's': 3}
        """
        if len(names) != len(self.positional_shape):
            raise NamedAxisError(
                f"tag got {len(names)} names {list(names)} for {len(self.positional_shape)} positional axes "
                f"(shape {_describe(self)}). Fix: pass one name per positional axis, or use tag_prefix "
                "to name only the leading ones."
            )
        return self.tag_prefix(*names)  # type: ignore[return-value]

    def tag_prefix(self, *names: AxisName) -> NamedArrayBase:
        """Names the leading positional axes; the rest stay positional.

        Args:
          *names: New names for the first ``len(names)`` positional axes.

        Returns:
          A named array whose positional axes are the untouched suffix.

        Raises:
          NamedAxisError: If there are more names than positional axes, or a
            name is duplicated or already in use.

        Example:
            >>> import jax.numpy as jnp
            >>> wrap(jnp.zeros((2, 3))).tag_prefix("b").positional_shape
            (3,)
        """
        _check_names(names, "tag")
        view = self.as_namedarrayview()
        logical = view.data_axis_for_logical_axis
        if len(names) > len(logical):
            raise NamedAxisError(
                f"tag_prefix got {len(names)} names {list(names)} but the array has only {len(logical)} "
                f"positional axes (shape {_describe(self)}). Fix: pass at most {len(logical)} names."
            )
        clash = [n for n in names if n in view.data_axis_for_name]
        if clash:
            raise NamedAxisError(
                f"tag: axis names {clash} are already used by this array (shape {_describe(self)}). "
                "Fix: pick new names, or untag the existing axes first."
            )
        new_names = dict(view.data_axis_for_name)
        new_names.update(zip(names, logical[: len(names)]))
        return make_named(view.data_array, logical[len(names) :], new_names)

    def untag(self, *names: AxisName) -> NamedArrayBase:
        """Turns named axes into positional axes appended after the existing ones.

        Args:
          *names: Existing axis names, in the order their new positional axes
            should have.

        Returns:
          A named array (often a view: no data moves).

        Raises:
          NamedAxisError: If a name is unknown or duplicated.

        Example:
            >>> import jax.numpy as jnp
            >>> x = wrap(jnp.zeros((2, 3, 4))).tag_prefix("a")
            >>> x.untag("a").positional_shape
            (3, 4, 2)
        """
        view, axes = self._pop_names(names, "untag")
        return make_named(view.data_array, view.data_axis_for_logical_axis + axes, self._without(view, names))

    def untag_prefix(self, *names: AxisName) -> NamedArrayBase:
        """Turns named axes into positional axes placed before the existing ones.

        Args:
          *names: Existing axis names, in the order their new positional axes
            should have.

        Returns:
          A named array (often a view: no data moves).

        Raises:
          NamedAxisError: If a name is unknown or duplicated.

        Example:
            >>> import jax.numpy as jnp
            >>> x = wrap(jnp.zeros((2, 3, 4))).tag_prefix("a")
            >>> x.untag_prefix("a").positional_shape
            (2, 3, 4)
        """
        view, axes = self._pop_names(names, "untag_prefix")
        return make_named(view.data_array, axes + view.data_axis_for_logical_axis, self._without(view, names))

    def _pop_names(self, names: tuple[AxisName, ...], what: str) -> tuple[NamedArrayView, tuple[int, ...]]:
        _check_names(names, what)
        view = self.as_namedarrayview()
        missing = [n for n in names if n not in view.data_axis_for_name]
        if missing:
            raise NamedAxisError(
                f"{what}: unknown axis names {missing}; the array has named axes "
                f"{list(view.data_axis_for_name)} (shape {_describe(self)}). Fix: use one of those names."
            )
        return view, tuple(view.data_axis_for_name[n] for n in names)

    @staticmethod
    def _without(view: NamedArrayView, names: tuple[AxisName, ...]) -> dict[str, int]:
        return {n: a for n, a in view.data_axis_for_name.items() if n not in names}

    def unwrap(self, *names: AxisName) -> jax.Array:
        """Returns the plain positional array, untagging ``names`` first.

        Args:
          *names: Named axes to turn into trailing positional axes; after
            that, no named axis may remain.

        Returns:
          A ``jax.Array`` whose axes are the positional axes in order.

        Raises:
          NamedAxisError: If named axes remain.

        Example:
            >>> import jax.numpy as jnp
            >>> wrap(jnp.zeros((2, 3)), "a", "b").unwrap("b", "a").shape
            (3, 2)
        """
        array = self.untag(*names) if names else self
        view = array.as_namedarrayview()
        if view.data_axis_for_name:
            raise NamedAxisError(
                f"unwrap: named axes {list(view.data_axis_for_name)} remain (shape {_describe(array)}). "
                f"Fix: pass them to unwrap, e.g. .unwrap({', '.join(repr(n) for n in view.data_axis_for_name)})."
            )
        perm = view.data_axis_for_logical_axis
        if perm == tuple(range(len(perm))):
            return view.data_array
        return jnp.transpose(view.data_array, perm)

    def with_positional_prefix(self) -> NamedArray:
        """Returns an equal :class:`NamedArray` (positional axes first, then names).

        Named axes keep their relative data order, so at most one transpose
        happens and none when the layout already fits.

        Example:
            >>> import jax.numpy as jnp
            >>> x = wrap(jnp.zeros((2, 3)), "a", "b").untag("a")
            >>> x.with_positional_prefix().data_array.shape
            (2, 3)
        """
        view = self.as_namedarrayview()
        ordered = sorted(view.data_axis_for_name.items(), key=lambda item: item[1])
        return self._relayout(view, [name for name, _ in ordered])

    def order_as(self, *names: AxisName) -> NamedArray:
        """Returns a :class:`NamedArray` storing named axes in exactly this order.

        Args:
          *names: A permutation of all axis names.

        Returns:
          An equal :class:`NamedArray` (positional prefix, then ``names``).

        Raises:
          NamedAxisError: If ``names`` is not a permutation of the axis names.

        Example:
            >>> import jax.numpy as jnp
            >>> list(wrap(jnp.zeros((2, 3)), "a", "b").order_as("b", "a").named_shape)
            ['b', 'a']
        """
        _check_names(names, "order_as")
        view = self.as_namedarrayview()
        if set(names) != set(view.data_axis_for_name):
            raise NamedAxisError(
                f"order_as got {list(names)} but the array has named axes {list(view.data_axis_for_name)}. "
                "Fix: pass every axis name exactly once."
            )
        return self._relayout(view, list(names))

    @staticmethod
    def _relayout(view: NamedArrayView, names: list[str]) -> NamedArray:
        perm = view.data_axis_for_logical_axis + tuple(view.data_axis_for_name[n] for n in names)
        data = view.data_array
        if perm != tuple(range(len(perm))):
            data = jnp.transpose(data, perm)
        sizes = AxisMap((n, view.data_shape[view.data_axis_for_name[n]]) for n in names)
        return NamedArray(data, sizes)

    def canonicalize(self) -> NamedArray:
        """Returns an equal :class:`NamedArray` with named axes in sorted order.

        Example:
            >>> import jax.numpy as jnp
            >>> list(wrap(jnp.zeros((2, 3)), "z", "a").canonicalize().named_shape)
            ['a', 'z']
        """
        return self.order_as(*sorted(self.named_shape))

    def order_like(self, other: NamedArrayBase) -> NamedArrayBase:
        """Lays this array out exactly like ``other`` (same pytree structure).

        Args:
          other: A named array with the same axis names and the same number
            of positional axes.

        Returns:
          An equal array whose storage form and axis order match ``other``.

        Raises:
          NamedAxisError: If the names or positional ranks differ.

        Example:
            >>> import jax.numpy as jnp
            >>> a, b = wrap(jnp.zeros((2, 3)), "x", "y"), wrap(jnp.ones((3, 2)), "y", "x")
            >>> list(a.order_like(b).named_shape)
            ['y', 'x']
        """
        if set(self.named_shape) != set(other.named_shape) or len(self.positional_shape) != len(
            other.positional_shape
        ):
            raise NamedAxisError(
                f"order_like: shapes {_describe(self)} and {_describe(other)} differ in axis names or "
                "positional rank. Fix: make both arrays carry the same names and positional rank first."
            )
        if isinstance(other, NamedArray):
            return self.order_as(*other.named_shape)
        view = self.as_namedarrayview()
        source_for_target: dict[int, int] = {}
        for mine, theirs in zip(view.data_axis_for_logical_axis, other.data_axis_for_logical_axis):
            source_for_target[theirs] = mine
        for name, theirs in other.data_axis_for_name.items():
            source_for_target[theirs] = view.data_axis_for_name[name]
        perm = tuple(source_for_target[i] for i in range(len(source_for_target)))
        data = view.data_array if perm == tuple(range(len(perm))) else jnp.transpose(view.data_array, perm)
        return NamedArrayView(data, tuple(data.shape), other.data_axis_for_logical_axis, other.data_axis_for_name)


    # Operations that compute on the data (``astype``, ``reshape``,
    # ``broadcast_to``, indexing, ``at``, operators, reductions) are installed
    # on this class by pzbridge.core.named_axes_ops.install_methods.

    def broadcast_like(self, other: Any) -> NamedArrayBase:
        """Broadcasts to the positional and named shape of ``other``.

        Example:
            >>> import jax.numpy as jnp
            >>> wrap(jnp.zeros(3), "s").broadcast_like(wrap(jnp.ones((2, 3)), "b", "s")).named_shape["b"]
            2
        """
        if isinstance(other, NamedArrayBase):
            return self.broadcast_to(other.positional_shape, other.named_shape)
        return self.broadcast_to(tuple(jnp.shape(other)), {})

    def __iter__(self) -> Any:
        raise TypeError(
            "named arrays are not iterable. Fix: use pzb.nx.unstack(x, name) for named axes, "
            "or x.unwrap() for a plain array."
        )

    def _scalar(self, convert: Any) -> Any:
        if self.named_shape:
            raise NamedAxisError(
                f"cannot convert an array with named axes {list(self.named_shape)} to a Python scalar. "
                "Fix: reduce or index the named axes first."
            )
        return convert(self.unwrap())

    def __bool__(self) -> bool:
        return self._scalar(bool)

    def __int__(self) -> int:
        return self._scalar(int)

    def __float__(self) -> float:
        return self._scalar(float)

    def __index__(self) -> int:
        return self._scalar(operator.index)

    # Rendering (treescope is imported only when something is rendered). ----------
    # The renderer module imports treescope but nothing of this module: it
    # works on the array through its methods, so the dependency points one way.

    def __treescope_repr__(self, path: str | None, subtree_renderer: Any) -> Any:
        from pzbridge.core.named_axes_treescope import render_named_array

        return render_named_array(self, path, subtree_renderer)

    def __treescope_ndarray_adapter__(self) -> Any:
        from pzbridge.core.named_axes_treescope import NamedArrayAdapter

        return NamedArrayAdapter()

    def _aligned_data(self, other: Any) -> jax.Array:
        """``other`` broadcast to this array, as data laid out like this array's view.

        The treescope adapter aligns a ``valid_mask`` (a named or a plain
        array) with the data it draws this way: names are matched by name,
        positional axes broadcast numpy-style.

        Example:
            >>> import jax.numpy as jnp
            >>> x = wrap(jnp.zeros((2, 3)), "b", "s").untag("s")
            >>> x._aligned_data(wrap(jnp.ones(2, bool), "b")).shape
            (2, 3)
        """
        named = other if isinstance(other, NamedArrayBase) else wrap(other)
        view = self.as_namedarrayview()
        return named.broadcast_like(self).order_like(view).as_namedarrayview().data_array


@pytree_dataclass
class NamedArray(NamedArrayBase, Struct):
    """A named array stored as positional axes followed by named axes.

    ``data_array`` is the only pytree child. Its leading axes are positional;
    its trailing axes are the named ones, in the order of ``named_axes``.

    Attributes:
      data_array: The data.
      named_axes: Static, ordered name -> size mapping for the trailing axes
        (any mapping is accepted and stored as an :class:`AxisMap`).

    Operators act elementwise like ``jax.Array`` ones, so ``x == y`` is a
    boolean named array; use ``pzb.tree_equal(x, y)`` for structural equality.

    Example:
        >>> import jax.numpy as jnp
        >>> x = NamedArray(jnp.zeros((5, 2, 3)), named_axes={"b": 2, "s": 3})
        >>> x.positional_shape, x.named_shape["s"]
        ((5,), 3)
    """

    data_array: jax.Array
    named_axes: AxisMap = static_field(default=AxisMap())

    def __post_init__(self) -> None:
        _check_data(self.data_array, "NamedArray")
        if not isinstance(self.named_axes, AxisMap):
            object.__setattr__(self, "named_axes", _axis_map(self.named_axes, "NamedArray", "named_axes"))
        self.check_valid()

    def check_valid(self) -> None:
        """Raises :class:`NamedAxisError` if ``named_axes`` does not match the data.

        Example:
            >>> import jax.numpy as jnp
            >>> NamedArray(jnp.zeros(3), named_axes={"s": 4})
            Traceback (most recent call last):
            ...
            pzbridge.core.errors.NamedAxisError: NamedArray: named_axes {'s': 4} must match the trailing axes of data_array with shape (3,). Fix: build it with pzb.nx.wrap(array).tag(...) or pass the right sizes.
        """
        _check_names(tuple(self.named_axes), "NamedArray")
        shape = _shape_of(self.data_array)
        if shape is None:
            return  # Placeholder leaves (e.g. inside tree utilities) carry no shape.
        sizes = tuple(self.named_axes.values())
        if len(shape) < len(sizes) or shape[len(shape) - len(sizes) :] != sizes:
            raise NamedAxisError(
                f"NamedArray: named_axes {dict(self.named_axes)} must match the trailing axes of data_array "
                f"with shape {shape}. Fix: build it with pzb.nx.wrap(array).tag(...) or pass the right sizes."
            )

    @property
    def positional_shape(self) -> tuple[int, ...]:
        shape = tuple(self.data_array.shape)
        return shape[: len(shape) - len(self.named_axes)]

    @property
    def named_shape(self) -> AxisMap:
        return self.named_axes

    def as_namedarrayview(self) -> NamedArrayView:
        shape = tuple(self.data_array.shape)
        p = len(shape) - len(self.named_axes)
        return NamedArrayView(
            self.data_array, shape, tuple(range(p)), AxisMap((n, p + i) for i, n in enumerate(self.named_axes))
        )


@pytree_dataclass
class NamedArrayView(NamedArrayBase, Struct):
    """A named array whose axes may sit anywhere in the data array.

    Attributes:
      data_array: The data.
      data_shape: Static shape of ``data_array``.
      data_axis_for_logical_axis: Static; entry ``k`` is the data axis of
        positional axis ``k``.
      data_axis_for_name: Static :class:`AxisMap` from name to data axis.

    Every data axis is exactly one positional axis or one name. Like
    :class:`NamedArray`, ``==`` is elementwise (use ``pzb.tree_equal`` for
    structural equality).

    Example:
        >>> import jax.numpy as jnp
        >>> v = NamedArrayView(jnp.zeros((2, 3)), (2, 3), (1,), {"b": 0})
        >>> v.positional_shape, dict(v.named_shape)
        ((3,), {'b': 2})
    """

    data_array: jax.Array
    data_shape: tuple[int, ...] = static_field()
    data_axis_for_logical_axis: tuple[int, ...] = static_field()
    data_axis_for_name: AxisMap = static_field()

    def __post_init__(self) -> None:
        _check_data(self.data_array, "NamedArrayView")
        object.__setattr__(self, "data_shape", _int_tuple(self.data_shape, "NamedArrayView", "data_shape"))
        object.__setattr__(self, "data_axis_for_logical_axis", _int_tuple(
            self.data_axis_for_logical_axis, "NamedArrayView", "data_axis_for_logical_axis"))
        if not isinstance(self.data_axis_for_name, AxisMap):
            object.__setattr__(self, "data_axis_for_name",
                               _axis_map(self.data_axis_for_name, "NamedArrayView", "data_axis_for_name"))
        self.check_valid()

    def check_valid(self) -> None:
        """Raises :class:`NamedAxisError` if the axis bookkeeping is inconsistent.

        Example:
            >>> import jax.numpy as jnp
            >>> NamedArrayView(jnp.zeros((2, 3)), (2, 3), (0,), {"b": 0})
            Traceback (most recent call last):
            ...
            pzbridge.core.errors.NamedAxisError: NamedArrayView: positional axes (0,) and named axes {'b': 0} must use each of the 2 data axes exactly once. Fix: build views with .untag / .tag instead of by hand.
        """
        _check_names(tuple(self.data_axis_for_name), "NamedArrayView")
        used = sorted(self.data_axis_for_logical_axis + tuple(self.data_axis_for_name.values()))
        if used != list(range(len(self.data_shape))):
            raise NamedAxisError(
                f"NamedArrayView: positional axes {self.data_axis_for_logical_axis} and named axes "
                f"{dict(self.data_axis_for_name)} must use each of the {len(self.data_shape)} data axes "
                "exactly once. Fix: build views with .untag / .tag instead of by hand."
            )
        shape = _shape_of(self.data_array)
        if shape is not None and shape != self.data_shape:
            raise NamedAxisError(
                f"NamedArrayView: data_shape {self.data_shape} differs from data_array.shape {shape}. "
                "Fix: convert with .with_positional_prefix() before transforming the data directly."
            )

    @property
    def positional_shape(self) -> tuple[int, ...]:
        return tuple(self.data_shape[a] for a in self.data_axis_for_logical_axis)

    @property
    def named_shape(self) -> AxisMap:
        return AxisMap((n, self.data_shape[a]) for n, a in self.data_axis_for_name.items())

    def as_namedarrayview(self) -> NamedArrayView:
        return self


def is_namedarray(value: Any) -> bool:
    """True for :class:`NamedArray` and :class:`NamedArrayView` instances.

    Example:
        >>> import jax.numpy as jnp
        >>> is_namedarray(wrap(jnp.zeros(2))), is_namedarray(jnp.zeros(2))
        (True, False)
    """
    return isinstance(value, NamedArrayBase)


def wrap(array: Any, *names: AxisName) -> NamedArray:
    """Wraps an array as a :class:`NamedArray`, naming all axes if names are given.

    Args:
      array: Anything ``jnp.asarray`` accepts.
      *names: Either nothing (all axes stay positional) or one name per axis.

    Returns:
      A :class:`NamedArray`.

    Raises:
      NamedAxisError: If the number of names differs from ``array.ndim``.

    Example:
        >>> import jax.numpy as jnp
        >>> dict(wrap(jnp.zeros((2, 3)), "b", "s").named_shape)
        {'b': 2, 's': 3}
    """
    result = NamedArray(jnp.asarray(array), AxisMap())
    return result.tag(*names) if names else result


def unwrap(array: Any, *names: AxisName) -> jax.Array:
    """Function form of :meth:`NamedArrayBase.unwrap`; plain arrays pass through.

    Example:
        >>> import jax.numpy as jnp
        >>> unwrap(wrap(jnp.zeros((2, 3)), "b", "s"), "s", "b").shape
        (3, 2)
    """
    if isinstance(array, NamedArrayBase):
        return array.unwrap(*names)
    if names:
        raise NamedAxisError(f"unwrap got names {list(names)} for a plain array. Fix: call it without names.")
    return jnp.asarray(array)

