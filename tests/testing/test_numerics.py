"""pzbridge.testing.numerics: the jaxpr comparison and the bitwise / ulps output assertions can fail.

Laws: a program is the same computation as itself (and as another trace of the same code), the relation
is symmetric; a tolerance of ``ulps`` accepts a perturbation of exactly ``k`` ulps for ``k <= ulps`` and
rejects it beyond, for every float dtype and scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pzbridge.testing as pzt
from pzbridge.testing.numerics import (
    assert_bitwise_reproducible,
    assert_outputs_match,
    assert_same_computation,
    assert_same_outputs,
    exact_computation,
    jaxpr_difference,
    same_computation,
    ulps_difference,
)

X = jnp.linspace(-1.5, 2.0, 12, dtype=jnp.float32).reshape(3, 4)
W = jnp.cos(jnp.arange(20.0, dtype=jnp.float32)).reshape(4, 5)

# A small vocabulary of array -> array steps (shape (3, 4) in and out), to build random programs from.
STEPS = {
    "sin": jnp.sin,
    "exp": lambda a: jnp.exp(a * 0.1),
    "add_const": lambda a: a + 0.5,
    "mul_const": lambda a: a * 3.0,
    "square": lambda a: a * a,
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "row_sum": lambda a: a + a.sum(axis=1, keepdims=True),
    "matmul": lambda a: (a @ W) @ W.T,
    "softmax": lambda a: jax.nn.softmax(a, axis=-1),
    "flip": lambda a: a[::-1],
    "jit_sin": jax.jit(jnp.sin),
    "checkpoint": jax.checkpoint(lambda a: a * 2.0 + 1.0),
}

programs = st.lists(st.sampled_from(sorted(STEPS)), min_size=1, max_size=6)


def build(names):
    def run(a):
        for name in names:
            a = STEPS[name](a)
        return a

    return run


# ----------------------------------------------------------------------------------------------------
# Comparing programs.


@given(programs)
def test_same_computation_is_reflexive_across_separately_built_closures(names):
    f, g = build(names), build(list(names))
    assert same_computation(f, f, X)
    assert jaxpr_difference(f, g, X) is None
    assert_same_computation(f, g, X)
    assert_same_outputs(f, g, X, bitwise=True)


@given(programs, programs)
def test_same_computation_is_symmetric_and_detects_a_different_step_sequence(a, b):
    f, g = build(a), build(b)
    assert same_computation(f, g, X) == same_computation(g, f, X)
    if a == b:
        assert same_computation(f, g, X)
    # Appending a rounding step to one side always makes a different program.
    assert not same_computation(build([*a, "sin"]), f, X)


@pytest.mark.parametrize(("f", "g"), [
    (lambda a: (a + 1.0) + a, lambda a: a + (1.0 + a)),  # association
    (lambda a: a * 2.0, lambda a: a + a),  # another primitive, same value
    (lambda a: a - 1.0, lambda a: -(1.0 - a)),
    (lambda a: a * 2.0, lambda a: a * 3.0),  # literal constants
    (lambda a: a * W[0, 0], lambda a: a * W[0, 1]),  # closed-over constants, by value
    (lambda a: a / 3.0, lambda a: a * (1.0 / 3.0)),
    (lambda a: a.sum(), lambda a: a.sum(axis=0).sum()),  # reduction order
    (lambda a: a.sum(), lambda a: a.T.sum()),
    (lambda a: a @ W, lambda a: jnp.einsum("ij,jk->ik", a, W, precision="highest")),  # parameters
    (lambda a: jnp.sin(a), lambda a: jnp.sin(a.astype(jnp.bfloat16)).astype(jnp.float32)),  # dtypes
    (jax.jit(jnp.sin), jnp.sin),  # a jit boundary is a different XLA program
    (jax.jit(lambda a: jnp.sin(a) * 2.0), jax.jit(lambda a: jnp.sin(a) * 3.0)),  # inside a sub-jaxpr
    (lambda a: jax.lax.cond(True, jnp.sin, jnp.cos, a), lambda a: jax.lax.cond(True, jnp.sin, jnp.tanh, a)),
    (lambda a: jax.lax.scan(lambda c, r: (c + r, c * r), a[0], a)[0],
     lambda a: jax.lax.scan(lambda c, r: (c * r, c + r), a[0], a)[0]),
    (lambda a: a - a.T.T * 0.5, lambda a: a.T.T * 0.5 - a),  # operand order
], ids=lambda f: "")
def test_different_programs_are_detected_with_a_description(f, g):
    difference = jaxpr_difference(f, g, X)
    assert difference is not None and "equation" in difference
    assert difference == jaxpr_difference(f, g, X)  # deterministic
    assert not same_computation(f, g, X) and not same_computation(g, f, X)
    with pytest.raises(AssertionError, match="different jaxprs"):
        assert_same_computation(f, g, X)


def test_names_order_of_independent_equations_and_dead_code_do_not_matter():
    def f(a):
        s, c = jnp.sin(a), jnp.cos(a)
        return s * c

    def g(b):
        c = jnp.cos(b)
        unused = jnp.exp(b)  # noqa: F841 - dead: cannot change the output
        s = jnp.sin(b)
        return s * c

    assert same_computation(f, g, X)
    assert not same_computation(f, lambda a: jnp.cos(a) * jnp.sin(a), X)  # operands swapped: another program


def test_equal_constants_are_compared_by_value_and_literals_are_not_constants():
    copy = jnp.array(np.asarray(W))
    assert copy is not W
    assert same_computation(lambda a: a @ W, lambda a: a @ copy, X)
    assert not same_computation(lambda a: a @ W, lambda a: a @ (W + 0.0 * W + 1e-7), X)
    assert not same_computation(lambda a: a * 2.0, lambda a: a * jnp.float32(2.0) * jnp.ones((), jnp.float32), X)


def test_static_and_keyword_arguments_are_passed_through():
    f = lambda a, n, *, scale: a * scale + n  # noqa: E731
    assert same_computation(f, lambda a, n, *, scale: a * scale + n, X, 2, scale=X)
    assert not same_computation(f, lambda a, n, *, scale: a * scale - n, X, 2, scale=X)


def test_forward_irrelevant_parameters_are_ignored():
    # dot_general's preferred_element_type names the result dtype, which is compared anyway.
    assert same_computation(lambda a: jax.lax.dot(a, W), lambda a: jax.lax.dot(a, W, preferred_element_type=jnp.float32),
                            X)
    # custom_jvp rules are traced afresh (new objects) each time; only the forward body counts.
    assert same_computation(jax.nn.relu, jax.nn.relu, X) and same_computation(jax.nn.gelu, lambda a: jax.nn.gelu(a), X)
    # An undifferentiated jax.checkpoint is no program boundary (evaluated op by op, inlined when lowered).
    assert same_computation(jax.checkpoint(jnp.sin), jnp.sin, X)
    assert not same_computation(jax.grad(lambda a: jax.checkpoint(jnp.sin)(a).sum()),
                                jax.grad(lambda a: jnp.sin(a).sum()), X)


# ----------------------------------------------------------------------------------------------------
# Exact programs.


@pytest.mark.parametrize(("f", "exact"), [
    (lambda a: a.T[::-1, 1:], True),
    (lambda a: jnp.max(a, axis=0), True),
    (lambda a: jnp.where(a > 0, a, -a), True),
    (lambda a: jnp.take(a, jnp.array([2, 0]), axis=0), True),
    (lambda a: jnp.pad(a, 1, mode="reflect"), True),
    (lambda a: jnp.floor(a).astype(jnp.float64 if jax.config.jax_enable_x64 else jnp.float32), True),
    (lambda a: jnp.argsort(a, axis=-1), True),
    (lambda a: (jnp.arange(12).reshape(3, 4) * 7 + 1) // 3, True),  # integer arithmetic
    (lambda a: a.astype(jnp.int8).astype(jnp.float32), False),  # float -> int may overflow
    (lambda a: jnp.arange(12, dtype=jnp.int8).reshape(3, 4).astype(jnp.float32) + 0 * a, False),  # float mul, add
    (lambda a: jnp.arange(12, dtype=jnp.int8).reshape(3, 4).astype(jnp.float32), True),
    (lambda a: jnp.arange(12, dtype=jnp.int32).reshape(3, 4).astype(jnp.float32), False),  # int32 -> f32 rounds
    (lambda a: a.astype(jnp.float16), False),
    (lambda a: a.sum(axis=0), False),
    (lambda a: a * 2.0, False),
    (jax.jit(lambda a: jnp.maximum(a, 0.0)), True),
    (jax.jit(lambda a: jnp.exp(a)), False),
    (lambda a: jax.random.bits(jax.random.key(0), (3,)), True),
], ids=lambda f: "")
def test_exact_computation_accepts_only_programs_that_round_nowhere(f, exact):
    assert exact_computation(f, X) is exact


def test_different_exact_programs_are_equal_on_any_machine_and_rounding_ones_are_not():
    assert_bitwise_reproducible(lambda a: a[::-1].max(), jnp.max, X)
    assert_same_outputs(lambda a: a[::-1].max(), jnp.max, X, bitwise=True)
    with pytest.raises(AssertionError, match="different jaxprs that round"):
        assert_bitwise_reproducible(lambda a: a[::-1].sum(), jnp.sum, X)
    with pytest.raises(AssertionError, match="different jaxprs that round"):
        assert_same_outputs(lambda a: a[::-1].sum(), jnp.sum, X, bitwise=True)


# ----------------------------------------------------------------------------------------------------
# Output assertions.

FLOAT_DTYPES = [np.float16, jnp.bfloat16, np.float32, np.float64]


@st.composite
def perturbations(draw):
    """(expected, actual, k, ulps): ``actual`` is ``expected`` moved by exactly ``k`` ulps of its scale."""
    dtype = np.dtype(draw(st.sampled_from(FLOAT_DTYPES)))
    e = draw(st.integers(-3, 6))
    ulps = draw(st.integers(1, 8))
    k = draw(st.integers(0, 2 * ulps + 1))
    n = draw(st.integers(2, 6))
    top = 2.0 ** e  # the largest magnitude: an exact power of two
    others = draw(st.lists(st.floats(-top, top, allow_nan=False, width=16), min_size=n - 2, max_size=n - 2))
    expected = np.array([top * draw(st.sampled_from([1.0, -1.0])), 0.0, *others], dtype=dtype)
    unit = float(jnp.finfo(dtype).eps) * max(1.0, top)  # an ulp of max(1, largest magnitude)
    at = draw(st.sampled_from([0, 1]))  # move the largest entry toward zero, or the zero entry either way
    step = -np.sign(expected[0]) * k * unit if at == 0 else draw(st.sampled_from([1.0, -1.0])) * k * unit
    actual = expected.copy()
    actual[at] = dtype.type(float(expected[at]) + step)
    assert float(actual[at]) - float(expected[at]) == step  # the perturbation is exactly representable
    return expected, actual, k, ulps


@given(perturbations())
def test_ulps_tolerance_accepts_k_ulps_exactly_up_to_the_bound(case):
    expected, actual, k, ulps = case
    assert ulps_difference(actual, expected) == k
    if k <= ulps:
        assert_outputs_match(actual, expected, same_computation=False, ulps=ulps)
    else:
        with pytest.raises(AssertionError, match=rf"= {k} ulps .* allowed {ulps} ulps"):
            assert_outputs_match(actual, expected, same_computation=False, ulps=ulps)


@given(perturbations())
def test_bitwise_mode_rejects_any_perturbation(case):
    expected, actual, k, _ = case
    if k == 0:
        assert_outputs_match(actual, expected, same_computation=True)
    else:
        with pytest.raises(AssertionError, match="not bitwise equal"):
            assert_outputs_match(actual, expected, same_computation=True)


def test_bitwise_mode_compares_bits_and_ulps_mode_values():
    zeros = np.zeros(3, np.float32)
    with pytest.raises(AssertionError, match="1 of 3 elements differ"):
        assert_outputs_match(np.array([0.0, -0.0, 0.0], np.float32), zeros, same_computation=True)
    assert_outputs_match(np.array([0.0, -0.0, 0.0], np.float32), zeros, same_computation=False, ulps=0)
    nan = np.array([1.0, np.nan, np.inf], np.float32)
    assert_outputs_match(nan, nan.copy(), same_computation=True)
    assert_outputs_match(nan, nan.copy(), same_computation=False, ulps=0)
    with pytest.raises(AssertionError, match="inf ulps"):
        assert_outputs_match(np.array([1.0, 2.0, np.inf], np.float32), nan, same_computation=False)
    with pytest.raises(AssertionError, match="inf ulps"):
        assert_outputs_match(np.array([1.0, np.nan, -np.inf], np.float32), nan, same_computation=False)


def test_scale_is_one_ulp_of_the_largest_entry_and_at_least_of_one():
    # Largest magnitude 10 -> unit ulp(8) = 2**-20 for float32; small outputs are held to ulp(1) = 2**-23.
    assert ulps_difference(np.float32([10.0, 0.0]), np.float32([10.0, 2.0 ** -18])) == 4.0
    assert ulps_difference(np.float32([0.001, 0.0]), np.float32([0.001, 2.0 ** -22])) == 2.0
    assert ulps_difference(np.float32([]), np.float32([])) == 0.0


def test_structure_shape_dtype_and_integer_leaves_must_match_exactly():
    ok = {"a": jnp.ones(2), "n": jnp.arange(3)}
    assert_outputs_match(ok, {"a": jnp.ones(2), "n": jnp.arange(3)}, same_computation=False)
    with pytest.raises(AssertionError, match="tree structures differ"):
        assert_outputs_match(ok, {"a": jnp.ones(2)}, same_computation=False)
    with pytest.raises(AssertionError, match=r"leaf output\['a'\]: actual float32\[2\] vs expected float32\[3\]"):
        assert_outputs_match(ok, {"a": jnp.ones(3), "n": jnp.arange(3)}, same_computation=False)
    with pytest.raises(AssertionError, match="float16"):
        assert_outputs_match(ok, {"a": jnp.ones(2, jnp.float16), "n": jnp.arange(3)}, same_computation=False)
    with pytest.raises(AssertionError, match=r"leaf output\['n'\] .* index \(1,\).*not a float"):
        assert_outputs_match(ok, {"a": jnp.ones(2), "n": jnp.array([0, 2, 2])}, same_computation=False, ulps=100)
    keys = jax.random.split(jax.random.key(0))
    assert_outputs_match(keys, jax.random.split(jax.random.key(0)), same_computation=True)
    with pytest.raises(AssertionError, match="not a float"):
        assert_outputs_match(keys, jax.random.split(jax.random.key(1)), same_computation=False)


def test_failure_message_names_the_leaf_the_index_and_the_difference_in_ulps():
    expected = {"out": np.zeros((2, 3), np.float32)}
    actual = {"out": expected["out"].copy()}
    actual["out"][1, 2] = 6 * 2.0 ** -23
    with pytest.raises(AssertionError) as info:
        assert_outputs_match(actual, expected, same_computation=False)
    message = str(info.value)
    assert "output['out']" in message and "index (1, 2)" in message and "= 6 ulps" in message
    assert "allowed 4 ulps" in message


def test_assert_same_outputs_picks_the_standard_from_the_programs():
    # The same program: bitwise, so a (simulated) 1-ulp difference between two runs would fail.
    assert_same_outputs(jnp.tanh, lambda a: jnp.tanh(a), X)
    # Different programs: within ulps; bitwise=True then refuses to compare them at all.
    div, mul = (lambda a: a / 3.0), (lambda a: a * (1.0 / 3.0))
    assert_same_outputs(div, mul, X)
    with pytest.raises(AssertionError, match="div vs mul"):
        assert_same_outputs(div, mul, X, bitwise=True)
    with pytest.raises(AssertionError, match="ulps"):
        assert_same_outputs(lambda a: a * 1.001, lambda a: a, X)
    # bitwise=False does not trace: functions that cannot be traced are compared too.
    assert_same_outputs(lambda a: jnp.asarray(np.asarray(a) / 3.0), div, X, bitwise=False)


def test_helpers_are_exported_from_pzbridge_testing():
    for name in ("assert_bitwise_reproducible", "assert_outputs_match", "assert_same_computation",
                 "assert_same_outputs", "exact_computation", "jaxpr_difference", "same_computation",
                 "ulps_difference"):
        assert name in pzt.__all__ and getattr(pzt, name) is globals()[name]
