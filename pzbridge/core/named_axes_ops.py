"""Vectorising positional code over named axes: ``nmap`` and the array methods.

Why ``nmap`` is built the way it is: vectorising with one ``jax.vmap`` per
named axis (penzai's approach) makes tracing cost grow with the number of
names. Instead, the named axes are grouped by *which arguments carry them*.
Each group is moved to the front of the arguments that carry it and
flattened into a single axis (one transpose + one reshape, both skipped when
the layout already fits), and each group costs one ``jax.vmap``. In the
common case every named argument carries every name, so there is exactly one
``vmap`` whatever the number of names; outputs are reshaped back and returned
as views (named axes leading), so chained calls find their layout ready.

Elementwise operators skip ``vmap`` altogether: the operands are aligned by
name (transpose, then reshape to insert size-1 axes) and the ``jnp`` function
is applied once with ordinary broadcasting. Reductions and static indexing
act directly on the data axes and only rewrite metadata.

Example:
    >>> import jax.numpy as jnp
    >>> from pzbridge.core.named_axes_core import wrap
    >>> x = wrap(jnp.ones((2, 3)), "batch", "features")
    >>> w = jnp.ones((3, 4))
    >>> y = nmap(jnp.dot)(x.untag("features"), w).tag("out")
    >>> dict(y.named_shape)
    {'batch': 2, 'out': 4}
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pzbridge.core.errors import NamedAxisError, format_path
from pzbridge.core.named_axes_core import (
    AxisMap,
    NamedArray,
    NamedArrayBase,
    NamedArrayView,
    _describe,
    make_named,
)


def _is_named(value: Any) -> bool:
    return isinstance(value, NamedArrayBase)


def _union_sizes(named: list[tuple[str, NamedArrayView]], what: str) -> dict[str, int]:
    """Union of named shapes (ordered by first appearance), checking sizes agree."""
    sizes: dict[str, int] = {}
    first_seen: dict[str, str] = {}
    for where, view in named:
        ordered = sorted(view.data_axis_for_name.items(), key=lambda item: item[1])
        for name, axis in ordered:
            size = view.data_shape[axis]
            if name not in sizes:
                sizes[name] = size
                first_seen[name] = where
            elif sizes[name] != size:
                raise NamedAxisError(
                    f"{what}: axis {name!r} has size {sizes[name]} in {first_seen[name]} and {size} in {where}. "
                    f"Fix: make the sizes agree (slice or pad one of them), or rename one axis with "
                    f".untag({name!r}).tag('other_name')."
                )
    return sizes


def _arrange(view: NamedArrayView, leading: list[str], padded_rank: int | None = None,
             size_one_for_missing: dict[str, int] | None = None) -> jax.Array:
    """Data laid out as (leading names..., positional...), optionally with size-1 padding.

    With ``size_one_for_missing`` (the full name order), names the array lacks
    become size-1 axes; with ``padded_rank``, size-1 axes are inserted before
    the positional axes up to that positional rank.
    """
    present = [n for n in leading if n in view.data_axis_for_name]
    perm = tuple(view.data_axis_for_name[n] for n in present) + view.data_axis_for_logical_axis
    data = view.data_array
    if perm != tuple(range(len(perm))):
        data = jnp.transpose(data, perm)
    if size_one_for_missing is None and padded_rank is None:
        return data
    positional = view.positional_shape
    names_part = (
        [size_one_for_missing[n] if n in view.data_axis_for_name else 1 for n in size_one_for_missing]
        if size_one_for_missing is not None
        else [view.data_shape[view.data_axis_for_name[n]] for n in present]
    )
    pad = [] if padded_rank is None else [1] * (padded_rank - len(positional))
    target = tuple(names_part) + tuple(pad) + positional
    return data if target == tuple(data.shape) else jnp.reshape(data, target)


def _leading_named(data: jax.Array, names: list[str]) -> NamedArrayBase:
    """Wraps data whose leading axes are ``names`` and whose remaining axes are positional."""
    k = len(names)
    return make_named(data, tuple(range(k, data.ndim)), {n: i for i, n in enumerate(names)})


def _where(path: tuple) -> str:
    # Paths are taken over (args, kwargs); render them as "argument 0" / "keyword 'x'".
    if not path:
        return "the input"
    head, rest = path[0], path[1:]
    if getattr(head, "idx", None) == 0 and rest:
        label = f"argument {rest[0].idx}"
        rest = rest[1:]
    elif rest:
        label = f"keyword {rest[0].key!r}"
        rest = rest[1:]
    else:
        label = format_path(path)
    return label + (f" at {format_path(rest)}" if rest else "")


def nmap(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Vectorises a positional function over the named axes of its arguments.

    Inside ``fn`` every named array argument (anywhere in a pytree argument)
    is a plain ``jax.Array`` of its positional shape; other arguments pass
    through unchanged. Arguments may carry different names: each name is
    mapped over the arguments that have it and broadcast to the others. Every
    array in the output becomes a named array carrying the union of the input
    names, with the output's own axes positional.

    Args:
      fn: A function of positional arrays (and anything else).

    Returns:
      The vectorised function.

    Raises:
      NamedAxisError: When one name has different sizes in two arguments.

    Example:
        >>> import jax.numpy as jnp
        >>> from pzbridge.core.named_axes_core import wrap
        >>> a = wrap(jnp.ones((2, 3)), "b", "s")
        >>> b = wrap(jnp.arange(4.0), "h")
        >>> out = nmap(lambda x, y: x * y)(a, b)
        >>> sorted(out.named_shape.items())
        [('b', 2), ('h', 4), ('s', 3)]
    """

    @functools.wraps(fn)
    def vectorised(*args: Any, **kwargs: Any) -> Any:
        with_path, treedef = jax.tree_util.tree_flatten_with_path((args, kwargs), is_leaf=_is_named)
        leaves = [leaf for _, leaf in with_path]
        named_slots = [i for i, leaf in enumerate(leaves) if _is_named(leaf)]
        views = [leaves[i].as_namedarrayview() for i in named_slots]
        sizes = _union_sizes(
            [(_where(with_path[i][0]), v) for i, v in zip(named_slots, views)], f"nmap({_fn_name(fn)})"
        )
        # Group names by the set of arguments carrying them: one vmap per group.
        groups: dict[frozenset[int], list[str]] = {}
        for name in sizes:
            signature = frozenset(j for j, v in enumerate(views) if name in v.data_axis_for_name)
            groups.setdefault(signature, []).append(name)
        group_list = list(groups.items())

        arrays = []
        for view in views:
            mine = [names for sig, names in group_list if name_in_view(names[0], view)]
            data = _arrange(view, [n for names in mine for n in names])
            flat = tuple(math.prod(sizes[n] for n in names) for names in mine) + view.positional_shape
            arrays.append(data if flat == tuple(data.shape) else jnp.reshape(data, flat))

        def call(named_values: list[jax.Array]) -> Any:
            full = list(leaves)
            for slot, value in zip(named_slots, named_values):
                full[slot] = value
            call_args, call_kwargs = jax.tree_util.tree_unflatten(treedef, full)
            return fn(*call_args, **call_kwargs)

        mapped = call
        for signature, _ in reversed(group_list):
            in_axes = [0 if j in signature else None for j in range(len(views))]
            mapped = jax.vmap(mapped, in_axes=(in_axes,))
        out = mapped(arrays)

        all_names = [n for _, names in group_list for n in names]
        name_sizes = tuple(sizes[n] for n in all_names)

        def rewrap(leaf: Any) -> NamedArrayBase:
            if _is_named(leaf):
                raise NamedAxisError(
                    f"nmap({_fn_name(fn)}) returned a named array; the function must return plain arrays. "
                    "Fix: unwrap inside the function, or call the named operation outside nmap."
                )
            data = jnp.asarray(leaf)
            positional = data.shape[len(group_list) :]
            target = name_sizes + positional
            if target != data.shape:
                data = jnp.reshape(data, target)
            return _leading_named(data, all_names)

        return jax.tree_util.tree_map(rewrap, out, is_leaf=_is_named)

    return vectorised


def name_in_view(name: str, view: NamedArrayView) -> bool:
    """True when ``view`` carries the axis ``name`` (a tiny helper for readability).

    Example:
        >>> import jax.numpy as jnp
        >>> from pzbridge.core.named_axes_core import wrap
        >>> name_in_view("a", wrap(jnp.zeros(2), "a").as_namedarrayview())
        True
    """
    return name in view.data_axis_for_name


def _fn_name(fn: Any) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


# Elementwise operations: align by name, then one jnp call. ------------------------


def _positional_shape(value: Any) -> tuple[int, ...]:
    return value.positional_shape if _is_named(value) else tuple(np.shape(value))


def elementwise(fn: Callable[..., Any], *operands: Any, what: str | None = None) -> Any:
    """Applies an elementwise ``jnp`` function, broadcasting by name and positionally.

    Named axes are matched by name (their union is the result's names);
    positional axes broadcast numpy-style (right-aligned). Plain arrays and
    scalars count as positional.

    Args:
      fn: An elementwise function such as ``jnp.add``.
      *operands: Named arrays, arrays or scalars.
      what: Name used in error messages (defaults to ``fn.__name__``).

    Returns:
      A named array (a plain result if no operand is named).

    Raises:
      NamedAxisError: If a name has two sizes, or positional shapes do not
        broadcast.

    Example:
        >>> import jax.numpy as jnp
        >>> from pzbridge.core.named_axes_core import wrap
        >>> out = elementwise(jnp.add, wrap(jnp.ones(2), "a"), wrap(jnp.ones(3), "b"))
        >>> dict(out.named_shape)
        {'a': 2, 'b': 3}
    """
    what = what or _fn_name(fn)
    named = [(i, x.as_namedarrayview()) for i, x in enumerate(operands) if _is_named(x)]
    if not named:
        return fn(*operands)
    sizes = _union_sizes([(f"operand {i}", v) for i, v in named], what)
    shapes = [_positional_shape(x) for x in operands]
    try:
        positional = np.broadcast_shapes(*shapes)
    except ValueError:
        raise NamedAxisError(
            f"{what}: positional shapes {shapes} do not broadcast (numpy rules, right-aligned). "
            "Fix: reshape the positional axes, or name them with .tag(...) so they align by name."
        ) from None
    rank = len(positional)
    aligned = list(operands)
    for i, view in named:
        aligned[i] = _arrange(view, list(sizes), padded_rank=rank, size_one_for_missing=sizes)
    return _leading_named(fn(*aligned), list(sizes))


def map_data(fn: Callable[[jax.Array], jax.Array], x: NamedArrayBase) -> NamedArrayBase:
    """Applies a shape-preserving function to the data, keeping the layout.

    Example:
        >>> import jax.numpy as jnp
        >>> from pzbridge.core.named_axes_core import wrap
        >>> map_data(jnp.negative, wrap(jnp.ones(2), "a")).unwrap("a").tolist()
        [-1.0, -1.0]
    """
    if isinstance(x, NamedArray):
        return NamedArray(fn(x.data_array), x.named_axes)
    view = x.as_namedarrayview()
    return NamedArrayView(fn(view.data_array), view.data_shape, view.data_axis_for_logical_axis, view.data_axis_for_name)


def where(condition: Any, x: Any, y: Any) -> Any:
    """Elementwise ``jnp.where`` broadcasting by name.

    Example:
        >>> import jax.numpy as jnp
        >>> from pzbridge.core.named_axes_core import wrap
        >>> where(wrap(jnp.array([True, False]), "a"), 1, 0).unwrap("a").tolist()
        [1, 0]
    """
    return elementwise(jnp.where, condition, x, y, what="where")


# Data-axis bookkeeping shared by reductions and static indexing. -------------------


def _drop_axes(view: NamedArrayView, data: jax.Array, dropped: set[int], kept_names: Mapping[str, int],
               logical: tuple[int, ...]) -> NamedArrayBase:
    """Renumbers metadata after the data axes in ``dropped`` were removed."""
    new_index = {}
    for axis in range(len(view.data_shape)):
        if axis not in dropped:
            new_index[axis] = len(new_index)
    return make_named(
        data,
        tuple(new_index[a] for a in logical),
        {n: new_index[a] for n, a in kept_names.items()},
    )


def _normalize_axes(axis: int | tuple[int, ...] | None, rank: int, what: str, x: NamedArrayBase) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(rank))
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    out = []
    for a in axes:
        if not -rank <= a < rank:
            raise NamedAxisError(
                f"{what}: positional axis {a} is out of range for positional rank {rank} (shape {_describe(x)}). "
                "Fix: pass a valid positional axis, or reduce named axes by name, e.g. x.sum('seq')."
            )
        out.append(int(a) % rank)
    return tuple(out)


def reduce(fn: Callable[..., Any], x: NamedArrayBase, names: tuple[str, ...], axis: Any,
           single_axis: bool = False, **kwargs: Any) -> NamedArrayBase:
    """Reduces named axes (by name) or positional axes (by ``axis``) of ``x``.

    Example:
        >>> import jax.numpy as jnp
        >>> from pzbridge.core.named_axes_core import wrap
        >>> reduce(jnp.sum, wrap(jnp.ones((2, 3)), "a", "b"), ("b",), None).unwrap("a").tolist()
        [3.0, 3.0]
    """
    what = _fn_name(fn)
    view = x.as_namedarrayview()
    if names and axis is not None:
        raise NamedAxisError(
            f"{what}: got both axis names {list(names)} and positional axis={axis}. "
            "Fix: reduce named and positional axes in two calls."
        )
    if names:
        x._pop_names(names, what)  # Validates the names with a helpful error.
        data_axes = tuple(view.data_axis_for_name[n] for n in names)
        kept_names = {n: a for n, a in view.data_axis_for_name.items() if n not in names}
        logical = view.data_axis_for_logical_axis
        if kwargs.get("keepdims"):
            raise NamedAxisError(f"{what}: keepdims applies to positional axes only. Fix: drop keepdims.")
    else:
        positional = _normalize_axes(axis, len(view.data_axis_for_logical_axis), what, x)
        data_axes = tuple(view.data_axis_for_logical_axis[a] for a in positional)
        kept_names = dict(view.data_axis_for_name)
        logical = tuple(a for k, a in enumerate(view.data_axis_for_logical_axis) if k not in positional)
        if kwargs.get("keepdims"):
            out = fn(view.data_array, axis=data_axes[0] if single_axis else data_axes, **kwargs)
            return make_named(out, view.data_axis_for_logical_axis, dict(view.data_axis_for_name))
    if single_axis:
        if len(data_axes) != 1:
            if not names and axis is None:
                # argmax over all positional axes: flatten them, as jnp does.
                return nmap(lambda a: fn(a, **kwargs))(x)
            raise NamedAxisError(
                f"{what} reduces exactly one axis, got {list(names) or axis}. Fix: pass a single axis or name."
            )
        out = fn(view.data_array, axis=data_axes[0], **kwargs)
    else:
        out = fn(view.data_array, axis=data_axes, **kwargs)
    return _drop_axes(view, out, set(data_axes), kept_names, logical)


# Indexing. --------------------------------------------------------------------------


def _is_static_index(value: Any) -> bool:
    return value is None or isinstance(value, (int, np.integer, slice)) and not isinstance(value, bool)


def _split_dict_index(x: NamedArrayBase, index: Mapping[str, Any]) -> tuple[list[str], list[str], list[str]]:
    unknown = [n for n in index if not isinstance(n, str)]
    if unknown:
        raise NamedAxisError(f"dict index keys must be axis names, found {unknown!r}. Fix: use {{'name': index}}.")
    shape = x.named_shape
    new = [n for n, i in index.items() if i is None]
    clash = [n for n in new if n in shape]
    if clash:
        raise NamedAxisError(
            f"index: None adds a new axis, but {clash} already exist (shape {_describe(x)}). "
            "Fix: use a slice to keep an existing axis, or pick a new name."
        )
    missing = [n for n, i in index.items() if i is not None and n not in shape]
    if missing:
        raise NamedAxisError(
            f"index: unknown axis names {missing}; the array has named axes {list(shape)} "
            f"(shape {_describe(x)}). Fix: index one of those names, or map the name to None to add it."
        )
    slices = [n for n, i in index.items() if isinstance(i, slice)]
    advanced = [n for n, i in index.items() if i is not None and not isinstance(i, slice)]
    return new, slices, advanced


def _add_unit_names(x: NamedArrayBase, names: list[str]) -> NamedArrayBase:
    if not names:
        return x
    view = x.as_namedarrayview()
    data = jnp.reshape(view.data_array, (1,) * len(names) + view.data_shape)
    shift = len(names)
    mapping = {n: i for i, n in enumerate(names)}
    mapping.update({n: a + shift for n, a in view.data_axis_for_name.items()})
    return make_named(data, tuple(a + shift for a in view.data_axis_for_logical_axis), mapping)


def getitem(x: NamedArrayBase, index: Any) -> NamedArrayBase:
    """Implements ``x[index]`` (see :meth:`NamedArrayBase.__getitem__`).

    Example:
        >>> import jax.numpy as jnp
        >>> from pzbridge.core.named_axes_core import wrap
        >>> getitem(wrap(jnp.arange(3)), 1).unwrap().tolist()
        1
    """
    if not isinstance(index, Mapping):
        return nmap(lambda a, i: a[i])(x, index)
    new, slices, advanced = _split_dict_index(x, index)
    if all(_is_static_index(index[n]) for n in slices + advanced):
        # Static ints and slices: index the data axes directly, no vmap.
        view = x.as_namedarrayview()
        data_index = [slice(None)] * len(view.data_shape)
        for n in slices + advanced:
            data_index[view.data_axis_for_name[n]] = index[n]
        data = view.data_array[tuple(data_index)]
        dropped = {view.data_axis_for_name[n] for n in advanced}
        kept = {n: a for n, a in view.data_axis_for_name.items() if n not in advanced}
        result = _drop_axes(view, data, dropped, kept, view.data_axis_for_logical_axis)
    else:
        # Slices first, then advanced indices: the advanced ones are adjacent,
        # so numpy keeps their broadcast axes in place (after the slices).
        y = x.untag_prefix(*slices, *advanced)
        positional_index = tuple(index[n] for n in slices + advanced) + (Ellipsis,)
        result = nmap(lambda a, i: a[i])(y, positional_index).tag_prefix(*slices)
    return _add_unit_names(result, new)


class IndexUpdateHelper:
    """The object behind ``x.at``; index it to get an :class:`IndexUpdateRef`.

    Example:
        >>> import jax.numpy as jnp
        >>> from pzbridge.core.named_axes_core import wrap
        >>> wrap(jnp.zeros(3)).at[1].add(2.0).unwrap().tolist()
        [0.0, 2.0, 0.0]
    """

    def __init__(self, array: NamedArrayBase) -> None:
        self._array = array

    def __getitem__(self, index: Any) -> IndexUpdateRef:
        return IndexUpdateRef(self._array, index)


class IndexUpdateRef:
    """A pending indexed update: call ``set``, ``add``, ``multiply``, ``get``, ...

    Example:
        >>> import jax.numpy as jnp
        >>> from pzbridge.core.named_axes_core import wrap
        >>> wrap(jnp.ones(2), "a").at[{"a": 0}].multiply(5.0).unwrap("a").tolist()
        [5.0, 1.0]
    """

    def __init__(self, array: NamedArrayBase, index: Any) -> None:
        self._array = array
        self._index = index

    def get(self, **kwargs: Any) -> NamedArrayBase:
        """Same as ``array[index]`` (``kwargs`` go to ``jax.Array.at[].get``)."""
        if not kwargs:
            return getitem(self._array, self._index)
        if isinstance(self._index, Mapping):
            raise NamedAxisError("at[...].get(**kwargs) supports positional indices only. Fix: use x[{...}].")
        return nmap(lambda a, i: a.at[i].get(**kwargs))(self._array, self._index)

    def _update(self, method: str, values: Any, kwargs: dict[str, Any]) -> NamedArrayBase:
        x, index = self._array, self._index

        def apply(a: jax.Array, v: Any, i: Any) -> jax.Array:
            return getattr(a.at[i], method)(v, **kwargs)

        if not isinstance(index, Mapping):
            return nmap(apply)(x, values, index)
        new, slices, advanced = _split_dict_index(x, index)
        if new:
            # As in x[index], None gives the indexed region a new axis of size 1; the update values may carry it.
            values = _drop_unit_axes(values, new)
            index = {n: i for n, i in index.items() if i is not None}
        y = x.untag_prefix(*slices, *advanced)
        positional_index = tuple(index[n] for n in slices + advanced) + (Ellipsis,)
        values = _values_for_region(values, slices, advanced, positional_index, x)
        return nmap(apply)(y, values, positional_index).tag_prefix(*slices, *advanced)

    def set(self, values: Any, **kwargs: Any) -> NamedArrayBase:
        """Replaces the indexed entries by ``values``.

        Example:
            >>> import jax.numpy as jnp
            >>> from pzbridge.core.named_axes_core import wrap
            >>> wrap(jnp.zeros(3), "a").at[{"a": slice(1, None)}].set(2.0).unwrap("a").tolist()
            [0.0, 2.0, 2.0]
        """
        return self._update("set", values, kwargs)

    def add(self, values: Any, **kwargs: Any) -> NamedArrayBase:
        """Adds ``values`` to the indexed entries."""
        return self._update("add", values, kwargs)

    def multiply(self, values: Any, **kwargs: Any) -> NamedArrayBase:
        """Multiplies the indexed entries by ``values``."""
        return self._update("multiply", values, kwargs)

    def divide(self, values: Any, **kwargs: Any) -> NamedArrayBase:
        """Divides the indexed entries by ``values``."""
        return self._update("divide", values, kwargs)

    def power(self, values: Any, **kwargs: Any) -> NamedArrayBase:
        """Raises the indexed entries to ``values``."""
        return self._update("power", values, kwargs)

    def min(self, values: Any, **kwargs: Any) -> NamedArrayBase:
        """Takes the elementwise minimum with ``values``."""
        return self._update("min", values, kwargs)

    def max(self, values: Any, **kwargs: Any) -> NamedArrayBase:
        """Takes the elementwise maximum with ``values``."""
        return self._update("max", values, kwargs)


def _drop_unit_axes(values: Any, names: list[str]) -> Any:
    """Update values with the region's new size-1 axes (``None`` in the index) removed."""
    if not _is_named(values):
        return values
    present = [n for n in names if n in values.named_shape]
    wrong = {n: values.named_shape[n] for n in present if values.named_shape[n] != 1}
    if wrong:
        raise NamedAxisError(
            f"at[...]: None in the index adds axes {names} of size 1 to the indexed region, but the update values "
            f"have sizes {wrong} there. Fix: give the values size 1 on those axes, or drop them from the values."
        )
    return getitem(values, {n: 0 for n in present}) if present else values


def _values_for_region(values: Any, slices: list[str], advanced: list[str], positional_index: tuple,
                       x: NamedArrayBase) -> Any:
    """Lays out update values as positional (slice axes..., rest) for a dict-indexed region."""
    if not _is_named(values):
        return values
    bad = [n for n in advanced if n in values.named_shape]
    if bad:
        raise NamedAxisError(
            f"at[...]: the update values carry axes {bad} that the index removes. "
            "Fix: index those axes with a slice instead, or drop them from the values."
        )
    present = [n for n in slices if n in values.named_shape]
    moved = values.untag_prefix(*present)
    own = values.positional_shape
    advanced_shape = np.broadcast_shapes(*[_positional_shape(positional_index[len(slices) + k]) for k in range(len(advanced))]) if advanced else ()
    rest_rank = len(advanced_shape) + len(x.positional_shape)
    if len(own) > rest_rank:
        raise NamedAxisError(
            f"at[...]: update values have positional shape {own}, more axes than the indexed region's "
            f"{rest_rank} non-sliced positional axes. Fix: reshape the values."
        )
    moved_sizes = dict(values.named_shape)
    target = tuple(moved_sizes[n] if n in moved_sizes else 1 for n in slices) + (1,) * (rest_rank - len(own)) + own
    return nmap(lambda v: jnp.reshape(v, target))(moved)


def broadcast_to(x: NamedArrayBase, positional_shape: tuple[int, ...], named_shape: dict[str, int]) -> NamedArrayBase:
    """Implements :meth:`NamedArrayBase.broadcast_to`.

    Example:
        >>> import jax.numpy as jnp
        >>> from pzbridge.core.named_axes_core import wrap
        >>> broadcast_to(wrap(jnp.ones(3)), (2, 3), {}).positional_shape
        (2, 3)
    """
    view = x.as_namedarrayview()
    sizes = _union_sizes([("the array", view), ("the target", _sizes_view(named_shape))], "broadcast_to")
    try:
        if np.broadcast_shapes(x.positional_shape, positional_shape) != tuple(positional_shape):
            raise ValueError
    except ValueError:
        raise NamedAxisError(
            f"broadcast_to: positional shape {x.positional_shape} does not broadcast to {positional_shape}. "
            "Fix: pass a compatible positional shape."
        ) from None
    data = _arrange(view, list(sizes), padded_rank=len(positional_shape), size_one_for_missing=sizes)
    data = jnp.broadcast_to(data, tuple(sizes.values()) + tuple(positional_shape))
    return _leading_named(data, list(sizes))


def _sizes_view(named_shape: Mapping[str, int]) -> NamedArrayView:
    """A metadata-only view (no data) used to check sizes."""
    view = object.__new__(NamedArrayView)
    object.__setattr__(view, "data_shape", tuple(named_shape.values()))
    object.__setattr__(view, "data_axis_for_logical_axis", ())
    object.__setattr__(view, "data_axis_for_name", AxisMap((n, i) for i, n in enumerate(named_shape)))
    object.__setattr__(view, "data_array", None)
    return view


# Methods installed on NamedArrayBase. ------------------------------------------------

_BINARY = {
    "add": jnp.add, "sub": jnp.subtract, "mul": jnp.multiply, "truediv": jnp.true_divide,
    "floordiv": jnp.floor_divide, "mod": jnp.mod, "pow": jnp.power, "and": jnp.bitwise_and,
    "or": jnp.bitwise_or, "xor": jnp.bitwise_xor, "lshift": jnp.left_shift, "rshift": jnp.right_shift,
}
_COMPARE = {"lt": jnp.less, "le": jnp.less_equal, "gt": jnp.greater, "ge": jnp.greater_equal,
            "eq": jnp.equal, "ne": jnp.not_equal}
_UNARY = {"neg": jnp.negative, "pos": jnp.positive, "abs": jnp.abs, "invert": jnp.invert}
_REDUCTIONS = {"sum": jnp.sum, "mean": jnp.mean, "max": jnp.max, "min": jnp.min, "prod": jnp.prod,
               "std": jnp.std, "var": jnp.var, "any": jnp.any, "all": jnp.all,
               "logsumexp": jax.nn.logsumexp}
_SINGLE_AXIS = {"argmax": jnp.argmax, "argmin": jnp.argmin}


def _binary(name: str, fn: Callable[..., Any]) -> tuple[Callable[..., Any], Callable[..., Any]]:
    def forward(self: Any, other: Any) -> Any:
        return elementwise(fn, self, other, what=f"__{name}__")

    def reflected(self: Any, other: Any) -> Any:
        return elementwise(fn, other, self, what=f"__r{name}__")

    return forward, reflected


def _reduction(name: str, fn: Callable[..., Any], single_axis: bool) -> Callable[..., Any]:
    def method(self: Any, *names: str, axis: Any = None, **kwargs: Any) -> Any:
        return reduce(fn, self, names, axis, single_axis=single_axis, **kwargs)

    method.__name__ = name
    method.__doc__ = (
        f"``jnp.{name}`` over named axes (``x.{name}('seq')``) or positional axes (``axis=``).\n\n"
        "With names, reduces those named axes; otherwise reduces positional axes (all of them\n"
        "when ``axis`` is None), vectorised over every named axis. Extra keyword arguments go\n"
        f"to ``jnp.{name}``.\n\n"
        "Example:\n"
        "    >>> import jax.numpy as jnp\n"
        "    >>> from pzbridge.core.named_axes_core import wrap\n"
        f"    >>> dict(wrap(jnp.ones((2, 3)), 'b', 's').{name}('s').named_shape)\n"
        "    {'b': 2}\n"
    )
    return method


class _DataMethods:
    """The methods of :class:`NamedArrayBase` that compute on the data.

    Not a base class: :func:`install_methods` copies these onto
    ``NamedArrayBase``. They live here because they call the operations of
    this module, which builds on the classes of ``named_axes_core``; keeping
    them out of that module keeps the import graph acyclic.
    """

    def astype(self: NamedArrayBase, dtype: Any) -> NamedArrayBase:
        """Casts the data to ``dtype`` (layout unchanged).

        Example:
            >>> import jax.numpy as jnp
            >>> from pzbridge.core.named_axes_core import wrap
            >>> wrap(jnp.zeros(2), "a").astype(jnp.int32).dtype
            dtype('int32')
        """
        return map_data(lambda d: d.astype(dtype), self)

    def reshape(self: NamedArrayBase, *shape: Any) -> NamedArrayBase:
        """Reshapes the positional axes (vectorised over every named axis).

        Example:
            >>> import jax.numpy as jnp
            >>> from pzbridge.core.named_axes_core import wrap
            >>> wrap(jnp.zeros((2, 6))).tag_prefix("b").reshape(2, 3).positional_shape
            (2, 3)
        """
        target = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        return nmap(lambda a: jnp.reshape(a, tuple(target)))(self)

    def broadcast_to(
        self: NamedArrayBase, positional_shape: tuple[int, ...] = (), named_shape: Mapping[str, int] | None = None
    ) -> NamedArrayBase:
        """Broadcasts to a positional shape (numpy rules) and adds named axes.

        Args:
          positional_shape: Target positional shape.
          named_shape: Named axes to add (existing names must keep their size).

        Returns:
          A named array with at least these axes.

        Example:
            >>> import jax.numpy as jnp
            >>> from pzbridge.core.named_axes_core import wrap
            >>> dict(wrap(jnp.zeros(3), "s").broadcast_to((), {"b": 2}).named_shape)
            {'s': 3, 'b': 2}
        """
        return broadcast_to(self, tuple(positional_shape), dict(named_shape or {}))

    def __getitem__(self: NamedArrayBase, index: Any) -> NamedArrayBase:
        """Indexes positional axes numpy-style, or named axes with a dict.

        A tuple/int/slice/array index applies to the positional axes and is
        vectorised over the named axes; index arrays may be named arrays (their
        names are vectorised jointly). A dict ``{name: index}`` indexes named
        axes: an int removes the name, a slice keeps it (resized), ``None``
        adds a new size-1 name, and an integer (named) array gathers; the
        positional axes of array indices come first in the result.

        Example:
            >>> import jax.numpy as jnp
            >>> from pzbridge.core.named_axes_core import wrap
            >>> x = wrap(jnp.arange(6).reshape(2, 3), "b", "s")
            >>> x[{"s": 1}].unwrap("b").tolist()
            [1, 4]
            >>> dict(x[{"s": slice(0, 2)}].named_shape)
            {'b': 2, 's': 2}
        """
        return getitem(self, index)

    @property
    def at(self: NamedArrayBase) -> IndexUpdateHelper:
        """Functional updates: ``x.at[index].set(v)`` (also add, multiply, ...).

        The index has the same forms as in ``__getitem__``; positional parts
        of ``v`` broadcast numpy-style against the indexed region, named axes
        of ``v`` are matched by name.

        Example:
            >>> import jax.numpy as jnp
            >>> from pzbridge.core.named_axes_core import wrap
            >>> x = wrap(jnp.zeros((2, 3)), "b", "s")
            >>> x.at[{"s": 0}].set(1.0).unwrap("b", "s").tolist()
            [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
        """
        return IndexUpdateHelper(self)


_DATA_METHODS = ("astype", "reshape", "broadcast_to", "__getitem__", "at")


def install_methods(cls: type) -> None:
    """Adds the data methods, operators and reductions to ``cls``.

    Called once, for ``NamedArrayBase``, when this module loads;
    ``pzbridge/core/__init__.py`` imports this module, so the methods are
    installed before any core module can be used.

    Example:
        >>> from pzbridge.core.named_axes_core import NamedArrayBase
        >>> hasattr(NamedArrayBase, "__radd__"), hasattr(NamedArrayBase, "argmax")
        (True, True)
        >>> hasattr(NamedArrayBase, "astype"), hasattr(NamedArrayBase, "at")
        (True, True)
    """
    for name in _DATA_METHODS:
        setattr(cls, name, vars(_DataMethods)[name])
    for name, fn in _BINARY.items():
        forward, reflected = _binary(name, fn)
        setattr(cls, f"__{name}__", forward)
        setattr(cls, f"__r{name}__", reflected)
    for name, fn in _COMPARE.items():
        setattr(cls, f"__{name}__", _binary(name, fn)[0])
    for name, fn in _UNARY.items():
        setattr(cls, f"__{name}__", _make_unary(fn))
    setattr(cls, "__matmul__", lambda self, other: nmap(jnp.matmul)(self, other))
    setattr(cls, "__rmatmul__", lambda self, other: nmap(jnp.matmul)(other, self))
    for name, fn in _REDUCTIONS.items():
        setattr(cls, name, _reduction(name, fn, single_axis=False))
    for name, fn in _SINGLE_AXIS.items():
        setattr(cls, name, _reduction(name, fn, single_axis=True))
    # `==` is elementwise (like jax.Array); keep structural hashing from Struct.
    cls.__hash__ = lambda self: hash(jax.tree_util.tree_structure(self))


def _make_unary(fn: Callable[..., Any]) -> Callable[[Any], Any]:
    def method(self: Any) -> Any:
        return map_data(fn, self)

    return method


install_methods(NamedArrayBase)
