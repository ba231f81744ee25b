"""Loops without scanned inputs: ``lax.scan(..., length=n)`` and ``lax.fori_loop`` over a weight-tied block.

Both become a ``LayerStack`` over a ``steps`` axis that slices nothing; a
``fori_loop``'s counter is a carried side input the body may read.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lora_helpers import train_adapters

import pzbridge as pzb
from pzbridge.nn.layer_stack import LayerStack
from pzbridge.testing.numerics import assert_outputs_match
from pzbridge.toolshed.intermediates import capture_intermediates
from pzbridge.toolshed.lora import loraify_linears_in_selection

pytestmark = pytest.mark.oldest  # also run against .ci/oldest-constraints.txt

D = 6


class Universal(eqx.Module):
    """A weight-tied block applied ``steps`` times by ``lax.scan`` without ``xs`` (a universal transformer)."""

    mlp: eqx.nn.MLP
    norm: eqx.nn.LayerNorm
    steps: int = eqx.field(static=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        def step(h: jax.Array, _: None) -> tuple[jax.Array, None]:
            return h + jax.vmap(self.mlp)(jax.vmap(self.norm)(h)), None

        return jax.lax.scan(step, x, None, length=self.steps)[0]


class Refine(eqx.Module):
    """A ``fori_loop`` whose body reads its counter (a per-step scale) and a per-step row of a raw table."""

    linear: eqx.nn.Linear
    step_bias: jax.Array  # (steps, features)

    def __call__(self, x: jax.Array) -> jax.Array:
        def body(i: jax.Array, h: jax.Array) -> jax.Array:
            scale = 1.0 / (1.0 + i.astype(h.dtype))
            return h + scale * jnp.tanh(jax.vmap(self.linear)(h) + self.step_bias[i])

        return jax.lax.fori_loop(0, self.step_bias.shape[0], body, x)


def _universal() -> Universal:
    k1, _ = jax.random.split(jax.random.key(0))
    return Universal(eqx.nn.MLP(D, D, 2 * D, 1, key=k1), eqx.nn.LayerNorm(D), 3)


def _refine() -> Refine:
    k1, k2 = jax.random.split(jax.random.key(1))
    return Refine(eqx.nn.Linear(D, D, key=k1), 0.1 * jax.random.normal(k2, (4, D)))


@pytest.mark.parametrize("make", [_universal, _refine])
def test_loops_over_length_trace_to_a_stack_and_match_at_two_lengths_eager_and_jit(make):
    model = make()
    lifted = pzb.lift(model, jnp.ones((5, D)), strict=True)
    stacks = pzb.select(lifted).at_instances_of(LayerStack).get_sequence()
    assert len(stacks) == 1 and stacks[0].axis == "steps" and stacks[0].size == (3 if make is _universal else 4)
    jitted = jax.jit(lambda m, x: m.positional(x))
    for length in (5, 8):
        x = jax.random.normal(jax.random.key(length), (length, D))
        assert_outputs_match(lifted.positional(x), model(x), same_computation=False)
        assert_outputs_match(jitted(pzb.freeze_variables(lifted), x), model(x), same_computation=False)
    lowered = pzb.lower(lifted)
    assert type(lowered) is type(model)
    assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(lowered), jax.tree_util.tree_leaves(model)))


def test_capturing_inside_the_loop_returns_every_step_stacked_on_steps():
    model = _universal()
    lifted = pzb.lift(model, jnp.ones((5, D)), strict=True)
    x = jax.random.normal(jax.random.key(2), (5, D))
    _, captured = capture_intermediates(lifted, pzb.nn.Residual, pzb.nx.wrap(x, "seq", "features"))
    (stream,) = captured.values()
    assert stream.named_shape["steps"] == 3
    h = x
    for step in range(3):  # the hand-written reference: the stream after each application
        h = h + jax.vmap(model.mlp)(jax.vmap(model.norm)(h))
        np.testing.assert_allclose(np.asarray(stream[{"steps": step}].unwrap("seq", "features")), np.asarray(h),
                                   rtol=1e-5, atol=1e-5)


def test_lora_on_the_tied_block_trains_through_the_loop():
    model = _universal()
    x = jax.random.normal(jax.random.key(3), (5, D))
    lifted = pzb.lift(model, x, strict=True)
    adapted = loraify_linears_in_selection(pzb.select(lifted).at_instances_of(pzb.nn.Linear), 2, jax.random.key(4))
    lowered = pzb.lower(adapted)
    assert_outputs_match(lowered(x), model(x), same_computation=False)
    target = jax.random.normal(jax.random.key(5), (5, D))
    _, losses = train_adapters(lowered, lambda m: jnp.mean((m(x) - target) ** 2))
    assert losses[-1] < losses[0]
