"""Tests for pzbridge/bridge/tracing/child_calls.py: one primitive per child call, under every transform.

The reference is always the real child function called directly (under the
same transform), never the primitive itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pzbridge.bridge.tracing.child_calls import (
    ChildCall,
    ChildProxy,
    bind_child_call,
    child_call_p,
    is_array_leaf,
)
from pzbridge.core.errors import LiftError

W = jnp.asarray(np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(3, 4))
B = jnp.asarray(np.array([0.1, -0.2, 0.3, 0.0], dtype=np.float32))


def real(w, b, x, scale=1.0):
    """The child's computation: ``tanh(x @ w + b) * scale``."""
    return jnp.tanh(x @ w + b) * scale


def run(leaves, args, kwargs):
    w, b = leaves
    return real(w, b, *args, **kwargs)


def proxy(w, b, calls=None, key="mlp", module=None):
    return ChildProxy(key, module, [w, b], run, [] if calls is None else calls)


def _x(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def _child_eqns(jaxpr):
    return [e for e in jaxpr.jaxpr.eqns if e.primitive is child_call_p]


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


# The jaxpr ---------------------------------------------------------------------------------

def test_each_call_is_one_equation_and_the_glue_stays_ordinary():
    calls = []

    def parent(w, b, x):
        child = proxy(w, b, calls)
        return child(child(x[:, :3], scale=2.0)[:, :3]) + 1.0

    jaxpr = jax.make_jaxpr(parent)(W, B, _x(2, 3))
    eqns = _child_eqns(jaxpr)
    assert len(eqns) == 2 and len(calls) == 2
    assert [e.params["call"] for e in eqns] == calls
    assert all(e.params["vmaps"] == () for e in eqns)
    # The child's own ops (dot_general, tanh) do not appear in the parent's jaxpr.
    names = {e.primitive.name for e in jaxpr.jaxpr.eqns}
    assert "tanh" not in names and "dot_general" not in names
    # Operands: the child's arrays, then the call's array arguments; static keywords stay in the call.
    assert len(eqns[0].invars) == 3
    assert calls[0].static_leaves == ((1, 2.0),) and calls[1].static_leaves == ()
    assert calls[0].key == "mlp" and calls[0].module_leaf_count == 2


def test_vmap_over_a_child_stays_one_equation_with_the_mapped_axes_recorded():
    jaxpr = jax.make_jaxpr(lambda w, b, xs: jax.vmap(proxy(w, b))(xs))(W, B, _x(5, 3))
    (eqn,) = _child_eqns(jaxpr)
    assert len(jaxpr.jaxpr.eqns) == 1
    assert eqn.params["vmaps"] == ((None, None, 0),)  # weights unmapped, input mapped on axis 0
    assert eqn.outvars[0].aval.shape == (5, 4)


def test_nested_vmap_records_outer_then_inner_axes():
    def parent(w, b, xs):
        return jax.vmap(jax.vmap(proxy(w, b)), in_axes=1)(xs)

    xs = _x(2, 5, 3)
    jaxpr = jax.make_jaxpr(parent)(W, B, xs)
    (eqn,) = _child_eqns(jaxpr)
    assert eqn.params["vmaps"] == ((None, None, 1), (None, None, 0))
    assert eqn.outvars[0].aval.shape == (5, 2, 4)
    expected = jax.vmap(jax.vmap(lambda x: real(W, B, x)), in_axes=1)(xs)
    _close(parent(W, B, xs), expected)


def test_vmap_over_the_weights_too_is_recorded():
    ws = jnp.stack([W, 2 * W])
    jaxpr = jax.make_jaxpr(lambda ws, b, x: jax.vmap(lambda w: proxy(w, b)(x))(ws))(ws, B, _x(3))
    (eqn,) = _child_eqns(jaxpr)
    assert eqn.params["vmaps"] == ((0, None, None),)


# Evaluation -------------------------------------------------------------------------------

@given(st.integers(1, 4), st.floats(-2, 2, width=32), st.integers(0, 1000))
def test_eval_equals_the_real_call(rows, scale, seed):
    x = _x(rows, 3, seed=seed)
    _close(proxy(W, B)(x, scale=scale), real(W, B, x, scale=scale))


@given(st.integers(1, 4), st.integers(0, 1000))
def test_vmapped_eval_equals_the_vmapped_real_call(batch, seed):
    xs = _x(batch, 2, 3, seed=seed)
    _close(jax.vmap(proxy(W, B))(xs), jax.vmap(lambda x: real(W, B, x))(xs))
    _close(jax.vmap(proxy(W, B), in_axes=1)(xs), jax.vmap(lambda x: real(W, B, x), in_axes=1)(xs))


def test_output_structure_and_keyword_arrays_follow_the_real_call():
    def run_tree(leaves, args, kwargs):
        (w,) = leaves
        x, = args
        return {"out": x @ w + kwargs["bias"], "aux": [kwargs["flag"]]}

    x = _x(2, 3)
    call_log = []

    def parent(w, x, bias):
        out = ChildProxy("tree", None, [w], run_tree, call_log)(x, bias=bias, flag=jnp.int32(3))
        return out["out"], out["aux"][0]

    out, flag = parent(W, x, B)
    _close(out, x @ W + B)
    assert int(flag) == 3
    jaxpr = jax.make_jaxpr(parent)(W, x, B)
    (eqn,) = _child_eqns(jaxpr)
    assert len(eqn.outvars) == 2 and len(eqn.invars) == 4  # w, x, bias, flag


def test_bind_child_call_rebuilds_args_around_static_leaves():
    treedef = jax.tree_util.tree_structure(((0, 0), {"k": 0}))
    seen = []

    def record(leaves, args, kwargs):
        seen.append((args, kwargs))
        return args[0] * kwargs["k"]

    # Flat leaves: args[0] (array), args[1] (static "mode"), kwargs["k"] (array).
    call = ChildCall("c", record, 0, treedef, ((1, "mode"),), (0, 2))
    out = bind_child_call(call, [], [jnp.float32(3.0), jnp.float32(4.0)])
    assert float(out) == 12.0
    args, kwargs = seen[-1]
    assert args[1] == "mode" and float(kwargs["k"]) == 4.0


# Differentiation and compilation ---------------------------------------------------------------

@given(st.integers(1, 3), st.integers(0, 1000))
def test_jvp_equals_the_jvp_of_the_real_function(rows, seed):
    x = _x(rows, 3, seed=seed)
    tangents = (_x(3, 4, seed=seed + 1), _x(4, seed=seed + 2), _x(rows, 3, seed=seed + 3))
    primal, tangent = jax.jvp(lambda w, b, x: proxy(w, b)(x, scale=1.5), (W, B, x), tangents)
    ref_primal, ref_tangent = jax.jvp(lambda w, b, x: real(w, b, x, scale=1.5), (W, B, x), tangents)
    _close(primal, ref_primal)
    _close(tangent, ref_tangent)


def test_jvp_under_vmap_equals_the_reference():
    xs = _x(4, 3)
    dxs = _x(4, 3, seed=1)
    f = lambda xs: jax.vmap(proxy(W, B))(xs)  # noqa: E731
    g = lambda xs: jax.vmap(lambda x: real(W, B, x))(xs)  # noqa: E731
    for got, ref in zip(jax.jvp(f, (xs,), (dxs,)), jax.jvp(g, (xs,), (dxs,))):
        _close(got, ref)


def test_grad_through_a_child_call_equals_the_reference():
    x = _x(2, 3)
    got = jax.grad(lambda w, b: proxy(w, b)(x).sum(), argnums=(0, 1))(W, B)
    ref = jax.grad(lambda w, b: real(w, b, x).sum(), argnums=(0, 1))(W, B)
    for a, r in zip(got, ref):
        _close(a, r)


def test_jit_lowering_compiles_and_matches_the_real_call():
    def parent(w, b, xs):
        return jax.vmap(proxy(w, b))(xs).sum(axis=0) * 2.0

    xs = _x(3, 2, 3)
    compiled = jax.jit(parent).lower(W, B, xs).compile()
    _close(compiled(W, B, xs), jax.vmap(lambda x: real(W, B, x))(xs).sum(axis=0) * 2.0)
    _close(jax.jit(lambda w, b, x: proxy(w, b)(x, scale=3.0))(W, B, xs[0]), real(W, B, xs[0], scale=3.0))


# The proxy ---------------------------------------------------------------------------------

def test_proxy_reads_attributes_of_the_child_and_refuses_assignments():
    class Module:
        features = 4

    child = proxy(W, B, key="layers[2]", module=Module())
    assert child.features == 4
    with pytest.raises(LiftError, match=r"layers\[2\].*'features'"):
        child.features = 5
    assert Module.features == 4


def test_is_array_leaf():
    assert is_array_leaf(jnp.ones(2)) and is_array_leaf(np.ones(2)) and is_array_leaf(np.float32(1.0))
    assert not any(is_array_leaf(v) for v in (3, 2.0, "x", None, (1,)))
