"""ApplyRoPE against independent references: Equinox's RotaryPositionalEmbedding
(rotate-half) and a complex-number formulation (interleaved)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError
from pzbridge.nn.rope import ApplyRoPE

BATCH_NAMES = ("batch", "b2")


def vmap_batch(fn, n):
    for _ in range(n):
        fn = jax.vmap(fn)
    return fn


def ref_interleaved(x, pos, theta):  # x [T, d]: pairs (2i, 2i+1) as complex numbers
    d = x.shape[-1]
    z = x[:, 0::2] + 1j * x[:, 1::2]
    angle = pos[:, None] * theta ** (-jnp.arange(0, d, 2) / d)
    r = z * jnp.exp(1j * angle)
    return jnp.stack([r.real, r.imag], -1).reshape(x.shape)


def ref_rotate_half(x, pos, theta):  # x [T, d]
    d = x.shape[-1]
    angle = pos[:, None] * theta ** (-jnp.arange(0, d, 2) / d)
    z = x[:, : d // 2] + 1j * x[:, d // 2 :]
    r = z * jnp.exp(1j * angle)
    return jnp.concatenate([r.real, r.imag], -1)


@settings(max_examples=15)
@given(st.integers(1, 5), st.integers(1, 4), st.lists(st.integers(1, 2), max_size=2).map(tuple),
       st.sampled_from(["rotate_half", "interleaved"]), st.sampled_from([10_000.0, 500.0]), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_rope_matches_complex_rotation_reference_vmapped(t, half, batch, convention, theta, explicit, seed):
    d = 2 * half
    k1, k2 = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(k1, batch + (t, d))
    pos = jax.random.randint(k2, batch + (t,), 0, 50) if explicit else jnp.broadcast_to(jnp.arange(t), batch + (t,))
    bn = BATCH_NAMES[: len(batch)]
    ref = ref_rotate_half if convention == "rotate_half" else ref_interleaved

    @jax.jit  # One compilation per example instead of one per eager op.
    def both(x, pos):
        # Store the projection axis first: the layer must not assume storage order.
        xn = nx.wrap(x, *bn, "seq", "projection").order_as("projection", *bn, "seq")
        side = {"token_positions": nx.wrap(pos, *bn, "seq")} if explicit else {}
        out = ApplyRoPE(max_wavelength=theta, convention=convention)(xn, **side)
        expected = vmap_batch(lambda xx, pp: ref(xx, pp.astype(jnp.float32), theta), len(batch))(x, pos)
        return out.unwrap(*bn, "seq", "projection"), expected

    np.testing.assert_allclose(*both(x, pos), atol=2e-5, rtol=1e-5)


@settings(max_examples=6)
@given(st.integers(1, 6), st.integers(1, 4), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_rotate_half_equals_equinox_rotary_embedding_per_head(t, half, heads, seed):
    x = jax.random.normal(jax.random.key(seed), (t, heads, 2 * half))
    rope = eqx.nn.RotaryPositionalEmbedding(2 * half)
    expected = jax.jit(jax.vmap(rope, in_axes=1, out_axes=1))(x)
    out = jax.jit(lambda v: ApplyRoPE()(nx.wrap(v, "seq", "heads", "projection")).unwrap("seq", "heads", "projection"))
    np.testing.assert_allclose(out(x), expected, atol=1e-6)


def test_rope_keeps_bfloat16_and_position_zero_is_identity():
    x = nx.wrap(jnp.arange(8.0, dtype=jnp.bfloat16).reshape(2, 4), "seq", "projection")
    out = ApplyRoPE()(x, token_positions=nx.wrap(jnp.zeros(2, jnp.int32), "seq"))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out.unwrap("seq", "projection"), x.unwrap("seq", "projection"))


def test_rope_gradient_flows_under_jit():
    x = jax.random.normal(jax.random.key(0), (3, 4))
    f = lambda v: ApplyRoPE()(nx.wrap(v, "seq", "projection")).unwrap("seq", "projection").sum()  # noqa: E731
    g = jax.jit(jax.grad(f))(x)
    ref = jax.grad(lambda v: ref_rotate_half(v, jnp.arange(3.0), 10_000.0).sum())(x)
    np.testing.assert_allclose(g, ref, atol=1e-5)


def test_rope_errors_say_what_and_how():
    with pytest.raises(NamedAxisError, match="even size"):
        ApplyRoPE()(nx.ones({"seq": 2, "projection": 3}))
    with pytest.raises(NamedAxisError, match="token_positions"):
        ApplyRoPE()(nx.ones({"projection": 2}))
    with pytest.raises(NamedAxisError, match="convention"):
        ApplyRoPE(convention="spiral")
