"""Operators, reductions and indexing of named arrays, against numpy references."""

import operator

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pzbridge.core.errors import NamedAxisError
from pzbridge.core.named_axes import NamedArrayBase, where, wrap
from pzbridge.testing.named_arrays import broadcastable_named_array_cases, named_array_cases


def _aligned(case, union, rank):
    """numpy: reference laid out (union names..., size-1 padding..., positional...)."""
    p = case.reference.ndim - len(case.names)
    data = np.transpose(case.reference, [p + case.names.index(n) for n in union if n in case.names] + list(range(p)))
    shape = [union[n] if n in case.names else 1 for n in union] + [1] * (rank - p) + list(case.reference.shape[:p])
    return data.reshape(shape)


def _result_names_last(result, union):
    return np.asarray(result.unwrap(*union))


def _names_last(array, k):
    return np.moveaxis(array, list(range(k)), list(range(-k, 0))) if k else array


BINARY = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "truediv": operator.truediv,
    "lt": operator.lt, "ge": operator.ge, "eq": operator.eq, "ne": operator.ne, "max": np.maximum,
}


@given(broadcastable_named_array_cases(count=2), st.sampled_from(sorted(BINARY)))
def test_binary_operators_broadcast_by_name_like_numpy_reference(drawn, op_name):
    union, _, (a, b) = drawn
    rank = max(a.reference.ndim - len(a.names), b.reference.ndim - len(b.names))
    op = BINARY[op_name]
    if op_name == "max":
        from pzbridge.core.named_axes import elementwise

        got = elementwise(jnp.maximum, a.array, b.array)
    else:
        got = op(a.array, b.array)
    want = op(_aligned(a, union, rank), _aligned(b, union, rank))
    assert dict(got.named_shape) == dict(union)
    np.testing.assert_allclose(_result_names_last(got, union), _names_last(want, len(union)), rtol=1e-6)


@given(named_array_cases(dtype="float32"), st.floats(-3, 3, width=32))
def test_scalars_and_plain_arrays_act_positionally_on_both_sides(case, scalar):
    names = case.names
    np.testing.assert_allclose(np.asarray((scalar - case.array).unwrap(*names)), scalar - case.reference, rtol=1e-6)
    positional = case.array.positional_shape
    plain = np.arange(int(np.prod(positional)), dtype=np.float32).reshape(positional)
    want = case.reference * plain.reshape(positional + (1,) * len(names))
    np.testing.assert_allclose(np.asarray((plain * case.array).unwrap(*names)), want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray((case.array * jnp.asarray(plain)).unwrap(*names)), want, rtol=1e-6)


@given(named_array_cases(dtype="float32"))
def test_unary_operators_and_astype_keep_axes(case):
    np.testing.assert_allclose(np.asarray((-case.array).unwrap(*case.names)), -case.reference)
    np.testing.assert_allclose(np.asarray(abs(case.array).unwrap(*case.names)), np.abs(case.reference))
    as_int = case.array.astype(jnp.int32)
    assert as_int.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(as_int.unwrap(*case.names)), case.reference.astype(np.int32))


def test_positional_shapes_that_do_not_broadcast_raise_with_shapes():
    with pytest.raises(NamedAxisError, match=r"positional shapes \[\(2,\), \(3,\)\] do not broadcast"):
        wrap(jnp.zeros(2)) + wrap(jnp.zeros(3))


def test_named_size_mismatch_in_arithmetic_names_axis_and_sizes():
    with pytest.raises(NamedAxisError, match=r"axis 'seq' has size 3 in operand 0 and 4 in operand 1"):
        wrap(jnp.zeros(3), "seq") * wrap(jnp.zeros(4), "seq")


REDUCTIONS = {"sum": np.sum, "mean": np.mean, "max": np.max, "min": np.min, "prod": np.prod, "std": np.std,
              "var": np.var, "any": np.any, "all": np.all}


@given(named_array_cases(dtype="float32", min_named_axes=1), st.sampled_from(sorted(REDUCTIONS)), st.data())
def test_reductions_over_names_match_numpy(case, name, data):
    reduced = data.draw(st.lists(st.sampled_from(case.names), min_size=1, unique=True))
    p = case.reference.ndim - len(case.names)
    got = getattr(case.array, name)(*reduced)
    kept = [n for n in case.names if n not in reduced]
    axes = tuple(p + case.names.index(n) for n in reduced)
    want = REDUCTIONS[name](case.reference, axis=axes)
    assert set(got.named_shape) == set(kept)
    np.testing.assert_allclose(np.asarray(got.unwrap(*kept)), want, rtol=1e-4, atol=1e-5)


@given(named_array_cases(dtype="float32", min_positional_axes=1), st.sampled_from(sorted(REDUCTIONS)), st.data())
def test_reductions_over_positional_axes_are_vectorised_over_names(case, name, data):
    p = case.reference.ndim - len(case.names)
    axis = data.draw(st.sampled_from([None] + list(range(-p, p))))
    got = getattr(case.array, name)(axis=axis)
    want = REDUCTIONS[name](case.reference, axis=tuple(range(p)) if axis is None else axis % p)
    assert dict(got.named_shape) == dict(case.array.named_shape)
    np.testing.assert_allclose(np.asarray(got.unwrap(*case.names)), want, rtol=1e-4, atol=1e-5)


@given(named_array_cases(dtype="float32", min_named_axes=1), st.data())
def test_argmax_and_argmin_over_one_name_match_numpy(case, data):
    name = data.draw(st.sampled_from(case.names))
    p = case.reference.ndim - len(case.names)
    kept = [n for n in case.names if n != name]
    for method, reference in (("argmax", np.argmax), ("argmin", np.argmin)):
        got = getattr(case.array, method)(name)
        want = reference(case.reference, axis=p + case.names.index(name))
        np.testing.assert_array_equal(np.asarray(got.unwrap(*kept)), want)


def test_reduction_errors_name_the_problem():
    x = wrap(jnp.zeros((2, 3)), "a", "b")
    with pytest.raises(NamedAxisError, match=r"unknown axis names \['z'\]"):
        x.sum("z")
    with pytest.raises(NamedAxisError, match="out of range"):
        x.sum(axis=0)
    with pytest.raises(NamedAxisError, match="exactly one axis"):
        x.argmax("a", "b")


@given(broadcastable_named_array_cases(count=3, dtype="float32"))
def test_where_broadcasts_condition_by_name(drawn):
    union, _, (c, a, b) = drawn
    rank = max(case.reference.ndim - len(case.names) for case in (c, a, b))
    got = where(c.array > 0, a.array, b.array)
    want = np.where(_aligned(c, union, rank) > 0, _aligned(a, union, rank), _aligned(b, union, rank))
    np.testing.assert_allclose(_result_names_last(got, union), _names_last(want, len(union)))


def test_matmul_contracts_positional_axes_per_name():
    x = wrap(jnp.arange(12.0).reshape(2, 2, 3)).tag_prefix("b")
    w = jnp.arange(12.0).reshape(3, 4)
    got = (x @ w).unwrap("b")
    np.testing.assert_allclose(np.asarray(got), np.moveaxis(np.arange(12.0).reshape(2, 2, 3) @ np.asarray(w), 0, -1))


def test_broadcast_to_adds_names_and_positional_axes():
    x = wrap(jnp.arange(3.0), "s")
    y = x.broadcast_to((2,), {"b": 4})
    assert y.positional_shape == (2,) and dict(y.named_shape) == {"s": 3, "b": 4}
    np.testing.assert_allclose(np.asarray(y.unwrap("s", "b")), np.broadcast_to(np.arange(3.0)[:, None], (2, 3, 4)))


def test_reshape_acts_on_positional_axes_only():
    x = wrap(jnp.arange(12.0).reshape(2, 6)).tag_prefix("b")
    y = x.reshape(2, 3)
    assert isinstance(y, NamedArrayBase) and y.positional_shape == (2, 3)
    np.testing.assert_allclose(np.asarray(y.unwrap("b")), np.moveaxis(np.arange(12.0).reshape(2, 2, 3), 0, -1))


def test_grad_flows_through_operators_and_indexing():
    def loss(w):
        x = wrap(w, "a", "b")
        return ((x[{"a": 0}] * x.sum("a")) ** 2).sum("b").unwrap()

    w = jnp.arange(6.0).reshape(2, 3) / 6.0
    plain = lambda w: jnp.sum((w[0] * w.sum(0)) ** 2)  # noqa: E731
    np.testing.assert_allclose(np.asarray(jax.grad(loss)(w)), np.asarray(jax.grad(plain)(w)), rtol=1e-6)
