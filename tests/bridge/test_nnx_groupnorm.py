"""NNX GroupNorm / InstanceNorm rules: lifted form, outputs, round trips, named batch axes, exact fallbacks."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.bridge.nnx.group_norm import NnxGroupNorm, NnxInstanceNorm
from pzbridge.nn.foreign import Foreign
from nnx_checks import assert_round_trip, assert_same_outputs
from pzbridge.testing.numerics import assert_outputs_match

settings_ = settings(max_examples=12)


@settings_
@given(st.sampled_from([(4, 1), (4, 2), (6, 3), (6, 6)]), st.booleans(), st.booleans(), st.booleans(),
       st.sampled_from([(2, 4), (2, 3, 5), (1, 2, 3, 3)]), st.integers(0, 99))
def test_groupnorm_lifts_and_matches_nnx(channels_groups, use_scale, use_bias, fast, lead, seed):
    channels, groups = channels_groups
    model = nnx.GroupNorm(channels, num_groups=groups, use_scale=use_scale, use_bias=use_bias,
                          use_fast_variance=fast, rngs=nnx.Rngs(seed))
    if use_scale:
        model.scale.set_value(jax.random.normal(jax.random.key(seed + 1), (channels,)))
    body = pzb.lift(model).body
    assert isinstance(body, NnxGroupNorm) and body.groups == groups
    x = 3.0 * jax.random.normal(jax.random.key(seed), (*lead, channels)) + 1.0
    # The named-axis norm is not NNX's program (the jaxprs differ): within a few ulps, not bitwise on every CPU.
    assert_same_outputs(model, x, ulps=4)
    assert_round_trip(model)


@settings_
@given(st.integers(1, 5), st.booleans(), st.booleans(), st.sampled_from([(2, 4), (2, 3, 5)]), st.integers(0, 99))
def test_instancenorm_lifts_and_matches_nnx(channels, use_scale, fast, lead, seed):
    model = nnx.InstanceNorm(channels, use_scale=use_scale, use_fast_variance=fast, rngs=nnx.Rngs(seed))
    body = pzb.lift(model).body
    assert isinstance(body, NnxInstanceNorm)
    x = 2.0 * jax.random.normal(jax.random.key(seed), (*lead, channels)) - 0.5
    assert_same_outputs(model, x, ulps=4)  # not NNX's jaxpr
    assert_round_trip(model)


def test_group_and_instance_norm_pass_extra_named_batch_axes_through():
    x = jax.random.normal(jax.random.key(0), (2, 3, 5, 5, 4))
    for model in (nnx.GroupNorm(4, num_groups=2, rngs=nnx.Rngs(0)), nnx.InstanceNorm(4, rngs=nnx.Rngs(0))):
        body = pzb.lift(model).body
        # NNX reduces every axis but the first and the features: name the two batch axes explicitly.
        expected = model(x.reshape(6, 5, 5, 4)).reshape(x.shape)
        named = pzb.nx.wrap(x, "batch", "seq", "height", "width", "channels").untag("height", "width")
        out = body(named)
        assert set(out.named_shape) == {"batch", "seq", "channels"} and out.positional_shape == (5, 5)
        got = out.untag_prefix("batch", "seq").unwrap("channels")
        assert_outputs_match(got, expected, same_computation=False)


def test_non_default_group_norm_configurations_stay_foreign_and_exact():
    x = jax.random.normal(jax.random.key(1), (2, 3, 4))
    for model in (nnx.GroupNorm(4, num_groups=2, reduction_axes=(-1,), rngs=nnx.Rngs(0)),
                  nnx.GroupNorm(4, num_groups=2, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)),
                  nnx.InstanceNorm(3, feature_axes=1, rngs=nnx.Rngs(0))):
        assert isinstance(pzb.lift(model).body, Foreign)
        assert_round_trip(model)
        assert_same_outputs(model, x)
