"""A patched model lowered back to Equinox, run on stacked worlds, against the lifted model and the plain original.

``patch_worlds`` patches the hidden layer of an ``eqx.nn.MLP`` (width 512,
two hidden layers, tanh) from world 1 into world 0. Lowered with
``pzb.lower``, the patch is an adapter that gathers the worlds over
``jax.vmap(..., axis_name="worlds")``; the rest is the original Equinox
code, per example. Three forward calls on a batch of 64 examples x 2 worlds,
each jitted as a pure function of its arrays:

- the lowered Equinox model: ``jax.vmap(jax.vmap(lowered, axis_name="worlds"))``;
- the lifted patched model, variables frozen, on ``stack_worlds`` of the batch;
- the plain original on the same 128 inputs (``jax.vmap`` twice): no patch.

CPU seconds (``time.process_time``), interleaved repetitions, medians;
ratios lowered / lifted and lowered / plain.

Run: ``python benchmarks/lowered_worlds_bench.py``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

import pzbridge as pzb
from pzbridge.toolshed.where import Where
from pzbridge.toolshed.worlds import patch_worlds, stack_worlds

sys.path.insert(0, str(Path(__file__).parent))
from interleaved import interleaved_medians

WIDTH, DEPTH, BATCH = 512, 2, 64


def rows(reps: int = 15, inner: int = 20) -> list[dict[str, Any]]:
    """Milliseconds per forward call of the three variants, and the ratios."""
    mlp = eqx.nn.MLP(WIDTH, WIDTH, WIDTH, DEPTH, activation=jnp.tanh, key=jax.random.key(0))
    patched = patch_worlds(pzb.lift(mlp), Where(path="body.sublayers[1]"), (1, 1))
    lowered = pzb.lower(patched)
    xs = jax.random.normal(jax.random.key(1), (BATCH, 2, WIDTH))  # batch, worlds, features

    params, static = eqx.partition(lowered, eqx.is_inexact_array)
    lowered_call = jax.jit(lambda p, x: jax.vmap(jax.vmap(eqx.combine(p, static), axis_name="worlds"))(x))
    plain_params, plain_static = eqx.partition(mlp, eqx.is_inexact_array)
    plain_call = jax.jit(lambda p, x: jax.vmap(jax.vmap(eqx.combine(p, plain_static)))(x))
    frozen = pzb.freeze_variables(patched)
    worlds = stack_worlds([pzb.nx.wrap(xs[:, w], "batch", "features") for w in range(2)])
    lifted_call = jax.jit(lambda m, x: m(x))

    calls = [lambda: lowered_call(params, xs), lambda: lifted_call(frozen, worlds),
             lambda: plain_call(plain_params, xs)]
    lowered_s, lifted_s, plain_s = interleaved_medians(calls, reps, inner, clock=time.process_time)
    return [{"call": "forward", "lowered_ms": lowered_s * 1e3, "lifted_ms": lifted_s * 1e3,
             "plain_ms": plain_s * 1e3, "lowered/lifted": lowered_s / lifted_s,
             "lowered/plain": lowered_s / plain_s}]


def main() -> None:
    print(f"{'call':10s} {'lowered ms':>11s} {'lifted ms':>10s} {'plain ms':>9s} {'low/lifted':>11s} "
          f"{'low/plain':>10s}")
    for row in rows():
        print(f"{row['call']:10s} {row['lowered_ms']:11.3f} {row['lifted_ms']:10.3f} {row['plain_ms']:9.3f} "
              f"{row['lowered/lifted']:11.2f} {row['lowered/plain']:10.2f}")


if __name__ == "__main__":
    main()
