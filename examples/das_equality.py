"""Distributed alignment search (DAS) finds the variable "a == b" in a rotated subspace of a hidden layer.

Run: ``python examples/das_equality.py`` (CPU, well under a minute, no downloads).

1. The hierarchical equality task: four entities ``a, b, c, d`` (fresh
   random vectors, concatenated into the input; ``b`` is a copy of ``a``
   half the time, and ``d`` of ``c``); the label is ``(a == b) == (c == d)``.
   An ``eqx.nn.MLP`` is trained on it here with optax, in plain Equinox.
2. ``pzb.lift`` opens it up. The high-level causal model has two
   intermediate variables, ``V1 = (a == b)`` and ``V2 = (c == d)``. An
   interchange intervention on ``V1`` takes a base input and a source
   input; the counterfactual label is ``V1(source) == V2(base)``.
3. ``train_intervention`` trains a ``RotatedSubspaceInterchange`` at the
   first hidden layer (after its ReLU) with the MLP frozen: only the
   rotation trains. Its interchange intervention accuracy (IIA) on fresh
   pairs is compared with the best *neuron-aligned* interchange of the same
   number of units, found by a greedy search over the hidden units.

The last line reports both accuracies.
"""

from __future__ import annotations

import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import pzbridge as pzb
from pzbridge.toolshed.trainable import (
    LowRankRotatedInterchange,
    RotatedSubspaceInterchange,
)
from pzbridge.toolshed.trainable_fit import interchange_accuracy, train_intervention
from pzbridge.toolshed.where import Where

EMBED, HIDDEN, K = 4, 32, 4
SITE = Where(path="body.sublayers[1]")  # the ReLU after the first Linear: the first hidden layer


def entities(key: jax.Array, n: int) -> tuple[tuple[jax.Array, ...], jax.Array, jax.Array]:
    """Entity vectors ``a, b, c, d`` (fresh uniform vectors) with ``a == b`` and ``c == d`` each half the time.

    Returns the four entities and the two variables ``V1 = (a == b)``, ``V2 = (c == d)``.
    """
    keys = jax.random.split(key, 6)

    def pair(k_first: jax.Array, k_other: jax.Array, k_same: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        first = jax.random.uniform(k_first, (n, EMBED), minval=-1.0, maxval=1.0)
        other = jax.random.uniform(k_other, (n, EMBED), minval=-1.0, maxval=1.0)
        same = jax.random.bernoulli(k_same, 0.5, (n,))
        return first, jnp.where(same[:, None], first, other), same

    a, b, v1 = pair(*keys[:3])
    c, d, v2 = pair(*keys[3:])
    return (a, b, c, d), v1, v2


def task(key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """Inputs (the concatenated entities) and labels ``(a == b) == (c == d)``."""
    ents, v1, v2 = entities(key, n)
    return jnp.concatenate(ents, axis=-1), (v1 == v2).astype(jnp.int32)


def train_mlp(steps: int = 2000) -> eqx.nn.MLP:
    """Plain Equinox + optax, the whole loop in one ``lax.scan`` (one compilation, no per-step dispatch)."""
    params, static = eqx.partition(eqx.nn.MLP(4 * EMBED, 2, HIDDEN, 2, key=jax.random.key(1)), eqx.is_array)
    optimizer = optax.adam(3e-3)

    def step(carry: tuple[Any, Any], key: jax.Array) -> tuple[tuple[Any, Any], jax.Array]:
        params, state = carry
        x, y = task(key, 256)

        def loss(p: Any) -> jax.Array:
            logits = jax.vmap(eqx.combine(p, static))(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        value, grads = jax.value_and_grad(loss)(params)
        updates, state = optimizer.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), value

    run = jax.jit(lambda p: jax.lax.scan(step, (p, optimizer.init(p)), jax.random.split(jax.random.key(2), steps)))
    (params, _), _ = run(params)
    return eqx.combine(params, static)


def counterfactual_pairs(key: jax.Array, n: int) -> tuple[pzb.nx.NamedArray, ...]:
    """Base and source inputs and the label the model gives if V1 took the source's value: V1(source) == V2(base)."""
    k_base, k_source = jax.random.split(key)
    base, _, v2 = entities(k_base, n)
    source, source_v1, _ = entities(k_source, n)
    target = (source_v1 == v2).astype(jnp.int32)
    wrap = lambda ents: pzb.nx.wrap(jnp.concatenate(ents, axis=-1), "batch", "features")
    return wrap(base), wrap(source), pzb.nx.wrap(target, "batch")


def best_neuron_aligned(lifted: pzb.bridge.LiftedModel, data: tuple[pzb.nx.NamedArray, ...]) -> tuple[float, list[int]]:
    """Greedy search: grow a set of K hidden units, adding the unit that helps IIA most; the best set seen."""
    chosen: list[int] = []
    best: tuple[float, list[int]] = (0.0, [])
    for _ in range(K):
        scores = {}
        for unit in (u for u in range(HIDDEN) if u not in chosen):
            layer = LowRankRotatedInterchange.of_units({"features": HIDDEN}, [*chosen, unit])
            scores[unit] = interchange_accuracy(lifted, SITE, layer, *data)
        unit = max(scores, key=scores.get)
        chosen = [*chosen, unit]
        best = max(best, (scores[unit], chosen), key=lambda entry: entry[0])
    return best


def main() -> None:
    start = time.perf_counter()
    mlp = train_mlp()
    x, y = task(jax.random.key(3), 2000)
    accuracy = float(jnp.mean(jax.vmap(mlp)(x).argmax(-1) == y))
    print(f"MLP task accuracy {accuracy:.3f} ({time.perf_counter() - start:.1f} s)")
    assert accuracy >= 0.97, accuracy

    lifted = pzb.lift(mlp)
    params_before = [np.asarray(p.value.unwrap(*p.value.named_shape)) for p in pzb.unbind_params(lifted)[1]]
    train = counterfactual_pairs(jax.random.key(4), 4096)
    test = counterfactual_pairs(jax.random.key(5), 2000)

    das = RotatedSubspaceInterchange.from_config("das", jax.random.key(6), {"features": HIDDEN}, k=K)
    fit = train_intervention(lifted, SITE, das, *train, optimizer=optax.adam(1e-2), steps=600, batch_size=256)
    print(f"DAS training loss {fit.losses[0]:.3f} -> {fit.losses[-20:].mean():.3f} ({time.perf_counter() - start:.1f} s)")
    iia = interchange_accuracy(lifted, SITE, das, *test)

    params_after = [np.asarray(p.value.unwrap(*p.value.named_shape)) for p in pzb.unbind_params(lifted)[1]]
    assert all(np.array_equal(x, y) for x, y in zip(params_before, params_after)), "the MLP must stay frozen"
    r = das.rotation().unwrap("rotated", "features")
    assert np.abs(np.asarray(r @ r.T) - np.eye(HIDDEN)).max() < 1e-5, "the rotation must stay orthogonal"

    baseline, units = best_neuron_aligned(lifted, test)
    print(f"DAS (rotated subspace, k={K}) IIA {iia:.3f}; best neuron-aligned units {units}: IIA {baseline:.3f}")
    assert iia >= 0.9 and iia - baseline >= 0.15, (iia, baseline)
    print(f"DAS finds a==b in a rotated subspace that no set of neurons holds: OK "
          f"({time.perf_counter() - start:.1f} s)")
    print(f"RESULT das_equality: iia={iia:.3f} baseline_iia={baseline:.3f}")


if __name__ == "__main__":
    main()
