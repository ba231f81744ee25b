"""Per-call overhead of ``variable_jit``: pzbridge vs ``jax.jit`` vs penzai.

The model is a list of 250 ``Residual(Affine(kernel))`` structs (~750 pytree
nodes, 250 parameter variables) plus one state counter. The function body is
trivially cheap (read one parameter, bump the counter) so the time per call
is dispatch overhead:

- ``jax.jit``: the equivalent pure function on the same tree with plain
  arrays in place of variables, returning the new counter (the baseline);
- ``pzbridge``: ``pzbridge.core.variable_jit.variable_jit`` on the tree of
  ``Parameter``s, writing the counter back;
- ``penzai``: ``penzai.pz.variable_jit`` on the same tree built from penzai
  structs and ``pz.Parameter`` / ``pz.StateVariable``.

Each repetition times a batch of calls of every variant back to back
(interleaved), and the medians over repetitions are reported.

Run: ``.venv/bin/python benchmarks/variable_jit_bench.py``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from pzbridge.core.struct import Struct, pytree_dataclass
from pzbridge.core.variable_jit import variable_jit
from pzbridge.core.variables import Parameter, StateVariable

N_PARAMS = 250


@pytree_dataclass
class Affine(Struct):
    kernel: Any


@pytree_dataclass
class Residual(Struct):
    inner: Any


def _count_nodes(tree: Any) -> int:
    """Pytree nodes including leaves (variables are leaves)."""
    count = 0

    def visit(node: Any) -> None:
        nonlocal count
        count += 1
        children = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)[0]
        if not (len(children) == 1 and children[0] is node):
            for child in children:
                visit(child)

    visit(tree)
    return count


def _body(kernel: jax.Array, counter: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return x + kernel[0], counter + 1


def _make_variants() -> tuple[dict[str, Callable[[], Any]], int]:
    x = jnp.ones((4,), jnp.float32)
    values = [jnp.full((4,), float(i), jnp.float32) for i in range(N_PARAMS)]

    # jax.jit on the equivalent pure function.
    pure_model = [Residual(Affine(v)) for v in values]
    pure_state = {"counter": jnp.zeros((), jnp.int32)}

    @jax.jit
    def pure_step(model, counter, x):
        return _body(model[0].inner.kernel, counter, x)

    def run_pure() -> Any:
        out, pure_state["counter"] = pure_step(pure_model, pure_state["counter"], x)
        return out

    # pzbridge.variable_jit on the tree of variables.
    ours_model = [Residual(Affine(Parameter(v, label=f"layers.{i}.kernel"))) for i, v in enumerate(values)]
    ours_counter = StateVariable(jnp.zeros((), jnp.int32), label="counter")

    @variable_jit
    def ours_step(model, counter, x):
        out, counter.value = _body(model[0].inner.kernel.value, counter.value, x)
        return out

    def run_ours() -> Any:
        return ours_step(ours_model, ours_counter, x)

    variants = {"jax.jit": run_pure, "pzbridge": run_ours}
    try:
        from penzai import pz
    except ImportError:  # penzai is an optional benchmark dependency.
        pz = None
    if pz is not None:

        @pz.pytree_dataclass
        class PzAffine(pz.Struct):
            kernel: Any

        @pz.pytree_dataclass
        class PzResidual(pz.Struct):
            inner: Any

        pz_model = [PzResidual(PzAffine(pz.Parameter(value=v, label=f"layers.{i}.kernel"))) for i, v in enumerate(values)]
        pz_counter = pz.StateVariable(value=jnp.zeros((), jnp.int32), label="counter")

        @pz.variable_jit
        def pz_step(model, counter, x):
            out, counter.value = _body(model[0].inner.kernel.value, counter.value, x)
            return out

        variants["penzai"] = lambda: pz_step(pz_model, pz_counter, x)
    return variants, _count_nodes(ours_model)


def _time_batch(run: Callable[[], Any], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        out = run()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls


def variable_jit_rows(repetitions: int = 15, calls: int = 20) -> list[dict]:
    """Measures microseconds per call of each variant, interleaved, median.

    Args:
      repetitions: Interleaved rounds (the median is reported).
      calls: Calls per variant per round.

    Returns:
      One dict per variant: ``variant``, ``nodes``, ``us_per_call``,
      ``overhead_us`` (minus ``jax.jit``), ``vs_jax_jit`` (ratio of times) and
      ``penzai_over_this`` (penzai's time divided by this variant's).
    """
    variants, nodes = _make_variants()
    for run in variants.values():  # Compile and warm up.
        for _ in range(3):
            jax.block_until_ready(run())
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repetitions):
        for name, run in variants.items():
            samples[name].append(_time_batch(run, calls))
    medians = {name: statistics.median(times) * 1e6 for name, times in samples.items()}
    base = medians["jax.jit"]
    rows = []
    for name, us in medians.items():
        row = {
            "variant": name,
            "nodes": nodes,
            "us_per_call": round(us, 1),
            "overhead_us": round(us - base, 1),
            "vs_jax_jit": round(us / base, 2),
        }
        if "penzai" in medians:
            row["penzai_over_this"] = round(medians["penzai"] / us, 1)
        rows.append(row)
    return rows


def main() -> None:
    rows = variable_jit_rows()
    print(f"variable_jit per-call time, {rows[0]['nodes']} nodes, {N_PARAMS} parameters + 1 state variable")
    print(f"{'variant':<10} {'us/call':>9} {'overhead us':>12} {'x jax.jit':>10} {'penzai/this':>12}")
    for row in rows:
        print(
            f"{row['variant']:<10} {row['us_per_call']:>9} {row['overhead_us']:>12} "
            f"{row['vs_jax_jit']:>10} {row.get('penzai_over_this', '-'):>12}"
        )


if __name__ == "__main__":
    main()
