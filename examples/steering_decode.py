"""Steering a Flax NNX language model while it decodes through its KV cache.

Run: ``python examples/steering_decode.py`` (CPU, well under a minute, no downloads).

1. A custom ``nnx.Module`` language model (embedding, two blocks of
   ``nnx.MultiHeadAttention`` + MLP, tied output) is trained here on a
   synthetic task with two modes: a sequence starts with a mode token,
   ``UP`` (each next token is the previous + 1) or ``SKIP`` (+ 3), modulo
   ``NUMBERS``.
2. A decoding copy (``decode=True``, ``init_cache``) is lifted by traced
   lifting, ``pzb.lift(model, one_token)``: each attention keeps NNX's decode
   cache as ``StateVariable``s.
3. The steering vector is the difference of the embedding layer's output
   on the two mode tokens (captured with ``capture_intermediates``).
   ``steer`` adds it at absolute position 0 (the mode token) of a prompt in
   ``UP`` mode. ``cached_greedy_decode`` feeds the prompt one token per call
   (NNX's decode cache takes one at a time), then each generated token, one
   jitted pure call each; the steered copy's position counter advances with
   the caches, so "position 0" is the first token, not the first token of
   every call.
4. Checks: the steered cached decode gives the same tokens and logits as
   (a) the same steered model recomputing the whole growing sequence from
   empty caches at every step and (b) the original NNX model run on the full
   sequence (causal mask, no cache) with the same steering written into its
   code; and the original module's cache never moved.

The last line reports how many generated tokens steering changed and
whether the cached decode equals the recomputation.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import pzbridge as pzb
from pzbridge.toolshed.decoding import cached_greedy_decode, recompute_greedy_decode
from pzbridge.toolshed.intermediates import capture_intermediates
from pzbridge.toolshed.steering import cache_start, steer
from pzbridge.toolshed.where import Where

NUMBERS = 14
UP, SKIP = NUMBERS, NUMBERS + 1  # mode tokens
VOCAB, D_MODEL, HEADS, SEQ = NUMBERS + 2, 32, 2, 10
STEPS, BATCH, LEARNING_RATE, SEED = 200, 64, 3e-3, 0
DECODE_STEPS, SCALE, POSITION = 6, 1.0, 0


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.norm = nnx.RMSNorm(D_MODEL, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=HEADS, in_features=D_MODEL, use_bias=False, decode=False,
                                           rngs=rngs)
        self.mlp = nnx.Sequential(nnx.Linear(D_MODEL, 4 * D_MODEL, rngs=rngs), nnx.gelu,
                                  nnx.Linear(4 * D_MODEL, D_MODEL, rngs=rngs))

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        x = x + self.attn(self.norm(x), mask=mask)
        return x + self.mlp(x)


class LM(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(VOCAB, D_MODEL, rngs=rngs)
        self.blocks = nnx.List([Block(rngs) for _ in range(2)])
        self.norm = nnx.RMSNorm(D_MODEL, rngs=rngs)
        self.decode = False

    def __call__(self, tokens: jax.Array, steering: tuple | None = None) -> jax.Array:
        # steering = (vector, position): the reference of step 4, written into the model's own code.
        x = self.embed(tokens)
        if steering is not None:
            vector, position = steering
            x = x + (jnp.arange(tokens.shape[-1]) == position)[:, None] * vector
        mask = None if self.decode else nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask=mask)
        return self.embed.attend(self.norm(x))


def sequences(key: jax.Array, n: int) -> jax.Array:
    k_mode, k_start = jax.random.split(key)
    skip = jax.random.bernoulli(k_mode, 0.5, (n, 1))
    start = jax.random.randint(k_start, (n, 1), 0, NUMBERS)
    numbers = (start + jnp.where(skip, 3, 1) * jnp.arange(SEQ - 1)[None, :]) % NUMBERS
    return jnp.concatenate([jnp.where(skip, SKIP, UP), numbers], axis=1)


def train() -> LM:
    model = LM(nnx.Rngs(SEED))
    optimizer = nnx.Optimizer(model, optax.adam(LEARNING_RATE), wrt=nnx.Param)

    @nnx.jit
    def step(model: LM, optimizer: nnx.Optimizer, tokens: jax.Array) -> jax.Array:
        def loss_fn(model: LM) -> jax.Array:
            logits = model(tokens[:, :-1])[:, 1:]  # the first number is not predictable
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 2:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    key = jax.random.key(SEED + 1)
    for i in range(STEPS):
        key, sub = jax.random.split(key)
        loss = step(model, optimizer, sequences(sub, BATCH))
        if i % 100 == 0 or i == STEPS - 1:
            print(f"step {i:4d}  loss {float(loss):.3f}")
    return model


def decoding_copy(model: LM, batch: int, length: int) -> LM:
    copy = nnx.clone(model)
    copy.decode = True
    for block in copy.blocks:
        block.attn.decode = True
        block.attn.init_cache((batch, length, D_MODEL))
    return copy


def main() -> None:
    start = time.perf_counter()
    model = train()
    print(f"trained in {time.perf_counter() - start:.1f} s")

    prompt_ids = jnp.array([[UP, 2, 3, 4, 5]])
    prompt = pzb.nx.wrap(prompt_ids, "batch", "seq")
    decoding = decoding_copy(model, 1, prompt_ids.shape[1] + DECODE_STEPS)
    lifted = pzb.lift(decoding, prompt_ids[:, :1], strict=True)  # traced: every activation is reachable

    site = Where(module="embed")  # the token embeddings
    _, up = capture_intermediates(lifted, site, pzb.nx.wrap(jnp.array([[UP]]), "batch", "seq"))
    _, skip = capture_intermediates(lifted, site, pzb.nx.wrap(jnp.array([[SKIP]]), "batch", "seq"))
    (path,) = up
    vector = (skip[path] - up[path])[{"batch": 0, "seq": 0}]  # named {features}

    steered = steer(lifted, site, vector, positions=(POSITION,), scale=SCALE)
    plain = cached_greedy_decode(lifted, prompt, DECODE_STEPS, prefill=False)
    cached = cached_greedy_decode(steered, prompt, DECODE_STEPS, prefill=False)
    recomputed = recompute_greedy_decode(steered, prompt, DECODE_STEPS, prefill=False)

    plain_tokens = np.asarray(plain.tokens.unwrap("batch", "seq"))[0]
    tokens = np.asarray(cached.tokens.unwrap("batch", "seq"))[0]
    logits = np.asarray(cached.logits.unwrap("batch", "seq", "vocabulary"))[0]
    print(f"prompt           {prompt_ids[0].tolist()}  (UP = {UP}: +1 mode, SKIP = {SKIP}: +3 mode; "
          f"steered: embedding of position {POSITION} + (SKIP - UP))")
    print(f"unsteered decode {plain_tokens.tolist()}")
    print(f"steered decode   {tokens.tolist()}")

    # Reference: the original NNX model on the whole growing sequence, steering in its own code.
    sequence, native_tokens, native_logits = prompt_ids, [], []
    steering = (vector.unwrap("features") * SCALE, POSITION)
    for _ in range(DECODE_STEPS):
        last = model(sequence, steering)[0, -1]
        native_tokens.append(int(last.argmax()))
        native_logits.append(np.asarray(last))
        sequence = jnp.concatenate([sequence, jnp.array([[native_tokens[-1]]])], axis=1)
    again_tokens = np.asarray(recomputed.tokens.unwrap("batch", "seq"))[0]
    again_logits = np.asarray(recomputed.logits.unwrap("batch", "seq", "vocabulary"))[0]
    # Not bitwise: attention over the masked cache differs in op order from the full causal pass.
    same = (np.array_equal(tokens, again_tokens) and np.allclose(logits, again_logits, atol=1e-4)
            and tokens.tolist() == native_tokens and np.allclose(logits, np.stack(native_logits), atol=1e-4))
    print(f"full recomputation (pzbridge, empty caches each step) {again_tokens.tolist()}")
    print(f"full recomputation (original NNX model, causal mask)  {native_tokens}")
    untouched = int(decoding.blocks[0].attn.cache_index[...]) == 0 and cache_start(lifted) == 0
    changed = int((tokens != plain_tokens).sum())
    assert untouched, "steering a copy must leave the original's cache alone"
    assert changed >= 1 and same, (changed, same)
    print(f"steering changed {changed} of {DECODE_STEPS} tokens; cached == recomputed: OK "
          f"({time.perf_counter() - start:.1f} s)")
    print(f"RESULT steering_decode: changed_tokens={changed} cached_equals_recompute={str(same).lower()}")


if __name__ == "__main__":
    main()
