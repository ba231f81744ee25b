"""Small models of the three kinds the intervention tools must handle, with their originals for references.

- a pzb.nn model (``Attention.from_config`` inside a residual);
- stock layers lifted: ``eqx.nn.MultiheadAttention`` and ``nnx.MultiHeadAttention``;
- a traced custom Equinox model: einsum attention on raw ``W_Q/W_K/W_V/W_O`` arrays.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from flax import nnx

import pzbridge as pzb

HEADS, D_MODEL, HEAD_SIZE, VOCAB = 3, 6, 2, 7


class RawAttention(eqx.Module):
    """Causal attention the way research code writes it: heads live in the weights."""

    W_Q: jax.Array
    W_K: jax.Array
    W_V: jax.Array
    W_O: jax.Array

    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v = (jnp.einsum("sd,hdk->hsk", x, w) for w in (self.W_Q, self.W_K, self.W_V))
        scores = jnp.einsum("hqk,hsk->hqs", q, k) / jnp.sqrt(q.shape[-1])
        scores = jnp.where(jnp.tril(jnp.ones((x.shape[0], x.shape[0]), bool)), scores, -1e9)
        z = jnp.einsum("hqs,hsk->hqk", jax.nn.softmax(scores, axis=-1), v)
        return jnp.einsum("hqk,hkd->qd", z, self.W_O)


class TinyLM(eqx.Module):
    """Embedding, two residual attention layers, unembedding."""

    embed: jax.Array
    attns: list
    unembed: jax.Array

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed[tokens]
        for attn in self.attns:
            x = x + attn(x)
        return x @ self.unembed


def raw_attention(key: jax.Array) -> RawAttention:
    ks = jax.random.split(key, 4)
    shapes = [(HEADS, D_MODEL, HEAD_SIZE)] * 3 + [(HEADS, HEAD_SIZE, D_MODEL)]
    return RawAttention(*(jax.random.normal(k, s) / math.sqrt(s[1]) for k, s in zip(ks, shapes)))


def tiny_lm(seed: int) -> TinyLM:
    ks = jax.random.split(jax.random.key(seed), 4)
    return TinyLM(jax.random.normal(ks[0], (VOCAB, D_MODEL)), [raw_attention(ks[1]), raw_attention(ks[2])],
                  jax.random.normal(ks[3], (D_MODEL, VOCAB)) / math.sqrt(D_MODEL))


def tokens(seed: int, batch: int, seq: int) -> jax.Array:
    return jax.random.randint(jax.random.key(seed + 1000), (batch, seq), 0, VOCAB)


def lifted_tiny_lm(seed: int, seq: int = 5) -> tuple[TinyLM, pzb.bridge.lifted.LiftedModel]:
    model = tiny_lm(seed)
    return model, pzb.lift(model, jnp.arange(seq) % VOCAB, strict=True)


def pzb_attention(seed: int) -> pzb.nn.Sequential:
    """``Residual(Attention)`` then a final linear map, all pzb.nn."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    attn = pzb.nn.Attention.from_config("attn", k1, d_model=D_MODEL, num_heads=HEADS, qk_size=HEAD_SIZE)
    head = pzb.nn.Linear.from_config("head", k2, {"features": D_MODEL}, {"features": D_MODEL})
    return pzb.nn.Sequential([pzb.nn.Residual(attn), head])


def eqx_mha(seed: int) -> eqx.nn.MultiheadAttention:
    return eqx.nn.MultiheadAttention(HEADS, D_MODEL, key=jax.random.key(seed))


def nnx_mha(seed: int) -> nnx.MultiHeadAttention:
    return nnx.MultiHeadAttention(HEADS, D_MODEL, HEADS * HEAD_SIZE, rngs=nnx.Rngs(seed), decode=False)


def stream(seed: int, *shape: int) -> jax.Array:
    return jax.random.normal(jax.random.key(seed + 2000), shape)
