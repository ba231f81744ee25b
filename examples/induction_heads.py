"""Induction heads in a 2-layer attention-only transformer, found by head knockout on the lifted model.

Run: ``python examples/induction_heads.py`` (CPU, about half a minute, no downloads).

1. An Equinox attention-only transformer written as research code is: raw
   ``W_Q / W_K / W_V / W_O`` arrays with a ``heads`` dimension, einsum
   attention, a causal mask, learned positions. Layer 0 has many small
   heads, layer 1 one wide head.
2. It is trained here (optax, a few thousand steps) on repeated random
   token sequences: a random segment of length ``P`` (different for every
   sequence, so no fixed-offset shortcut exists) repeated to fill the
   context. Tokens after the first repeat are predictable only by finding
   the previous occurrence of the current token and copying what followed
   it: an induction circuit.
3. ``pzb.lift(model, example)`` traces the custom modules into explicit
   pzbridge layers. The residual stream entering layer 1 is captured with a
   ``Where(module="layers.1", side="before")``; from it the script computes
   each head's induction score (attention from a repeated token to the token
   after its previous occurrence) and names the head with the highest score
   the induction head.
4. Every head is knocked out in turn with
   ``knockout_heads(lifted, h, at=Where(label="layers.L.W_O", side="before"))``
   (zeroing the head's output before the output projection) and the
   second-half loss is compared with the clean loss and ``ln V``:
   ``F = (ablated - clean) / (ln V - clean)``.

The last line reports F for the induction head and the largest F of every
other head.
"""

from __future__ import annotations

import math
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import pzbridge as pzb
from pzbridge.toolshed.ablation import knockout_heads
from pzbridge.toolshed.intermediates import capture_intermediates
from pzbridge.toolshed.where import Where

VOCAB, SEQ = 32, 24
D_MODEL = 32
HEADS, HEAD_SIZE = (16, 1), (2, 16)  # per layer: many narrow heads, then one wide head
STEPS, BATCH, LEARNING_RATE = 3000, 32, 3e-3
SEED = 0


class Attention(eqx.Module):
    """Causal multi-head attention on raw arrays: W_Q/W_K/W_V (heads, d_model, d_head), W_O (heads, d_head, d_model)."""

    W_Q: jax.Array
    W_K: jax.Array
    W_V: jax.Array
    W_O: jax.Array

    def __call__(self, x: jax.Array) -> jax.Array:
        q = jnp.einsum("sd,hdk->hsk", x, self.W_Q)
        k = jnp.einsum("sd,hdk->hsk", x, self.W_K)
        v = jnp.einsum("sd,hdk->hsk", x, self.W_V)
        scores = jnp.einsum("hqk,hsk->hqs", q, k) / jnp.sqrt(q.shape[-1])
        causal = jnp.tril(jnp.ones((x.shape[0], x.shape[0]), bool))
        weights = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
        z = jnp.einsum("hqs,hsk->hqk", weights, v)
        return jnp.einsum("hqk,hkd->qd", z, self.W_O)


class AttentionOnly(eqx.Module):
    """Token and position embeddings, attention layers added to the residual stream, unembedding."""

    embed: jax.Array
    pos: jax.Array
    layers: list
    unembed: jax.Array

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed[tokens] + self.pos[: tokens.shape[0]]
        for layer in self.layers:
            x = x + layer(x)
        return x @ self.unembed


def init_model(key: jax.Array) -> AttentionOnly:
    keys = jax.random.split(key, 4)

    def attention(key: jax.Array, heads: int, size: int) -> Attention:
        kq, kk, kv, ko = jax.random.split(key, 4)
        qkv = [jax.random.normal(k, (heads, D_MODEL, size)) / math.sqrt(D_MODEL) for k in (kq, kk, kv)]
        return Attention(*qkv, jax.random.normal(ko, (heads, size, D_MODEL)) / math.sqrt(heads * size))

    layer_keys = jax.random.split(keys[2], len(HEADS))
    return AttentionOnly(
        embed=jax.random.normal(keys[0], (VOCAB, D_MODEL)),
        pos=0.5 * jax.random.normal(keys[1], (SEQ, D_MODEL)),
        layers=[attention(k, h, s) for k, h, s in zip(layer_keys, HEADS, HEAD_SIZE)],
        unembed=jax.random.normal(keys[3], (D_MODEL, VOCAB)) / math.sqrt(D_MODEL),
    )


def repeated_sequences(key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """``n`` sequences, each a random segment of a random period in [SEQ/4, SEQ/2] tiled to SEQ tokens."""
    k_tokens, k_period = jax.random.split(key)
    segments = jax.random.randint(k_tokens, (n, SEQ // 2), 0, VOCAB)
    periods = jax.random.randint(k_period, (n, 1), SEQ // 4, SEQ // 2 + 1)
    return jnp.take_along_axis(segments, jnp.arange(SEQ)[None, :] % periods, axis=1), periods[:, 0]


def token_losses(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Next-token cross-entropy at positions 0..SEQ-2: (batch, SEQ-1)."""
    log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]


def train(seed: int) -> AttentionOnly:
    model = init_model(jax.random.key(seed))
    optimizer = optax.adamw(LEARNING_RATE, weight_decay=0.01)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))

    def loss_fn(m: AttentionOnly, tokens: jax.Array) -> jax.Array:
        return token_losses(jax.vmap(m)(tokens), tokens).mean()

    @eqx.filter_jit
    def step(m: AttentionOnly, state: optax.OptState, key: jax.Array):
        tokens, _ = repeated_sequences(key, BATCH)
        loss, grads = eqx.filter_value_and_grad(loss_fn)(m, tokens)
        updates, state = optimizer.update(grads, state, eqx.filter(m, eqx.is_array))
        return eqx.apply_updates(m, updates), state, loss

    key = jax.random.key(seed + 1)
    for i in range(STEPS):
        key, sub = jax.random.split(key)
        model, opt_state, loss = step(model, opt_state, sub)
        if i % 1000 == 0 or i == STEPS - 1:
            print(f"step {i:5d}  loss {float(loss):.3f}")
    return model


def second_half_loss(lifted: pzb.bridge.lifted.LiftedModel, tokens: pzb.nx.NamedArray) -> float:
    """Mean next-token loss over the second half of the sequence (every token there is a repeat)."""
    logits = lifted(tokens).unwrap("batch", "seq", "features")
    return float(token_losses(logits, tokens.unwrap("batch", "seq"))[:, SEQ // 2 :].mean())


def induction_scores(model: AttentionOnly, lifted, tokens: pzb.nx.NamedArray, periods: jax.Array) -> dict:
    """Per head: mean attention from each second-half position t to t - period + 1 (the token after the last occurrence)."""
    scores = {}
    for layer, attention in enumerate(model.layers):
        # The residual stream entering this layer's attention, captured on the lifted model.
        _, acts = capture_intermediates(lifted, Where(module=f"layers.{layer}", side="before"), tokens)
        (stream,) = acts.values()
        x = stream.unwrap("batch", "seq", "features")
        q = jnp.einsum("bsd,hdk->bhsk", x, attention.W_Q)
        k = jnp.einsum("bsd,hdk->bhsk", x, attention.W_K)
        logits = jnp.einsum("bhqk,bhsk->bhqs", q, k) / math.sqrt(q.shape[-1])
        weights = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((SEQ, SEQ), bool)), logits, -1e9), axis=-1)
        query = jnp.arange(SEQ // 2, SEQ)
        target = query[None, :] - periods[:, None] + 1  # (batch, queries)
        picked = jnp.take_along_axis(weights[:, :, SEQ // 2 :, :], target[:, None, :, None], axis=-1)
        for head in range(attention.W_O.shape[0]):
            scores[(layer, head)] = float(picked[:, head].mean())
    return scores


def main() -> None:
    start = time.perf_counter()
    model = train(SEED)
    print(f"trained in {time.perf_counter() - start:.1f} s")

    test_tokens, periods = repeated_sequences(jax.random.key(12345), 256)
    example = test_tokens[0]
    lifted = pzb.lift(model, example, strict=True)  # traced: the custom modules become pzbridge layers
    assert pzb.select(lifted).at_instances_of(pzb.nn.Foreign).count() == 0
    np.testing.assert_allclose(lifted.positional(example), model(example), rtol=1e-4, atol=1e-4)

    tokens = pzb.nx.wrap(test_tokens, "batch", "seq")
    clean = second_half_loss(lifted, tokens)
    ln_v = math.log(VOCAB)
    print(f"clean second-half loss {clean:.3f}   ln V = {ln_v:.3f}")

    scores = induction_scores(model, lifted, tokens, periods)
    fractions = {}
    print("layer head  induction-score  knockout-fraction")
    for (layer, head), score in scores.items():
        site = Where(label=f"layers.{layer}.W_O", side="before")  # the per-head outputs, before W_O
        knocked = knockout_heads(lifted, head, at=site)
        fractions[(layer, head)] = (second_half_loss(knocked, tokens) - clean) / (ln_v - clean)
        print(f"{layer:5d} {head:4d}  {score:15.3f}  {fractions[(layer, head)]:17.3f}")

    induction = max(scores, key=scores.get)
    f = fractions[induction]
    g = max(v for k, v in fractions.items() if k != induction)
    print(f"induction head: layer {induction[0]} head {induction[1]} (score {scores[induction]:.2f})")
    assert f >= 0.7 and g <= 0.3, (f, g)
    print(f"knocking out the induction head undoes induction, other heads matter little: OK "
          f"({time.perf_counter() - start:.1f} s)")
    print(f"RESULT induction_heads: knockout_fraction={f:.3f} other_heads_max_fraction={g:.3f}")


if __name__ == "__main__":
    main()
