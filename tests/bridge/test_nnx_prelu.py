"""NNX PReLU rule: lifted form, outputs (NNX and a pure-jax reference), round trips, named axes, fallbacks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.bridge.nnx.adapter import NnxAdapter
from pzbridge.bridge.nnx.prelu import NnxPReLU
from pzbridge.nn.foreign import Foreign
from nnx_checks import assert_round_trip, assert_same_outputs
from pzbridge.testing.numerics import assert_outputs_match


@settings(max_examples=15)
@given(st.floats(-1.0, 1.0, width=32), st.sampled_from([jnp.float32, jnp.bfloat16]), st.integers(0, 99))
def test_prelu_lifts_to_scalar_slope_and_matches_nnx_and_a_reference(slope, input_dtype, seed):
    model = nnx.PReLU(slope)
    body = pzb.lift(model).body
    assert isinstance(body, NnxPReLU) and body.cast_slope_to_input
    x = jax.random.normal(jax.random.key(seed), (3, 4)).astype(input_dtype)
    expected = jnp.where(x >= 0, x, jnp.asarray(slope, jnp.float32).astype(input_dtype) * x)
    # Three different jaxprs (the lifted one reshapes the slope; NNX's closes over it): within ulps, not bitwise.
    got = assert_same_outputs(model, x, ulps=4)
    assert got.dtype == input_dtype
    assert_outputs_match(got, expected, same_computation=False)
    assert_round_trip(model)


def test_prelu_passes_named_axes_through():
    model = nnx.PReLU(0.2)
    x = jax.random.normal(jax.random.key(0), (2, 3, 4))
    out = pzb.lift(model).body(pzb.nx.wrap(x, "batch", "seq", "features"))
    assert_outputs_match(out.unwrap("batch", "seq", "features"), model(x), same_computation=False)


def test_prelu_in_sequential_keeps_the_previous_layer_names():
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.PReLU())
    lifted = pzb.lift(model)
    assert isinstance(lifted.body.sublayers[-1], NnxPReLU)
    assert_same_outputs(model, jax.random.normal(jax.random.key(1), (2, 3)), ulps=4)  # not NNX's jaxpr
    assert_round_trip(model)


def test_prelu_with_dtype_stays_foreign_and_edited_slope_axes_lower_to_adapter():
    model = nnx.PReLU(dtype=jnp.bfloat16)
    assert isinstance(pzb.lift(model).body, Foreign)
    assert_round_trip(model)
    lifted = pzb.lift(nnx.PReLU(0.5))
    edited = dataclasses.replace(lifted.body, cast_slope_to_input=False)
    assert isinstance(pzb.lower(edited, framework="nnx"), NnxAdapter)
