"""Demo section: a Flax NNX model through the whole pzbridge workflow.

Lift, summarise and render, capture an activation, ablate, add LoRA, lower
to ``nnx.LoRALinear``, train with ``nnx.Optimizer(..., wrt=nnx.LoRAParam)``
under ``nnx.jit`` (the user's own loop), re-lift, merge, lower to the
original classes, and checkpoint with orbax.

Example:
    >>> type(build_nnx_model(0)).__name__
    'Sequential'
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import pzbridge as pzb
from pzbridge.demo.report import Report
from pzbridge.demo.roundtrip import add_lora, checkpoint_round_trip, structure_summary, write_html
from pzbridge.toolshed.intermediates import capture_intermediates
from pzbridge.toolshed.interventions import Ablate, insert_intervention
from pzbridge.toolshed.lora import merge_lora


class ResidualMLP(nnx.Module):
    """A user's own block (no pzbridge rule: it lifts to ``Foreign``)."""

    def __init__(self, width: int, rngs: nnx.Rngs) -> None:
        self.norm = nnx.RMSNorm(width, rngs=rngs)
        self.up = nnx.Linear(width, 2 * width, rngs=rngs)
        self.down = nnx.Linear(2 * width, width, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.down(jax.nn.gelu(self.up(self.norm(x))))


def build_nnx_model(seed: int) -> nnx.Sequential:
    """A small regression model: Linear, GELU, a custom residual block, Linear."""
    rngs = nnx.Rngs(seed)
    return nnx.Sequential(nnx.Linear(8, 16, rngs=rngs), jax.nn.gelu, ResidualMLP(16, rngs), nnx.Linear(16, 4, rngs=rngs))


def _train(report: Report, model: nnx.Module, xs: jax.Array, ys: jax.Array, steps: int) -> list[float]:
    """The user's ordinary NNX training loop, training only the LoRA parameters."""
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(m):
            return jnp.mean((m(xs) - ys) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    losses = []
    for i in range(steps):
        losses.append(float(step(model, optimizer)))
        if i % 15 == 0 or i == steps - 1:
            report.note(f"step {i:3d}/{steps}  loss {losses[-1]:.4f}")
    return losses


def run_nnx_demo(report: Report, out_dir: pathlib.Path) -> None:
    """Runs the NNX section, recording its checks in ``report``."""
    with report.section("flax nnx: lift, inspect, intervene, LoRA, train, merge, checkpoint"):
        model = build_nnx_model(0)
        xs = jax.random.normal(jax.random.key(1), (64, 8))
        ys = jnp.sin(xs[:, :4]) + 0.5 * xs[:, 4:]
        state_before = jax.tree_util.tree_map(np.asarray, nnx.state(model))

        lifted = pzb.lift(model)
        for line in structure_summary(lifted).splitlines():
            report.note(line)
        report.check("treescope rendering written", write_html(lifted, out_dir / "nnx_lifted.html").exists())
        report.check("lifted model computes what the original computes",
                     bool(jnp.allclose(lifted.positional(xs), model(xs), atol=1e-6)))

        named_xs = pzb.nx.wrap(xs, "batch", "features")
        first = pzb.select(lifted).at_instances_of(pzb.nn.Linear).pick_nth_selected(0)
        _, captured = capture_intermediates(lifted, first, named_xs)
        activation = next(iter(captured.values())).untag("batch", "features").unwrap()
        report.check("captured the first Linear's output without hooks",
                     bool(jnp.allclose(activation, xs @ model.layers[0].kernel[...], atol=1e-5)))

        first_affine = pzb.select(lifted).at_instances_of(pzb.nn.AddBias).pick_nth_selected(0)
        ablated = pzb.lower(insert_intervention(lifted, first_affine, Ablate("zero")))
        expected = model.layers[3](model.layers[2](jax.nn.gelu(jnp.zeros((64, 16)))))
        report.check("zero-ablating the first layer lowers to a working nnx.Module",
                     isinstance(ablated, nnx.Module) and bool(jnp.allclose(ablated(xs), expected, atol=1e-5)))

        adapted, count = add_lora(lifted)
        lora_model = pzb.lower(adapted)
        lora_linears = [m for _, m in nnx.iter_graph(lora_model) if isinstance(m, nnx.LoRALinear)]
        report.check("LoRA on every Linear lowers to nnx.LoRALinear", count == len(lora_linears) == 4,
                     f"{count} adapters")
        base_before = jax.tree_util.tree_map(np.asarray, nnx.state(lora_model, nnx.Not(nnx.LoRAParam)))
        losses = _train(report, lora_model, xs, ys, steps=60)
        report.check("nnx.Optimizer(wrt=nnx.LoRAParam) under nnx.jit lowers the loss",
                     losses[-1] < losses[0], f"{losses[0]:.4f} -> {losses[-1]:.4f}")
        base_after = nnx.state(lora_model, nnx.Not(nnx.LoRAParam))
        report.check("base parameters are bitwise unchanged by adapter training",
                     all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(base_before),
                                                               jax.tree_util.tree_leaves(base_after))))
        report.check("the user's model is untouched",
                     all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(state_before),
                                                               jax.tree_util.tree_leaves(nnx.state(model)))))

        merged = pzb.lower(merge_lora(pzb.lift(lora_model)))
        report.check("re-lift + merge + lower gives the original classes (equal nnx.graphdef)",
                     nnx.graphdef(merged) == nnx.graphdef(model))
        report.check("the merged model computes the fine-tuned function",
                     bool(jnp.allclose(merged(xs), lora_model(xs), atol=1e-5)))

        checkpoint_round_trip(report, pzb.lift(merged), pzb.lift(model), out_dir)
