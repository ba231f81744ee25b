"""Tests for pzbridge/nn/activations.py (PReLU): reference, per-channel slopes, eqx / nnx parity."""

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
from pzbridge.core.errors import NamedAxisError
from pzbridge.core.variables import Parameter, ParameterSlot, unbind_params
from pzbridge.nn.activations import PReLU
from pzbridge.testing.numerics import assert_outputs_match


@settings(max_examples=8)
@given(st.integers(0, 2**16), st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.booleans())
def test_per_channel_prelu_matches_reference_vmapped(seed, b, c, h, channels_first):
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(b, c, h)).astype(np.float32)
    alpha = rng.uniform(0, 1, size=(c,)).astype(np.float32)
    names = ("batch", "channels", "height")
    xin = nx.wrap(jnp.asarray(x), *names) if channels_first else nx.wrap(
        jnp.asarray(np.transpose(x, (2, 0, 1))), "height", "batch", "channels")
    y = PReLU(Parameter(nx.wrap(jnp.asarray(alpha), "channels"), "a"))(xin).unwrap(*names)
    ref = lambda v: jnp.where(v >= 0, v, jnp.asarray(alpha)[:, None] * v)  # noqa: E731
    assert_outputs_match(y, jax.vmap(ref)(x), same_computation=False)  # not the reference's jaxpr


def test_matches_equinox_and_nnx_prelu():
    x = jnp.linspace(-2.0, 2.0, 12).reshape(3, 4)
    e = eqx.nn.PReLU()
    layer = PReLU(Parameter(nx.wrap(e.negative_slope), "a"))
    # Neither is the framework's program (the jaxprs differ: slope reshape / cast order): within a few ulps.
    assert_outputs_match(layer(nx.wrap(x, "batch", "features")).unwrap("batch", "features"), e(x),
                         same_computation=False)
    n = nnx.PReLU()
    nlayer = PReLU(Parameter(nx.wrap(n.negative_slope[...]), "a"), cast_slope_to_input=True)
    xb = x.astype(jnp.bfloat16)
    got = nlayer(nx.wrap(xb, "batch", "features")).unwrap("batch", "features")
    assert got.dtype == n(xb).dtype == jnp.bfloat16
    assert_outputs_match(got, n(xb), same_computation=False)


def test_from_config_grad_slot_and_errors():
    layer = PReLU.from_config("act", jax.random.key(0), {"channels": 2}, init_alpha=0.01)
    assert layer.alpha.label == "act.alpha"
    assert PReLU.from_config("act", None).alpha == ParameterSlot("act.alpha")
    slots, values = unbind_params(layer, freeze=True)
    x = nx.wrap(jnp.array([[-1.0, -3.0], [2.0, -1.0]]), "batch", "channels")
    grad = jax.grad(lambda vs: slots.stateless_call(vs, x)[0].unwrap("batch", "channels").sum())(values)
    np.testing.assert_allclose(grad[0].value.unwrap("channels"), [-1.0, -4.0])
    with pytest.raises(NamedAxisError, match=r"PReLU 'act.alpha' alpha.*'channels': \(2, 3\)"):
        layer(nx.zeros({"channels": 3}))
