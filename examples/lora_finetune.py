"""LoRA fine-tuning round trip: lift an Equinox model, add adapters, lower, train with optax, merge back.

Run: ``python examples/lora_finetune.py`` (CPU, a few seconds, no downloads).

1. lift an ``eqx.nn.Sequential`` regression model;
2. wrap every ``Linear`` in a low-rank adapter (``B = 0``, so nothing changes yet);
3. lower: the adapted layers become ``LoRALinear`` Equinox modules;
4. train only the adapters with ``eqx.filter_value_and_grad`` + optax;
5. lift the trained module again, fold the adapters into the weights, and
   lower to plain ``eqx.nn.Linear`` layers that compute the fine-tuned function.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import pzbridge as pzb
from pzbridge.bridge.equinox.lora import LoRALinear, lora_filter
from pzbridge.nn.linear import Linear
from pzbridge.toolshed.lora import loraify_linears_in_selection, merge_lora


def main() -> None:
    k1, k2, kx = jax.random.split(jax.random.key(0), 3)
    model = eqx.nn.Sequential([eqx.nn.Linear(4, 16, key=k1), eqx.nn.Lambda(jnp.tanh), eqx.nn.Linear(16, 1, key=k2)])
    xs = jax.random.normal(kx, (64, 4))
    ys = jnp.sin(xs.sum(axis=1, keepdims=True))  # the new task

    lifted = pzb.lift(model)
    adapted = loraify_linears_in_selection(pzb.select(lifted).at_instances_of(Linear), rank=2,
                                           init_base_rng=jax.random.key(1), alpha=4.0)
    lora_model = pzb.lower(adapted)
    print("lowered layers:", [type(layer).__name__ for layer in lora_model.layers])
    np.testing.assert_allclose(jax.vmap(lora_model)(xs), jax.vmap(model)(xs), atol=1e-6)

    trainable, frozen = eqx.partition(lora_model, lora_filter(lora_model))
    optimizer = optax.adam(3e-2)
    opt_state = optimizer.init(trainable)

    def loss_fn(t: eqx.Module) -> jax.Array:
        return jnp.mean((jax.vmap(eqx.combine(t, frozen))(xs) - ys) ** 2)

    @eqx.filter_jit
    def step(t: eqx.Module, state: optax.OptState) -> tuple[eqx.Module, optax.OptState, jax.Array]:
        loss, grads = eqx.filter_value_and_grad(loss_fn)(t)
        updates, state = optimizer.update(grads, state, t)
        return eqx.apply_updates(t, updates), state, loss

    for i in range(101):
        trainable, opt_state, loss = step(trainable, opt_state)
        if i % 25 == 0:
            print(f"step {i:3d}  loss {float(loss):.4f}")
    trained = eqx.combine(trainable, frozen)
    assert np.array_equal(trained.layers[0].linear.weight, model.layers[0].weight), "base weights stay frozen"

    merged = pzb.lower(merge_lora(pzb.lift(trained)))
    print("merged layers:", [type(layer).__name__ for layer in merged.layers])
    assert all(not isinstance(layer, LoRALinear) for layer in merged.layers)
    np.testing.assert_allclose(jax.vmap(merged)(xs), jax.vmap(trained)(xs), rtol=1e-4, atol=1e-5)
    print("merged plain-Equinox model computes the fine-tuned function: OK")


if __name__ == "__main__":
    main()
