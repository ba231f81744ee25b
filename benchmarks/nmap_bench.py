"""Trace-time cost of ``pzb.nx.nmap`` versus plain JAX and penzai's ``nmap``.

The workload is an attention-like positional block (projections, scores,
softmax, MLP) over ``(seq, features)``, vectorised over four named batch
axes. Tracing is what ``nmap`` adds (after ``jit`` the compiled program is
the same), so we time ``jax.make_jaxpr`` on a fresh function each time (no
trace cache), interleaving the variants and taking medians:

- ``plain_batched``: hand-written batched JAX (leading batch axes, no vmap);
- ``plain_vmap``: flatten the batch axes, one ``jax.vmap``, reshape back;
- ``pzbridge``: ``pzb.nx.nmap`` over the four names;
- ``penzai``: ``penzai.core.named_axes.nmap`` (one vmap per name).

Run: ``python benchmarks/nmap_bench.py``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

BATCH = {"b1": 2, "b2": 3, "b3": 2, "b4": 2}
SEQ, FEATURES, HIDDEN = 8, 16, 32


def block(x: jax.Array, wq: jax.Array, wk: jax.Array, w1: jax.Array, w2: jax.Array) -> jax.Array:
    """Attention-like positional computation on one ``(seq, features)`` example."""
    q, k = x @ wq, x @ wk
    attn = jax.nn.softmax(q @ k.T / jnp.sqrt(FEATURES), axis=-1)
    h = jax.nn.relu((attn @ x) @ w1)
    return x + h @ w2


def block_batched(x: jax.Array, wq: jax.Array, wk: jax.Array, w1: jax.Array, w2: jax.Array) -> jax.Array:
    """The same computation written by hand for any leading batch axes."""
    q, k = x @ wq, x @ wk
    attn = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / jnp.sqrt(FEATURES), axis=-1)
    h = jax.nn.relu((attn @ x) @ w1)
    return x + h @ w2


def _inputs() -> tuple[jax.Array, list[jax.Array]]:
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], tuple(BATCH.values()) + (SEQ, FEATURES))
    shapes = [(FEATURES, FEATURES), (FEATURES, FEATURES), (FEATURES, HIDDEN), (HIDDEN, FEATURES)]
    weights = [jax.random.normal(k, s) for k, s in zip(keys[1:], shapes)]
    return x, weights


def _variants() -> dict[str, tuple[Callable[..., Any], tuple[Any, ...]]]:
    from pzbridge.core import named_axes as nx

    x, weights = _inputs()
    batch_shape = tuple(BATCH.values())

    def plain_vmap(x: jax.Array, *w: jax.Array) -> jax.Array:
        flat = x.reshape((-1, SEQ, FEATURES))
        out = jax.vmap(block, in_axes=(0, None, None, None, None))(flat, *w)
        return out.reshape(batch_shape + (SEQ, FEATURES))

    def pzbridge(x_named: Any, *w: jax.Array) -> Any:
        return nx.nmap(block)(x_named, *w)

    variants = {
        "plain_batched": (block_batched, (x, *weights)),
        "plain_vmap": (plain_vmap, (x, *weights)),
        "pzbridge": (pzbridge, (nx.wrap(x).tag_prefix(*BATCH), *weights)),
    }
    try:
        from penzai.core import named_axes as pz_nx
    except ImportError:  # penzai is an optional benchmark dependency.
        return variants

    def penzai(x_named: Any, *w: jax.Array) -> Any:
        return pz_nx.nmap(block)(x_named, *w)

    variants["penzai"] = (penzai, (pz_nx.wrap(x).tag_prefix(*BATCH), *weights))
    return variants


def _trace_seconds(fn: Callable[..., Any], args: tuple[Any, ...]) -> float:
    fresh = lambda *a: fn(*a)  # noqa: E731 - a new function object defeats trace caches.
    start = time.perf_counter()
    jax.make_jaxpr(fresh)(*args)
    return time.perf_counter() - start


def nmap_trace_rows(repetitions: int = 60, warmup: int = 5) -> list[dict[str, Any]]:
    """Median trace time per variant and its ratio to the two plain-JAX baselines.

    Args:
      repetitions: Timed repetitions per variant (interleaved across variants).
      warmup: Untimed repetitions first (imports, primitive caches).

    Returns:
      One dict per variant: ``variant``, ``median_ms``, ``vs_plain_vmap``,
      ``vs_plain_batched``.

    Example:
        >>> rows = nmap_trace_rows(repetitions=2, warmup=1)  # doctest: +SKIP
        >>> sorted(r["variant"] for r in rows)  # doctest: +SKIP
        ['penzai', 'plain_batched', 'plain_vmap', 'pzbridge']
    """
    variants = _variants()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(warmup + repetitions):
        for name, (fn, args) in variants.items():
            seconds = _trace_seconds(fn, args)
            if rep >= warmup:
                times[name].append(seconds)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    return [
        {
            "variant": name,
            "median_ms": 1e3 * median,
            "vs_plain_vmap": median / medians["plain_vmap"],
            "vs_plain_batched": median / medians["plain_batched"],
        }
        for name, median in medians.items()
    ]


def main() -> None:
    """Prints the table of trace-time ratios."""
    rows = nmap_trace_rows()
    names = ", ".join(f"{n}:{s}" for n, s in BATCH.items())
    print(f"nmap trace time: attention-like block over ({SEQ}, {FEATURES}) with named batch axes {{{names}}}")
    print(f"{'variant':<15}{'median ms':>11}{'vs plain_vmap':>15}{'vs plain_batched':>18}")
    for row in rows:
        print(f"{row['variant']:<15}{row['median_ms']:>11.2f}{row['vs_plain_vmap']:>15.2f}{row['vs_plain_batched']:>18.2f}")
    by_name = {row["variant"]: row for row in rows}
    if "penzai" in by_name:
        print(f"pzbridge / penzai: {by_name['pzbridge']['median_ms'] / by_name['penzai']['median_ms']:.2f}")


if __name__ == "__main__":
    main()
