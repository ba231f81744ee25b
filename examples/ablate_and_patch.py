"""Ablation and activation patching on a small sequence model, then lowering an ablation to Equinox.

Run: ``python examples/ablate_and_patch.py`` (CPU, a few seconds, no downloads).

Part 1 builds a tiny pzbridge model that mixes information across positions
(a causal running mean between two MLP layers), then:

- zero-ablates each hidden unit in turn and reports how much the output moves;
- mean-ablates the hidden layer over the sequence;
- patches the hidden activation of a *clean* input into a run on a *corrupted*
  input one position at a time, showing which output positions each patch
  restores (only positions at or after the patched one, because mixing is causal).

Part 2 lifts an ``eqx.nn.MLP``, inserts an ablation, lowers it back to a genuine
Equinox module and checks it against a hand-written Equinox computation.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import pzbridge as pzb
from pzbridge.bridge.equinox.linear import EqxLinear
from pzbridge.nn.linear import Affine
from pzbridge.toolshed.intermediates import capture_intermediates
from pzbridge.toolshed.interventions import Ablate, ZeroAblation, insert_intervention, patch_activations

SEQ, D_IN, HIDDEN, D_OUT = 5, 3, 6, 2


@pzb.pytree_dataclass
class CausalMean(pzb.nn.Layer):
    """Replaces position t by the mean of positions 0..t (the only cross-position mixing)."""

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        counts = pzb.nx.arange("seq", 1, SEQ + 1).astype(jnp.float32)
        return pzb.nx.nmap(lambda v: jnp.cumsum(v))(x.untag("seq")).tag("seq") / counts


def build_model() -> pzb.nn.Sequential:
    k1, k2 = jax.random.split(jax.random.key(0))
    return pzb.nn.Sequential([
        Affine.from_config("encode", k1, {"features": D_IN}, {"features": HIDDEN}),
        pzb.nn.Elementwise(jax.nn.relu),
        CausalMean(),
        Affine.from_config("decode", k2, {"features": HIDDEN}, {"features": D_OUT}),
    ])


def out(y: pzb.nx.NamedArray) -> np.ndarray:
    return np.asarray(y.unwrap("seq", "features"))


def part1() -> None:
    model = build_model()
    hidden = pzb.select(model).at_instances_of(pzb.nn.Elementwise)  # the relu output
    clean = pzb.nx.wrap(jax.random.normal(jax.random.key(1), (SEQ, D_IN)), "seq", "features")
    corrupt = pzb.nx.wrap(clean.unwrap("seq", "features").at[1].set(3.0), "seq", "features")
    base = out(model(clean))

    print("== zero-ablating one hidden unit at a time ==")
    for unit in range(HIDDEN):
        mask = pzb.nx.wrap(jnp.arange(HIDDEN) == unit, "features")
        ablated = insert_intervention(model, hidden, ZeroAblation(mask=mask))
        print(f"unit {unit}: output change {np.abs(out(ablated(clean)) - base).max():.4f}")

    mean_ablated = insert_intervention(model, hidden, Ablate("mean", axes=("seq",)))
    print(f"mean-ablating over seq: output change {np.abs(out(mean_ablated(clean)) - base).max():.4f}")

    print("\n== activation patching: clean hidden state into the corrupted run ==")
    corrupt_out = out(model(corrupt))
    print("positions whose output differs (corrupted run):", np.flatnonzero(np.abs(corrupt_out - base).max(-1) > 1e-6))
    for position in range(SEQ):
        mask = pzb.nx.wrap(jnp.arange(SEQ) == position, "seq")
        patched = out(patch_activations(model, clean, corrupt, at=hidden, mask=mask))
        restored = np.flatnonzero(np.abs(patched - base).max(-1) < 1e-6)
        print(f"patch position {position}: outputs equal to the clean run at positions {restored.tolist()}")
    full = out(patch_activations(model, clean, corrupt, at=hidden))
    assert np.allclose(full, base, atol=1e-6), "patching every position must reproduce the clean run"
    print("patching every position reproduces the clean run: OK")


def part2() -> None:
    print("\n== lowering an ablated Equinox MLP ==")
    mlp = eqx.nn.MLP(in_size=D_IN, out_size=D_OUT, width_size=HIDDEN, depth=1, key=jax.random.key(2))
    lifted = pzb.lift(mlp)
    first = pzb.select(lifted).at_instances_of(EqxLinear).pick_nth_selected(0)
    mask = np.arange(HIDDEN) < 2  # ablate hidden units 0 and 1
    ablated = insert_intervention(lifted, first, ZeroAblation(mask=pzb.StateVariable(pzb.nx.wrap(mask, "features"), "mask")))
    lowered = pzb.lower(ablated)
    print("lowered layers:", [type(layer).__name__ for layer in lowered.layers])

    def by_hand(x: jax.Array) -> jax.Array:
        h = jnp.where(mask, 0.0, mlp.layers[0](x))
        return mlp.layers[1](jax.nn.relu(h))

    xs = jax.random.normal(jax.random.key(3), (4, D_IN))
    np.testing.assert_allclose(jax.vmap(lowered)(xs), jax.vmap(by_hand)(xs), rtol=1e-5, atol=1e-6)
    _, acts = capture_intermediates(ablated, first, pzb.nx.wrap(xs, "batch", "features"), where="after")
    print("hidden units 0, 1 before the ablation (first example):",
          np.round(np.asarray(acts["body.sublayers[0]"].unwrap("batch", "features")[0, :2]), 4))
    print("lowered Equinox module computes the ablated function: OK")


if __name__ == "__main__":
    part1()
    part2()
