"""Demo section: an Equinox model through the whole pzbridge workflow.

Lift, summarise and render, capture an activation, ablate, add LoRA, lower,
train with ``eqx.filter_value_and_grad`` + optax (the user's own loop),
re-lift, merge, lower to the original classes, and checkpoint with orbax.

Example:
    >>> model = build_equinox_model(jax.random.key(0))
    >>> type(model).__name__
    'Sequential'
"""

from __future__ import annotations

import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import pzbridge as pzb
from pzbridge.bridge.equinox.lora import LoRALinear, lora_filter
from pzbridge.demo.report import Report
from pzbridge.demo.roundtrip import add_lora, checkpoint_round_trip, structure_summary, write_html
from pzbridge.toolshed.intermediates import capture_intermediates
from pzbridge.toolshed.interventions import Ablate, insert_intervention
from pzbridge.toolshed.lora import merge_lora


class ResidualMLP(eqx.Module):
    """A user's own block (no pzbridge rule: it lifts to ``Foreign``)."""

    norm: eqx.nn.LayerNorm
    mlp: eqx.nn.MLP

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        return x + self.mlp(self.norm(x))


def build_equinox_model(key: jax.Array) -> eqx.nn.Sequential:
    """A small regression model: Linear, GELU, a custom residual MLP block, Linear."""
    k1, k2, k3 = jax.random.split(key, 3)
    return eqx.nn.Sequential([
        eqx.nn.Linear(8, 16, key=k1),
        eqx.nn.Lambda(jax.nn.gelu),
        ResidualMLP(eqx.nn.LayerNorm(16), eqx.nn.MLP(16, 16, 32, 1, key=k2)),
        eqx.nn.Linear(16, 4, key=k3),
    ])


@eqx.filter_jit
def _run_batched(model: eqx.Module, xs: jax.Array) -> jax.Array:
    return jax.vmap(model)(xs)


def _train(report: Report, model: eqx.Module, xs: jax.Array, ys: jax.Array, steps: int) -> tuple[eqx.Module, list[float]]:
    """The user's ordinary Equinox training loop, training only the LoRA adapters."""
    trainable, frozen = eqx.partition(model, lora_filter(model))
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(trainable)

    @eqx.filter_jit
    def step(trainable, opt_state):
        def loss_fn(t):
            return jnp.mean((jax.vmap(eqx.combine(t, frozen))(xs) - ys) ** 2)

        loss, grads = eqx.filter_value_and_grad(loss_fn)(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return eqx.apply_updates(trainable, updates), opt_state, loss

    losses = []
    for i in range(steps):
        trainable, opt_state, loss = step(trainable, opt_state)
        losses.append(float(loss))
        if i % 15 == 0 or i == steps - 1:
            report.note(f"step {i:3d}/{steps}  loss {losses[-1]:.4f}")
    return eqx.combine(trainable, frozen), losses


def run_equinox_demo(report: Report, out_dir: pathlib.Path) -> None:
    """Runs the Equinox section, recording its checks in ``report``."""
    with report.section("equinox: lift, inspect, intervene, LoRA, train, merge, checkpoint"):
        model = build_equinox_model(jax.random.key(0))
        xs = jax.random.normal(jax.random.key(1), (64, 8))
        ys = jnp.sin(xs[:, :4]) + 0.5 * xs[:, 4:]
        before = jax.tree_util.tree_leaves(model)

        lifted = pzb.lift(model)
        for line in structure_summary(lifted).splitlines():
            report.note(line)
        report.check("treescope rendering written", write_html(lifted, out_dir / "equinox_lifted.html").exists())
        named_xs = pzb.nx.wrap(xs, "batch", "features")
        out = lifted(named_xs).untag("batch", "features").unwrap()
        report.check("lifted model computes what the original computes (batch as a named axis)",
                     bool(jnp.allclose(out, jax.vmap(model)(xs), atol=1e-6)))

        first = pzb.select(lifted).at_instances_of(pzb.nn.Linear).pick_nth_selected(0)
        _, captured = capture_intermediates(lifted, first, named_xs)
        activation = next(iter(captured.values())).untag("batch", "features").unwrap()
        report.check("captured the first Linear's output without hooks",
                     bool(jnp.allclose(activation, jax.vmap(lambda x: model.layers[0].weight @ x)(xs), atol=1e-5)))

        gelu = pzb.select(lifted).at_instances_of(pzb.nn.Elementwise).pick_nth_selected(0)
        ablated = pzb.lower(insert_intervention(lifted, gelu, Ablate("zero")))
        expected = jax.vmap(lambda x: model.layers[3](model.layers[2](jnp.zeros(16))))(xs)
        report.check("zero-ablating the hidden layer lowers to a working eqx.Module",
                     isinstance(ablated, eqx.nn.Sequential)
                     and bool(jnp.allclose(_run_batched(ablated, xs), expected, atol=1e-5)))

        adapted, count = add_lora(lifted)
        lora_model = pzb.lower(adapted)
        n_lora = sum(isinstance(m, LoRALinear) for m in jax.tree_util.tree_leaves(
            lora_model, is_leaf=lambda m: isinstance(m, LoRALinear)))
        report.check("LoRA on every Linear lowers to LoRALinear modules", count == n_lora and count >= 4,
                     f"{count} adapters")
        report.check("at initialisation the LoRA model equals the original",
                     bool(jnp.allclose(jax.vmap(lora_model)(xs), jax.vmap(model)(xs), atol=1e-6)))

        trained, losses = _train(report, lora_model, xs, ys, steps=60)
        report.check("the user's eqx.filter_value_and_grad + optax loop lowers the loss",
                     losses[-1] < losses[0], f"{losses[0]:.4f} -> {losses[-1]:.4f}")
        base_unchanged = all(
            np.array_equal(a, b) for a, b in zip(before, jax.tree_util.tree_leaves(model))
        )
        report.check("the user's model is untouched", base_unchanged)

        merged = pzb.lower(merge_lora(pzb.lift(trained)))
        report.check("re-lift + merge + lower gives the original classes and tree structure",
                     jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(model))
        report.check("the merged model computes the fine-tuned function",
                     bool(jnp.allclose(jax.vmap(merged)(xs), jax.vmap(trained)(xs), atol=1e-5)))

        checkpoint_round_trip(report, pzb.lift(merged), pzb.lift(model), out_dir)
