"""Tests for pzbridge/nn/dropout.py: mask statistics, stream semantics, train switch, framework parity."""

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
from pzbridge.core.random_stream import RandomStream
from pzbridge.core.variables import unbind_variables
from pzbridge.nn.dropout import DisabledDropout, Dropout
from pzbridge.testing.numerics import assert_outputs_match, assert_same_outputs


def reference_dropout(key, x, rate):
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, x.shape)
    return jnp.where(mask, x / keep, 0.0)


@settings(max_examples=8)
@given(st.integers(0, 2**16), st.sampled_from([0.1, 0.5, 0.9]), st.integers(1, 4), st.integers(1, 4))
def test_dropout_equals_reference_on_data_layout(seed, rate, b, f):
    x = jnp.asarray(np.random.RandomState(seed).normal(size=(b, f)).astype(np.float32))
    stream = RandomStream.from_base_key(jax.random.key(seed), "d")
    y = Dropout(rate, stream)(nx.wrap(x, "batch", "features")).unwrap("batch", "features")
    key = jax.random.fold_in(jax.random.key(seed), 0)
    # Not the reference's program (the key is derived inside the layer): within a few ulps (masks still exact).
    assert_outputs_match(y, reference_dropout(key, x, rate), same_computation=False)
    assert int(stream.offset.value) == 1


def test_dropout_keeps_expected_fraction_and_mean():
    stream = RandomStream.from_base_key(jax.random.key(0), "d")
    y = Dropout(0.3, stream)(nx.ones({"batch": 100, "features": 100})).unwrap("batch", "features")
    assert abs(float((y == 0).mean()) - 0.3) < 0.02
    assert abs(float(y.mean()) - 1.0) < 0.03


def test_broadcast_axes_share_the_mask():
    stream = RandomStream.from_base_key(jax.random.key(1), "d")
    y = Dropout(0.5, stream, broadcast_axes=("seq",))(nx.ones({"batch": 8, "seq": 5})).unwrap("batch", "seq")
    assert bool((y == y[:, :1]).all())


def test_train_side_input_overrides_and_side_stream_takes_precedence():
    held = RandomStream.from_base_key(jax.random.key(0), "held")
    passed = RandomStream.from_base_key(jax.random.key(1), "passed")
    x = nx.ones({"features": 16})
    layer = Dropout(0.5, held, deterministic=True)
    assert layer(x) is x
    layer(x, train=True, random_stream=passed)
    assert (int(held.offset.value), int(passed.offset.value)) == (0, 1)
    assert Dropout(0.5, held)(x, train=False) is x


def test_stateless_call_under_jit_advances_stream_state():
    layer = Dropout(0.5, RandomStream.from_base_key(jax.random.key(0), "d"))
    slots, values = unbind_variables(layer, freeze=True)
    step = jax.jit(lambda vs, x: slots.stateless_call(vs, x))
    y1, (s1,) = step(values, nx.ones({"features": 32}))
    y2, (s2,) = step((s1,), nx.ones({"features": 32}))
    assert (int(s1.value), int(s2.value)) == (1, 2)
    assert not bool((y1.unwrap("features") == y2.unwrap("features")).all())


def test_matches_nnx_dropout_with_same_key():
    x = jnp.arange(1.0, 25.0).reshape(4, 6)
    key = jax.random.key(5)
    ref = nnx.Dropout(0.4, rngs=nnx.Rngs(dropout=0))
    expected = ref(x, rngs=key)
    got = Dropout(0.4)(nx.wrap(x, "batch", "features"),
                       random_stream=_stream_yielding(key)).unwrap("batch", "features")
    np.testing.assert_array_equal(got, expected)
    # Bitwise on any CPU: NNX's own program (the jaxprs are compared); Equinox's is not: within a few ulps.
    run = lambda v: Dropout(0.4)(nx.wrap(v, "batch", "features"),  # noqa: E731
                                 random_stream=_stream_yielding(key)).unwrap("batch", "features")
    assert_same_outputs(run, lambda v: nnx.clone(ref)(v, rngs=key), x, bitwise=True)
    assert_outputs_match(got, eqx.nn.Dropout(0.4)(x, key=key), same_computation=False)


def _stream_yielding(key):
    """A stream whose first key is ``key`` (fold_in(base, 0) == key has no inverse, so wrap next_key)."""
    stream = RandomStream.from_base_key(jax.random.key(0), "s")
    object.__setattr__(stream, "next_key", lambda: key)
    return stream


def test_rate_edge_cases_disabled_form_and_errors():
    x = nx.ones({"features": 3})
    assert Dropout(0.0)(x) is x
    np.testing.assert_array_equal(Dropout(1.0)(x).unwrap("features"), jnp.zeros(3))
    disabled = Dropout(0.2, broadcast_axes=("seq",)).disabled()
    assert disabled == DisabledDropout(0.2, ("seq",)) and disabled(x, train=True) is x
    with pytest.raises(PzbridgeError, match="needs a RandomStream"):
        Dropout(0.5)(x)
    with pytest.raises(PzbridgeError, match=r"rate must be in \[0, 1\]"):
        Dropout(1.5)
    with pytest.raises(NamedAxisError, match=r"broadcast_axes \['seq'\]"):
        Dropout(0.5, RandomStream.from_base_key(jax.random.key(0)), broadcast_axes=("seq",))(x)
