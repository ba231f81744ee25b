"""Lifted vs original Equinox models: run time, trace+compile time, and lift/lower time at 7B shape.

Side by side in one process:

- **transformer**: a user-written Equinox transformer (``Embedding``,
  custom pre-norm residual blocks with ``MultiheadAttention``, ``MLP`` and
  ``LayerNorm``, output ``Linear``), batch via ``jax.vmap`` for the original
  and a named ``batch`` axis for the lifted model;
- **cnn**: ``eqx.nn.Sequential`` of ``Conv2d`` + ``Lambda(relu)`` layers
  (lifted to native pzbridge convolutions on named axes, no vmap).

The original runs as ``jax.jit`` of ``vmap(combine(params, static))``; the
lifted model as ``jax.jit`` of ``stateless_call`` on its frozen variable
values (the arrays are arguments in both, never baked-in constants).
Reported: median jitted run time ratio (target <= 1.02), median
trace+lower+compile time ratio after ``jax.clear_caches()`` (target <= 1.2),
and ``pzb.lift`` / ``pzb.lower`` wall time of a 32-block, 7B-shaped model
(d_model 4096, 32 heads, MLP 11008, vocabulary 32000) built with
``eqx.filter_eval_shape`` (target <= 1 s each).

Run: ``.venv/bin/python benchmarks/equinox_bench.py``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

import pzbridge as pzb
from pzbridge.core import named_axes as nx
from pzbridge.core.variables import unbind_variables


class Block(eqx.Module):
    """A pre-norm transformer block (kept ``Foreign`` by the bridge; its layers lift natively)."""

    ln1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    ln2: eqx.nn.LayerNorm
    mlp: eqx.nn.MLP

    def __init__(self, d: int, heads: int, hidden: int, key: jax.Array) -> None:
        k1, k2 = jax.random.split(key)
        self.ln1, self.ln2 = eqx.nn.LayerNorm(d), eqx.nn.LayerNorm(d)
        self.attn = eqx.nn.MultiheadAttention(heads, d, key=k1)
        self.mlp = eqx.nn.MLP(d, d, hidden, 1, activation=jax.nn.gelu, key=k2)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.vmap(self.ln1)(x)
        x = x + self.attn(h, h, h, jnp.tril(jnp.ones((x.shape[0], x.shape[0]), bool)))
        return x + jax.vmap(self.mlp)(jax.vmap(self.ln2)(x))


class Transformer(eqx.Module):
    """Token ids ``(seq,)`` -> logits ``(seq, vocab)``."""

    embedding: eqx.nn.Embedding
    blocks: list[Block]
    head: eqx.nn.Linear

    def __init__(self, vocab: int, d: int, heads: int, hidden: int, depth: int, key: jax.Array) -> None:
        keys = jax.random.split(key, depth + 2)
        self.embedding = eqx.nn.Embedding(vocab, d, key=keys[0])
        self.blocks = [Block(d, heads, hidden, k) for k in keys[1:-1]]
        self.head = eqx.nn.Linear(d, vocab, key=keys[-1])

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = jax.vmap(self.embedding)(tokens)
        for block in self.blocks:
            x = block(x)
        return jax.vmap(self.head)(x)


def _cnn(key: jax.Array) -> eqx.nn.Sequential:
    k = jax.random.split(key, 3)
    relu = eqx.nn.Lambda(jax.nn.relu)
    return eqx.nn.Sequential([
        eqx.nn.Conv2d(3, 16, 3, padding=1, key=k[0]), relu,
        eqx.nn.Conv2d(16, 32, 3, stride=2, padding=1, key=k[1]), relu,
        eqx.nn.Conv2d(32, 32, 3, padding=1, key=k[2]), relu,
    ])


def _original_fn(model: eqx.Module) -> tuple[Callable[..., Any], Any]:
    params, static = eqx.partition(model, eqx.is_array)
    return (lambda p, batch: jax.vmap(eqx.combine(p, static))(batch)), params


def _lifted_fn(model: eqx.Module) -> tuple[Callable[..., Any], Any]:
    structure, values = unbind_variables(pzb.lift(model), freeze=True)
    convention = structure.convention

    def run(vals: Any, batch: jax.Array) -> jax.Array:
        (named,) = [a.tag_prefix("batch") for a in convention.name_inputs([batch])]
        out, _ = structure.stateless_call(vals, named)
        return convention.unname_output(out.untag_prefix("batch") if nx.is_namedarray(out) else out)

    return run, values


def _median_run_times(fns: list[tuple[Callable, Any]], batch: jax.Array, reps: int, calls: int) -> list[float]:
    jitted = [(jax.jit(fn), args) for fn, args in fns]
    for fn, args in jitted:
        jax.block_until_ready(fn(args, batch))
    times: list[list[float]] = [[] for _ in jitted]
    for _ in range(reps):
        for i, (fn, args) in enumerate(jitted):
            start = time.perf_counter()
            for _ in range(calls):
                out = fn(args, batch)
            jax.block_until_ready(out)
            times[i].append((time.perf_counter() - start) / calls)
    return [statistics.median(t) for t in times]


def _median_compile_times(fns: list[tuple[Callable, Any]], batch: jax.Array, reps: int) -> list[float]:
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, (fn, args) in enumerate(fns):
            jax.clear_caches()
            start = time.perf_counter()
            jax.jit(fn).lower(args, batch).compile()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def _check_same(fns: list[tuple[Callable, Any]], batch: jax.Array) -> float:
    (f0, a0), (f1, a1) = fns
    want, got = jax.jit(f0)(a0, batch), jax.jit(f1)(a1, batch)
    return float(jnp.max(jnp.abs(want - got)) / jnp.max(jnp.abs(want)))


def _seven_b_times(reps: int) -> tuple[float, float]:
    model = eqx.filter_eval_shape(Transformer, 32000, 4096, 32, 11008, 32, jax.random.key(0))
    lift_times, lower_times = [], []
    for _ in range(reps):
        start = time.perf_counter()
        lifted = pzb.lift(model)
        lift_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        lowered = pzb.lower(lifted)
        lower_times.append(time.perf_counter() - start)
    assert jax.tree_util.tree_structure(lowered) == jax.tree_util.tree_structure(model)
    return statistics.median(lift_times), statistics.median(lower_times)


def equinox_rows(reps: int = 7, calls: int = 10) -> list[dict[str, Any]]:
    """Measures every row of the table (see the module docstring).

    Args:
      reps: Interleaved repetitions (medians are reported).
      calls: Jitted calls per run-time repetition.

    Returns:
      Rows ``{"case", "metric", "original", "lifted", "ratio", "target"}``
      (times in seconds; the 7B rows have ``original`` None).
    """
    key = jax.random.key(0)
    cases = {
        "transformer": (Transformer(512, 128, 4, 512, 4, key), jnp.arange(8 * 64).reshape(8, 64) % 512),
        "cnn": (_cnn(key), jnp.sin(jnp.arange(16 * 3 * 32 * 32, dtype=jnp.float32)).reshape(16, 3, 32, 32)),
    }
    rows: list[dict[str, Any]] = []
    for name, (model, batch) in cases.items():
        fns = [_original_fn(model), _lifted_fn(model)]
        error = _check_same(fns, batch)
        run = _median_run_times(fns, batch, reps, calls)
        compile_ = _median_compile_times(fns, batch, max(3, reps // 2))
        rows.append(dict(case=name, metric=f"jitted run (max rel diff {error:.1e})", original=run[0],
                         lifted=run[1], ratio=run[1] / run[0], target=1.02))
        rows.append(dict(case=name, metric="trace+compile", original=compile_[0], lifted=compile_[1],
                         ratio=compile_[1] / compile_[0], target=1.2))
    lift_time, lower_time = _seven_b_times(max(3, reps // 2))
    rows.append(dict(case="7B-shaped (abstract)", metric="pzb.lift", original=None, lifted=lift_time,
                     ratio=None, target=1.0))
    rows.append(dict(case="7B-shaped (abstract)", metric="pzb.lower", original=None, lifted=lower_time,
                     ratio=None, target=1.0))
    return rows


def main() -> None:
    """Prints the table."""
    print(f"{'case':<22} {'metric':<34} {'original':>10} {'lifted':>10} {'ratio':>7} {'target':>7}")
    for row in equinox_rows():
        original = "" if row["original"] is None else f"{row['original'] * 1e3:.2f}ms"
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.3f}"
        target = f"<={row['target']}" + ("" if row["ratio"] is not None else "s")
        print(f"{row['case']:<22} {row['metric']:<34} {original:>10} {row['lifted'] * 1e3:>8.2f}ms {ratio:>7} "
              f"{target:>7}")


if __name__ == "__main__":
    main()
