"""Shape and structure checking with dimension variables (exported as ``pzb.chk``).

A model built from small layers passes pytrees of named arrays between
them, which Python annotations cannot describe. This module checks a value
against a *pattern*: the same pytree with :class:`ArraySpec` nodes where
arrays are expected. An ``ArraySpec`` gives the positional shape, the named
shape and the dtype, and any dimension may be a variable (:func:`var`).
Matching binds each variable the first time it is seen and checks every
later use against it, so one call both validates and extracts sizes::

    chk.check_structure(x, chk.ArraySpec(shape=(chk.var("n"),), named_shape={"seq": chk.var("s")}))
    # -> MatchResult({'n': 3, 's': 5})

``*chk.var("b")`` stands for any number of positional axes (bound to a
tuple), ``**chk.var("rest")`` for the named axes not listed (bound to a
dict), and ``**chk.vars_for_axes("x", names)`` for one variable per listed
axis, collected under one name. A mismatch raises
:class:`~pzbridge.core.errors.StructureMismatchError` naming the path of the
array, the dimension, and where the variable it disagrees with was bound.

Why the variables are frozen dataclasses and ``ArraySpec`` a childless
:class:`~pzbridge.core.struct.Struct`: a pattern is static configuration
(it may sit in a layer such as :class:`pzbridge.nn.CheckStructure` and go
through ``jax.jit``), so it must flatten to no leaves and hash. See
docs/architecture.md for where checking sits in the layers of the package.

Example:
    >>> import jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> chk = pzb.chk
    >>> x = pzb.nx.wrap(jnp.ones((2, 3)), "batch", "features")
    >>> dict(chk.check_structure({"x": x}, {"x": chk.ArraySpec(named_shape={"features": chk.var("f"), **chk.var("rest")})}))
    {'f': 3, 'rest': {'batch': 2}}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from pzbridge.core.errors import StructureMismatchError, format_path
from pzbridge.core.named_axes_core import NamedArrayBase
from pzbridge.core.struct import Struct, pytree_dataclass, static_field
from pzbridge.core.tree_util import tree_equal
from pzbridge.core.variables_kinds import FrozenMetadata

VarName = str | tuple[str, Any]


@dataclasses.dataclass(frozen=True)
class MultiDimVar:
    """A variable standing for several positional axes (a tuple) or the remaining named axes (a dict).

    Made by unpacking a :class:`DimVar`: ``*var("b")`` in a ``shape``,
    ``**var("rest")`` in a ``named_shape``.

    Example:
        >>> [*var("b")]
        [MultiDimVar(name='b')]
    """

    name: str


@dataclasses.dataclass(frozen=True)
class RemainingAxisPlaceholder:
    """The value paired with a :class:`MultiDimVar` key in a ``named_shape`` (``**var(name)``).

    Example:
        >>> {**var("rest")}
        {MultiDimVar(name='rest'): RemainingAxisPlaceholder()}
    """


@dataclasses.dataclass(frozen=True)
class DimVar:
    """A variable for one dimension's size; unpack it for several (see :func:`var`).

    Attributes:
      name: The variable's name (a string, or ``(group, axis)`` for the
        variables :func:`vars_for_axes` makes).

    Example:
        >>> check_structure(jnp.ones((2, 2)), ArraySpec(shape=(var("n"), var("n"))))["n"]
        2
    """

    name: VarName

    def _multi(self) -> MultiDimVar:
        if not isinstance(self.name, str):
            raise StructureMismatchError(
                f"chk: only a variable with a string name can be unpacked, found name {self.name!r}. "
                "Fix: unpack chk.var('name') itself."
            )
        return MultiDimVar(self.name)

    def __iter__(self) -> Iterator[MultiDimVar]:
        # `*var(name)` in a shape tuple.
        return iter((self._multi(),))

    def keys(self) -> tuple[MultiDimVar, ...]:
        """Makes ``**var(name)`` a ``{MultiDimVar(name): RemainingAxisPlaceholder()}`` entry.

        Example:
            >>> var("rest").keys()
            (MultiDimVar(name='rest'),)
        """
        return (self._multi(),)

    def __getitem__(self, key: MultiDimVar) -> RemainingAxisPlaceholder:
        if key != self._multi():
            raise KeyError(key)
        return RemainingAxisPlaceholder()


@dataclasses.dataclass(frozen=True)
class KnownDim:
    """A dimension of known size that also binds a variable name to that size.

    What :func:`full_substitute_dimension_variables` leaves in place of a
    variable, so a substituted pattern still binds the same names.

    Example:
        >>> dict(check_structure(jnp.ones(3), ArraySpec(shape=(KnownDim("n", 3),))))
        {'n': 3}
    """

    name: VarName
    size: int


@dataclasses.dataclass(frozen=True)
class Wildcard:
    """Matches any value or subtree in a pattern.

    Attributes:
      description: Shown in renderings of the pattern (optional).

    Example:
        >>> dict(check_structure({"a": 1, "b": [2, 3]}, {"a": 1, "b": ANY}))
        {}
    """

    description: str | None = None


ANY = Wildcard()
"""A :class:`Wildcard` without a description."""

Dim = int | DimVar | MultiDimVar | KnownDim


class _FrozenShape(FrozenMetadata):
    """A hashable, ordered read-only mapping for an ``ArraySpec``'s named shape (it is static)."""

    __slots__ = ()

    def __hash__(self) -> int:
        return hash(frozenset(self._items))  # Sizes are hashable: all of each entry counts.

    def __reduce__(self) -> tuple:
        return (_FrozenShape, (self._items,))

    def __repr__(self) -> str:
        return repr(self._dict)


# Dtype categories (classes, not dtypes): a spec with one accepts any dtype below it.
_ABSTRACT_DTYPES = (np.generic, np.number, np.integer, np.signedinteger, np.unsignedinteger, np.inexact,
                    np.floating, np.complexfloating, jax.dtypes.extended, jax.dtypes.prng_key)


def _is_abstract_dtype(dtype: Any) -> bool:
    return isinstance(dtype, type) and dtype in _ABSTRACT_DTYPES


@pytree_dataclass
class ArraySpec(Struct):
    """The expected positional shape, named shape and dtype of an array in a pattern.

    Like ``jax.ShapeDtypeStruct`` but with named axes and dimension
    variables, and a pytree node with no children (a pattern flattens to no
    leaves). It matches a ``jax.Array`` / ``np.ndarray`` / ``ShapeDtypeStruct``
    (named shape must then be empty) or a named array.

    Attributes:
      shape: Positional shape: ints, :func:`var` variables, at most one
        unbound ``*var(name)``, :class:`KnownDim` (static).
      dtype: A concrete dtype, or an abstract one such as ``np.floating``
        that accepts any sub-dtype; default ``np.generic`` accepts any (static).
      named_shape: Axis name -> size or variable; ``**var(name)`` accepts and
        binds the axes not listed, which are otherwise an error (static).

    Example:
        >>> spec = ArraySpec(shape=(2,), dtype=np.floating, named_shape={"seq": var("s")})
        >>> check_structure(pzb.nx.wrap(jnp.ones((2, 7))).tag_prefix("seq"), spec)
        Traceback (most recent call last):
        ...
        pzbridge.core.errors.StructureMismatchError: chk: the value at <root> has positional shape (7,), expected (2,) (named shape {'seq': 2}). Fix: pass a value of that shape, or loosen the pattern (a chk.var for a size, *chk.var(name) for any number of axes).
        >>> check_structure(pzb.nx.wrap(jnp.ones((7, 2))).tag_prefix("seq"), spec)["s"]
        7
    """

    shape: tuple[Dim, ...] = static_field(default=())
    dtype: Any = static_field(default=np.generic)
    named_shape: Mapping[Any, Any] = static_field(default=_FrozenShape({}))

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))
        for dim in self.shape:
            if not isinstance(dim, (int, np.integer, DimVar, MultiDimVar, KnownDim)) or isinstance(dim, bool):
                raise StructureMismatchError(
                    f"ArraySpec: a positional dimension must be an int, chk.var(name), *chk.var(name) or KnownDim, "
                    f"found {type(dim).__name__} {dim!r}. Fix: write sizes as ints or variables."
                )
        if not isinstance(self.named_shape, _FrozenShape):
            object.__setattr__(self, "named_shape", _FrozenShape(dict(self.named_shape)))
        remainders = [k for k in self.named_shape if isinstance(k, MultiDimVar)]
        if len(remainders) > 1:
            raise StructureMismatchError(
                f"ArraySpec: at most one **chk.var(name) per named shape, found {[r.name for r in remainders]}. "
                "Fix: keep one remainder variable."
            )
        if not _is_abstract_dtype(self.dtype):
            object.__setattr__(self, "dtype", np.dtype(self.dtype))

    @property
    def positional_shape(self) -> tuple[Dim, ...]:
        """The positional shape (the same as ``shape``, as for named arrays).

        Example:
            >>> ArraySpec(shape=(3,)).positional_shape
            (3,)
        """
        return self.shape

    @classmethod
    def floating_named(cls, named_shape: Mapping[Any, Any]) -> ArraySpec:
        """A spec for a floating named array with no positional axes.

        Example:
            >>> ArraySpec.floating_named({"f": 3}).dtype is np.floating
            True
        """
        return cls(shape=(), dtype=np.floating, named_shape=named_shape)


def var(name: str) -> DimVar:
    """A dimension variable: one size, or unpacked (``*`` / ``**``) several.

    Every use of one name in a check must agree: one positional or named
    size, a tuple of positional sizes (``*var(name)``), or a dict of the
    named axes not otherwise listed (``**var(name)``).

    Args:
      name: The variable's name.

    Returns:
      A :class:`DimVar`.

    Example:
        >>> dict(check_structure(jnp.ones((4, 5, 6)), ArraySpec(shape=(var("n"), *var("rest")))))
        {'n': 4, 'rest': (5, 6)}
    """
    if not isinstance(name, str) or not name:
        raise StructureMismatchError(f"chk.var: a variable name must be a non-empty string, found {name!r}.")
    return DimVar(name)


def vars_for_axes(var_name: str, axis_names: Collection[str] | Mapping[str, Any]) -> dict[str, DimVar]:
    """One variable per axis name, whose sizes the match result collects under ``var_name``.

    Args:
      var_name: The name the sizes are reported under (a dict axis -> size).
      axis_names: The axes (a mapping's keys are used).

    Returns:
      ``{axis: DimVar((var_name, axis))}``, to unpack into a ``named_shape``.

    Example:
        >>> spec = ArraySpec(named_shape={**vars_for_axes("heads", ["h", "kv"]), "f": 2})
        >>> check_structure(pzb.nx.zeros({"h": 3, "kv": 1, "f": 2}), spec)["heads"]
        {'h': 3, 'kv': 1}
    """
    return {axis: DimVar((var_name, axis)) for axis in axis_names}


class MatchResult(Mapping):
    """The sizes bound by a successful check: a read-only mapping from variable name to value.

    A single size is an ``int``, ``*var`` binds a tuple, ``**var`` a dict,
    and the variables of ``vars_for_axes(name, ...)`` are gathered into one
    dict under ``name``.

    Example:
        >>> m = check_structure(jnp.ones((2, 3)), ArraySpec(shape=(var("a"), var("b"))))
        >>> m["a"], len(m), m
        (2, 2, MatchResult({'a': 2, 'b': 3}))
    """

    def __init__(self, bindings: Mapping[VarName, Any]) -> None:
        merged: dict[str, Any] = {}
        for name, value in bindings.items():
            if isinstance(name, tuple):
                group, axis = name
                merged.setdefault(group, {})
                if isinstance(merged[group], dict):
                    merged[group].setdefault(axis, value)
            elif name not in merged:
                merged[name] = value
        self._values = merged
        self._raw = dict(bindings)

    def __getitem__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise KeyError(f"chk: no variable {name!r} was bound; bound: {sorted(self._values)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"MatchResult({self._values!r})"


@dataclasses.dataclass(frozen=True)
class DimensionVariables:
    """The names of the variables a pattern uses, by kind (see :func:`get_dimension_variables`).

    Attributes:
      size_vars: Names bound to one size (``var(name)``, ``vars_for_axes``).
      sequence_vars: Names bound to positional tuples (``*var(name)``).
      mapping_vars: Names bound to dicts of named axes (``**var(name)``).

    Example:
        >>> get_dimension_variables(ArraySpec(shape=(var("n"), *var("b")))).sequence_vars
        ('b',)
    """

    size_vars: tuple[VarName, ...] = ()
    sequence_vars: tuple[str, ...] = ()
    mapping_vars: tuple[str, ...] = ()


def _is_spec(x: Any) -> bool:
    return isinstance(x, (ArraySpec, Wildcard))


class _Matcher:
    """Binds variables in traversal order and remembers where each was bound (for errors)."""

    def __init__(self, known: Mapping[str, Any] | None, prefix: str) -> None:
        self.bindings: dict[VarName, Any] = {}
        self.origin: dict[VarName, str] = {}
        self.prefix = prefix
        for name, value in dict(known or {}).items():
            if isinstance(value, Mapping) and not isinstance(name, tuple):
                for axis, size in value.items():
                    self.bindings[(name, axis)] = size
                    self.origin[(name, axis)] = "known_vars"
            self.bindings[name] = dict(value) if isinstance(value, Mapping) else (
                tuple(value) if isinstance(value, (tuple, list)) else value)
            self.origin[name] = "known_vars"

    def fail(self, message: str, fix: str) -> None:
        raise StructureMismatchError(f"{self.prefix}chk: {message}. Fix: {fix}.")

    def bind(self, name: VarName, value: Any, where: str) -> None:
        if name in self.bindings:
            if self.bindings[name] != value:
                shown = repr(name) if isinstance(name, str) else f"{name[0]}[{name[1]!r}]"
                self.fail(
                    f"{where} is {value!r}, but variable {shown} was bound to {self.bindings[name]!r} at "
                    f"{self.origin[name]}",
                    "make the two agree, or use different variable names if they may differ")
            return
        self.bindings[name] = value
        self.origin[name] = where

    def dim(self, expected: Dim, found: int, where: str) -> bool:
        """Matches one dimension; False for a literal mismatch (the caller reports the whole shape)."""
        if isinstance(expected, DimVar):
            self.bind(expected.name, found, where)
            return True
        if isinstance(expected, KnownDim):
            if expected.size != found:
                return False
            self.bind(expected.name, found, where)
            return True
        return int(expected) == found

    def positional(self, pattern: tuple[Dim, ...], found: tuple[int, ...], path: str, named: Any) -> None:
        expanded: list[Any] = []
        for dim in pattern:  # a bound *var is just its sizes
            if isinstance(dim, MultiDimVar) and dim.name in self.bindings:
                expanded.extend(("bound", dim, i) for i in range(len(self.bindings[dim.name])))
            else:
                expanded.append(dim)
        multis = [i for i, d in enumerate(expanded) if isinstance(d, MultiDimVar)]
        shape_text = f"the value at {path} has positional shape {found}, expected {_show(pattern)} (named shape {named})"
        fix = "pass a value of that shape, or loosen the pattern (a chk.var for a size, *chk.var(name) for any number of axes)"
        if len(multis) > 1:
            self.fail(f"{shape_text}: two unbound *chk.var in one shape is ambiguous",
                      "bind one of them earlier in the pattern or through known_vars")
        fixed = len(expanded) - len(multis)
        if (multis and len(found) < fixed) or (not multis and len(found) != fixed):
            self.fail(shape_text, fix)
        if multis:
            i = multis[0]
            n = len(found) - fixed
            expanded = expanded[:i] + [("multi", expanded[i], n)] + [None] * (n - 1) + expanded[i + 1:]
            if n == 0:  # the *var binds () and takes no axis; keep positions aligned
                self.bind(expanded[i][1].name, (), f"{path} (no positional axes at {i})")
                del expanded[i]
        for axis, (dim, size) in enumerate(zip(expanded, found)):
            if dim is None:
                continue
            if isinstance(dim, tuple) and dim[0] == "multi":  # an unbound *var: binds its run of axes
                n = dim[2]
                self.bind(dim[1].name, tuple(found[axis:axis + n]), f"{path} positional axes {axis}..{axis + n - 1}")
                continue
            if isinstance(dim, tuple):  # an axis of an already-bound *var
                _, multi, j = dim
                if self.bindings[multi.name][j] != size:
                    self.fail(
                        f"{path} positional axis {axis} is {size}, but *{multi.name!r} was bound to "
                        f"{self.bindings[multi.name]!r} at {self.origin[multi.name]}",
                        "make the two agree, or use different variable names if they may differ")
                continue
            if not self.dim(dim, size, f"{path} positional axis {axis}"):
                self.fail(shape_text, fix)

    def named(self, pattern: Mapping[Any, Any], found: Mapping[str, int], path: str) -> None:
        rest = dict(found)
        remainder = None
        for name, dim in pattern.items():
            if isinstance(name, MultiDimVar):
                remainder = name
                continue
            if name not in rest:
                self.fail(f"the value at {path} has no named axis {name!r} (named shape {dict(found)})",
                          "name the axis (pzb.nx.wrap(x, ...) / .tag(...)), or rename it with pzb.nn.RenameAxes")
            size = rest.pop(name)
            if not self.dim(dim, size, f"{path} named axis {name!r}"):
                self.fail(f"the value at {path} has named axis {name!r} of size {size}, expected {_show_dim(dim)}",
                          "pass a value of that size, or use a chk.var for the size")
        if remainder is not None:
            self.bind(remainder.name, rest, f"{path} (remaining named axes)")
        elif rest:
            self.fail(f"the value at {path} has unexpected named axes {rest} (expected only {list(pattern)})",
                      "drop or rename them, or add **chk.var('rest') to the pattern's named_shape")

    def leaf(self, value: Any, pattern: Any, keypath: tuple) -> None:
        path = format_path(keypath)
        if isinstance(pattern, Wildcard):
            return
        if not isinstance(pattern, ArraySpec):
            if not tree_equal(value, pattern):
                self.fail(f"the value at {path} is {value!r:.80}, expected exactly {pattern!r:.80}",
                          "pass that value, or put a chk.ArraySpec / chk.ANY in the pattern there")
            return
        if isinstance(value, NamedArrayBase):
            positional, named = tuple(value.positional_shape), dict(value.named_shape)
        elif hasattr(value, "shape") and hasattr(value, "dtype"):
            positional, named = tuple(value.shape), {}
        else:
            self.fail(f"the value at {path} is {type(value).__name__} {value!r:.60}, expected an array matching "
                      f"{pattern!r:.120}", "pass an array (or named array) there")
        if not _dtype_matches(value.dtype, pattern.dtype):
            self.fail(f"the value at {path} has dtype {np.dtype(value.dtype).name}, expected {_show_dtype(pattern.dtype)}",
                      "cast it with .astype(...), or widen the pattern's dtype (e.g. np.floating)")
        self.positional(pattern.shape, positional, path, named)
        self.named(pattern.named_shape, named, path)


def _dtype_matches(found: Any, expected: Any) -> bool:
    if expected is np.generic:
        return True
    if _is_abstract_dtype(expected):
        return bool(jax.numpy.issubdtype(found, expected))
    return np.dtype(found) == expected


def _show_dtype(dtype: Any) -> str:
    return f"a sub-dtype of {dtype.__name__}" if _is_abstract_dtype(dtype) else np.dtype(dtype).name


def _show_dim(dim: Any) -> str:
    if isinstance(dim, DimVar):
        return f"var({dim.name!r})"
    if isinstance(dim, MultiDimVar):
        return f"*var({dim.name!r})"
    if isinstance(dim, KnownDim):
        return str(dim.size)
    return str(dim)


def _show(shape: tuple[Dim, ...]) -> str:
    if all(isinstance(d, (int, np.integer)) for d in shape):
        return str(tuple(int(d) for d in shape))
    return "(" + ", ".join(_show_dim(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def check_structure(
    value: Any, pattern: Any, known_vars: Mapping[str, Any] | None = None, error_prefix: str = ""
) -> MatchResult:
    """Checks that ``value`` matches ``pattern`` and returns the bound variables.

    ``pattern`` is a pytree with the structure of ``value`` in which
    :class:`ArraySpec` nodes stand for arrays and :data:`ANY` for any subtree;
    other leaves must equal the value's. Variables are bound in traversal
    order; each later use must agree.

    Args:
      value: A pytree of arrays / named arrays.
      pattern: The expected structure.
      known_vars: Earlier bindings (e.g. a previous :class:`MatchResult`)
        the value must agree with.
      error_prefix: Prepended to error messages (e.g. the model path).

    Returns:
      The :class:`MatchResult` of every variable (including ``known_vars``).

    Raises:
      StructureMismatchError: On a tree structure, dtype, shape or variable
        mismatch; the message names the path, the dimension, and where the
        disagreeing variable was bound.

    Example:
        >>> x, y = jnp.ones((2, 3)), jnp.ones((3, 2))
        >>> check_structure((x, y), (ArraySpec(shape=(var("a"), var("b"))), ArraySpec(shape=(var("a"), var("b")))))
        Traceback (most recent call last):
        ...
        pzbridge.core.errors.StructureMismatchError: chk: [1] positional axis 0 is 3, but variable 'a' was bound to 2 at [0] positional axis 0. Fix: make the two agree, or use different variable names if they may differ.
    """
    matcher = _Matcher(known_vars, error_prefix)
    pattern_leaves, treedef = jax.tree_util.tree_flatten_with_path(pattern, is_leaf=_is_spec)
    try:
        value_leaves = treedef.flatten_up_to(value)
    except (ValueError, TypeError) as exc:
        value_struct = jax.tree_util.tree_structure(value, is_leaf=lambda x: isinstance(x, NamedArrayBase))
        raise StructureMismatchError(
            f"{error_prefix}chk: the value's tree structure {value_struct} does not match the pattern's "
            f"{treedef} ({exc}). Fix: pass a value with the pattern's structure, or put chk.ANY where "
            "any subtree is allowed."
        ) from None
    for (keypath, leaf_pattern), leaf_value in zip(pattern_leaves, value_leaves):
        matcher.leaf(leaf_value, leaf_pattern, keypath)
    return MatchResult(matcher.bindings)


def as_array_structure(tree: Any) -> Any:
    """Replaces every array and named array in ``tree`` by its :class:`ArraySpec`.

    Example:
        >>> as_array_structure({"x": pzb.nx.zeros({"f": 2})})
        {'x': ArraySpec(shape=(), dtype=dtype('float32'), named_shape={'f': 2})}
    """

    def spec(leaf: Any) -> Any:
        if isinstance(leaf, NamedArrayBase):
            return ArraySpec(shape=tuple(leaf.positional_shape), dtype=leaf.dtype, named_shape=dict(leaf.named_shape))
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            return ArraySpec(shape=tuple(leaf.shape), dtype=leaf.dtype)
        return leaf

    return jax.tree_util.tree_map(spec, tree, is_leaf=lambda x: isinstance(x, NamedArrayBase))


def _specs(structure: Any) -> list[ArraySpec]:
    leaves = jax.tree_util.tree_leaves(structure, is_leaf=_is_spec)
    return [leaf for leaf in leaves if isinstance(leaf, ArraySpec)]


def get_dimension_variables(structure: Any) -> DimensionVariables:
    """The variables a pattern uses, by kind, in order of first use.

    Example:
        >>> get_dimension_variables(ArraySpec(named_shape={"f": var("f"), **var("rest")}))
        DimensionVariables(size_vars=('f',), sequence_vars=(), mapping_vars=('rest',))
    """
    sizes: dict[Any, None] = {}
    sequences: dict[str, None] = {}
    mappings: dict[str, None] = {}
    for spec in _specs(structure):
        for dim in (*spec.shape, *spec.named_shape.values()):
            if isinstance(dim, (DimVar, KnownDim)):
                sizes[dim.name] = None
            elif isinstance(dim, MultiDimVar):
                sequences[dim.name] = None
        for key in spec.named_shape:
            if isinstance(key, MultiDimVar):
                mappings[key.name] = None
    return DimensionVariables(tuple(sizes), tuple(sequences), tuple(mappings))


def full_substitute_dimension_variables(structure: Any, match: Mapping[str, Any]) -> Any:
    """Replaces every variable in ``structure`` by its value in ``match`` (sizes become :class:`KnownDim`).

    Raises:
      StructureMismatchError: If a variable has no value in ``match``.

    Example:
        >>> m = check_structure(jnp.ones((2, 3)), ArraySpec(shape=(var("n"), *var("b"))))
        >>> full_substitute_dimension_variables(ArraySpec(shape=(*var("b"), var("n"))), m).shape
        (3, KnownDim(name='n', size=2))
    """
    flat = _Matcher(match, "").bindings

    def value_of(name: VarName) -> Any:
        if name not in flat:
            raise StructureMismatchError(
                f"chk: variable {name!r} has no value in the match (known: {sorted(map(str, flat))}). "
                "Fix: check a value that binds it first, or pass it in the mapping."
            )
        return flat[name]

    def substitute(spec: Any) -> Any:
        if not isinstance(spec, ArraySpec):
            return spec
        shape: list[Any] = []
        for dim in spec.shape:
            if isinstance(dim, DimVar):
                shape.append(KnownDim(dim.name, value_of(dim.name)))
            elif isinstance(dim, MultiDimVar):
                shape.extend(value_of(dim.name))
            else:
                shape.append(dim)
        named: dict[Any, Any] = {}
        for key, dim in spec.named_shape.items():
            if isinstance(key, MultiDimVar):
                named.update(value_of(key.name))
            else:
                named[key] = KnownDim(dim.name, value_of(dim.name)) if isinstance(dim, DimVar) else dim
        return ArraySpec(shape=tuple(shape), dtype=spec.dtype, named_shape=named)

    return jax.tree_util.tree_map(substitute, structure, is_leaf=_is_spec)


__all__ = [
    "ANY",
    "ArraySpec",
    "DimVar",
    "DimensionVariables",
    "KnownDim",
    "MatchResult",
    "MultiDimVar",
    "RemainingAxisPlaceholder",
    "StructureMismatchError",
    "Wildcard",
    "as_array_structure",
    "check_structure",
    "full_substitute_dimension_variables",
    "get_dimension_variables",
    "var",
    "vars_for_axes",
]
