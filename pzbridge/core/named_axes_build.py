"""Building, joining and scanning named arrays.

Constructors take a *named shape* (``{"batch": 2, "seq": 8}``) because named
code should never depend on axis order. Joining functions (``concatenate``,
``stack``) align the other axes by name through :func:`nmap`; ``unstack`` and
``scan`` move the chosen axis to the front of the data so that plain JAX
slicing (and ``jax.lax.scan``) act on it directly.

Example:
    >>> x = zeros({"batch": 2, "seq": 3})
    >>> [dict(p.named_shape) for p in unstack(x, "batch")]
    [{'seq': 3}, {'seq': 3}]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from pzbridge.core.errors import NamedAxisError
from pzbridge.core.named_axes_core import AxisMap, NamedArray, NamedArrayBase, is_namedarray
from pzbridge.core.named_axes_ops import map_data, nmap


def full(named_shape: Mapping[str, int], fill_value: Any, dtype: Any = None) -> NamedArray:
    """An array with the given named axes filled with ``fill_value``.

    Example:
        >>> full({"a": 2}, 7, dtype="int32").unwrap("a").tolist()
        [7, 7]
    """
    sizes = AxisMap(named_shape)
    return NamedArray(jnp.full(tuple(sizes.values()), fill_value, dtype=dtype), sizes)


def zeros(named_shape: Mapping[str, int], dtype: Any = None) -> NamedArray:
    """Zeros with the given named axes.

    Example:
        >>> dict(zeros({"a": 2, "b": 3}).named_shape)
        {'a': 2, 'b': 3}
    """
    return full(named_shape, 0, dtype=dtype if dtype is not None else jnp.float32)


def ones(named_shape: Mapping[str, int], dtype: Any = None) -> NamedArray:
    """Ones with the given named axes.

    Example:
        >>> float(ones({"a": 2}).sum("a"))
        2.0
    """
    return full(named_shape, 1, dtype=dtype if dtype is not None else jnp.float32)


def full_like(x: NamedArrayBase, fill_value: Any, dtype: Any = None) -> NamedArrayBase:
    """An array shaped and laid out like ``x``, filled with ``fill_value``.

    Example:
        >>> full_like(zeros({"a": 2}), 3.0).unwrap("a").tolist()
        [3.0, 3.0]
    """
    return map_data(lambda d: jnp.full_like(d, fill_value, dtype=dtype), x)


def zeros_like(x: NamedArrayBase, dtype: Any = None) -> NamedArrayBase:
    """Zeros shaped and laid out like ``x``.

    Example:
        >>> zeros_like(ones({"a": 2})).unwrap("a").tolist()
        [0.0, 0.0]
    """
    return full_like(x, 0, dtype=dtype)


def ones_like(x: NamedArrayBase, dtype: Any = None) -> NamedArrayBase:
    """Ones shaped and laid out like ``x``.

    Example:
        >>> ones_like(zeros({"a": 2})).unwrap("a").tolist()
        [1.0, 1.0]
    """
    return full_like(x, 1, dtype=dtype)


def arange(name: str, start: int, stop: int | None = None, step: int = 1, dtype: Any = None) -> NamedArray:
    """``jnp.arange`` along a single named axis.

    Args:
      name: The axis name.
      start: First value, or the size when ``stop`` is omitted.
      stop: End (exclusive).
      step: Increment.
      dtype: Optional dtype.

    Returns:
      A one-axis :class:`NamedArray`.

    Example:
        >>> arange("seq", 4).unwrap("seq").tolist()
        [0, 1, 2, 3]
    """
    data = jnp.arange(start, stop, step, dtype=dtype) if stop is not None else jnp.arange(start, dtype=dtype)
    return NamedArray(data, AxisMap({name: data.shape[0]}))


def random_split(key: Any, axis_names_and_sizes: Mapping[str, int] | Sequence[tuple[str, int]]) -> NamedArrayBase:
    """Splits a PRNG key into a named array of independent keys.

    Args:
      key: A key (``jax.random.key`` or a raw ``uint32[2]`` key), or a
        named array of keys (the new names are added to its names).
      axis_names_and_sizes: The new axes, e.g. ``{"batch": 4}``.

    Returns:
      A named array of keys carrying the new axes (raw keys keep their
      trailing positional axis of size 2).

    Example:
        >>> import jax
        >>> keys = random_split(jax.random.key(0), {"batch": 2, "heads": 3})
        >>> dict(keys.named_shape)
        {'batch': 2, 'heads': 3}
    """
    sizes = AxisMap(axis_names_and_sizes)
    counts = tuple(sizes.values())

    def split(k: jax.Array) -> jax.Array:
        parts = jax.random.split(k, math.prod(counts))
        return jnp.reshape(parts, counts + parts.shape[1:])

    named_key = key if is_namedarray(key) else NamedArray(jnp.asarray(key) if not _is_typed_key(key) else key, AxisMap())
    return nmap(split)(named_key).tag_prefix(*sizes)


def _is_typed_key(key: Any) -> bool:
    return hasattr(key, "dtype") and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)


def _require_axis(arrays: Sequence[NamedArrayBase], axis_name: str, what: str, present: bool) -> None:
    for i, a in enumerate(arrays):
        if not is_namedarray(a):
            raise NamedAxisError(f"{what}: item {i} is a {type(a).__name__}, not a named array. Fix: pzb.nx.wrap it.")
        if (axis_name in a.named_shape) != present:
            state = "lacks" if present else "already has"
            raise NamedAxisError(
                f"{what}: item {i} {state} axis {axis_name!r} (named axes {list(a.named_shape)}). "
                + ("Fix: tag the axis first." if present else "Fix: pick a new axis name.")
            )


def concatenate(arrays: Sequence[NamedArrayBase], axis_name: str) -> NamedArrayBase:
    """Concatenates named arrays along an existing named axis.

    Other named axes are matched by name; positional shapes must agree.

    Example:
        >>> concatenate([zeros({"s": 2}), ones({"s": 3})], "s").unwrap("s").tolist()
        [0.0, 0.0, 1.0, 1.0, 1.0]
    """
    _require_axis(arrays, axis_name, "concatenate", present=True)
    moved = [a.untag_prefix(axis_name) for a in arrays]
    return nmap(lambda *xs: jnp.concatenate(xs, axis=0))(*moved).tag_prefix(axis_name)


def stack(arrays: Sequence[NamedArrayBase], axis_name: str) -> NamedArrayBase:
    """Stacks named arrays along a new named axis.

    Example:
        >>> sorted(stack([zeros({"s": 2}), ones({"s": 2})], "layer").named_shape.items())
        [('layer', 2), ('s', 2)]
    """
    _require_axis(arrays, axis_name, "stack", present=False)
    return nmap(lambda *xs: jnp.stack(xs))(*arrays).tag_prefix(axis_name)


def unstack(array: NamedArrayBase, axis_name: str) -> list[NamedArray]:
    """Splits a named array along a named axis into a list (the inverse of :func:`stack`).

    Example:
        >>> [p.unwrap().tolist() for p in unstack(arange("s", 3), "s")]
        [0, 1, 2]
    """
    _require_axis([array], axis_name, "unstack", present=True)
    front = array.untag_prefix(axis_name).with_positional_prefix()
    return [NamedArray(front.data_array[i], front.named_axes) for i in range(front.data_array.shape[0])]


def order_like(value_tree: Any, reference_tree: Any) -> Any:
    """Lays out every named array in ``value_tree`` like its match in ``reference_tree``.

    Useful before tree-wide JAX functions (``jax.lax.cond``, carries of
    ``scan``) that need identical pytree structures.

    Example:
        >>> a = {"w": zeros({"x": 2, "y": 3})}
        >>> b = {"w": zeros({"y": 3, "x": 2})}
        >>> list(order_like(a, b)["w"].named_shape)
        ['y', 'x']
    """
    return jax.tree_util.tree_map(
        lambda v, r: v.order_like(r) if is_namedarray(v) else v, value_tree, reference_tree, is_leaf=is_namedarray
    )


def scan(f: Callable[[Any, Any], tuple[Any, Any]], axis: str, init: Any, xs: Any = None,
         **scan_kwargs: Any) -> tuple[Any, Any]:
    """``jax.lax.scan`` over a named axis.

    Every named array in ``xs`` must carry ``axis``; ``f(carry, x)`` sees
    slices without it. Named arrays in the stacked outputs get ``axis`` back;
    plain arrays in the outputs get it as a new name too. The carry keeps the
    layout of ``init``.

    Args:
      f: The step function ``(carry, x) -> (carry, y)``.
      axis: The named axis to scan over.
      init: The initial carry (any pytree).
      xs: The scanned inputs (a pytree of named arrays; plain arrays are
        scanned over their leading axis).
      **scan_kwargs: Forwarded to ``jax.lax.scan`` (``reverse``, ``unroll``).

    Returns:
      ``(final_carry, stacked_ys)``.

    Raises:
      NamedAxisError: If an input lacks ``axis`` or sizes disagree.

    Example:
        >>> carry, ys = scan(lambda c, x: (c + x, c), "t", 0.0, arange("t", 4, dtype="float32"))
        >>> float(carry), ys.unwrap("t").tolist()
        (6.0, [0.0, 0.0, 1.0, 3.0])
    """
    leaves = jax.tree_util.tree_leaves(xs, is_leaf=is_namedarray)
    _require_axis([x for x in leaves if is_namedarray(x)], axis, "scan", present=True)
    lengths = {x.named_shape[axis] if is_namedarray(x) else jnp.shape(x)[0] for x in leaves}
    if len(lengths) > 1:
        raise NamedAxisError(
            f"scan: inputs disagree on the length of axis {axis!r}: {sorted(lengths)}. Fix: make them equal."
        )
    front = jax.tree_util.tree_map(
        lambda x: x.untag_prefix(axis).with_positional_prefix() if is_namedarray(x) else x, xs, is_leaf=is_namedarray
    )
    init_layout = init

    def step(carry: Any, x: Any) -> tuple[Any, Any]:
        new_carry, y = f(carry, x)
        new_carry = _match_carry(new_carry, init_layout)
        # Outputs are stacked on the data's leading axis: store them positional-first.
        y = jax.tree_util.tree_map(
            lambda v: v.with_positional_prefix() if is_namedarray(v) else v, y, is_leaf=is_namedarray
        )
        return new_carry, y

    carry, ys = jax.lax.scan(step, init, front, length=lengths.pop() if lengths else None, **scan_kwargs)
    ys = jax.tree_util.tree_map(
        lambda v: v.tag_prefix(axis) if is_namedarray(v) else NamedArray(v, AxisMap()).tag_prefix(axis),
        ys,
        is_leaf=is_namedarray,
    )
    return carry, ys


def _match_carry(new: Any, reference: Any) -> Any:
    def fix(value: Any, ref: Any) -> Any:
        if is_namedarray(ref) and is_namedarray(value):
            return value.order_like(ref)
        if is_namedarray(value) and not value.named_shape and not is_namedarray(ref):
            return value.unwrap()
        return value

    try:
        return jax.tree_util.tree_map(fix, new, reference, is_leaf=is_namedarray)
    except ValueError:
        return new  # Structures differ: let jax.lax.scan report it with its own message.
