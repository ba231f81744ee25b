"""Deeply nested models: ``pzb.lift``, the lifted call and ``pzb.lower`` at depth 10 / 100 / 1,000 (issue 13).

Four nestings of one ``Linear(4, 4)``, each wrapper holding the previous model:

- **eqx Sequential**: ``eqx.nn.Sequential([m])`` (lifted natively; its calling
  convention is read from the layers inside, the case that was exponential);
- **eqx wrapper**: a user ``eqx.Module`` whose ``__call__`` calls its ``inner``
  (lifted as ``Foreign``);
- **nnx Sequential**: ``nnx.Sequential(m)`` (the convention case in NNX,
  quadratic before);
- **nnx wrapper**: a user ``nnx.Module`` calling its ``inner`` (``Foreign``).

Reported per row: the median wall time of ``pzb.lift``, of one eager call of
the lifted model (``.positional``) and of ``pzb.lower``, and the lift time per
nesting level (flat when lifting is linear in depth). Native models are built
and called inside :func:`~pzbridge.bridge.context.recursion_headroom`:
at depth 1,000 Equinox's module constructor and NNX's graph functions also
recurse past Python's default limit. The native ``eqx.nn.Sequential`` call is
not timed (Equinox's own ``Sequential.__call__`` takes 34 s at depth 400).

Run: ``python benchmarks/depth_bench.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import pzbridge as pzb
from pzbridge.testing.deep_models import eqx_sequentials, eqx_wrappers, nnx_sequentials, nnx_wrappers

DEPTHS = (10, 100, 1_000)


NESTINGS: dict[str, tuple[Callable[[int], Any], jax.Array]] = {
    "eqx Sequential": (eqx_sequentials, jnp.ones(4)),
    "eqx wrapper": (eqx_wrappers, jnp.ones(4)),
    "nnx Sequential": (nnx_sequentials, jnp.ones((2, 4))),
    "nnx wrapper": (nnx_wrappers, jnp.ones((2, 4))),
}


def _median_time(fn: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _row(name: str, model: Any, x: jax.Array, depth: int, reps: int) -> dict[str, Any]:
    lifted = pzb.lift(model)
    lifted.positional(x)  # Compiles the ops once, outside the timing.
    return {
        "nesting": name, "depth": depth,
        "lift": _median_time(lambda: pzb.lift(model), reps),
        "call": _median_time(lambda: jax.block_until_ready(lifted.positional(x)), reps),
        "lower": _median_time(lambda: pzb.lower(lifted), reps),
    }


def depth_rows(depths: tuple[int, ...] = DEPTHS, reps: int = 5) -> list[dict[str, Any]]:
    """One row per nesting and depth: lift, call and lower times in seconds.

    Example:
        >>> rows = depth_rows((2,), reps=1)
        >>> sorted(rows[0])
        ['call', 'depth', 'lift', 'lower', 'nesting']
    """
    return [_row(name, build(depth), x, depth, reps) for name, (build, x) in NESTINGS.items() for depth in depths]


def main() -> None:
    """Prints the table."""
    print(f"{'nesting':<16} {'depth':>6} {'lift':>10} {'lift/level':>11} {'call':>10} {'lower':>10}")
    for row in depth_rows():
        per_level = row["lift"] / row["depth"] * 1e6
        print(f"{row['nesting']:<16} {row['depth']:>6} {row['lift'] * 1e3:>8.1f}ms {per_level:>9.0f}µs "
              f"{row['call'] * 1e3:>8.1f}ms {row['lower'] * 1e3:>8.1f}ms")


if __name__ == "__main__":
    main()
