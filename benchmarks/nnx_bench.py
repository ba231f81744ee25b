"""NNX bridge benchmark: lifted vs original run time, trace+compile time, and lift/lower time at 7B shape.

Rows (measured side by side in one process, interleaved repetitions, median):

- ``run <model>``: jitted call of the lifted model (variables unbound and
  passed as frozen values) / ``nnx.jit`` call of the original (target <= 1.02);
- ``compile <model>``: trace + lower + compile of the same two functions
  (target <= 1.2);
- ``lift 7B`` / ``lower 7B``: seconds to lift / lower a 32-block model shaped
  like a 7B LLaMA (d_model 4096, 32 heads, MLP 11008, vocab 32000) built with
  ``nnx.eval_shape`` (no weights allocated; target <= 1 s).

Models: a small NNX transformer (Embed, causal MultiHeadAttention, MLP,
RMSNorm, tied ``attend``; a custom root, so its lifted form is ``Foreign``
around lifted blocks) and one ``MultiHeadAttention`` (lifted natively: every
attention step is a pzbridge layer).

Usage: ``python benchmarks/nnx_bench.py``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import pzbridge as pzb
from pzbridge.core.variables import bind_variables, unbind_variables


class Block(nnx.Module):
    """Pre-norm transformer block (RMSNorm, causal attention, MLP)."""

    def __init__(self, d: int, heads: int, hidden: int, rngs: nnx.Rngs) -> None:
        self.norm1 = nnx.RMSNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, d, use_bias=False, decode=False, rngs=rngs)
        self.norm2 = nnx.RMSNorm(d, rngs=rngs)
        self.mlp = nnx.Sequential(nnx.Linear(d, hidden, use_bias=False, rngs=rngs), nnx.silu,
                                  nnx.Linear(hidden, d, use_bias=False, rngs=rngs))

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.mlp(self.norm2(x))


class Transformer(nnx.Module):
    """Decoder-only transformer with tied embeddings."""

    def __init__(self, vocab: int, d: int, heads: int, hidden: int, layers: int, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.blocks = nnx.List([Block(d, heads, hidden, rngs) for _ in range(layers)])
        self.norm = nnx.RMSNorm(d, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed(tokens)
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.embed.attend(self.norm(x))


def _median_time(fn: Callable[[], Any], reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def _pair(model: nnx.Module, x: jax.Array) -> tuple[Callable[[], Any], Callable[[], Any], Callable[[], Any],
                                                    Callable[[], Any]]:
    """(run original, run lifted, compile original, compile lifted) closures."""
    graphdef, state = nnx.split(model)
    # Both sides take plain pytrees of arrays, so per-call dispatch costs are comparable.
    leaves, state_def = jax.tree.flatten(state)
    state = leaves
    slots, values = unbind_variables(pzb.lift(model), freeze=True)

    def original(leaves: Any, x: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, jax.tree.unflatten(state_def, leaves), copy=True)(x)

    def lifted(values: Any, x: jax.Array) -> jax.Array:
        return bind_variables(slots, [v.unfreeze_as_copy() for v in values]).positional(x)

    run_original, run_lifted = jax.jit(original), jax.jit(lifted)
    run_original(state, x), run_lifted(values, x)  # warm up
    return (
        lambda: run_original(state, x),
        lambda: run_lifted(values, x),
        lambda: jax.jit(lambda s, a: original(s, a)).lower(state, x).compile(),
        lambda: jax.jit(lambda v, a: lifted(v, a)).lower(values, x).compile(),
    )


def _ratio_rows(name: str, model: nnx.Module, x: jax.Array, run_reps: int, compile_reps: int) -> list[tuple]:
    run_o, run_l, comp_o, comp_l = _pair(model, x)
    rows = []
    for kind, (fo, fl), reps in (("run", (run_o, run_l), run_reps), ("compile", (comp_o, comp_l), compile_reps)):
        to, tl = [], []
        for _ in range(reps):  # interleaved
            to += _median_time(fo, 1)
            tl += _median_time(fl, 1)
        mo, ml = statistics.median(to), statistics.median(tl)
        target = 1.02 if kind == "run" else 1.2
        rows.append((f"{kind} {name}", mo, ml, ml / mo, target))
    return rows


def _seven_b_rows(reps: int = 3) -> list[tuple]:
    abstract = nnx.eval_shape(lambda: Transformer(32000, 4096, 32, 11008, 32, nnx.Rngs(0)))
    lift_times, lower_times = [], []
    for _ in range(reps):
        start = time.perf_counter()
        lifted = pzb.lift(abstract)
        lift_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        pzb.lower(lifted)
        lower_times.append(time.perf_counter() - start)
    return [("lift 7B (s)", None, statistics.median(lift_times), None, 1.0),
            ("lower 7B (s)", None, statistics.median(lower_times), None, 1.0)]


def nnx_rows(small: bool = False) -> list[tuple[str, float | None, float, float | None, float]]:
    """The benchmark rows: ``(name, original seconds, lifted seconds, ratio, target)``.

    For the 7B rows the "lifted" column is the lift / lower time and the
    target is in seconds. ``small`` shrinks the models (for a quick check).

    Example:
        >>> rows = nnx_rows(small=True)  # doctest: +SKIP
    """
    d, heads, hidden, layers, seq, batch = (32, 4, 64, 2, 16, 2) if small else (256, 8, 1024, 4, 128, 8)
    reps = 3 if small else 30
    model = Transformer(1000, d, heads, hidden, layers, nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (batch, seq), 0, 1000)
    mha = nnx.MultiHeadAttention(heads, d, decode=False, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(1), (batch, seq, d))
    rows = _ratio_rows("transformer", model, tokens, reps, 3 if small else 7)
    rows += _ratio_rows("mha", mha, x, reps, 3 if small else 7)
    return rows + _seven_b_rows(1 if small else 3)


def main() -> None:
    """Prints the table."""
    print(f"{'row':<22} {'original':>10} {'lifted':>10} {'ratio':>7} {'target':>7}")
    for name, original, lifted, ratio, target in nnx_rows():
        o = "" if original is None else f"{original * 1e3:9.2f}ms"
        l = f"{lifted:9.3f}s " if ratio is None else f"{lifted * 1e3:9.2f}ms"
        r = "" if ratio is None else f"{ratio:7.3f}"
        print(f"{name:<22} {o:>10} {l:>10} {r:>7} {target:>7}")


if __name__ == "__main__":
    main()
