"""NNX LayerNorm / RMSNorm / BatchNorm rules: lifted form, exact outputs, round trips, named batch axes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.bridge.nnx.adapter import NnxAdapter
from pzbridge.bridge.nnx.norm import NnxBatchNorm, NnxLayerNorm, NnxRMSNorm
from pzbridge.core.variables import StateVariable, stateless_call, unbind_variables
from pzbridge.nn.foreign import Foreign
from nnx_checks import assert_round_trip, assert_same_outputs
from pzbridge.testing.numerics import assert_outputs_match

settings_ = settings(max_examples=15)


@settings_
@given(st.integers(1, 5), st.booleans(), st.booleans(), st.booleans(), st.integers(0, 99))
def test_layernorm_lifts_to_named_norm_and_matches_nnx(features, use_bias, use_scale, fast, seed):
    model = nnx.LayerNorm(features, use_bias=use_bias, use_scale=use_scale, use_fast_variance=fast,
                          rngs=nnx.Rngs(seed))
    body = pzb.lift(model).body
    assert isinstance(body, NnxLayerNorm) and body.across_axes == ("features",)
    assert (body.bias is None) == (not use_bias) and (body.scale is None) == (not use_scale)
    x = 3.0 * jax.random.normal(jax.random.key(seed), (2, 3, features)) + 1.0
    # The named-axis norm is not NNX's program (the jaxprs differ): within a few ulps, not bitwise on every CPU.
    assert_same_outputs(model, x, ulps=4)
    assert_round_trip(model)


@settings_
@given(st.integers(1, 5), st.sampled_from([1e-6, 1e-2]), st.integers(0, 99))
def test_rmsnorm_lifts_scale_only_and_matches_nnx(features, epsilon, seed):
    model = nnx.RMSNorm(features, epsilon=epsilon, rngs=nnx.Rngs(seed))
    body = pzb.lift(model).body
    assert isinstance(body, NnxRMSNorm) and body.bias is None and body.epsilon == epsilon
    assert dict(body.scale.value.named_shape) == {"features": features}
    assert_same_outputs(model, jax.random.normal(jax.random.key(seed), (4, features)), ulps=4)  # not NNX's jaxpr
    assert_round_trip(model)


def test_norms_pass_extra_named_batch_axes_through():
    x = jax.random.normal(jax.random.key(0), (2, 3, 4))
    for model in (nnx.LayerNorm(4, rngs=nnx.Rngs(0)), nnx.RMSNorm(4, rngs=nnx.Rngs(0))):
        named = pzb.nx.wrap(x, "batch", "seq", "features")
        out = pzb.lift(model).body(named)
        assert_outputs_match(out.unwrap("batch", "seq", "features"), model(x), same_computation=False)


def test_non_default_norm_configurations_stay_foreign_and_exact():
    x = jax.random.normal(jax.random.key(1), (3, 4))
    for model in (nnx.LayerNorm(4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)),
                  nnx.LayerNorm(3, reduction_axes=0, feature_axes=0, rngs=nnx.Rngs(0)),
                  nnx.BatchNorm(4, axis_name="devices", rngs=nnx.Rngs(0))):
        assert isinstance(pzb.lift(model).body, Foreign)
        assert_round_trip(model)
    assert_same_outputs(nnx.LayerNorm(4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)), x)


def test_edited_epsilon_lowers_into_the_nnx_module():
    lifted = pzb.lift(nnx.LayerNorm(4, rngs=nnx.Rngs(0)))
    edited = pzb.select(lifted).at_instances_of(NnxLayerNorm).apply(lambda n: dataclasses.replace(n, epsilon=0.5))
    lowered = pzb.lower(edited)
    assert type(lowered) is nnx.LayerNorm and lowered.epsilon == 0.5


def test_norm_with_non_nnx_numerics_lowers_to_an_adapter():
    lifted = pzb.lift(nnx.RMSNorm(4, rngs=nnx.Rngs(0)))
    edited = dataclasses.replace(lifted.body, dtype_policy="input")
    assert isinstance(pzb.lower(edited, framework="nnx"), NnxAdapter)


@settings_
@given(st.integers(1, 4), st.sampled_from([0.0, 0.5, 0.9]), st.booleans(), st.integers(0, 99))
def test_batchnorm_training_statistics_equal_nnx_in_place_update(features, momentum, fast, seed):
    model = nnx.BatchNorm(features, momentum=momentum, use_fast_variance=fast, rngs=nnx.Rngs(seed))
    x = 2.0 * jax.random.normal(jax.random.key(seed), (5, 3, features)) + 0.5
    reference = nnx.clone(model)
    expected = nnx.jit(lambda m, a: m(a))(reference, x)  # updates reference.mean / var in place
    lifted = pzb.lift(model)
    assert isinstance(lifted.body, NnxBatchNorm)
    assert isinstance(lifted.body.running_mean, StateVariable)
    slots, values = unbind_variables(lifted, freeze=True)
    named = pzb.nx.wrap(x, "batch", "seq", "features")
    out, state = jax.jit(lambda v, a: stateless_call(slots, v, a))(values, named)
    # Not NNX's program (the jaxprs differ: named reductions), so within a few ulps rather than bitwise.
    assert_outputs_match(out.unwrap("batch", "seq", "features"), expected, same_computation=False)
    new = {v.label: v.value for v in state}
    assert_outputs_match(new["mean"].unwrap("features"), reference.mean[...], same_computation=False)
    assert_outputs_match(new["var"].unwrap("features"), reference.var[...], same_computation=False)
    # A plain (eager) lifted call updates the lifted StateVariables; lowering carries them back.
    eager = nnx.clone(model)
    eager(x)
    lifted.positional(x)
    lowered = pzb.lower(lifted)
    assert_outputs_match(lowered.mean[...], eager.mean[...], same_computation=False)
    assert_outputs_match(lowered.var[...], eager.var[...], same_computation=False)
    assert np.array_equal(model.mean[...], np.zeros(features))  # the user's module is untouched


def test_batchnorm_eval_mode_and_named_batch_axes():
    model = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    model(jax.random.normal(jax.random.key(0), (8, 3)))  # non-trivial running statistics
    model.eval()
    lifted = pzb.lift(model)
    assert lifted.body.use_running_average
    x = jax.random.normal(jax.random.key(1), (2, 4, 3))
    assert_same_outputs(model, x, ulps=4)  # not NNX's jaxpr
    train_model = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    named = pzb.nx.wrap(x, "batch", "seq", "features")
    out = pzb.lift(train_model).body(named)
    assert_outputs_match(out.unwrap("batch", "seq", "features"), nnx.clone(train_model)(x), same_computation=False)
    assert_outputs_match(pzb.lift(model).positional(x, use_running_average=False), nnx.clone(model)(x, False),
                         same_computation=False)
    lowered = assert_round_trip(model)
    assert lowered.use_running_average is True
