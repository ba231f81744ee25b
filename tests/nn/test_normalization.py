"""Tests for pzbridge/nn/normalization.py: pure-jax references, vmap over extra names, eqx / nnx parity."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError, PzbridgeError
from pzbridge.core.variables import (
    Parameter,
    ParameterSlot,
    StateVariable,
    StateVariableSlot,
    StateVariableValue,
    unbind_params,
    unbind_variables,
)
from pzbridge.nn.normalization import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, RMSNorm
from pzbridge.testing.numerics import assert_outputs_match

TOL = dict(rtol=2e-5, atol=2e-5)


def stored(data: np.ndarray, names: list[str], perm: list[int]) -> nx.NamedArray:
    """A NamedArray with logical axes ``names`` whose storage order is ``perm``."""
    return nx.wrap(jnp.asarray(np.transpose(data, perm)), *[names[i] for i in perm])


def rand(seed: int, shape: tuple[int, ...], offset: float = 0.0) -> np.ndarray:
    return (np.random.RandomState(seed).normal(size=shape) * 2 + offset).astype(np.float32)


def vmap_n(fn, n: int):
    for _ in range(n):
        fn = jax.vmap(fn)
    return fn


# Pure-jax references for one example (the normalised axes only). ----------------------------


def ref_layer_norm(x, w, b, eps):
    mean = x.mean()
    var = ((x - mean) ** 2).mean()
    return (x - mean) / jnp.sqrt(var + eps) * w + b


def ref_rms_norm(x, w, b, eps):
    return x / jnp.sqrt((x**2).mean() + eps) * w + b


cases = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**16),
        "core": st.lists(st.integers(1, 4), min_size=1, max_size=2),
        "batch": st.lists(st.integers(1, 3), min_size=0, max_size=2),
        "perm_seed": st.integers(0, 1000),
        "eps": st.sampled_from([1e-6, 1e-5, 0.1]),
    }
)


def _setup(case):
    core_names = ["features", "heads"][: len(case["core"])]
    batch_names = ["batch", "b2"][: len(case["batch"])]
    names = batch_names + core_names
    shape = tuple(case["batch"]) + tuple(case["core"])
    x = rand(case["seed"], shape, offset=1.5)
    rng = np.random.RandomState(case["perm_seed"])
    perm = list(rng.permutation(len(names)))
    w = rand(case["seed"] + 1, tuple(case["core"]))
    b = rand(case["seed"] + 2, tuple(case["core"]))
    wperm = list(rng.permutation(len(core_names)))
    return names, batch_names, core_names, x, perm, w, b, wperm


@settings(max_examples=6)
@given(cases)
def test_layer_norm_matches_reference_vmapped_over_extra_names(case):
    names, batch_names, core, x, perm, w, b, wperm = _setup(case)
    layer = LayerNorm(
        Parameter(stored(w, core, wperm), "ln.scale"), Parameter(stored(b, core, wperm), "ln.bias"),
        tuple(core), case["eps"],
    )
    y = layer(stored(x, names, perm)).unwrap(*names)
    expected = vmap_n(lambda v: ref_layer_norm(v, jnp.asarray(w), jnp.asarray(b), case["eps"]), len(batch_names))(x)
    np.testing.assert_allclose(y, expected, **TOL)


@settings(max_examples=6)
@given(cases)
def test_rms_norm_matches_reference_vmapped_over_extra_names(case):
    names, batch_names, core, x, perm, w, b, wperm = _setup(case)
    layer = RMSNorm(
        Parameter(stored(w, core, wperm), "rms.scale"), Parameter(stored(b, core, wperm), "rms.bias"),
        tuple(core), case["eps"],
    )
    y = layer(stored(x, names, perm)).unwrap(*names)
    expected = vmap_n(lambda v: ref_rms_norm(v, jnp.asarray(w), jnp.asarray(b), case["eps"]), len(batch_names))(x)
    np.testing.assert_allclose(y, expected, **TOL)


@settings(max_examples=6)
@given(cases, st.booleans(), st.booleans())
def test_layer_norm_options_keep_the_formula(case, fast, fold):
    # NNX's fast variance and folded scale change rounding only, never the value.
    names, batch_names, core, x, perm, w, b, wperm = _setup(case)
    layer = LayerNorm(
        Parameter(stored(w, core, wperm), "s"), None, tuple(core), case["eps"],
        use_fast_variance=fast, scale_into_inverse=fold, dtype_policy="promote",
    )
    y = layer(stored(x, names, perm)).unwrap(*names)
    expected = vmap_n(lambda v: ref_layer_norm(v, jnp.asarray(w), 0.0, case["eps"]), len(batch_names))(x)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


@settings(max_examples=6)
@given(st.integers(0, 2**16), st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.booleans())
def test_layer_norm_scale_over_a_subset_of_normalised_axes(seed, b, f, h, fold):
    x = rand(seed, (b, f, h), 1.0)
    w = rand(seed + 1, (f,))
    layer = LayerNorm(Parameter(nx.wrap(jnp.asarray(w), "features"), "s"), None, ("features", "heads"), 1e-5,
                      scale_into_inverse=fold)
    y = layer(nx.wrap(jnp.asarray(x), "batch", "features", "heads")).unwrap("batch", "features", "heads")
    expected = jax.vmap(lambda v: ref_layer_norm(v, jnp.asarray(w)[:, None], 0.0, 1e-5))(x)
    np.testing.assert_allclose(y, expected, **TOL)


def ref_group_norm(x, w, b, groups, eps):
    # x: (channels, spatial...), group-major split like Equinox / NNX.
    c = x.shape[0]
    g = x.reshape(groups, c // groups, -1)
    mean = g.mean(axis=(1, 2), keepdims=True)
    var = ((g - mean) ** 2).mean(axis=(1, 2), keepdims=True)
    out = ((g - mean) / jnp.sqrt(var + eps)).reshape(x.shape)
    shape = (c,) + (1,) * (x.ndim - 1)
    return out * w.reshape(shape) + b.reshape(shape)


@settings(max_examples=6)
@given(st.integers(0, 2**16), st.sampled_from([(1, 3), (2, 2), (3, 1), (2, 3)]), st.integers(1, 3),
       st.integers(1, 3), st.integers(1, 2), st.integers(0, 100), st.booleans())
def test_group_norm_matches_reference_vmapped_over_batch(seed, groups_size, h, w_, batch, perm_seed, fast):
    groups, size = groups_size
    c = groups * size
    names = ["batch", "channels", "height", "width"]
    x = rand(seed, (batch, c, h, w_), 0.5)
    scale, bias = rand(seed + 1, (c,)), rand(seed + 2, (c,))
    perm = list(np.random.RandomState(perm_seed).permutation(4))
    layer = GroupNorm(Parameter(nx.wrap(jnp.asarray(scale), "channels"), "gn.scale"),
                      Parameter(nx.wrap(jnp.asarray(bias), "channels"), "gn.bias"),
                      "channels", groups, ("height", "width"), 1e-5, use_fast_variance=fast)
    y = layer(stored(x, names, perm)).unwrap(*names)
    expected = jax.vmap(lambda v: ref_group_norm(v, jnp.asarray(scale), jnp.asarray(bias), groups, 1e-5))(x)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


@settings(max_examples=6)
@given(st.integers(0, 2**16), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(0, 100))
def test_instance_norm_is_per_channel_layer_norm(seed, c, h, batch, perm_seed):
    names = ["batch", "height", "width", "channels"]
    x = rand(seed, (batch, h, 2, c), 1.0)
    scale = rand(seed + 1, (c,))
    perm = list(np.random.RandomState(perm_seed).permutation(4))
    layer = InstanceNorm(Parameter(nx.wrap(jnp.asarray(scale), "channels"), "in.scale"), None,
                         ("height", "width"), 1e-6)
    y = layer(stored(x, names, perm)).unwrap(*names)
    per_channel = jax.vmap(lambda v, s: ref_layer_norm(v, s, 0.0, 1e-6), in_axes=(2, 0), out_axes=2)
    expected = jax.vmap(lambda v: per_channel(v, jnp.asarray(scale)))(x)
    np.testing.assert_allclose(y, expected, **TOL)


# BatchNorm. -----------------------------------------------------------------------------------


def ref_batch_stats(x):  # x: (batch, features)
    return x.mean(0), ((x - x.mean(0)) ** 2).mean(0)


@settings(max_examples=6)
@given(st.integers(0, 2**16), st.integers(2, 4), st.integers(1, 4), st.sampled_from([0.5, 0.9, 0.99]),
       st.integers(0, 10))
def test_batch_norm_train_uses_batch_stats_and_updates_running_averages(seed, n, f, momentum, perm_seed):
    x = rand(seed, (n, f), 1.0)
    perm = list(np.random.RandomState(perm_seed).permutation(2))
    bn = BatchNorm.from_config("bn", jax.random.key(0), {"features": f}, momentum=momentum)
    y = bn(stored(x, ["batch", "features"], perm)).unwrap("batch", "features")
    mean, var = ref_batch_stats(jnp.asarray(x))
    np.testing.assert_allclose(y, (x - mean) / jnp.sqrt(var + 1e-5), **TOL)
    np.testing.assert_allclose(bn.running_mean.value.unwrap("features"), (1 - momentum) * mean, **TOL)
    np.testing.assert_allclose(bn.running_var.value.unwrap("features"), momentum + (1 - momentum) * var, **TOL)
    # Eval: running statistics, nothing changes.
    before = bn.running_mean.value.unwrap("features")
    y_eval = bn(stored(x, ["batch", "features"], perm), train=False).unwrap("batch", "features")
    rm, rv = before, bn.running_var.value.unwrap("features")
    np.testing.assert_allclose(y_eval, (x - rm) / jnp.sqrt(rv + 1e-5), **TOL)
    np.testing.assert_array_equal(bn.running_mean.value.unwrap("features"), before)


@settings(max_examples=6)
@given(st.integers(0, 2**16), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))
def test_batch_norm_statistics_over_batch_and_spatial_names(seed, n, h, c):
    x = rand(seed, (n, h, c), 0.0)
    bn = BatchNorm.from_config("bn", jax.random.key(0), {"channels": c}, across_axes=("batch", "height"))
    y = bn(nx.wrap(jnp.asarray(x), "batch", "height", "channels")).unwrap("batch", "height", "channels")
    flat = jnp.asarray(x).reshape(-1, c)
    mean, var = ref_batch_stats(flat)
    np.testing.assert_allclose(y, (x - mean) / jnp.sqrt(var + 1e-5), **TOL)


def test_batch_norm_stateless_call_returns_new_stats_and_leaves_caller_untouched():
    bn = BatchNorm.from_config("bn", jax.random.key(0), {"features": 3}, momentum=0.5)
    x = nx.wrap(jnp.arange(6.0).reshape(2, 3), "batch", "features")
    slots, values = unbind_variables(bn, freeze=True)
    y, new_state = jax.jit(lambda vs, x: slots.stateless_call(vs, x))(values, x)
    by_label = {v.label: v.value for v in new_state}
    np.testing.assert_allclose(by_label["bn.mean"].unwrap("features"), 0.5 * jnp.array([1.5, 2.5, 3.5]))
    np.testing.assert_array_equal(bn.running_mean.value.unwrap("features"), jnp.zeros(3))
    assert all(isinstance(v, StateVariableValue) for v in new_state)


def test_batch_norm_ema_mode_first_call_then_normalises_with_updated_average():
    bn = BatchNorm.from_config("bn", jax.random.key(0), {"features": 2}, momentum=0.5, mode="ema")
    x1 = nx.wrap(jnp.array([[0.0, 0.0], [2.0, 4.0]]), "batch", "features")
    bn(x1)
    np.testing.assert_allclose(bn.running_mean.value.unwrap("features"), [1.0, 2.0])  # batch stats stored
    np.testing.assert_allclose(bn.running_var.value.unwrap("features"), [1.0, 4.0])
    assert not bool(bn.first_call.value)
    x2 = nx.wrap(jnp.array([[2.0, 2.0], [4.0, 2.0]]), "batch", "features")
    y = bn(x2).unwrap("batch", "features")
    mean = 0.5 * jnp.array([1.0, 2.0]) + 0.5 * jnp.array([3.0, 2.0])
    var = 0.5 * jnp.array([1.0, 4.0]) + 0.5 * jnp.array([1.0, 0.0])
    np.testing.assert_allclose(y, (x2.unwrap("batch", "features") - mean) / jnp.sqrt(var + 1e-5), **TOL)


def test_batch_norm_debias_divides_running_stats_by_step_count():
    bn = BatchNorm.from_config("bn", jax.random.key(0), {"features": 1}, momentum=0.5, debias=True)
    x = nx.wrap(jnp.array([[1.0], [3.0]]), "batch", "features")
    bn(x)
    assert int(bn.counter.value) == 1
    y = bn(x, train=False).unwrap("batch", "features")
    # running mean = 0.5*0 + 0.5*2 = 1, debiased by 1 - 0.5 = 0.5 -> 2; var 0.5*1+0.5*1 = 1 -> 2.
    np.testing.assert_allclose(y[:, 0], (jnp.array([1.0, 3.0]) - 2.0) / jnp.sqrt(2.0 + 1e-5), **TOL)


# Framework parity (these pin what the bridges will rely on). -------------------------------------
# The named-axis norms are not the frameworks' programs (their jaxprs differ), so they agree within a few ulps:
# bitwise agreement on one CPU does not carry over to others (AMD EPYC rounds some of them 1 ulp apart).


def _x(seed, shape):
    return jnp.asarray(rand(seed, shape, 1.0))


@pytest.mark.parametrize("seed", range(3))
def test_layer_norm_matches_equinox_under_jit(seed):
    x = _x(seed, (4, 3, 5))
    ref = eqx.nn.LayerNorm((3, 5))
    ref = eqx.tree_at(lambda m: (m.weight, m.bias), ref, (_x(seed + 1, (3, 5)), _x(seed + 2, (3, 5))))
    layer = LayerNorm(Parameter(nx.wrap(ref.weight, "features", "heads"), "w"),
                      Parameter(nx.wrap(ref.bias, "features", "heads"), "b"), ("features", "heads"), ref.eps)
    expected = jax.jit(jax.vmap(ref))(x)
    got = jax.jit(lambda v: layer(nx.wrap(v, "batch", "features", "heads")).unwrap("batch", "features", "heads"))(x)
    assert_outputs_match(got, expected, same_computation=False)


@pytest.mark.parametrize("fast", [True, False])
def test_layer_norm_matches_nnx_under_jit(fast):
    x = _x(0, (4, 6))
    ref = nnx.LayerNorm(6, rngs=nnx.Rngs(0), use_fast_variance=fast)
    ref.scale[...] = _x(1, (6,))
    ref.bias[...] = _x(2, (6,))
    layer = LayerNorm(Parameter(nx.wrap(ref.scale[...], "features"), "s"), Parameter(nx.wrap(ref.bias[...], "features"), "b"),
                      ("features",), ref.epsilon, use_fast_variance=fast, scale_into_inverse=True,
                      dtype_policy="promote")
    expected = jax.jit(lambda v: ref(v))(x)
    got = jax.jit(lambda v: layer(nx.wrap(v, "batch", "features")).unwrap("batch", "features"))(x)
    assert_outputs_match(got, expected, same_computation=False)


def test_rms_norm_matches_equinox_and_nnx_under_jit():
    x = _x(3, (4, 6))
    ref = eqx.nn.RMSNorm(6)
    ref = eqx.tree_at(lambda m: (m.weight, m.bias), ref, (_x(4, (6,)), _x(5, (6,))))
    layer = RMSNorm(Parameter(nx.wrap(ref.weight, "features"), "w"), Parameter(nx.wrap(ref.bias, "features"), "b"),
                    ("features",), ref.eps)
    run = lambda l: jax.jit(lambda v: l(nx.wrap(v, "batch", "features")).unwrap("batch", "features"))(x)  # noqa: E731
    assert_outputs_match(run(layer), jax.jit(jax.vmap(ref))(x), same_computation=False)
    nref = nnx.RMSNorm(6, rngs=nnx.Rngs(0))
    nref.scale[...] = _x(6, (6,))
    nlayer = RMSNorm(Parameter(nx.wrap(nref.scale[...], "features"), "s"), None, ("features",), nref.epsilon,
                     scale_into_inverse=True, dtype_policy="promote")
    assert_outputs_match(run(nlayer), jax.jit(lambda v: nref(v))(x), same_computation=False)


def test_layer_norm_dtype_policies_match_frameworks_for_bfloat16_input():
    x = _x(7, (2, 6)).astype(jnp.bfloat16)
    ref = eqx.nn.LayerNorm(6)
    layer = LayerNorm(Parameter(nx.wrap(ref.weight, "features"), "w"), Parameter(nx.wrap(ref.bias, "features"), "b"),
                      ("features",), ref.eps)
    got = layer(nx.wrap(x, "batch", "features")).unwrap("batch", "features")
    expected = jax.vmap(ref)(x)
    assert got.dtype == expected.dtype == jnp.bfloat16
    assert_outputs_match(got, expected, same_computation=False)
    nref = nnx.LayerNorm(6, rngs=nnx.Rngs(0))
    nlayer = LayerNorm(Parameter(nx.wrap(nref.scale[...], "features"), "s"), Parameter(nx.wrap(nref.bias[...], "features"), "b"),
                       ("features",), nref.epsilon, use_fast_variance=True, scale_into_inverse=True,
                       dtype_policy="promote")
    got = nlayer(nx.wrap(x, "batch", "features")).unwrap("batch", "features")
    expected = nref(x)
    assert got.dtype == expected.dtype == jnp.float32
    assert_outputs_match(got, expected, same_computation=False)


def test_group_norm_equals_equinox_and_nnx():
    x = _x(8, (2, 6, 3, 3))  # eqx: (batch, channels, h, w)
    ref = eqx.nn.GroupNorm(3, 6)
    ref = eqx.tree_at(lambda m: (m.weight, m.bias), ref, (_x(9, (6,)), _x(10, (6,))))
    layer = GroupNorm(Parameter(nx.wrap(ref.weight, "channels"), "w"), Parameter(nx.wrap(ref.bias, "channels"), "b"),
                      "channels", 3, ("height", "width"), ref.eps)
    names = ("batch", "channels", "height", "width")
    got = jax.jit(lambda v: layer(nx.wrap(v, *names)).unwrap(*names))(x)
    np.testing.assert_allclose(got, jax.jit(jax.vmap(ref))(x), rtol=1e-6, atol=1e-6)
    xn = jnp.transpose(x, (0, 2, 3, 1))  # nnx: channels last
    nref = nnx.GroupNorm(6, num_groups=3, rngs=nnx.Rngs(0))
    nref.scale[...] = _x(11, (6,))
    nlayer = GroupNorm(Parameter(nx.wrap(nref.scale[...], "channels"), "s"), Parameter(nx.wrap(nref.bias[...], "channels"), "b"),
                       "channels", 3, ("height", "width"), nref.epsilon, use_fast_variance=True,
                       scale_into_inverse=True, dtype_policy="promote")
    nnames = ("batch", "height", "width", "channels")
    got = jax.jit(lambda v: nlayer(nx.wrap(v, *nnames)).unwrap(*nnames))(xn)
    np.testing.assert_allclose(got, jax.jit(lambda v: nref(v))(xn), rtol=1e-6, atol=1e-6)


def test_instance_norm_equals_nnx():
    x = _x(12, (2, 3, 4, 5))
    nref = nnx.InstanceNorm(5, rngs=nnx.Rngs(0))
    nref.scale[...] = _x(13, (5,))
    layer = InstanceNorm(Parameter(nx.wrap(nref.scale[...], "channels"), "s"), Parameter(nx.wrap(nref.bias[...], "channels"), "b"),
                         ("height", "width"), nref.epsilon, use_fast_variance=True, scale_into_inverse=True,
                         dtype_policy="promote")
    names = ("batch", "height", "width", "channels")
    got = jax.jit(lambda v: layer(nx.wrap(v, *names)).unwrap(*names))(x)
    np.testing.assert_allclose(got, jax.jit(lambda v: nref(v))(x), rtol=1e-6, atol=1e-6)


def test_batch_norm_equals_nnx_in_train_and_eval():
    x = _x(14, (6, 4))
    nref = nnx.BatchNorm(4, momentum=0.9, rngs=nnx.Rngs(0))
    nref.scale[...] = _x(15, (4,))
    layer = BatchNorm(
        Parameter(nx.wrap(nref.scale[...], "features"), "s"), Parameter(nx.wrap(nref.bias[...], "features"), "b"),
        StateVariable(nx.wrap(nref.mean[...], "features"), "m"), StateVariable(nx.wrap(nref.var[...], "features"), "v"),
        across_axes=("batch",), epsilon=nref.epsilon, momentum=nref.momentum, use_fast_variance=True,
        scale_into_inverse=True, dtype_policy="promote",
    )
    for _ in range(2):
        expected = nref(x, use_running_average=False)
        got = layer(nx.wrap(x, "batch", "features")).unwrap("batch", "features")
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(layer.running_mean.value.unwrap("features"), nref.mean[...], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(layer.running_var.value.unwrap("features"), nref.var[...], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(layer(nx.wrap(x, "batch", "features"), train=False).unwrap("batch", "features"),
                               nref(x, use_running_average=True), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["ema", "batch"])
def test_batch_norm_equals_equinox_modes(mode):
    x = _x(16, (5, 3, 2))  # (batch, channels, spatial)
    ref, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", momentum=0.8, mode=mode)
    layer = BatchNorm.from_config("bn", jax.random.key(0), {"channels": 3}, across_axes=("batch", "width"),
                                  momentum=0.8, mode=mode, debias=(mode == "batch"))
    layer = BatchNorm(**{**{f: getattr(layer, f) for f in layer.__dataclass_fields__}, "divide_by_sqrt": True})
    names = ("batch", "channels", "width")
    run = jax.vmap(ref, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    for _ in range(2):
        expected, state = run(x, state)
        got = layer(nx.wrap(x, *names)).unwrap(*names)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    inference = eqx.nn.inference_mode(ref)
    expected, _ = jax.vmap(inference, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)
    np.testing.assert_allclose(layer(nx.wrap(x, *names), train=False).unwrap(*names), expected, rtol=1e-5, atol=1e-5)


# Builders, slots, transforms, errors. -----------------------------------------------------------


def test_from_config_is_deterministic_and_slots_without_key():
    a = LayerNorm.from_config("blocks.0.ln", jax.random.key(1), {"features": 3})
    b = LayerNorm.from_config("blocks.0.ln", jax.random.key(1), {"features": 3})
    np.testing.assert_array_equal(a.scale.value.unwrap("features"), b.scale.value.unwrap("features"))
    assert (a.scale.label, a.bias.label) == ("blocks.0.ln.scale", "blocks.0.ln.bias")
    assert RMSNorm.from_config("r", None, {"features": 3}).scale == ParameterSlot("r.scale")
    slots = BatchNorm.from_config("bn", None, {"features": 2}, mode="ema")
    assert slots.running_var == StateVariableSlot("bn.var") and slots.first_call == StateVariableSlot("bn.first_call")
    assert LayerNorm.from_config("l", jax.random.key(0), {"features": 2}, use_scale=False, use_bias=False).scale is None


def test_grad_through_frozen_layer_norm_matches_reference_grad():
    x = _x(20, (2, 4))
    layer = LayerNorm.from_config("ln", jax.random.key(0), {"features": 4})
    slots, values = unbind_params(layer, freeze=True)

    def loss(values):
        y, _ = slots.stateless_call(values, nx.wrap(x, "batch", "features"))
        return (y.unwrap("batch", "features") ** 2 * jnp.arange(4.0)).sum()

    grads = jax.jit(jax.grad(loss))(values)
    g_scale = {v.label: v.value for v in grads}["ln.scale"].unwrap("features")

    def ref_loss(w):
        return (jax.vmap(lambda v: ref_layer_norm(v, w, 0.0, 1e-6))(x) ** 2 * jnp.arange(4.0)).sum()

    np.testing.assert_allclose(g_scale, jax.grad(ref_loss)(jnp.ones(4)), **TOL)


def test_errors_name_layer_expected_and_found():
    layer = LayerNorm.from_config("blocks.3.ln", jax.random.key(0), {"features": 3})
    with pytest.raises(NamedAxisError, match=r"LayerNorm 'blocks.3.ln.scale'.*lacks named axes \['features'\]"):
        layer(nx.zeros({"batch": 2, "embed": 3}))
    with pytest.raises(NamedAxisError, match=r"size mismatches.*'features': \(3, 4\)"):
        layer(nx.zeros({"features": 4}))
    with pytest.raises(NamedAxisError, match="groups do not divide"):
        GroupNorm(None, None, "channels", 4, ("height", "width"), 1e-5)(nx.zeros({"channels": 6, "height": 1, "width": 1}))
    with pytest.raises(PzbridgeError, match="dtype_policy"):
        LayerNorm(None, None, ("features",), 1e-6, dtype_policy="fast")
    bn = BatchNorm.from_config("bn", jax.random.key(0), {"features": 2})
    with pytest.raises(NamedAxisError, match="running statistics have axes"):
        bn(nx.zeros({"batch": 2, "seq": 3, "features": 2}))
