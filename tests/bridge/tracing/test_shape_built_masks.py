"""Arrays built from a shape (causal masks, position grids) follow every call's sizes after traced lifting.

``jnp.tril(jnp.ones((t, t), bool))`` with ``t = x.shape[0]`` has no data path
from ``x``: only the second trace at other sizes shows that its axes are the
sequence's. Attention children used to fix the sequence length (their input
axes were all taken as weight-bound), so a block lifted at length 5 refused
length 7; now only axes a child's arrays have (a Linear's ``features``) are
fixed.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.nn.named_ops import Iota
from pzbridge.testing.numerics import assert_outputs_match

D, HEADS = 8, 2


class CausalBlock(eqx.Module):
    """Pre-norm self-attention with a causal mask built from the input's length, then a vmapped MLP."""

    norm: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    mlp: eqx.nn.MLP

    def __init__(self, key: jax.Array) -> None:
        k1, k2 = jax.random.split(key)
        self.norm = eqx.nn.LayerNorm(D)
        self.attn = eqx.nn.MultiheadAttention(HEADS, D, key=k1)
        self.mlp = eqx.nn.MLP(D, D, 2 * D, 1, key=k2)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.vmap(self.norm)(x)
        mask = jnp.tril(jnp.ones((x.shape[0], x.shape[0]), bool))
        x = x + self.attn(h, h, h, mask)
        return x + jax.vmap(self.mlp)(x)


class EinsumCausalAttention(nnx.Module):
    """Attention on raw params through einsum; the mask from ``jnp.arange`` of the length (NNX, batched)."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        init = nnx.initializers.lecun_normal()
        self.wq = nnx.Param(init(rngs.params(), (D, HEADS, D // HEADS)))
        self.wk = nnx.Param(init(rngs.params(), (D, HEADS, D // HEADS)))
        self.wv = nnx.Param(init(rngs.params(), (D, HEADS, D // HEADS)))
        self.wo = nnx.Param(init(rngs.params(), (HEADS, D // HEADS, D)))

    def __call__(self, x: jax.Array) -> jax.Array:
        q = jnp.einsum("btd,dhk->bthk", x, self.wq[...])
        k = jnp.einsum("btd,dhk->bthk", x, self.wk[...])
        v = jnp.einsum("btd,dhk->bthk", x, self.wv[...])
        t = x.shape[1]
        causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
        scores = jnp.einsum("bqhk,bshk->bhqs", q, k) / jnp.sqrt(D // HEADS)
        weights = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
        return x + jnp.einsum("bhqs,bshk,hkd->bqd", weights, v, self.wo[...])


@settings(max_examples=4, deadline=None)
@given(length=st.integers(3, 6), other=st.integers(2, 11))
def test_an_equinox_block_with_a_mask_from_the_length_runs_at_every_length(length, other):
    block = CausalBlock(jax.random.key(0))
    lifted = pzb.lift(block, jnp.ones((length, D)), strict=True)
    for size in (length, other):
        x = jax.random.normal(jax.random.key(size), (size, D))
        assert_outputs_match(lifted.positional(x), block(x), same_computation=False)


@settings(max_examples=4, deadline=None)
@given(length=st.integers(3, 6), other=st.integers(2, 11))
def test_nnx_einsum_attention_with_a_mask_from_the_length_runs_at_every_length(length, other):
    model = EinsumCausalAttention(nnx.Rngs(0))
    lifted = pzb.lift(model, jnp.ones((2, length, D)), strict=True)
    for size in (length, other):
        x = jax.random.normal(jax.random.key(size), (2, size, D))
        assert_outputs_match(lifted.positional(x), model(x), same_computation=False)


def test_the_mask_s_axes_read_the_input_s_length_at_call_time():
    lifted = pzb.lift(CausalBlock(jax.random.key(1)), jnp.ones((4, D)), strict=True)
    built = pzb.select(lifted).at_instances_of(Iota).get_sequence()
    assert len(built) == 2
    # Each entry: (axis name, size at the example, the input axis whose size it has at call time).
    assert all(source for layer in built for _, _, source in layer.sizes), [layer.sizes for layer in built]
