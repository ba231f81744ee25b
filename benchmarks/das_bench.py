"""Cost of trainable interchange interventions (DAS) in a forward pass, relative to the plain model.

Model: a lifted ``eqx.nn.MLP`` (in 32, width 128, depth 2, out 2); the site is
the first hidden layer (after its ReLU); batch 256. Rows (interleaved
repetitions of compiled calls, medians):

- forward: the frozen model with the intervention on ``stack_worlds([base,
  source])`` vs the plain frozen model on the same two worlds, for
  ``RotatedSubspaceInterchange`` (full 128 x 128 rotation, k = 64, a QR of a
  128 x 64 matrix per call) and ``LowRankRotatedInterchange`` (k = 8).

The steady-state cost of a ``train_intervention`` step is not measured here:
``train_intervention`` compiles its step on every call, and on a shared
machine the variance of that compilation swamps the difference of two runs.

Run: ``python benchmarks/das_bench.py``.
"""

from __future__ import annotations

import equinox as eqx
import jax

import pzbridge as pzb
from interleaved import interleaved_medians
from pzbridge.toolshed.trainable import (
    LowRankRotatedInterchange,
    RotatedSubspaceInterchange,
)
from pzbridge.toolshed.trainable_fit import intervened
from pzbridge.toolshed.where import Where
from pzbridge.toolshed.worlds import stack_worlds

D_IN, WIDTH, DEPTH, BATCH, K_FULL, K_LOW = 32, 128, 2, 256, 64, 8
SITE = Where(path="body.sublayers[1]")




def main() -> None:
    mlp = eqx.nn.MLP(D_IN, 2, WIDTH, DEPTH, key=jax.random.key(0))
    lifted = pzb.lift(mlp)
    base = jax.random.normal(jax.random.key(1), (BATCH, D_IN))
    source = jax.random.normal(jax.random.key(2), (BATCH, D_IN))
    named = [pzb.nx.wrap(v, "batch", "features") for v in (base, source)]
    worlds = stack_worlds(named)

    run = jax.jit(lambda m, x: m(x))
    plain = pzb.freeze_variables(lifted)
    full = RotatedSubspaceInterchange.from_config("das", jax.random.key(4), {"features": WIDTH}, k=K_FULL)
    low = LowRankRotatedInterchange.from_config("low", jax.random.key(5), {"features": WIDTH}, k=K_LOW)
    with_full = pzb.freeze_variables(intervened(lifted, SITE, full))
    with_low = pzb.freeze_variables(intervened(lifted, SITE, low))
    calls = [lambda: run(plain, worlds), lambda: run(with_full, worlds), lambda: run(with_low, worlds)]
    for call in calls:
        jax.block_until_ready(call())
    t_plain, t_full, t_low = interleaved_medians(calls, reps=20)

    print(f"{'row':58s} {'ratio':>7s}")
    print(f"{'forward, RotatedSubspaceInterchange k=64 / plain (2 worlds)':58s} {t_full / t_plain:7.2f}")
    print(f"{'forward, LowRankRotatedInterchange k=8 / plain (2 worlds)':58s} {t_low / t_plain:7.2f}")
    print(f"(plain forward {t_plain * 1e3:.2f} ms)", flush=True)


if __name__ == "__main__":
    main()
