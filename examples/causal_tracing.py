"""Causal tracing of a fact in a small Equinox language model, every restoration in one worlds pass.

Run: ``python examples/causal_tracing.py`` (CPU, well under a minute, no downloads).

1. An Equinox transformer written as research code (an ``eqx.nn.Embedding``
   called under ``jax.vmap``, learned positions, ``eqx.nn.MultiheadAttention``
   with a causal mask, MLPs under ``jax.vmap``) is trained here on synthetic
   facts: a subject is two tokens ``(first, last)`` and the prompt
   ``first last IS`` must be answered with the subject's attribute (a random
   table, so the model has to combine both subject tokens). Attention is
   local (each token sees itself and the token before), so what ``IS``
   learns about the subject passes through the subject's last token.
2. ``pzb.lift(model, example)`` traces it into explicit layers. Causal
   tracing then runs, in *one* forward pass, a stack of worlds on a named
   ``worlds`` axis: world 0 is the clean run; every other world has Gaussian
   noise (three times the embeddings' spread) added to the subject tokens'
   embeddings (an ``AddVector`` whose noise carries ``worlds``, zero in
   world 0); world ``2 + L * SEQ + p`` additionally restores the clean
   residual stream after block ``L`` at position ``p``
   (``patch_worlds(..., Where(module=f"blocks.{L}", index={"seq": p}))``).
3. The table shows, per block and position, the share of the clean answer's
   probability that restoring that one state brings back:
   ``(p_restored - p_corrupted) / (p_clean - p_corrupted)``.

The last line reports the best recovery from restoring the subject's last
token (the row of the second subject token).
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
from pzbridge.toolshed.interventions import AddVector, insert_intervention
from pzbridge.toolshed.where import Where
from pzbridge.toolshed.worlds import patch_worlds, stack_worlds

FIRSTS, LASTS, ATTRIBUTES = 8, 8, 8
FIRST0, LAST0, IS, ATTR0 = 0, FIRSTS, FIRSTS + LASTS, FIRSTS + LASTS + 1
VOCAB, SEQ = ATTR0 + ATTRIBUTES, 3
D_MODEL, HEADS, LAYERS, WINDOW = 64, 4, 4, 2
STEPS, LEARNING_RATE, SEED, NOISE_SAMPLES = 300, 3e-3, 0, 4
POSITION_NAMES = ("first", "last*", "IS")  # * the subject's last token


class Block(eqx.Module):
    attn: eqx.nn.MultiheadAttention
    mlp: eqx.nn.MLP

    def __call__(self, x: jax.Array) -> jax.Array:
        # Local causal attention: a token sees itself and the WINDOW - 1 tokens before it.
        length = x.shape[0]
        local = jnp.tril(jnp.ones((length, length), bool)) & ~jnp.tril(jnp.ones((length, length), bool), -WINDOW)
        x = x + self.attn(x, x, x, mask=local)
        return x + jax.vmap(self.mlp)(x)


class FactLM(eqx.Module):
    embed: eqx.nn.Embedding
    pos: jax.Array
    blocks: list
    unembed: jax.Array

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = jax.vmap(self.embed)(tokens) + self.pos[: tokens.shape[0]]
        for block in self.blocks:
            x = block(x)
        return x @ self.unembed


def init_model(key: jax.Array) -> FactLM:
    keys = jax.random.split(key, 3 + 2 * LAYERS)
    blocks = [Block(eqx.nn.MultiheadAttention(HEADS, D_MODEL, key=keys[3 + 2 * i]),
                    eqx.nn.MLP(D_MODEL, D_MODEL, 4 * D_MODEL, 1, key=keys[4 + 2 * i])) for i in range(LAYERS)]
    return FactLM(eqx.nn.Embedding(VOCAB, D_MODEL, key=keys[0]),
                  0.1 * jax.random.normal(keys[1], (SEQ, D_MODEL)), blocks,
                  jax.random.normal(keys[2], (D_MODEL, VOCAB)) / math.sqrt(D_MODEL))


def facts() -> tuple[jax.Array, jax.Array]:
    """Every subject's prompt ``(first, last, IS)`` and its attribute token."""
    first, last = np.meshgrid(np.arange(FIRSTS), np.arange(LASTS), indexing="ij")
    attribute = np.random.default_rng(SEED).integers(0, ATTRIBUTES, (FIRSTS, LASTS))
    prompts = np.stack([FIRST0 + first.ravel(), LAST0 + last.ravel(), np.full(first.size, IS)], axis=1)
    return jnp.asarray(prompts), jnp.asarray(ATTR0 + attribute.ravel())


def train(prompts: jax.Array, answers: jax.Array) -> FactLM:
    model = init_model(jax.random.key(SEED))
    optimizer = optax.adam(LEARNING_RATE)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))

    def loss_fn(m: FactLM) -> jax.Array:
        logits = jax.vmap(m)(prompts)[:, -1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, answers).mean()

    @eqx.filter_jit
    def step(m: FactLM, state: optax.OptState):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(m)
        updates, state = optimizer.update(grads, state, eqx.filter(m, eqx.is_array))
        return eqx.apply_updates(m, updates), state, loss

    for i in range(STEPS):
        model, opt_state, loss = step(model, opt_state)
        if i % 100 == 0 or i == STEPS - 1:
            print(f"step {i:4d}  loss {float(loss):.4f}")
    return model


def main() -> None:
    start = time.perf_counter()
    prompts, answers = facts()
    model = train(prompts, answers)
    print(f"trained in {time.perf_counter() - start:.1f} s")
    lifted = pzb.lift(model, prompts[0], strict=True)

    worlds = 2 + LAYERS * SEQ
    noise_scale = 3.0 * float(jnp.std(model.embed.weight))
    noise = noise_scale * jax.random.normal(jax.random.key(SEED + 2), (NOISE_SAMPLES, D_MODEL * 2))
    subject = np.zeros((SEQ, 1), np.float32)
    subject[:2] = 1.0  # the two subject tokens are corrupted
    # One noise sample per batch row (facts x samples), the same in every corrupted world, none in world 0.
    per_row = np.repeat(np.asarray(noise).reshape(NOISE_SAMPLES, 2, D_MODEL), len(prompts), axis=0)
    rows = np.zeros((NOISE_SAMPLES * len(prompts), SEQ, D_MODEL), np.float32)
    rows[:, :2] = per_row
    in_worlds = np.concatenate([np.zeros((1, *rows.shape), np.float32), np.broadcast_to(rows, (worlds - 1, *rows.shape))])
    corrupt = AddVector(pzb.nx.wrap(jnp.asarray(in_worlds * subject), "worlds", "batch", "seq", "features"))
    traced = insert_intervention(lifted, Where(module="embed"), corrupt)
    for layer in range(LAYERS):
        for position in range(SEQ):
            routes = list(range(worlds))
            routes[2 + layer * SEQ + position] = 0  # this world reads the clean state here
            traced = patch_worlds(traced, Where(module=f"blocks.{layer}", index={"seq": position}), routes)

    batch = jnp.tile(prompts, (NOISE_SAMPLES, 1))
    targets = jnp.tile(answers, NOISE_SAMPLES)
    tokens = stack_worlds([pzb.nx.wrap(batch, "batch", "seq")] * worlds)
    slots, values = pzb.unbind_variables(traced, freeze=True)
    logits = jax.jit(lambda vals, x: slots.stateless_call(vals, x)[0])(values, tokens)
    # The output projection keeps the name of its input axis, so the vocabulary is "features" here.
    probs = jax.nn.softmax(logits[{"seq": -1}].unwrap("worlds", "batch", "features"), axis=-1)
    p_answer = np.asarray(jnp.take_along_axis(probs, jnp.broadcast_to(targets[None, :, None], (worlds, len(batch), 1)),
                                              axis=-1)[..., 0].mean(axis=1))
    clean, corrupted = float(p_answer[0]), float(p_answer[1])
    table = (p_answer[2:].reshape(LAYERS, SEQ) - corrupted) / (clean - corrupted)
    print(f"p(answer): clean {clean:.3f}, subject corrupted {corrupted:.3f}")
    print("recovered share of p(answer) by restoring one state (rows: position, columns: after block)")
    print("position " + " ".join(f"{layer:>7d}" for layer in range(LAYERS)))
    for position, name in enumerate(POSITION_NAMES):
        print(f"{name:8s} " + " ".join(f"{table[layer, position]:7.3f}" for layer in range(LAYERS)))
    subject_last = table[:, 1]
    best_layer = int(np.argmax(subject_last))
    recovered = float(subject_last[best_layer])
    assert clean - corrupted > 0.3, (clean, corrupted)
    assert recovered >= 0.5, subject_last
    print(f"restoring the subject's last token after block {best_layer} recovers {recovered:.2f} of the answer: OK "
          f"({time.perf_counter() - start:.1f} s)")
    print(f"RESULT causal_tracing: recovered_fraction={recovered:.3f}")


if __name__ == "__main__":
    main()
