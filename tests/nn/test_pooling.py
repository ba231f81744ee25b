"""Tests for ``pzbridge.nn.pooling``.

References: window pools against an explicit pure-jax "stack every window
tap with strided slices" implementation (independent of
``lax.reduce_window``), adaptive pools against explicit per-window
reductions, both ``jax.vmap``-ed over extra named batch axes; plus
``equinox.nn`` pools and ``flax.linen`` pooling functions for the semantics
the bridges rely on.
"""

from __future__ import annotations

import itertools
import math

import equinox as eqx
import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.core.errors import NamedAxisError, StructError
from pzbridge.nn.pooling import (
    AdaptiveAvgPool,
    AdaptiveMaxPool,
    AvgPool,
    GlobalAvgPool,
    GlobalMaxPool,
    MaxPool,
)
from pzbridge.testing.named_arrays import build_named_array
from pzbridge.testing.numerics import assert_same_outputs

SPATIAL = {1: ("width",), 2: ("height", "width"), 3: ("depth", "height", "width")}


def explicit_pool_pads(padding, sizes, window, strides, dilation, ceil_mode):
    extents = [(k - 1) * d + 1 for k, d in zip(window, dilation)]
    if padding in ("SAME", "SAME_LOWER"):
        pads = []
        for n, e, s in zip(sizes, extents, strides):
            total = max((-(-n // s) - 1) * s + e - n, 0)
            small = total // 2
            pads.append((total - small, small) if padding == "SAME_LOWER" else (small, total - small))
    elif padding == "VALID":
        pads = [(0, 0)] * len(sizes)
    else:
        pads = [tuple(p) for p in padding]
    if ceil_mode:
        pads = [(lo, hi + s if (n + lo + hi - e) % s else hi)
                for n, (lo, hi), e, s in zip(sizes, pads, extents, strides)]
    return pads


def reference_window_pool(x, kind, window, strides, pads, dilation, count_include_pad=True):
    """Pure jax on x (C, *spatial): pad, stack every window tap with strided slices, reduce."""

    def taps(array, fill):
        padded = jnp.pad(array, [(0, 0)] + list(pads), constant_values=fill)
        out = [(padded.shape[1 + i] - ((k - 1) * d + 1)) // s + 1
               for i, (k, d, s) in enumerate(zip(window, dilation, strides))]
        stack = []
        for offsets in itertools.product(*[range(k) for k in window]):
            start = [0] + [o * d for o, d in zip(offsets, dilation)]
            limit = [array.shape[0]] + [st + (m - 1) * s + 1 for st, m, s in zip(start[1:], out, strides)]
            stack.append(jax.lax.slice(padded, start, limit, [1] + list(strides)))
        return jnp.stack(stack)

    if kind == "max":
        return taps(x, -jnp.inf).max(0)
    total = taps(x, 0.0).sum(0)
    if count_include_pad:
        return total / math.prod(window)
    return total / taps(jnp.ones_like(x), 0.0).sum(0)


@st.composite
def pool_cases(draw):
    n = draw(st.integers(1, 3))
    ints = lambda lo, hi: tuple(draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n)))  # noqa: E731
    sizes, window, strides, dilation = ints(1, 6 if n < 3 else 4), ints(1, 3), ints(1, 3), ints(1, 2)
    padding = draw(st.one_of(
        st.sampled_from(["SAME", "SAME_LOWER", "VALID"]),
        st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1)), min_size=n, max_size=n).map(tuple)))
    ceil_mode = draw(st.booleans())
    pads = explicit_pool_pads(padding, sizes, window, strides, dilation, ceil_mode)
    extents = [(k - 1) * d + 1 for k, d in zip(window, dilation)]
    if any(n_ + lo + hi < e for n_, (lo, hi), e in zip(sizes, pads, extents)):
        padding = tuple((e, e) for e in extents)  # keep every case valid instead of discarding it
        pads = explicit_pool_pads(padding, sizes, window, strides, dilation, ceil_mode)
    return dict(n=n, sizes=sizes, window=window, strides=strides, dilation=dilation, padding=padding,
                ceil_mode=ceil_mode, pads=pads, kind=draw(st.sampled_from(["max", "avg"])),
                count_include_pad=draw(st.booleans()), batch=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
                channels=draw(st.integers(1, 2)), seed=draw(st.integers(0, 2**16)),
                perm=draw(st.permutations(range(n + 3))))


@settings(max_examples=30)
@given(pool_cases())
def test_window_pools_match_reference_vmapped_over_named_batch_axes(case):
    spatial = SPATIAL[case["n"]]
    x = np.random.default_rng(case["seed"]).normal(size=case["batch"] + (case["channels"],) + case["sizes"])
    x = x.astype(np.float32)
    config = dict(strides=case["strides"], padding=case["padding"], dilation=case["dilation"],
                  ceil_mode=case["ceil_mode"], spatial_axes=spatial)
    if case["kind"] == "max":
        layer = MaxPool(case["window"], **config)
    else:
        layer = AvgPool(case["window"], count_include_pad=case["count_include_pad"], **config)
    named = build_named_array(x, ("batch", "b2", "channels") + spatial, permutation=case["perm"])
    got = layer(named).unwrap("batch", "b2", "channels", *spatial)
    ref = jax.vmap(jax.vmap(lambda xi: reference_window_pool(
        xi, case["kind"], case["window"], case["strides"], case["pads"], case["dilation"],
        case["count_include_pad"])))(jnp.asarray(x))
    assert got.shape == ref.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-6)


def reference_adaptive(x, target, op):
    """Explicit windows on x (C, *spatial), axis after axis: first n % t windows one longer."""
    for axis, t in enumerate(target, start=1):
        n = x.shape[axis]
        q, r = divmod(n, t)
        bounds, start = [], 0
        for i in range(t):
            width = q + 1 if i < r else q
            bounds.append((start, start + width))
            start += width
        x = jnp.stack([op(jax.lax.slice_in_dim(x, a, b, axis=axis), axis=axis) for a, b in bounds], axis=axis)
    return x


@st.composite
def adaptive_cases(draw):
    n = draw(st.integers(1, 3))
    sizes = tuple(draw(st.lists(st.integers(1, 7 if n < 3 else 4), min_size=n, max_size=n)))
    target = tuple(draw(st.integers(1, s)) for s in sizes)
    return dict(n=n, sizes=sizes, target=target, kind=draw(st.sampled_from(["max", "avg"])),
                batch=(draw(st.integers(1, 2)), draw(st.integers(1, 2))), seed=draw(st.integers(0, 2**16)),
                perm=draw(st.permutations(range(n + 3))))


@settings(max_examples=30)
@given(adaptive_cases())
def test_adaptive_pools_match_explicit_windows_vmapped_over_named_batch_axes(case):
    spatial = SPATIAL[case["n"]]
    x = np.random.default_rng(case["seed"]).normal(size=case["batch"] + (2,) + case["sizes"]).astype(np.float32)
    cls, op = (AdaptiveMaxPool, jnp.max) if case["kind"] == "max" else (AdaptiveAvgPool, jnp.mean)
    named = build_named_array(x, ("batch", "b2", "channels") + spatial, permutation=case["perm"])
    got = cls(case["target"], spatial_axes=spatial)(named).unwrap("batch", "b2", "channels", *spatial)
    ref = jax.vmap(jax.vmap(lambda xi: reference_adaptive(xi, case["target"], op)))(jnp.asarray(x))
    assert got.shape == ref.shape == case["batch"] + (2,) + case["target"]
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("use_ceil", [False, True])
def test_window_pools_equal_equinox_pools(n, use_ceil):
    spatial = SPATIAL[n]
    x = jax.random.normal(jax.random.key(n), (3,) + (7, 6, 5)[:n])
    window, stride, padding = (3, 2, 2)[:n], (2, 3, 1)[:n], ((1, 0), (1, 1), (0, 1))[:n]
    pairs = [(eqx.nn.MaxPool1d, eqx.nn.MaxPool2d, eqx.nn.MaxPool3d)[n - 1], MaxPool], [
        (eqx.nn.AvgPool1d, eqx.nn.AvgPool2d, eqx.nn.AvgPool3d)[n - 1], AvgPool]
    for eqx_cls, ours in pairs:
        m = eqx_cls(window, stride=stride, padding=padding, use_ceil=use_ceil)
        layer = ours(window, strides=stride, padding=padding, ceil_mode=use_ceil, spatial_axes=spatial)
        # Max pools round nowhere, so equal on any CPU; the average pool is not Equinox's program (the jaxprs
        # differ): within a few ulps.
        assert_same_outputs(lambda v: layer(pzb.nx.wrap(v, "channels", *spatial)).unwrap("channels", *spatial), m, x,
                            bitwise=ours is MaxPool)


@pytest.mark.parametrize("target", [(3, 4), (7, 6), (2, 2), (1, 1), (5, 1)])
def test_adaptive_pools_equal_equinox_adaptive_pools(target):
    x = jax.random.normal(jax.random.key(0), (3, 7, 6))
    for eqx_cls, ours in ((eqx.nn.AdaptiveMaxPool2d, AdaptiveMaxPool), (eqx.nn.AdaptiveAvgPool2d, AdaptiveAvgPool)):
        got = ours(target)(pzb.nx.wrap(x, "channels", "height", "width")).unwrap("channels", "height", "width")
        np.testing.assert_allclose(np.asarray(got), np.asarray(eqx_cls(target)(x)), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("padding", ["SAME", "VALID", ((1, 1), (0, 2))])
def test_window_pools_equal_flax_pooling_functions(padding):
    x = jax.random.normal(jax.random.key(1), (2, 7, 9, 3))
    names = ("batch", "height", "width", "channels")
    xn = pzb.nx.wrap(x, *names)
    for include in (True, False):
        pool = AvgPool((3, 2), strides=2, padding=padding, count_include_pad=include)
        assert_same_outputs(lambda v: pool(pzb.nx.wrap(v, *names)).unwrap(*names),
                            lambda v: flax_nn.avg_pool(v, (3, 2), (2, 2), padding, count_include_pad=include), x,
                            bitwise=True)
    pool = MaxPool((3, 2), strides=2, padding=padding)
    assert_same_outputs(lambda v: pool(pzb.nx.wrap(v, *names)).unwrap(*names),
                        lambda v: flax_nn.max_pool(v, (3, 2), (2, 2), padding), x, bitwise=True)


def test_pools_keep_the_input_layout_and_positional_axes():
    x = pzb.nx.wrap(jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3), "p", "width", "channels").untag("p")
    y = MaxPool(2, spatial_axes=("width",))(x)
    assert y.positional_shape == (2,) and dict(y.named_shape) == {"width": 2, "channels": 3}
    np.testing.assert_array_equal(np.asarray(y.unwrap("width", "channels")[0]), [[3, 4, 5], [9, 10, 11]])


def test_default_strides_equal_the_window_and_literal_avg_values():
    x = pzb.nx.wrap(jnp.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), "seq")
    assert AvgPool(3, spatial_axes=("seq",)).strides == (3,)
    np.testing.assert_array_equal(np.asarray(AvgPool(3, spatial_axes=("seq",))(x).unwrap("seq")), [2.0, 5.0])
    # count_include_pad=True divides border windows by the full window size (Equinox / Flax default).
    y = AvgPool(2, padding=((1, 1),), spatial_axes=("seq",))(x).unwrap("seq")
    np.testing.assert_array_equal(np.asarray(y), [0.5, 2.5, 4.5, 3.0])


def test_integer_max_pool_pads_with_the_dtype_minimum():
    x = pzb.nx.wrap(jnp.array([-5, -7, -2], dtype=jnp.int32), "seq")
    y = MaxPool(2, strides=1, padding=1, spatial_axes=("seq",))(x).unwrap("seq")
    assert y.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(y), [-5, -5, -2, -2])


def test_global_pools_remove_spatial_axes():
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)
    xn = pzb.nx.wrap(jnp.asarray(x), "batch", "height", "width", "channels")
    avg = GlobalAvgPool()(xn)
    assert dict(avg.named_shape) == {"batch": 2, "channels": 5}
    np.testing.assert_allclose(np.asarray(avg.unwrap("batch", "channels")), x.mean((1, 2)), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(GlobalMaxPool()(xn).unwrap("batch", "channels")), x.max((1, 2)))


def test_pools_under_jit_and_grad_match_reference():
    x = jax.random.normal(jax.random.key(3), (2, 3, 6, 5))
    names = ("batch", "channels", "height", "width")
    layer = MaxPool((2, 3), strides=(2, 1), padding=((1, 0), (1, 1)))

    def loss(x):
        return jnp.sum(jnp.sin(jax.jit(layer)(pzb.nx.wrap(x, *names)).unwrap(*names)))

    def ref_loss(x):
        pool = jax.vmap(lambda xi: reference_window_pool(xi, "max", (2, 3), (2, 1), [(1, 0), (1, 1)], (1, 1)))
        return jnp.sum(jnp.sin(pool(x)))

    np.testing.assert_allclose(loss(x), ref_loss(x), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(loss)(x), jax.grad(ref_loss)(x), rtol=1e-6)


def test_errors_name_the_layer_what_was_found_and_the_fix():
    x = pzb.nx.zeros({"batch": 1, "time": 8, "channels": 2})
    with pytest.raises(NamedAxisError, match=r"MaxPool: input lacks spatial axes \['seq'\].*time.*Fix"):
        MaxPool(2, spatial_axes=("seq",))(x)
    with pytest.raises(NamedAxisError, match=r"AdaptiveAvgPool: cannot pool axis 'time' of size 8 to 9 windows"):
        AdaptiveAvgPool(9, spatial_axes=("time",))(x)
    with pytest.raises(StructError, match=r"window must be an int or 2 ints"):
        AvgPool((2, 2, 2))
    with pytest.raises(StructError, match=r"output_size \(0,\) must be positive"):
        AdaptiveMaxPool(0, spatial_axes=("seq",))
    with pytest.raises(StructError, match=r"spatial_axes must be distinct axis names"):
        GlobalAvgPool(("seq", "seq"))
    with pytest.raises(NamedAxisError, match=r"GlobalMaxPool: input lacks spatial axes \['height', 'width'\]"):
        GlobalMaxPool()(x)
