"""Traced lifting of a custom Equinox transformer: lift time at 7B shape, run and compile time ratios.

The model is written the way research code is: token embedding looked up with
``jax.vmap``, blocks with a hand-written RMSNorm, einsum attention on raw
``W_Q / W_K / W_V / W_O`` arrays (TransformerLens layout) and an
``eqx.nn.MLP`` applied with ``jax.vmap``, residual adds in ``__call__``, and a
tied unembedding ``x @ embed.weight.T``. Without example inputs it lifts to
``Foreign``; with them every part is traced into pzbridge layers.

Side by side in one process (interleaved repetitions, medians):

- traced ``pzb.lift(model, tokens)`` of a 32-block 7B-shaped model (d_model
  4096, 32 heads, MLP 11008, vocabulary 32000) built with
  ``eqx.filter_eval_shape`` (target <= 2 s), and ``pzb.lower`` of it;
- jitted forward, traced lifted / original (target <= 1.02);
- eager forward, traced lifted / original (target <= 2);
- trace + lower + compile after ``jax.clear_caches()`` (target <= 1.2);
- the same blocks made by ``eqx.filter_vmap`` and run by ``lax.scan``
  (lifted to a ``LayerStack``): jitted run and trace + compile ratios, and
  the traced lift time.

The original runs as ``jax.vmap`` of the model over a batch; the lifted model
on a named ``batch`` axis (no vmap), its variables passed as frozen values.

Run: ``python benchmarks/tracing_bench.py``.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

import pzbridge as pzb
from pzbridge.core.variables import unbind_variables

sys.path.insert(0, str(Path(__file__).parent))
from equinox_bench import _median_compile_times, _median_run_times  # noqa: E402


class RMSNorm(eqx.Module):
    scale: jax.Array

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * self.scale


class Attention(eqx.Module):
    W_Q: jax.Array
    W_K: jax.Array
    W_V: jax.Array
    W_O: jax.Array

    def __call__(self, x: jax.Array) -> jax.Array:
        seq = x.shape[0]
        q, k, v = (jnp.einsum("sd,hdk->hsk", x, w) for w in (self.W_Q, self.W_K, self.W_V))
        scores = jnp.einsum("hqk,hsk->hqs", q, k) / jnp.sqrt(q.shape[-1])
        scores = jnp.where(jnp.tril(jnp.ones((seq, seq), bool)), scores, -1e9)
        return jnp.einsum("hqs,hsk,hkd->qd", jax.nn.softmax(scores, axis=-1), v, self.W_O)


class Block(eqx.Module):
    ln1: RMSNorm
    attn: Attention
    ln2: RMSNorm
    mlp: eqx.nn.MLP

    def __init__(self, d: int, heads: int, hidden: int, key: jax.Array) -> None:
        ks = jax.random.split(key, 5)
        shape = (heads, d, d // heads)
        self.ln1, self.ln2 = RMSNorm(jnp.ones(d)), RMSNorm(jnp.ones(d))
        self.attn = Attention(*(jax.random.normal(k, shape) * d ** -0.5 for k in ks[:3]),
                              jax.random.normal(ks[3], (heads, d // heads, d)) * d ** -0.5)
        self.mlp = eqx.nn.MLP(d, d, hidden, 1, activation=jax.nn.gelu, key=ks[4])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x))
        return x + jax.vmap(self.mlp)(self.ln2(x))


class Transformer(eqx.Module):
    embed: eqx.nn.Embedding
    blocks: list[Block]
    final: RMSNorm

    def __init__(self, vocab: int, d: int, heads: int, hidden: int, depth: int, key: jax.Array) -> None:
        keys = jax.random.split(key, depth + 1)
        self.embed = eqx.nn.Embedding(vocab, d, key=keys[0])
        self.blocks = [Block(d, heads, hidden, k) for k in keys[1:]]
        self.final = RMSNorm(jnp.ones(d))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = jax.vmap(self.embed)(tokens)
        for block in self.blocks:
            x = block(x)
        return self.final(x) @ self.embed.weight.T


class StackedTransformer(eqx.Module):
    """The same blocks made by ``eqx.filter_vmap`` and run by ``jax.lax.scan`` (lifts to a ``LayerStack``)."""

    embed: eqx.nn.Embedding
    blocks: Block
    final: RMSNorm

    def __init__(self, vocab: int, d: int, heads: int, hidden: int, depth: int, key: jax.Array) -> None:
        keys = jax.random.split(key, 2)
        self.embed = eqx.nn.Embedding(vocab, d, key=keys[0])
        self.blocks = eqx.filter_vmap(lambda k: Block(d, heads, hidden, k))(jax.random.split(keys[1], depth))
        self.final = RMSNorm(jnp.ones(d))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = jax.vmap(self.embed)(tokens)
        arrays, static = eqx.partition(self.blocks, eqx.is_array)
        x, _ = jax.lax.scan(lambda h, block: (eqx.combine(block, static)(h), None), x, arrays)
        return self.final(x) @ self.embed.weight.T


def _original(model: eqx.Module) -> tuple[Callable[..., Any], Any]:
    params, static = eqx.partition(model, eqx.is_array)
    return (lambda p, batch: jax.vmap(eqx.combine(p, static))(batch)), params


def _traced(model: eqx.Module, example: jax.Array) -> tuple[Callable[..., Any], Any]:
    structure, values = unbind_variables(pzb.lift(model, example), freeze=True)

    def run(vals: Any, batch: jax.Array) -> jax.Array:
        out, _ = structure.stateless_call(vals, pzb.nx.wrap(batch, "batch", "seq"))
        return out.unwrap("batch", "seq", "vocabulary")

    return run, values


def _eager_times(fns: list[tuple[Callable, Any]], batch: jax.Array, reps: int) -> list[float]:
    times: list[list[float]] = [[] for _ in fns]
    for fn, args in fns:
        jax.block_until_ready(fn(args, batch))
    for _ in range(reps):
        for i, (fn, args) in enumerate(fns):
            start = time.perf_counter()
            jax.block_until_ready(fn(args, batch))
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def _seven_b(reps: int, cls: type | None = None) -> tuple[float, float, int]:
    model = eqx.filter_eval_shape(cls or Transformer, 32000, 4096, 32, 11008, 32, jax.random.key(0))
    tokens = jax.ShapeDtypeStruct((128,), jnp.int32)
    lift_times, lower_times = [], []
    for _ in range(reps):
        start = time.perf_counter()
        lifted = pzb.lift(model, tokens, strict=True)
        lift_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        lowered = pzb.lower(lifted)
        lower_times.append(time.perf_counter() - start)
    assert jax.tree_util.tree_structure(lowered) == jax.tree_util.tree_structure(model)
    residuals = pzb.select(lifted).at_instances_of(pzb.nn.Residual).count()
    return statistics.median(lift_times), statistics.median(lower_times), residuals


def tracing_rows(reps: int = 7, calls: int = 10) -> list[dict[str, Any]]:
    """Measures every row (see the module docstring); times in seconds."""
    model = Transformer(512, 128, 4, 512, 4, jax.random.key(0))
    batch = jnp.arange(8 * 64).reshape(8, 64) % 512
    fns = [_original(model), _traced(model, batch[0])]
    want, got = jax.jit(fns[0][0])(fns[0][1], batch), jax.jit(fns[1][0])(fns[1][1], batch)
    error = float(jnp.max(jnp.abs(want - got)) / jnp.max(jnp.abs(want)))
    run = _median_run_times(fns, batch, reps, calls)
    eager = _eager_times(fns, batch, max(3, reps // 2))
    compile_ = _median_compile_times(fns, batch, max(3, reps // 2))
    lift_time, lower_time, residuals = _seven_b(max(3, reps // 2))
    stacked_7b, _, _ = _seven_b(max(3, reps // 2), StackedTransformer)
    stacked = StackedTransformer(512, 128, 4, 512, 4, jax.random.key(0))
    start = time.perf_counter()
    stacked_fns = [_original(stacked), _traced(stacked, batch[0])]
    stacked_lift = time.perf_counter() - start
    stacked_run = _median_run_times(stacked_fns, batch, reps, calls)
    stacked_compile = _median_compile_times(stacked_fns, batch, max(3, reps // 2))
    return [
        dict(metric=f"jitted run (max rel diff {error:.1e})", original=run[0], lifted=run[1],
             ratio=run[1] / run[0], target="<=1.02"),
        dict(metric="eager run", original=eager[0], lifted=eager[1], ratio=eager[1] / eager[0], target="<=2"),
        dict(metric="trace+compile", original=compile_[0], lifted=compile_[1], ratio=compile_[1] / compile_[0],
             target="<=1.2"),
        dict(metric=f"7B traced pzb.lift ({residuals} Residuals)", original=None, lifted=lift_time, ratio=None,
             target="<=2s"),
        dict(metric="7B pzb.lower", original=None, lifted=lower_time, ratio=None, target=""),
        dict(metric="scan stack: jitted run", original=stacked_run[0], lifted=stacked_run[1],
             ratio=stacked_run[1] / stacked_run[0], target="<=1.02"),
        dict(metric="scan stack: trace+compile", original=stacked_compile[0], lifted=stacked_compile[1],
             ratio=stacked_compile[1] / stacked_compile[0], target="<=1.2"),
        dict(metric="scan stack: traced pzb.lift (4 blocks)", original=None, lifted=stacked_lift, ratio=None,
             target=""),
        dict(metric="7B scan stack: traced pzb.lift (32 blocks)", original=None, lifted=stacked_7b, ratio=None,
             target="<=2s"),
    ]


def main() -> None:
    """Prints the table."""
    print(f"{'metric':<40} {'original':>10} {'lifted':>11} {'ratio':>7} {'target':>7}")
    for row in tracing_rows():
        original = "" if row["original"] is None else f"{row['original'] * 1e3:.2f}ms"
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.3f}"
        print(f"{row['metric']:<40} {original:>10} {row['lifted'] * 1e3:>9.2f}ms {ratio:>7} {row['target']:>7}")


if __name__ == "__main__":
    main()
