"""One LoRA training step: the pzbridge-lowered model vs a hand-written equivalent.

For each framework a small transformer (custom attention from ``Linear``
projections, MLP, norms) is lifted, LoRA is added to every attention
projection with ``loraify_linears_in_selection``, and the model is lowered.
The hand-written equivalent is the same architecture built directly with
LoRA layers (``nnx.LoRALinear``; for Equinox a user-written LoRA module).
Both are trained with the framework's own APIs (``eqx.filter_value_and_grad``
+ optax on ``eqx.partition``; ``nnx.Optimizer(wrt=nnx.LoRAParam)`` under
``nnx.jit``). Timings are interleaved repetitions of one compiled step; the
table shows medians and the ratio lowered / hand-written (target <= 1.05).

Run: ``python benchmarks/lora_bench.py``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import pzbridge as pzb
from pzbridge.bridge.equinox.lora import lora_filter
from pzbridge.nn.foreign import Foreign
from pzbridge.nn.linear import Linear
from pzbridge.toolshed.lora import loraify_linears_in_selection

D, HEADS, VOCAB, SEQ, BATCH, RANK, BLOCKS = 128, 4, 256, 64, 8, 8, 2


def _attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    split = lambda a: a.reshape(*a.shape[:-1], HEADS, D // HEADS)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    logits = jnp.einsum("...qhd,...khd->...hqk", q, k) / jnp.sqrt(D // HEADS)
    mask = jnp.tril(jnp.ones((q.shape[-3], q.shape[-3]), bool))
    weights = jax.nn.softmax(jnp.where(mask, logits, -1e9), axis=-1)
    out = jnp.einsum("...hqk,...khd->...qhd", weights, v)
    return out.reshape(*out.shape[:-2], D)


# ----------------------------------------------------------------------------- Equinox


class HandLoRA(eqx.Module):
    """What a user writes by hand: a Linear plus A, B."""

    linear: eqx.nn.Linear
    a: jax.Array
    b: jax.Array

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear(x) + (x @ self.a) @ self.b


class EqxAttention(eqx.Module):
    query: Any
    key: Any
    value: Any
    out: Any

    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v = (jax.vmap(layer)(x) for layer in (self.query, self.key, self.value))
        return jax.vmap(self.out)(_attend(q, k, v))


class EqxBlock(eqx.Module):
    norm1: eqx.nn.LayerNorm
    attn: EqxAttention
    norm2: eqx.nn.LayerNorm
    up: eqx.nn.Linear
    down: eqx.nn.Linear

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(jax.vmap(self.norm1)(x))
        return x + jax.vmap(self.down)(jax.nn.gelu(jax.vmap(self.up)(jax.vmap(self.norm2)(x))))


class EqxTransformer(eqx.Module):
    embed: eqx.nn.Embedding
    blocks: list
    head: eqx.nn.Linear

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = jax.vmap(self.embed)(tokens)
        for block in self.blocks:
            x = block(x)
        return jax.vmap(self.head)(x)


def _eqx_model(key: jax.Array, hand_lora: bool) -> EqxTransformer:
    keys = iter(jax.random.split(key, 64))

    def proj() -> Any:
        linear = eqx.nn.Linear(D, D, key=next(keys))
        if not hand_lora:
            return linear
        return HandLoRA(linear, jax.random.normal(next(keys), (D, RANK)) / D**0.5, jnp.zeros((RANK, D)))

    blocks = [
        EqxBlock(eqx.nn.LayerNorm(D), EqxAttention(proj(), proj(), proj(), proj()), eqx.nn.LayerNorm(D),
                 eqx.nn.Linear(D, 4 * D, key=next(keys)), eqx.nn.Linear(4 * D, D, key=next(keys)))
        for _ in range(BLOCKS)
    ]
    return EqxTransformer(eqx.nn.Embedding(VOCAB, D, key=next(keys)), blocks, eqx.nn.Linear(D, VOCAB, key=next(keys)))


def _eqx_step(model: Any, is_trainable: Any) -> Callable[[], Any]:
    tokens = jax.random.randint(jax.random.key(1), (BATCH, SEQ), 0, VOCAB)
    targets = jnp.roll(tokens, -1, axis=1)
    trainable, frozen = eqx.partition(model, is_trainable)
    optimizer = optax.adam(1e-3)
    state = {"trainable": trainable, "opt": optimizer.init(trainable)}

    @eqx.filter_jit
    def step(trainable: Any, opt_state: Any) -> Any:
        def loss_fn(t: Any) -> jax.Array:
            logits = jax.vmap(eqx.combine(t, frozen))(tokens)
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

        loss, grads = eqx.filter_value_and_grad(loss_fn)(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return eqx.apply_updates(trainable, updates), opt_state, loss

    def run() -> Any:
        state["trainable"], state["opt"], loss = step(state["trainable"], state["opt"])
        return loss.block_until_ready()

    return run


def _hand_filter(model: Any) -> Any:
    def mark(node: Any) -> Any:
        if isinstance(node, HandLoRA):
            falses = jax.tree_util.tree_map(lambda _: False, node)
            return eqx.tree_at(lambda m: (m.a, m.b), falses, (True, True))
        return False

    return jax.tree_util.tree_map(mark, model, is_leaf=lambda node: isinstance(node, HandLoRA))


def _projections(lifted: Any, class_name: str) -> Any:
    attention = pzb.select(lifted).at_subtrees_where(
        lambda node: isinstance(node, Foreign) and node.template.class_name == class_name
    )
    return attention.at_instances_of(Linear)


def equinox_steps() -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(lowered step, hand-written step) for Equinox."""
    base = _eqx_model(jax.random.key(0), hand_lora=False)
    lowered = pzb.lower(loraify_linears_in_selection(_projections(pzb.lift(base), "EqxAttention"), RANK,
                                                     jax.random.key(2)))
    hand = _eqx_model(jax.random.key(0), hand_lora=True)
    return _eqx_step(lowered, lora_filter(lowered)), _eqx_step(hand, _hand_filter(hand))


# ----------------------------------------------------------------------------- NNX


class NnxAttention(nnx.Module):
    def __init__(self, make: Callable[[], Any]) -> None:
        self.query, self.key, self.value, self.out = make(), make(), make(), make()

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(_attend(self.query(x), self.key(x), self.value(x)))


class NnxBlock(nnx.Module):
    def __init__(self, make: Callable[[], Any], rngs: nnx.Rngs) -> None:
        self.norm1 = nnx.LayerNorm(D, rngs=rngs)
        self.attn = NnxAttention(make)
        self.norm2 = nnx.LayerNorm(D, rngs=rngs)
        self.up = nnx.Linear(D, 4 * D, rngs=rngs)
        self.down = nnx.Linear(4 * D, D, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class NnxTransformer(nnx.Module):
    def __init__(self, hand_lora: bool, rngs: nnx.Rngs) -> None:
        def make() -> Any:
            if hand_lora:
                return nnx.LoRALinear(D, D, lora_rank=RANK, rngs=rngs)
            return nnx.Linear(D, D, rngs=rngs)

        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.blocks = nnx.List([NnxBlock(make, rngs) for _ in range(BLOCKS)])
        self.head = nnx.Linear(D, VOCAB, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _nnx_step(model: Any) -> Callable[[], Any]:
    tokens = jax.random.randint(jax.random.key(1), (BATCH, SEQ), 0, VOCAB)
    targets = jnp.roll(tokens, -1, axis=1)
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model: Any, optimizer: Any) -> jax.Array:
        def loss_fn(m: Any) -> jax.Array:
            return optax.softmax_cross_entropy_with_integer_labels(m(tokens), targets).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    return lambda: step(model, optimizer).block_until_ready()


def nnx_steps() -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(lowered step, hand-written step) for NNX."""
    base = NnxTransformer(False, nnx.Rngs(0))
    lowered = pzb.lower(loraify_linears_in_selection(_projections(pzb.lift(base), "NnxAttention"), RANK,
                                                     jax.random.key(2)))
    hand = NnxTransformer(True, nnx.Rngs(0))
    # The lowered model is structurally the hand-written one: same classes, same graphdef.
    assert nnx.graphdef(lowered) == nnx.graphdef(hand)
    return _nnx_step(lowered), _nnx_step(hand)


# ----------------------------------------------------------------------------- timing


def _interleaved_medians(first: Callable[[], Any], second: Callable[[], Any], repeats: int) -> tuple[float, float]:
    for fn in (first, second):
        fn()  # Compile.
        fn()
    a, b = [], []
    for i in range(repeats):
        # Alternate which one goes first, so drift on a shared machine hits both alike.
        order = ((first, a), (second, b)) if i % 2 == 0 else ((second, b), (first, a))
        for fn, times in order:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b)


def lora_rows(repeats: int = 60) -> list[tuple[str, float, float, float]]:
    """Rows ``(framework, lowered ms, hand-written ms, ratio)``.

    Example:
        >>> callable(lora_rows)
        True
    """
    rows = []
    for name, make in (("equinox", equinox_steps), ("nnx", nnx_steps)):
        lowered, hand = make()
        t_lowered, t_hand = _interleaved_medians(lowered, hand, repeats)
        rows.append((name, t_lowered * 1e3, t_hand * 1e3, t_lowered / t_hand))
    return rows


def main() -> None:
    """Prints the table."""
    print(f"LoRA training step (d={D}, heads={HEADS}, seq={SEQ}, batch={BATCH}, rank={RANK}, blocks={BLOCKS}), "
          f"{jax.devices()[0].platform}")
    print(f"{'framework':<10}{'lowered ms':>12}{'hand ms':>10}{'ratio':>8}")
    for name, lowered, hand, ratio in lora_rows():
        print(f"{name:<10}{lowered:>12.2f}{hand:>10.2f}{ratio:>8.3f}")


if __name__ == "__main__":
    main()
