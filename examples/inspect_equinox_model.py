"""Inspect an Equinox model with pzbridge: lift it, look at it, select weights, capture an activation.

Run: ``python examples/inspect_equinox_model.py`` (CPU, a few seconds, no downloads).

Steps:
1. build a small ``eqx.nn.MLP`` and lift it (no array is copied);
2. print a treescope text rendering of the lifted model;
3. select every ``Linear`` layer and print its weight's label and named shape;
4. capture the hidden activations on a batch, with no hooks, and check one
   against the value Equinox itself computes.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import treescope

import pzbridge as pzb
from pzbridge.bridge.equinox.linear import EqxLinear
from pzbridge.nn.linear import Linear
from pzbridge.toolshed.intermediates import capture_intermediates


def main() -> None:
    mlp = eqx.nn.MLP(in_size=4, out_size=3, width_size=8, depth=2, key=jax.random.key(0))
    lifted = pzb.lift(mlp)

    print("== lifted model (treescope text) ==")
    print(treescope.render_to_text(lifted), end="\n\n")

    print("== Linear weights ==")
    linears = pzb.select(lifted).at_instances_of(Linear)
    for path, layer in linears.get_by_path().items():
        weight = layer.weights
        print(f"{pzb.errors.format_path(path):40s} {weight.label:18s} {dict(weight.value.named_shape)}")
    # The lifted weights are the very same buffers as the Equinox ones.
    assert linears.get_sequence()[0].weights.value.data_array is mlp.layers[0].weight

    print("\n== captured activations (batch of 5) ==")
    x = jax.random.normal(jax.random.key(1), (5, 4))
    output, acts = capture_intermediates(lifted, EqxLinear, pzb.nx.wrap(x, "batch", "features"))
    for path, act in acts.items():
        print(f"{path:28s} {dict(act.named_shape)}")
    first_hidden = acts["body.sublayers[0]"].unwrap("batch", "features")
    np.testing.assert_allclose(first_hidden, jax.vmap(mlp.layers[0])(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(output.unwrap("batch", "features"), jax.vmap(mlp)(x), rtol=1e-5, atol=1e-6)
    print("captured values match Equinox's own computation: OK")
    print("output[0] =", jnp.round(output.unwrap("batch", "features")[0], 4))


if __name__ == "__main__":
    main()
