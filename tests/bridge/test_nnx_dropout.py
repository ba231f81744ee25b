"""NNX Dropout rule: the RngStream becomes a RandomStream with the same key and count, and comes back."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.bridge.nnx.dropout import NnxDropout, stream_keys_equal
from pzbridge.core.random_stream import RandomStream
from pzbridge.core.variables import StateVariable
from pzbridge.nn.foreign import Foreign
from nnx_checks import assert_round_trip, assert_same_outputs
from nnx_checks import pure
from pzbridge.testing.numerics import assert_bitwise_reproducible


@settings(max_examples=15)
@given(st.sampled_from([0.0, 0.1, 0.5, 1.0]), st.integers(0, 99), st.integers(0, 3))
def test_dropout_masks_equal_nnx_and_counts_advance_alike(rate, seed, calls):
    model = nnx.Dropout(rate, rngs=nnx.Rngs(dropout=seed))
    reference = nnx.clone(model)
    lifted = pzb.lift(model)
    body = lifted.body
    assert isinstance(body, NnxDropout) and isinstance(body.random_stream, RandomStream)
    assert isinstance(body.random_stream.offset, StateVariable)
    x = jax.random.normal(jax.random.key(seed), (3, 5))
    for _ in range(calls + 1):
        # Bitwise on any CPU: the lifted call is NNX's program (the jaxprs, on copies of the state, are compared).
        assert_bitwise_reproducible(pure(lambda l, a: l.positional(a), lifted), lambda a: nnx.clone(reference)(a), x)
        assert np.array_equal(lifted.positional(x), reference(x))
    lowered = pzb.lower(lifted)
    assert type(lowered.rngs) is nnx.RngStream and stream_keys_equal(lowered.rngs, reference.rngs)
    assert_bitwise_reproducible(lambda a: nnx.clone(lowered)(a), lambda a: nnx.clone(reference)(a), x)
    assert np.array_equal(lowered(x), reference(x))  # continues the same key sequence
    assert int(model.rngs.count[...]) == 0  # the user's stream did not move
    assert_round_trip(model)


def test_deterministic_and_train_switches():
    model = nnx.Dropout(0.5, rngs=nnx.Rngs(0))
    x = jnp.ones((2, 4))
    lifted = pzb.lift(model)
    assert np.array_equal(lifted.positional(x, deterministic=True), x)
    assert np.array_equal(lifted.positional(x, train=False), x)
    model.eval()
    assert pzb.lift(model).body.deterministic
    assert pzb.lower(pzb.lift(model)).deterministic is True
    assert_same_outputs(nnx.Dropout(0.5, deterministic=True), x)


def test_dropout_with_named_batch_axes_matches_nnx_mask():
    model = nnx.Dropout(0.5, rngs=nnx.Rngs(7))
    x = jax.random.normal(jax.random.key(1), (2, 3, 4))
    names = ("batch", "seq", "features")
    out = pzb.lift(model).body(pzb.nx.wrap(x, *names))
    assert np.array_equal(out.unwrap(*names), nnx.clone(model)(x))
    assert_bitwise_reproducible(pure(lambda l, a: l.body(pzb.nx.wrap(a, *names)).unwrap(*names), pzb.lift(model)),
                                lambda a: nnx.clone(model)(a), x)


def test_dropout_inside_sequential_after_linear_matches_nnx():
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Dropout(0.3, rngs=nnx.Rngs(1)))
    x = jax.random.normal(jax.random.key(2), (5, 3))
    assert_same_outputs(model, x, exact=False)
    assert_round_trip(model)


def test_broadcast_dims_stay_foreign():
    model = nnx.Dropout(0.5, broadcast_dims=(0,), rngs=nnx.Rngs(0))
    assert isinstance(pzb.lift(model).body, Foreign)
    assert_round_trip(model)
