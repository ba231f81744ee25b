"""One array leaf of a checkpoint: its JSON spec, its key on disk, and how it comes back.

Everything a checkpoint stores is a flat mapping ``key -> array`` plus, for
each array, a small JSON *spec* (dtype, shape, named axes, the PRNG key
implementation, or the Python number type it was). The key is readable: a
variable's label (``layers.0.weights``) or a dotted tree path
(``0.mu.1.data_array`` in an optax state), escaped so that orbax, which
normalises ``/`` in names (``"a"`` and ``"a/"`` name the same array), cannot
make two keys collide. Shared by model variables, optimizer states and the
array leaves of lowered Equinox / NNX modules (:mod:`pzbridge.checkpoint`).

Example:
    >>> import numpy as np
    >>> spec = leaf_spec(np.ones((2, 3), np.float32))
    >>> spec["shape"], spec["dtype"]
    ([2, 3], 'float32')
    >>> escape_key("blocks[0].attn/query"), unique_keys(["a", "a"])
    ('blocks[0].attn%2Fquery', ['a', 'a%%1'])
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import CheckpointError

# Characters kept as they are in a key; everything else (``/`` first) becomes %XX of its UTF-8 bytes.
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-[]()")


def escape_key(name: str) -> str:
    """``name`` as an orbax array name: safe characters kept, the rest ``%XX`` (empty: ``%``).

    Example:
        >>> escape_key("layers.0.weight"), escape_key("a b"), escape_key("")
        ('layers.0.weight', 'a%20b', '%')
    """
    if not name:
        return "%"
    return "".join(ch if ch in _SAFE else "".join(f"%{b:02X}" for b in ch.encode()) for ch in name)


def unique_keys(names: Iterable[str]) -> list[str]:
    """Escaped, pairwise distinct keys for ``names`` (a repeat gets ``%%1``, ``%%2``: never an escape's output).

    Example:
        >>> unique_keys(["w", "w", "w%%1"])
        ['w', 'w%%1', 'w%25%251']
    """
    keys: list[str] = []
    taken: set[str] = set()
    for name in names:
        key, n = escape_key(name), 0
        candidate = key
        while candidate in taken:
            n += 1
            candidate = f"{key}%%{n}"
        taken.add(candidate)
        keys.append(candidate)
    return keys


def path_name(path: Sequence[Any]) -> str:
    """A jax key path as a dotted name: ``(GetAttrKey('layers'), SequenceKey(0))`` -> ``layers.0``.

    Example:
        >>> path_name(jax.tree_util.tree_flatten_with_path({"a": [1, 2]})[0][1][0])
        'a.1'
    """
    parts = []
    for entry in path:
        for attribute in ("name", "key", "idx"):
            if hasattr(entry, attribute):
                parts.append(str(getattr(entry, attribute)))
                break
        else:
            parts.append(str(entry))
    return ".".join(parts) if parts else "<root>"


def _is_abstract(array: Any) -> bool:
    return isinstance(array, jax.ShapeDtypeStruct)


def leaf_spec(leaf: Any) -> dict[str, Any]:
    """The JSON spec of one leaf (array, named array, Python number, PRNG key, or an abstract one).

    Raises:
      CheckpointError: If the leaf is not an array or a number.

    Example:
        >>> leaf_spec(nx.wrap(np.ones((2, 3)), "a", "b"))["named_axes"], leaf_spec(3)["python"]
        (['a', 'b'], 'int')
    """
    array = leaf
    spec: dict[str, Any] = {"named_axes": None}
    if nx.is_namedarray(leaf):
        array = leaf.data_array
        spec = {
            "named_axes": list(leaf.named_shape),
            "named_sizes": [int(s) for s in leaf.named_shape.values()],
            "positional_shape": [int(s) for s in leaf.positional_shape],
        }
    if isinstance(array, (bool, int, float)):
        spec["python"] = type(array).__name__
        array = np.asarray(array)
    dtype = getattr(array, "dtype", None)
    if dtype is None:
        raise CheckpointError(
            f"cannot checkpoint a leaf {leaf!r:.80}: expected arrays, named arrays or Python numbers, found "
            f"{type(leaf).__name__}. Fix: keep variable values and optimizer states as arrays."
        )
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        # Keys are stored as their key data; an abstract key (eval_shape) gets the same spec, without data.
        if _is_abstract(array):
            spec["prng_impl"] = str(dtype._impl.name)
            array = jax.eval_shape(jax.random.key_data, array)
        else:
            spec["prng_impl"] = str(jax.random.key_impl(array))
            array = jax.random.key_data(array)
        dtype = array.dtype
    spec["dtype"] = str(np.dtype(dtype))
    spec["shape"] = [int(s) for s in (array.shape if _is_abstract(array) else np.shape(array))]
    return spec


def host_array(leaf: Any) -> np.ndarray:
    """The bytes a leaf stores, copied to host memory (key data for PRNG keys, the data of a named array).

    Copying here (a blocking device-to-host transfer) is what lets an
    asynchronous save write while training goes on updating the parameters.

    Example:
        >>> host_array(nx.wrap(jnp.arange(3), "a")).tolist()
        [0, 1, 2]
    """
    array = leaf.data_array if nx.is_namedarray(leaf) else leaf
    if isinstance(array, (bool, int, float)):
        return np.asarray(array)
    if jax.dtypes.issubdtype(getattr(array, "dtype", np.float32), jax.dtypes.prng_key):
        array = jax.random.key_data(array)
    return np.asarray(jax.device_get(array))


def canonical_leaves(value: Any) -> tuple[list[Any], Any]:
    """The leaves of a variable's value (named arrays kept whole, views made canonical) and the treedef.

    Example:
        >>> leaves, treedef = canonical_leaves((nx.wrap(np.ones(2), "a"), 3))
        >>> len(leaves), treedef.num_leaves
        (2, 2)
    """
    leaves, treedef = jax.tree_util.tree_flatten(value, is_leaf=nx.is_namedarray)
    # Views store data in any layout; canonical form = positional prefix then names in order.
    return [leaf.canonicalize() if isinstance(leaf, nx.NamedArrayView) else leaf for leaf in leaves], treedef


def rebuild_leaf(spec: Mapping[str, Any], array: Any, like: Any = None) -> Any:
    """The leaf a spec and its stored array describe, in ``like``'s named-axis order when given.

    Example:
        >>> spec = leaf_spec(nx.wrap(np.ones((2, 3)), "a", "b"))
        >>> like = nx.wrap(np.zeros((3, 2)), "b", "a")
        >>> tuple(rebuild_leaf(spec, np.ones((2, 3)), like).named_shape)
        ('b', 'a')
    """
    array = jnp.asarray(array)
    if spec.get("prng_impl"):
        array = jax.random.wrap_key_data(array, impl=spec["prng_impl"])
    if "python" in spec:
        return {"int": int, "float": float, "bool": bool}[spec["python"]](array)
    if spec.get("named_axes") is None:
        return array
    saved = dict(zip(spec["named_axes"], spec["named_sizes"]))
    positional = len(spec["positional_shape"])
    value = nx.NamedArray(array, saved) if not positional else nx.wrap(array).tag(
        *[f"__p{i}" for i in range(positional)], *spec["named_axes"]
    ).untag(*[f"__p{i}" for i in range(positional)])
    if like is not None and nx.is_namedarray(like) and tuple(like.named_shape) != tuple(saved):
        value = value.order_as(*like.named_shape) if not positional else value.order_like(like)
    return value


def leaf_differences(where: str, mine: Mapping[str, Any], spec: Mapping[str, Any]) -> list[str]:
    """How the target's leaf spec ``mine`` differs from the saved ``spec`` (axes, shapes, dtypes).

    Example:
        >>> leaf_differences("'w'", leaf_spec(np.ones(3)), leaf_spec(np.ones(2)))
        ["'w': shape (2,) in checkpoint, (3,) in model"]
    """
    if (mine["named_axes"] is None) != (spec["named_axes"] is None):
        kind = lambda s: "named array" if s["named_axes"] is not None else "plain array"  # noqa: E731
        return [f"{where}: {kind(spec)} in checkpoint, {kind(mine)} in model"]
    problems = []
    if mine["named_axes"] is not None:
        saved_named = dict(zip(spec["named_axes"], spec["named_sizes"]))
        our_named = dict(zip(mine["named_axes"], mine["named_sizes"]))
        if set(saved_named) != set(our_named):
            problems.append(f"{where}: axes {saved_named} in checkpoint, {our_named} in model")
        elif saved_named != our_named or spec["positional_shape"] != mine["positional_shape"]:
            problems.append(
                f"{where}: shape {saved_named} (positional {spec['positional_shape']}) in checkpoint, "
                f"{our_named} (positional {mine['positional_shape']}) in model"
            )
    elif list(spec["shape"]) != list(mine["shape"]):
        problems.append(f"{where}: shape {tuple(spec['shape'])} in checkpoint, {tuple(mine['shape'])} in model")
    if spec["dtype"] != mine["dtype"] or spec.get("prng_impl") != mine.get("prng_impl"):
        problems.append(f"{where}: dtype {_dtype_text(spec)} in checkpoint, {_dtype_text(mine)} in model")
    return problems


def _dtype_text(spec: Mapping[str, Any]) -> str:
    return f"key<{spec['prng_impl']}>" if spec.get("prng_impl") else spec["dtype"]


def flat_tree(tree: Any) -> tuple[list[str], list[Any], Any]:
    """Dotted path names, leaves and treedef of ``tree`` (named arrays split into their data leaves).

    Example:
        >>> names, leaves, _ = flat_tree({"mu": (np.ones(2),), "count": np.int32(0)})
        >>> names
        ['count', 'mu.0']
    """
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [path_name(path) for path, _ in with_paths], [leaf for _, leaf in with_paths], treedef


__all__ = [
    "canonical_leaves",
    "escape_key",
    "flat_tree",
    "host_array",
    "leaf_differences",
    "leaf_spec",
    "path_name",
    "rebuild_leaf",
    "unique_keys",
]
