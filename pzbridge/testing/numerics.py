"""Numerical comparison of two computations: bitwise when they are the same program, else within ulps.

XLA's CPU kernels may round differently on different processor families when
the sequence of operations differs (vectorised reductions, fused multiply-add,
a different association of a sum), so two *different* programs that agree
bitwise on one machine can differ in the last bit on another. Only two
evaluations of the *same* primitives in the same order are bitwise equal on
every machine. The helpers here make that distinction testable:

* :func:`jaxpr_difference` / :func:`same_computation` compare the jaxprs of
  two callables for given arguments, as dataflow graphs of primitives
  (machine-independent: tracing does not depend on the processor), and
  :func:`exact_computation` tells whether a program rounds at all (gathers,
  slices, max pools do not); :func:`assert_same_computation` and
  :func:`assert_bitwise_reproducible` (the same program, or two that both
  round nowhere) assert them;
* :func:`assert_outputs_match` asserts bitwise equality of two output pytrees
  when told the computations are the same, and equality within a few ulps of
  the output's scale otherwise (:func:`ulps_difference` measures it);
* :func:`assert_same_outputs` does both: it traces, runs and compares two
  callables.

Example:
    >>> from pzbridge.testing.numerics import assert_same_outputs, same_computation
    >>> x = jnp.linspace(-1.0, 1.0, 5)
    >>> same_computation(lambda a: jnp.tanh(a) * 2.0, lambda b: jnp.tanh(b) * 2.0, x)
    True
    >>> same_computation(lambda a: a * 2.0, lambda a: a + a, x)
    False
    >>> assert_same_outputs(lambda a: jnp.tanh(a) * 2.0, lambda b: jnp.tanh(b) * 2.0, x, bitwise=True)
    >>> assert_same_outputs(lambda a: (a + 1.0) * 3.0, lambda a: a * 3.0 + 3.0, x)  # different: within 4 ulps
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np

__all__ = [
    "assert_bitwise_reproducible",
    "assert_outputs_match",
    "assert_same_computation",
    "assert_same_outputs",
    "exact_computation",
    "jaxpr_difference",
    "same_computation",
    "ulps_difference",
]

# Equation parameters that cannot change what a forward evaluation computes: debug names, and the
# differentiation rules of custom_jvp / custom_vjp calls (their forward computation is `call_jaxpr`).
# `computation` is the Python reducer of a generic `reduce`, described by its `jaxpr` parameter.
_IGNORED_PARAMS = frozenset({
    "name", "jvp_jaxpr_fun", "jvp_jaxpr_thunk", "fwd_jaxpr_thunk", "bwd", "out_trees", "computation",
})
# Parameters implied by the result type, which is compared: dot_general lowers to an XLA dot with the
# equation's result dtype whether `preferred_element_type` names it or is None.
_IMPLIED_PARAMS: dict[str, frozenset[str]] = {"dot_general": frozenset({"preferred_element_type"})}
# Call primitives that are no boundary at all: evaluated equation by equation eagerly and inlined when lowered.
# ``jax.checkpoint`` (remat2) is, until it is differentiated (then XLA gets optimization barriers).
_TRANSPARENT = {"remat2": lambda params: not params.get("differentiated", False) and not getattr(
    params.get("jaxpr"), "constvars", True)}


# ----------------------------------------------------------------------------------------------------
# Canonical jaxprs: value numbering.
#
# Every value a program computes gets a number from a table shared by the programs being compared: equal
# numbers for equal primitives with equal parameters applied to equal-numbered operands. Two programs are the
# same when their outputs get the same numbers: the same dataflow graph of primitives, whatever the order in
# which independent equations are listed and however the variables are named.


@dataclasses.dataclass(frozen=True)
class _Identity:
    """Compares a parameter object (a host callback, ...) by identity: never equal to a lookalike."""

    obj: Any = dataclasses.field(compare=False, hash=False)
    ident: int = 0


@dataclasses.dataclass(frozen=True)
class _Signature:
    """A program up to naming and ordering: its input types and the numbers of its outputs."""

    inputs: tuple[Hashable, ...]
    outputs: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class _Node:
    """One live equation of a top-level program (for messages)."""

    number: int
    eqn: Any
    key: tuple[Any, ...]
    outputs: tuple[int, ...]


class _Numbering:
    def __init__(self) -> None:
        self._ids: dict[Hashable, int] = {}

    def __call__(self, key: Hashable) -> int:
        return self._ids.setdefault(key, len(self._ids))


def _aval_key(aval: Any) -> Hashable:
    shape = getattr(aval, "shape", None)
    dtype = getattr(aval, "dtype", None)
    if shape is None or dtype is None:
        return ("aval", str(aval))
    return ("aval", tuple(shape), str(dtype), bool(getattr(aval, "weak_type", False)))


def _value_key(value: Any) -> Hashable:
    """Dtype, shape and a digest of the exact bytes of a constant (PRNG keys by their key data)."""
    dtype = getattr(value, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return ("key", str(dtype), _value_key(jax.random.key_data(value)))
    array = np.asarray(value)
    digest = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
    return ("value", str(array.dtype), array.shape, digest)


def _param_key(value: Any, numbering: _Numbering) -> Hashable:
    if isinstance(value, (jex.Jaxpr, jex.ClosedJaxpr)):
        return _number(value, numbering)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_param_key(v, numbering) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((str(k), _param_key(v, numbering)) for k, v in value.items())))
    if isinstance(value, (np.ndarray, jax.Array)):
        return _value_key(value)
    if callable(value) and not isinstance(value, type):
        return _Identity(value, id(value))
    try:
        hash(value)
    except TypeError:
        return ("repr", type(value).__qualname__, repr(value))
    return value


def _number(jaxpr: jex.Jaxpr | jex.ClosedJaxpr, numbering: _Numbering, nodes: list[_Node] | None = None,
            bindings: Sequence[int] | None = None) -> _Signature:
    """Numbers the values of ``jaxpr``; collects its live equations into ``nodes`` if given.

    ``bindings``: the numbers of the inputs, when ``jaxpr`` is inlined into a caller.
    """
    consts: Sequence[Any] = ()
    if isinstance(jaxpr, jex.ClosedJaxpr):
        jaxpr, consts = jaxpr.jaxpr, jaxpr.consts
    ids: dict[Any, int] = {}
    for var, value in zip(jaxpr.constvars, consts):
        ids[var] = numbering(("const", _value_key(value)))
    open_constvars = jaxpr.constvars[len(consts):]  # an open jaxpr's constvars are inputs too
    inputs = tuple(_aval_key(v.aval) for v in jaxpr.invars) + tuple(("constvar", _aval_key(v.aval))
                                                                   for v in open_constvars)
    for i, var in enumerate([*jaxpr.invars, *open_constvars]):
        ids[var] = numbering(("in", i, inputs[i])) if bindings is None else bindings[i]

    def ref(atom: Any) -> int:
        if isinstance(atom, jex.Literal):
            value = atom.val
            if isinstance(value, (bool, int, float, complex)):
                value = np.asarray(value, dtype=atom.aval.dtype)
            return numbering(("literal", _aval_key(atom.aval), _value_key(value)))
        return ids[atom]

    all_nodes = []
    for number, eqn in enumerate(jaxpr.eqns):
        transparent = _TRANSPARENT.get(eqn.primitive.name)
        if transparent is not None and transparent(eqn.params):
            inner = _number(eqn.params["jaxpr"], numbering, None, [ref(v) for v in eqn.invars])
            for var, out in zip(eqn.outvars, inner.outputs):
                ids[var] = out
            all_nodes.append(_Node(number, eqn, ("inlined", inner), inner.outputs))
            continue
        implied = _IMPLIED_PARAMS.get(eqn.primitive.name, frozenset())
        params = tuple(sorted((k, _param_key(v, numbering)) for k, v in eqn.params.items()
                              if k not in _IGNORED_PARAMS and k not in implied))
        key = (eqn.primitive.name, params, tuple(ref(v) for v in eqn.invars))
        base = numbering(key)
        outputs = tuple(numbering(("out", base, j, _aval_key(v.aval))) for j, v in enumerate(eqn.outvars))
        for var, out in zip(eqn.outvars, outputs):
            ids[var] = out
        all_nodes.append(_Node(number, eqn, key, outputs))
    if nodes is not None:
        live = {v for v in jaxpr.outvars if not isinstance(v, jex.Literal)}
        kept = []
        for node in reversed(all_nodes):
            if any(v in live for v in node.eqn.outvars):
                kept.append(node)
                live.update(v for v in node.eqn.invars if not isinstance(v, jex.Literal))
        nodes.extend(reversed(kept))
    return _Signature(inputs, tuple(ref(v) for v in jaxpr.outvars))


def _eqn_text(eqn: Any) -> str:
    text = " ".join(str(eqn).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _subjaxpr_params(eqn: Any) -> dict[str, Any]:
    return {k: v for k, v in eqn.params.items() if isinstance(v, (jex.Jaxpr, jex.ClosedJaxpr))}


def _difference(a: jex.Jaxpr | jex.ClosedJaxpr, b: jex.Jaxpr | jex.ClosedJaxpr, numbering: _Numbering,
                where: str = "") -> str | None:
    """None if the programs are the same, else a description of the first (in ``a``'s order) difference."""
    nodes_a: list[_Node] = []
    nodes_b: list[_Node] = []
    sig_a, sig_b = _number(a, numbering, nodes_a), _number(b, numbering, nodes_b)
    if sig_a == sig_b:
        return None
    if sig_a.inputs != sig_b.inputs:
        return f"{where}input types differ: {sig_a.inputs} vs {sig_b.inputs}"
    computed_a = {o for n in nodes_a for o in n.outputs}
    computed_b = {o for n in nodes_b for o in n.outputs}
    x = next((n for n in nodes_a if not set(n.outputs) <= computed_b), None)
    y = next((n for n in nodes_b if not set(n.outputs) <= computed_a), None)
    if x is None or y is None:
        extra, label = (x, "first") if y is None else (y, "second")
        if extra is not None:
            return f"{where}equation {extra.number} of the {label} has no counterpart: {_eqn_text(extra.eqn)}"
        return f"{where}the outputs are different values (or in a different order)"
    at = f"{where}equation {x.number}" + (f" (of the second: {y.number})" if y.number != x.number else "")
    texts = f"\n  first:  {_eqn_text(x.eqn)}\n  second: {_eqn_text(y.eqn)}"
    if len(x.key) != 3 or len(y.key) != 3:  # an inlined call on one side
        return f"{at}: {x.eqn.primitive.name} vs {y.eqn.primitive.name}{texts}"
    (prim_x, params_x, in_x), (prim_y, params_y, in_y) = x.key, y.key
    if prim_x != prim_y:
        return f"{at}: {prim_x} vs {prim_y}{texts}"
    px, py = dict(params_x), dict(params_y)
    for key in sorted(set(px) | set(py)):
        if px.get(key) == py.get(key):
            continue
        sub_x, sub_y = _subjaxpr_params(x.eqn).get(key), _subjaxpr_params(y.eqn).get(key)
        if sub_x is not None and sub_y is not None:
            return _difference(sub_x, sub_y, numbering, f"{at} ({prim_x} {key}): ")
        return f"{at} ({prim_x}): parameter {key!r} differs{texts}"
    what = "operands or constants" if in_x != in_y else "result types"
    return f"{at} ({prim_x}): {what} differ{texts}"


def _make_jaxpr(f: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> jex.ClosedJaxpr:
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    is_array = [isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves]

    def flat(*arrays: Any) -> Any:
        it = iter(arrays)
        call_args, call_kwargs = jax.tree_util.tree_unflatten(
            treedef, [next(it) if a else leaf for leaf, a in zip(leaves, is_array)])
        return f(*call_args, **call_kwargs)

    return jax.make_jaxpr(flat)(*[leaf for leaf, a in zip(leaves, is_array) if a])


# Primitives whose float results are exact (no rounding): data movement, selection, comparisons, max / min, sign
# manipulation, rounding to integral values. Call-like primitives are exact when their sub-jaxprs are.
_EXACT_PRIMITIVES = frozenset({
    "reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims", "slice", "dynamic_slice",
    "dynamic_update_slice", "gather", "concatenate", "pad", "rev", "select_n", "iota", "copy", "copy_p",
    "device_put", "split", "sort", "reduce_max", "reduce_min", "reduce_and", "reduce_or", "reduce_xor", "argmax",
    "argmin", "reduce_window_max", "reduce_window_min", "cummax", "cummin", "max", "min", "neg", "abs", "sign",
    "copysign", "clamp", "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not", "xor", "floor", "ceil", "round",
    "is_finite", "real", "imag", "conj", "complex", "bitcast_convert_type", "optimization_barrier", "stop_gradient",
    "jit", "pjit", "closed_call", "core_call", "remat", "checkpoint", "custom_jvp_call", "custom_vjp_call", "cond",
    "while", "scan", "random_bits", "random_wrap", "random_unwrap", "random_seed", "random_fold_in",
    "random_split", "threefry2x32",
})


def _is_floating(dtype: Any) -> bool:
    return dtype is not None and not jax.dtypes.issubdtype(dtype, jax.dtypes.extended) and bool(
        jnp.issubdtype(dtype, jnp.inexact))


def _exact_conversion(source: Any, target: Any) -> bool:
    """Whether every value of ``source`` converts to ``target`` without rounding (and without overflow)."""
    if source is None or target is None or jax.dtypes.issubdtype(source, jax.dtypes.extended):
        return False
    source, target = np.dtype(source), np.dtype(target)
    if source == target or source == np.bool_:
        return True
    if not _is_floating(target):
        return not _is_floating(source) and bool(np.can_cast(source, target, "safe"))
    mantissa = jnp.finfo(target).nmant + 1
    if _is_floating(source):
        s, t = jnp.finfo(source), jnp.finfo(target)
        return bool(s.nmant <= t.nmant and s.maxexp <= t.maxexp and s.minexp >= t.minexp)
    return source.itemsize * 8 - (source.kind == "i") <= mantissa


def _eqn_is_exact(eqn: Any) -> bool:
    name = eqn.primitive.name
    in_dtypes = [getattr(v.aval, "dtype", None) for v in eqn.invars]
    out_dtypes = [getattr(v.aval, "dtype", None) for v in eqn.outvars]
    if name == "convert_element_type":
        return _exact_conversion(in_dtypes[0], eqn.params.get("new_dtype"))
    if name not in _EXACT_PRIMITIVES and any(_is_floating(d) for d in in_dtypes + out_dtypes):
        return False  # float arithmetic; integer / bool arithmetic and float comparisons do not round
    return all(_all_exact(sub) for sub in _subjaxprs(eqn.params.values()))


def _subjaxprs(values: Any) -> list[Any]:
    found = []
    for value in values:
        if isinstance(value, (jex.Jaxpr, jex.ClosedJaxpr)):
            found.append(value)
        elif isinstance(value, (tuple, list)):
            found.extend(_subjaxprs(value))
    return found


def _all_exact(jaxpr: jex.Jaxpr | jex.ClosedJaxpr) -> bool:
    if isinstance(jaxpr, jex.ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    return all(_eqn_is_exact(eqn) for eqn in jaxpr.eqns)


def exact_computation(f: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
    """Whether the program ``f(*args, **kwargs)`` runs rounds nowhere, so its result is exact on any machine.

    True when every equation (recursively) moves, selects, compares or
    orders values (reshapes, gathers, slices, pads, ``max`` / ``min``,
    ``select_n``, ``abs``, ``floor``, ...), works on integers or bools only
    (PRNG bits), or converts to a dtype holding every source value. Two such
    programs computing the same function give equal values (``0.0`` and
    ``-0.0`` aside) even when they are different programs. Arguments are
    traced as in :func:`jaxpr_difference`.

    Example:
        >>> x = jnp.arange(6.0).reshape(2, 3)
        >>> exact_computation(lambda a: jnp.max(a.T[::-1], axis=0), x)
        True
        >>> exact_computation(lambda a: a.sum(axis=0), x)
        False
    """
    return _all_exact(_make_jaxpr(f, args, kwargs))


def jaxpr_difference(f: Callable[..., Any], g: Callable[..., Any], *args: Any, **kwargs: Any) -> str | None:
    """Describes the first difference between the programs ``f(*args, **kwargs)`` and ``g(...)`` run.

    Both callables are traced with :func:`jax.make_jaxpr` on the same arguments
    (array leaves of ``args`` / ``kwargs`` become inputs; other leaves are
    passed through as static values). The two jaxprs are the same program when
    they have the same input types and compute their outputs by the same
    dataflow graph: every output value is the same primitive, with the same
    parameters (recursing into sub-jaxprs: ``jit``, ``scan``, ``cond``
    branches, ``custom_jvp`` bodies, ...) and result type, applied to the
    same operand values, in the same operand order. That is what fixes the
    rounding of every intermediate value: independent equations may be
    listed in another order, variables may be named differently, and
    equations whose results are unused are ignored. Literals and closed-over
    constants (such as model weights) are compared by dtype, shape and exact
    value, wherever they come from (a literal and an equal array constant
    count as different). Also ignored, since they cannot change a forward
    evaluation: debug names (``name=``), the differentiation rules of
    ``custom_jvp`` / ``custom_vjp`` calls, and ``dot_general``'s
    ``preferred_element_type`` (its result dtype, which is compared, is what
    XLA computes in). The comparison is conservative: it may report programs
    that round alike as different (``a + b`` vs ``b + a``), never the reverse.

    Tracing does not depend on the processor, so the answer is the same on
    every machine (of one backend).

    Args:
      f: A callable.
      g: Another callable, taking the same arguments.
      *args: Positional arguments for both.
      **kwargs: Keyword arguments for both.

    Returns:
      ``None`` when the programs are the same, else a readable description
      of the first difference: the first equation (in ``f``'s order) that
      computes a value ``g`` does not, next to ``g``'s first such equation.

    Example:
        >>> x = jnp.ones(3)
        >>> print(jaxpr_difference(lambda a: a * 2.0, lambda a: a * 3.0, x).splitlines()[0])
        equation 0 (mul): operands or constants differ
        >>> print(jaxpr_difference(lambda a: jnp.sin(a) * 2.0, lambda a: jnp.cos(a) * 2.0, x).splitlines()[0])
        equation 0: sin vs cos
        >>> jaxpr_difference(jnp.sin, lambda a: jnp.sin(a), x) is None
        True
        >>> def f(a):
        ...     s, c = jnp.sin(a), jnp.cos(a)
        ...     return s * c
        >>> def g(a):
        ...     c, s = jnp.cos(a), jnp.sin(a)  # the same graph, listed in another order
        ...     return s * c
        >>> jaxpr_difference(f, g, x) is None
        True
    """
    return _difference(_make_jaxpr(f, args, kwargs), _make_jaxpr(g, args, kwargs), _Numbering())


def same_computation(f: Callable[..., Any], g: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
    """Whether ``f`` and ``g`` trace to the same program for these arguments (see :func:`jaxpr_difference`).

    Two evaluations of the same program are bitwise equal on any machine;
    different programs may round differently on different processors.

    Example:
        >>> x = jnp.ones((2, 3))
        >>> same_computation(lambda a: a.sum(axis=1), lambda a: jnp.sum(a, axis=1), x)
        True
        >>> same_computation(lambda a: (a + a) + a, lambda a: a + (a + a), x)
        False
    """
    return jaxpr_difference(f, g, *args, **kwargs) is None


def assert_same_computation(f: Callable[..., Any], g: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Asserts ``f`` and ``g`` trace to the same program (see :func:`jaxpr_difference`).

    Raises:
      AssertionError: Describing the first differing equation.

    Example:
        >>> assert_same_computation(jnp.tanh, lambda a: jnp.tanh(a), jnp.ones(2))
    """
    difference = jaxpr_difference(f, g, *args, **kwargs)
    if difference is not None:
        raise AssertionError(f"the two computations trace to different jaxprs: {difference}")


def _bitwise_obstacle(f: Callable[..., Any], g: Callable[..., Any], args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> str | None:
    """None: the same program; "": different programs that both round nowhere; else the first difference."""
    a, b = _make_jaxpr(f, args, kwargs), _make_jaxpr(g, args, kwargs)
    difference = _difference(a, b, _Numbering())
    if difference is not None and _all_exact(a) and _all_exact(b):
        return ""
    return difference


def assert_bitwise_reproducible(f: Callable[..., Any], g: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Asserts that ``f`` and ``g``, computing the same function, give equal outputs on every machine.

    That holds when they trace to the same program (see
    :func:`jaxpr_difference`; then the outputs are bitwise equal), or when
    both programs round nowhere (see :func:`exact_computation`; then the
    values are equal). Check it before asserting bitwise equality of the
    outputs of two different implementations: other programs may round
    differently on other processors even where they agree on this one.

    Raises:
      AssertionError: Describing the first differing equation.

    Example:
        >>> x = jnp.arange(6.0)
        >>> assert_bitwise_reproducible(jnp.tanh, lambda a: jnp.tanh(a), x)  # the same program
        >>> assert_bitwise_reproducible(lambda a: a[::-1].max(), jnp.max, x)  # different, exact programs
        >>> assert_bitwise_reproducible(jnp.sum, lambda a: a[::-1].sum(), x)
        Traceback (most recent call last):
        ...
        AssertionError: the two computations trace to different jaxprs that round: equation 0: reduce_sum vs rev
        ...
    """
    difference = _bitwise_obstacle(f, g, args, kwargs)
    if difference:
        raise AssertionError(f"the two computations trace to different jaxprs that round: {difference}")


# ----------------------------------------------------------------------------------------------------
# Output comparison.


def _as_numpy(leaf: Any) -> np.ndarray:
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    return np.asarray(leaf)


def _is_float(array: np.ndarray) -> bool:
    return bool(jnp.issubdtype(array.dtype, jnp.inexact))


def _eps(dtype: np.dtype) -> float:
    return float(jnp.finfo(dtype).eps)  # of the real component type, for complex dtypes


def _scale(expected: np.ndarray) -> float:
    """The power of two whose ulp is the unit: that of the largest finite magnitude, at least 1."""
    magnitude = np.abs(expected).astype(np.float64)
    finite = magnitude[np.isfinite(magnitude)]
    largest = max(1.0, float(finite.max())) if finite.size else 1.0
    return float(2.0 ** (np.frexp(largest)[1] - 1))


def ulps_difference(actual: Any, expected: Any) -> float:
    """The largest difference of two float arrays, in ulps of the expected array's scale.

    The unit is one ulp of the largest finite magnitude of ``expected``, or of
    ``1.0`` when that is smaller: ``eps(dtype) * 2**floor(log2(max(1,
    max|expected|)))``. NaNs and infinities must coincide, else the result is
    ``inf``.

    Example:
        >>> a = np.array([1.0, 0.5], np.float32)
        >>> ulps_difference(a, np.nextafter(a, np.float32(2)))  # 1 ulp of 1.0 at 1.0, half of one at 0.5
        1.0
        >>> ulps_difference(jnp.array([10.0]), jnp.array([10.0 + 2**-18]))  # float32: ulp(10.0) = 2**-20
        4.0
    """
    a, e = _as_numpy(actual), _as_numpy(expected)
    if a.shape != e.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {e.shape}")
    return _ulps(a, e)[0]


def _ulps(a: np.ndarray, e: np.ndarray) -> tuple[float, tuple[int, ...] | None, float]:
    """(max difference in ulps of scale, index of it, unit) for two same-shape float arrays."""
    unit = _eps(e.dtype) * _scale(e)
    if not a.size:
        return 0.0, None, unit
    a64, e64 = a.astype(np.complex128 if np.iscomplexobj(a) else np.float64), e.astype(
        np.complex128 if np.iscomplexobj(e) else np.float64)
    special = ~np.isfinite(a64) | ~np.isfinite(e64)
    same_special = (np.isnan(a64) & np.isnan(e64)) | (a64 == e64)
    finite_diff = np.abs(np.where(special, 0, a64) - np.where(special, 0, e64))
    diff = np.where(special, np.where(same_special, 0.0, np.inf), finite_diff)
    index = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape))
    return float(diff[index]) / unit, index, unit


def _fmt(value: Any) -> str:
    value = np.asarray(value).item()
    return f"{value:.12g}" if isinstance(value, float) else repr(value)


def _bits_differ(a: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Elementwise: whether two same-dtype float arrays differ in any bit."""
    if np.iscomplexobj(a):
        return _bits_differ(a.real, e.real) | _bits_differ(a.imag, e.imag)
    unsigned = np.dtype(f"u{a.dtype.itemsize}")
    return np.ascontiguousarray(a).view(unsigned) != np.ascontiguousarray(e).view(unsigned)


def assert_outputs_match(actual: Any, expected: Any, *, same_computation: bool, ulps: float = 4) -> None:
    """Asserts two output pytrees are bitwise equal, or (different computations) within ``ulps``.

    Tree structures, shapes and dtypes must always match, and integer, bool
    and PRNG-key leaves must be equal. Float leaves:

    * ``same_computation=True``: every bit is equal (``-0.0`` differs from
      ``0.0``; NaNs must have the same payload). Only right when both sides
      evaluated the same primitives in the same order (check it with
      :func:`same_computation`); then it holds on every machine.
    * ``same_computation=False``: ``|actual - expected| <= ulps * eps(dtype) *
      scale`` elementwise, where ``scale`` is the power of two
      ``2**floor(log2(max(1, max|expected|)))`` over the finite entries of
      that leaf, so that the unit is one ulp of its largest entry. Rounding
      differences of a reordered computation are a few rounding steps of its
      largest intermediate values; the largest output magnitude stands for
      those, and outputs of magnitude below one (normalised activations,
      probabilities) are held to an absolute ``ulps * eps``. NaNs and
      infinities must be at the same places.

    Args:
      actual: The output pytree under test.
      expected: The reference output pytree.
      same_computation: Whether both were computed by the same program.
      ulps: The tolerance, in units of ``eps(dtype) * scale``, when they were not.

    Raises:
      AssertionError: Naming the leaf, the largest difference, in absolute
        terms and in ulps, and where it is.

    Example:
        >>> x = jnp.array([1.0, -2.0, 0.25])
        >>> assert_outputs_match({"y": x}, {"y": x}, same_computation=True)
        >>> assert_outputs_match(x * (1 + 2**-21), x, same_computation=False)  # 4 ulps of 2.0 at -2.0
        >>> assert_outputs_match({"y": x + 0.001}, {"y": x}, same_computation=False)
        Traceback (most recent call last):
        ...
        AssertionError: outputs differ at leaf output['y'] (float32[3]) index (0,): actual 1.00100004673 vs expected 1: max abs difference 0.001 = 4194.5 ulps of 2 (ulp 2.4e-07), allowed 4 ulps
    """
    got, got_def = jax.tree_util.tree_flatten_with_path(actual)
    want, want_def = jax.tree_util.tree_flatten_with_path(expected)
    if got_def != want_def:
        raise AssertionError(f"output tree structures differ:\n  actual:   {got_def}\n  expected: {want_def}")
    for (path, a), (_, e) in zip(got, want):
        where = "output" + jax.tree_util.keystr(path)
        a, e = _as_numpy(a), _as_numpy(e)
        if a.shape != e.shape or a.dtype != e.dtype:
            raise AssertionError(f"leaf {where}: actual {a.dtype}{list(a.shape)} vs expected {e.dtype}{list(e.shape)}")
        kind = f"{e.dtype}{list(e.shape)}".replace(" ", "")
        if not _is_float(e):
            if not np.array_equal(a, e):
                index = tuple(int(i) for i in np.argwhere(a != e)[0])
                raise AssertionError(f"outputs differ at leaf {where} ({kind}) index {index}: "
                                     f"actual {a[index]!r} vs expected {e[index]!r} (not a float: must be equal)")
            continue
        if same_computation:
            unequal = _bits_differ(a, e)
            if unequal.any():
                count = int(unequal.sum())
                n_ulps, index, unit = _ulps(a, e)
                first = tuple(int(i) for i in np.argwhere(unequal)[0])
                raise AssertionError(
                    f"outputs of the same computation are not bitwise equal at leaf {where} ({kind}): "
                    f"{count} of {e.size} elements differ, first at index {first} "
                    f"(actual {a[first]!r} vs expected {e[first]!r}); "
                    f"max abs difference {n_ulps * unit:.2g} = {n_ulps:.3g} ulps at index {index}")
            continue
        n_ulps, index, unit = _ulps(a, e)
        if n_ulps > ulps:
            raise AssertionError(
                f"outputs differ at leaf {where} ({kind}) index {index}: actual {_fmt(a[index])} vs "
                f"expected {_fmt(e[index])}: max abs difference {n_ulps * unit:.2g} = {n_ulps:.5g} ulps "
                f"of {_scale(e):g} (ulp {unit:.2g}), allowed {ulps:g} ulps")


def assert_same_outputs(f: Callable[..., Any], g: Callable[..., Any], *args: Any, bitwise: bool | None = None,
                        ulps: float = 4, **kwargs: Any) -> None:
    """Runs ``f`` and ``g`` on the same arguments and compares their outputs as their programs allow.

    ``f(*args, **kwargs)`` is the output under test, ``g(*args, **kwargs)``
    the reference; both run eagerly as given (wrap them in ``jax.jit`` to
    compare compiled programs). Their programs are compared with
    :func:`jaxpr_difference` and :func:`exact_computation`, and the outputs
    with :func:`assert_outputs_match`:

    * the same program: the outputs must be bitwise equal;
    * different programs that both round nowhere: the outputs must be equal
      (0 ulps: ``0.0 == -0.0``, NaNs at the same places);
    * otherwise: the outputs must agree within ``ulps``.

    Args:
      f: The callable under test.
      g: The reference callable.
      *args: Positional arguments for both.
      bitwise: ``True``: also assert that the outputs are equal on every
        machine, i.e. that the programs are the same or both round nowhere.
        ``False``: the programs are known to differ: compare within ``ulps``
        (without tracing). ``None``: decide from the programs.
      ulps: The tolerance for different programs (see :func:`assert_outputs_match`).
      **kwargs: Keyword arguments for both.

    Raises:
      AssertionError: If ``bitwise=True`` and the programs differ and round
        (naming the first differing equation), or if the outputs differ more
        than allowed.

    Example:
        >>> x = jnp.arange(4.0)
        >>> assert_same_outputs(jax.nn.relu, lambda a: jax.nn.relu(a), x, bitwise=True)
        >>> assert_same_outputs(lambda a: a / 3.0, lambda a: a * (1 / 3.0), x, bitwise=True)
        Traceback (most recent call last):
        ...
        AssertionError: the two computations trace to different jaxprs that round: equation 0: div vs mul
        ...
        >>> assert_same_outputs(lambda a: a[::-1].max(), jnp.max, x, bitwise=True)  # different, exact programs
        >>> assert_same_outputs(lambda a: a / 3.0, lambda a: a * (1 / 3.0), x)  # within 4 ulps
    """
    same = False
    if bitwise is not False:
        difference = _bitwise_obstacle(f, g, args, kwargs)
        same = difference is None
        if difference == "":
            ulps = 0
        elif bitwise and not same:
            raise AssertionError(f"the two computations trace to different jaxprs that round: {difference}")
    assert_outputs_match(f(*args, **kwargs), g(*args, **kwargs), same_computation=same, ulps=ulps)
