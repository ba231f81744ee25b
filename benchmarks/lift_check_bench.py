"""Traced lifting of an 8-block custom Equinox transformer: what the checks after the trace cost.

A traced ``pzb.lift`` checks the lifted model's output shapes against the
module's. The module's shapes come from the root trace itself (they are its
``out_shape``); this benchmark measures, side by side in one process
(interleaved repetitions, medians):

- traced ``pzb.lift(model, tokens)`` at sequence length 64;
- the same lift with the check evaluating the module again
  (``traced_output=None``: how the check worked before it reused the root
  trace);
- ``eqx.filter_eval_shape(model, tokens)``: that one abstract evaluation of
  the whole module on its own;
- traced ``pzb.lift(model, tokens[:1])``: an example with a size-1 axis,
  traced on a widened copy and checked on the original example (values too,
  as the example is concrete).

Run: ``python benchmarks/lift_check_bench.py``.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

import pzbridge as pzb
from pzbridge.bridge import api
from pzbridge.bridge.output_check import check_output_shapes

sys.path.insert(0, str(Path(__file__).parent))
from tracing_bench import Transformer


def _lift_reevaluating(model: Any, tokens: jax.Array) -> Any:
    """``pzb.lift`` with the output check given no root-trace shapes (it evaluates the module again)."""
    api.check_output_shapes = lambda *args, traced_output=None: check_output_shapes(*args)
    try:
        return pzb.lift(model, tokens, strict=True)
    finally:
        api.check_output_shapes = check_output_shapes


def lift_check_rows(reps: int = 5, depth: int = 8) -> list[dict[str, Any]]:
    """Medians in seconds of the three measurements of the module docstring."""
    model = Transformer(512, 64, 4, 128, depth, jax.random.key(0))
    tokens = jnp.arange(64) % 512
    one = tokens[:1]
    runs: dict[str, list[float]] = {"lift": [], "lift_reevaluating": [], "eval_shape": [], "lift_size_one": []}
    steps = {"lift": lambda: pzb.lift(model, tokens, strict=True),
             "lift_reevaluating": lambda: _lift_reevaluating(model, tokens),
             "eval_shape": lambda: eqx.filter_eval_shape(model, tokens),
             "lift_size_one": lambda: pzb.lift(model, one, strict=True)}
    for step in steps.values():
        step()  # warm the primitive caches
    for _ in range(reps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            runs[name].append(time.perf_counter() - start)
    lifted = pzb.lift(model, one, strict=True)
    assert jnp.allclose(lifted.positional(one), model(one), atol=1e-5)
    medians = {name: statistics.median(times) for name, times in runs.items()}
    return [
        dict(metric=f"traced pzb.lift, {depth} blocks, seq 64", seconds=medians["lift"], ratio=1.0),
        dict(metric="  the same, check re-evaluating the module", seconds=medians["lift_reevaluating"],
             ratio=medians["lift_reevaluating"] / medians["lift"]),
        dict(metric="eqx.filter_eval_shape of the module", seconds=medians["eval_shape"],
             ratio=medians["eval_shape"] / medians["lift"]),
        dict(metric="traced pzb.lift, seq 1 (widened trace + check)", seconds=medians["lift_size_one"],
             ratio=medians["lift_size_one"] / medians["lift"]),
    ]


def main() -> None:
    """Prints the rows (ratios against the seq-64 lift)."""
    for row in lift_check_rows():
        print(f"{row['metric']:<52} {row['seconds'] * 1e3:8.1f} ms  x{row['ratio']:.2f}")


if __name__ == "__main__":
    main()
