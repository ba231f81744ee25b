"""Cost of trainable interchange interventions (DAS) in a forward pass, relative to the plain model.

Model: a lifted ``eqx.nn.MLP`` (in 32, width 128, depth 2, out 2); the site is
the first hidden layer (after its ReLU); batch 256. Rows (interleaved
repetitions of compiled calls, medians):

- forward: the frozen model with the intervention on ``stack_worlds([base,
  source])`` vs the plain frozen model on the same two worlds, for
  ``RotatedSubspaceInterchange`` (full 128 x 128 rotation, k = 64, a QR of a
  128 x 64 matrix per call) and ``LowRankRotatedInterchange`` (k = 8).

- training step: the steady-state time of one ``train_intervention`` step
  (``RotatedSubspaceInterchange``, k = 64, minibatch 64, adam) against the same
  step written by hand on the Equinox model's arrays (the two hidden layers,
  the QR, the interchange and the loss in one ``jax.jit`` over the raw matrix).
  Each side runs ``SHORT`` and ``LONG`` steps; the per-step time is the
  difference over ``LONG - SHORT`` steps, so the compilation of each call
  cancels out.

Run: ``python benchmarks/das_bench.py``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from interleaved import interleaved_medians

import pzbridge as pzb
from pzbridge.toolshed.trainable import (
    LowRankRotatedInterchange,
    RotatedSubspaceInterchange,
)
from pzbridge.toolshed.trainable_fit import intervened, train_intervention
from pzbridge.toolshed.where import Where
from pzbridge.toolshed.worlds import stack_worlds

D_IN, WIDTH, DEPTH, BATCH, K_FULL, K_LOW = 32, 128, 2, 256, 64, 8
SITE = Where(path="body.sublayers[1]")
MINIBATCH, SHORT, LONG, ROUNDS = 64, 20, 420, 5


def _hand_written_training(mlp: eqx.nn.MLP, raw: jax.Array, base: jax.Array, source: jax.Array,
                           labels: jax.Array, order: jax.Array, steps: int) -> jax.Array:
    """DAS at the first hidden layer written directly on the MLP's arrays: what a user would write without pzbridge."""
    first, rest = mlp.layers[0], mlp.layers[1:]
    optimizer = optax.adam(1e-2)

    def loss(w: jax.Array, xb: jax.Array, xs: jax.Array, y: jax.Array) -> jax.Array:
        q = jnp.linalg.qr(w[:, :K_FULL])[0]
        hb = jax.nn.relu(xb @ first.weight.T + first.bias)
        hs = jax.nn.relu(xs @ first.weight.T + first.bias)
        h = hb + (hs - hb) @ q @ q.T
        for i, layer in enumerate(rest):
            h = h @ layer.weight.T + layer.bias
            h = jax.nn.relu(h) if i < len(rest) - 1 else h
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(h), y[:, None], axis=1))

    @jax.jit
    def step(w: jax.Array, state: optax.OptState, index: jax.Array) -> tuple[jax.Array, jax.Array, optax.OptState]:
        value, grad = jax.value_and_grad(loss)(w, base[index], source[index], labels[index])
        updates, state = optimizer.update(grad, state, w)
        return value, optax.apply_updates(w, updates), state

    state, losses = optimizer.init(raw), []
    for i in range(steps):
        value, raw, state = step(raw, state, order[i % len(order)])
        losses.append(value)
    return jnp.stack(losses)


def _per_step_seconds(run: Callable[[int], object]) -> float:
    """Median over ROUNDS of (time of LONG steps - time of SHORT steps) / (LONG - SHORT): compilation cancels."""
    estimates = []
    for _ in range(ROUNDS):
        times = []
        for steps in (SHORT, LONG):
            start = time.perf_counter()
            jax.block_until_ready(run(steps))
            times.append(time.perf_counter() - start)
        estimates.append((times[1] - times[0]) / (LONG - SHORT))
    return statistics.median(estimates)


def training_step_ratio(mlp: eqx.nn.MLP, lifted: object, base: jax.Array, source: jax.Array) -> tuple[float, float]:
    """(pzbridge step seconds, hand-written step seconds), measured alternately in one process."""
    labels = jax.random.randint(jax.random.key(3), (BATCH,), 0, 2)
    order = jnp.asarray(jax.random.permutation(jax.random.key(6), BATCH)[: (BATCH // MINIBATCH) * MINIBATCH]
                        .reshape(-1, MINIBATCH))
    named = [pzb.nx.wrap(v, "batch", "features") for v in (base, source)]

    def ours(steps: int) -> object:
        das = RotatedSubspaceInterchange.from_config("das", jax.random.key(4), {"features": WIDTH}, k=K_FULL)
        return train_intervention(lifted, SITE, das, named[0], named[1], labels, optimizer=optax.adam(1e-2),
                                  steps=steps, batch_size=MINIBATCH).losses

    raw = jax.random.normal(jax.random.key(4), (WIDTH, WIDTH))
    t_ours, t_hand = [], []
    for _ in range(2):  # Alternate the two sides so a load change hits both.
        t_ours.append(_per_step_seconds(ours))
        t_hand.append(_per_step_seconds(lambda steps: _hand_written_training(mlp, raw, base, source, labels,
                                                                             order, steps)))
    return min(t_ours), min(t_hand)


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
    t_plain, t_full, t_low = interleaved_medians(calls, reps=20, inner=5)

    print(f"{'row':58s} {'ratio':>7s}")
    print(f"{'forward, RotatedSubspaceInterchange k=64 / plain (2 worlds)':58s} {t_full / t_plain:7.2f}")
    print(f"{'forward, LowRankRotatedInterchange k=8 / plain (2 worlds)':58s} {t_low / t_plain:7.2f}")
    print(f"(plain forward {t_plain * 1e3:.2f} ms)", flush=True)
    t_ours, t_hand = training_step_ratio(mlp, lifted, base, source)
    print(f"{'train_intervention step / hand-written Equinox step':58s} {t_ours / t_hand:7.2f}")
    print(f"(hand-written step {t_hand * 1e3:.2f} ms, train_intervention step {t_ours * 1e3:.2f} ms)", flush=True)


if __name__ == "__main__":
    main()
