"""``variable_jit``: ``jax.jit`` for functions whose arguments hold variables.

A model with mutable variables cannot go through ``jax.jit`` as it is: the
variables are opaque leaves. ``variable_jit`` passes each distinct variable's
*value* into the compiled function, binds a temporary variable with the
traced value in its place (one per original object, so sharing is kept),
and after the call writes the values the function assigned back to the
original objects. Variables in the return value are mapped back to the
originals too.

Why not ``unbind_variables`` + ``bind_variables`` on every call (what
penzai does): that costs several tree traversals and label lookups per call,
milliseconds for a real model. Here the per-call work is one
``tree_flatten`` of the arguments, one pass over the leaves to split arrays /
variables / static leaves, and one dictionary lookup keyed by the tree
structure, the sharing pattern and the static leaves. The function is traced
once per key (``jax.jit`` handles shapes and dtypes underneath); the tracing
step rebuilds the arguments from the key, so a hit never rebuilds anything.

Non-array leaves (ints, strings, callables, ...) are static: a new value
means a new trace, as with ``static_argnums``. Variables must be passed as
arguments, not closed over (a closed-over variable would be read as a
constant, and assigning it a traced value would leak the tracer).

Example:
    >>> import jax.numpy as jnp
    >>> from pzbridge.core.variables_kinds import StateVariable
    >>> count = StateVariable(jnp.int32(0), label="count")
    >>> @variable_jit
    ... def step(counter, x):
    ...     counter.value = counter.value + 1
    ...     return x * 2
    >>> step(count, jnp.float32(1.5)), count.value
    (Array(3., dtype=float32), Array(1, dtype=int32))
"""

from __future__ import annotations

import functools
from itertools import compress, repeat
from operator import attrgetter, is_
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from pzbridge.core.errors import VariableError, format_path
from pzbridge.core.struct import Struct, pytree_dataclass, static_field
from pzbridge.core.variable_base import AbstractVariable
from pzbridge.core.variables_kinds import LabeledVariable, current_trace

_FORBIDDEN_JIT_KWARGS = ("static_argnums", "static_argnames", "donate_argnums", "donate_argnames", "in_shardings")


class _Kind:
    """Sentinels classifying argument leaves (hash by identity: cheap)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_ARRAY, _VARIABLE, _STATIC = _Kind("ARRAY"), _Kind("VARIABLE"), _Kind("STATIC")
_KIND_BY_TYPE: dict[type, _Kind] = {}


def _classify(leaf_type: type) -> _Kind:
    if issubclass(leaf_type, LabeledVariable):
        kind = _VARIABLE
    elif issubclass(leaf_type, AbstractVariable):
        raise VariableError(
            f"variable_jit supports Parameter and StateVariable leaves, found {leaf_type.__name__}. "
            "Fix: subclass pzbridge's Parameter or StateVariable."
        )
    elif issubclass(leaf_type, (jax.Array, np.ndarray, np.generic, jax.core.Tracer)):
        kind = _ARRAY
    else:
        kind = _STATIC
    _KIND_BY_TYPE[leaf_type] = kind
    return kind


@pytree_dataclass
class _ReturnedVariable(Struct):
    """Stands in the compiled output for an argument variable that is returned."""

    index: int = static_field()


def _meta_key(metadata: Mapping[Any, Any]) -> tuple:
    return tuple(metadata.items()) if metadata else ()


_get_kind_and_label = attrgetter("_kind_and_label")
_get_value = attrgetter("_value")
_get_metadata = attrgetter("metadata")


class VariableJitFunction:
    """The callable that :func:`variable_jit` returns (see there).

    Attributes:
      fn: The wrapped Python function.

    Example:
        >>> f = variable_jit(lambda x: x + 1)
        >>> isinstance(f, VariableJitFunction), int(f(np.int32(1)))
        (True, 2)
    """

    def __init__(
        self, fn: Callable[..., Any], donate_variables: bool, cache_size: int, jit_kwargs: dict[str, Any]
    ) -> None:
        self.fn = fn
        self._donate = donate_variables
        self._cache_size = cache_size
        self._jit_kwargs = jit_kwargs
        self._cache: dict[tuple, Callable[..., Any]] = {}
        functools.update_wrapper(self, fn)

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        # Decorating a method: bind the instance as the first argument.
        return self if instance is None else functools.partial(self, instance)

    def clear_cache(self) -> None:
        """Forgets every compiled specialisation (the next call traces again).

        Example:
            >>> f = variable_jit(lambda x: x)
            >>> f.clear_cache()
        """
        self._cache.clear()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        # Hot path: C-level map/compress instead of a Python loop per leaf.
        kinds = list(map(_KIND_BY_TYPE.get, map(type, leaves)))
        if None in kinds:
            kinds = [kind or _classify(type(leaf)) for kind, leaf in zip(kinds, leaves)]
        variable_leaves = list(compress(leaves, map(is_, kinds, repeat(_VARIABLE))))
        variables = list(dict.fromkeys(variable_leaves))  # Distinct, first-occurrence order.
        if len(variables) == len(variable_leaves):
            sharing = None  # Common case: nothing shared, no index map to build.
        else:
            index_of = {v: i for i, v in enumerate(variables)}
            sharing = tuple(map(index_of.__getitem__, variable_leaves))
        dynamic = list(compress(leaves, map(is_, kinds, repeat(_ARRAY))))
        statics = (
            tuple((type(leaf), leaf) for leaf in compress(leaves, map(is_, kinds, repeat(_STATIC))))
            if _STATIC in kinds
            else ()
        )
        signature = (
            tuple(map(_get_kind_and_label, variables)),
            tuple(map(_meta_key, map(_get_metadata, variables)))
            if any(map(_get_metadata, variables))
            else None,
        )
        key = (treedef, tuple(kinds), sharing, statics, signature)
        try:
            compiled = self._cache.get(key)
        except TypeError:
            raise self._unhashable_error(args, kwargs, variables) from None
        if compiled is None:
            compiled = self._compile(key)
        output, new_values, returns_variables = compiled(dynamic, list(map(_get_value, variables)))
        for index, value in new_values.items():
            variables[index]._value = value
        if returns_variables is not None:
            output = jax.tree_util.tree_map(
                lambda node: variables[node.index] if isinstance(node, _ReturnedVariable) else node,
                output,
                is_leaf=lambda node: isinstance(node, _ReturnedVariable),
            )
        return output

    def _compile(self, key: tuple) -> Callable[..., Any]:
        treedef, kinds, sharing, statics, (kinds_and_labels, metadata) = key
        fn, donate = self.fn, self._donate
        metadata = metadata or ((),) * len(kinds_and_labels)
        if sharing is None:
            sharing = range(len(kinds_and_labels))

        def traced(dynamic: list[Any], values: list[Any]) -> tuple[Any, dict[int, Any], tuple | None]:
            temporaries = []
            trace = current_trace()
            for kind_and_label, meta, value in zip(kinds_and_labels, metadata, values):
                cls, label = kind_and_label
                temporary = cls.__new__(cls)
                temporary._label, temporary._kind_and_label = label, kind_and_label
                temporary.metadata, temporary._value = dict(meta), value
                temporary._trace = trace  # Made in this trace: assigning it traced values is fine.
                temporaries.append(temporary)
            sources = {
                _ARRAY: iter(dynamic),
                _VARIABLE: (temporaries[i] for i in sharing),
                _STATIC: (leaf for _, leaf in statics),
            }
            leaves = [next(sources[kind]) for kind in kinds]
            args, kwargs = jax.tree_util.tree_unflatten(treedef, leaves)
            output = fn(*args, **kwargs)
            # Only values the function assigned travel back (fewer outputs);
            # donated inputs are gone, so then every value must come back.
            new_values = {
                i: t._value for i, (t, old) in enumerate(zip(temporaries, values)) if donate or t._value is not old
            }
            output, returned = _mark_returned_variables(output, temporaries)
            return output, new_values, (() if returned else None)

        jit_kwargs = dict(self._jit_kwargs)
        if donate:
            jit_kwargs["donate_argnums"] = (1,)
        compiled = jax.jit(traced, **jit_kwargs)
        if len(self._cache) >= self._cache_size:
            self._cache.pop(next(iter(self._cache)))  # Evict the oldest entry.
        self._cache[key] = compiled
        return compiled

    def _unhashable_error(self, args: tuple, kwargs: dict, variables: list[LabeledVariable]) -> VariableError:
        for v in variables:
            try:
                hash(_meta_key(v.metadata))
            except TypeError:
                return VariableError(
                    f"variable_jit: {type(v).__name__} '{v.label}' has unhashable metadata "
                    f"{v.metadata!r}, but metadata is part of the compilation key. "
                    "Fix: use hashable metadata values (tuples instead of lists)."
                )
        for path, leaf in jax.tree_util.tree_flatten_with_path((args, kwargs))[0]:
            if _KIND_BY_TYPE[type(leaf)] is not _STATIC:
                continue
            try:
                hash(leaf)
            except TypeError:
                return VariableError(
                    f"variable_jit: argument leaf at {format_path(path)} of type {type(leaf).__name__} "
                    "is neither an array nor a variable, so it is treated as static, but it is not "
                    "hashable. Fix: convert it to an array or a hashable value, or register its type "
                    "as a pytree."
                )
        return VariableError("variable_jit: an argument leaf is unhashable and cannot be static.")


def _mark_returned_variables(output: Any, temporaries: list[LabeledVariable]) -> tuple[Any, bool]:
    """Replaces temporaries in ``output`` by markers; new variables are an error."""
    leaves, treedef = jax.tree_util.tree_flatten(output)
    if not any(isinstance(leaf, AbstractVariable) for leaf in leaves):
        return output, False
    index_of = {id(t): i for i, t in enumerate(temporaries)}
    paths = None
    for n, leaf in enumerate(leaves):
        if isinstance(leaf, AbstractVariable):
            index = index_of.get(id(leaf))
            if index is None:
                paths = paths or [p for p, _ in jax.tree_util.tree_flatten_with_path(output)[0]]
                raise VariableError(
                    f"variable_jit: the output at {format_path(paths[n])} is {type(leaf).__name__} "
                    f"'{leaf.label}', created inside the jitted function; its traced value cannot "
                    "leave the trace. Fix: return `unbind_variables(x, freeze=True)` and rebuild "
                    "outside with `bind_variables(..., unfreeze_as_copy=True)`."
                )
            leaves[n] = _ReturnedVariable(index)
    return jax.tree_util.tree_unflatten(treedef, leaves), True


def variable_jit(
    fn: Callable[..., Any] | None = None,
    *,
    donate_variables: bool = False,
    cache_size: int = 64,
    **jit_kwargs: Any,
) -> Any:
    """Like ``jax.jit``, for functions whose arguments contain variables.

    Every variable reachable from the arguments enters the compiled function
    as a value; inside, a temporary variable holding the traced value takes
    the place of each original object (shared objects stay shared). After
    the call, the values the function assigned (state updates, or parameters
    it set) are written back to the original variables, and variables in the
    return value are the original objects. Array leaves are traced; every
    other leaf is static (part of the compilation key).

    Args:
      fn: The function to compile (``variable_jit`` also works as
        ``@variable_jit(donate_variables=True)``).
      donate_variables: Donate the variables' buffers to the computation (the
        new values replace them; old references become invalid).
      cache_size: Number of (tree structure, sharing, static leaves)
        specialisations kept.
      **jit_kwargs: Forwarded to ``jax.jit`` (e.g. ``out_shardings``,
        ``compiler_options``); argument-position options are not supported
        because static leaves are found automatically.

    Returns:
      A :class:`VariableJitFunction`.

    Raises:
      VariableError: On a position-based ``jax.jit`` option, an unhashable
        static leaf or metadata, or a returned variable created inside.

    Example:
        >>> import jax.numpy as jnp
        >>> from pzbridge.core.variables_kinds import Parameter
        >>> w = Parameter(jnp.ones(2), label="w")
        >>> @variable_jit
        ... def sgd(params, lr):
        ...     params["w"].value = params["w"].value - lr * 2 * params["w"].value
        >>> sgd({"w": w}, jnp.float32(0.25)); w.value
        Array([0.5, 0.5], dtype=float32)
    """
    bad = [name for name in _FORBIDDEN_JIT_KWARGS if name in jit_kwargs]
    if bad:
        raise VariableError(
            f"variable_jit does not accept {bad}: non-array leaves are already static and variables "
            "are passed by value. Fix: drop these options (use donate_variables=True to donate the "
            "variables' buffers)."
        )
    if fn is None:
        return functools.partial(variable_jit, donate_variables=donate_variables, cache_size=cache_size, **jit_kwargs)
    return VariableJitFunction(fn, donate_variables, cache_size, jit_kwargs)
