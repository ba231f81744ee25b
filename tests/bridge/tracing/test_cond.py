"""``jax.lax.cond`` in traced code: a ``pzb.nn.Switch`` whose branches are lifted too."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from test_equinox_tracing import train_lora

import pzbridge as pzb
from pzbridge.testing.numerics import assert_outputs_match
from pzbridge.toolshed.lora import loraify_linears_in_selection

pytestmark = pytest.mark.oldest  # also run against .ci/oldest-constraints.txt


class Gated(eqx.Module):
    """Chooses its update by the sign of a traced statistic (``lax.cond``), a residual around it."""

    proj: eqx.nn.Linear
    w: jax.Array

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.vmap(self.proj)(x)
        return x + jax.lax.cond(h.mean() > 0, lambda h: jnp.tanh(h @ self.w), lambda h: 2 * h, h)


class NnxGated(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.proj = nnx.Linear(4, 4, rngs=rngs)
        self.scale = nnx.Param(jnp.full((4,), 0.5))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.proj(x)
        return jax.lax.cond(h.sum() > 0, lambda h: h * self.scale[...], lambda h: -h, h)


def _inputs() -> list[jax.Array]:
    x = jax.random.normal(jax.random.key(2), (5, 4))
    return [x, -x, 3 * x, jax.random.normal(jax.random.key(3), (7, 4)), jnp.full((5, 4), 10.0), jnp.full((5, 4), -10.0)]


def test_cond_lifts_to_a_switch_and_both_branches_match_eager_and_under_jit():
    model = Gated(eqx.nn.Linear(4, 4, key=jax.random.key(0)), jax.random.normal(jax.random.key(1), (4, 4)))
    lifted = pzb.lift(model, jnp.ones((5, 4)), strict=True)
    assert pzb.select(lifted).at_instances_of(pzb.nn.Switch).count() == 1
    assert pzb.select(lifted).at_instances_of(pzb.nn.Residual).count() == 1
    jitted = jax.jit(lambda m, x: m.positional(x))
    taken = set()
    for x in _inputs():
        taken.add(bool(jax.vmap(model.proj)(x).mean() > 0))
        assert_outputs_match(lifted.positional(x), model(x), same_computation=False)
        assert_outputs_match(jitted(pzb.freeze_variables(lifted), x), model(x), same_computation=False)
    assert taken == {True, False}
    assert eqx.tree_equal(pzb.lower(lifted), model)


def test_lora_reaches_a_weight_used_inside_a_branch_and_trains():
    model = Gated(eqx.nn.Linear(4, 4, key=jax.random.key(0)), jax.random.normal(jax.random.key(1), (4, 4)))
    lifted = pzb.lift(model, jnp.ones((5, 4)))
    linears = pzb.select(lifted).at_instances_of(pzb.nn.Switch).at_instances_of(pzb.nn.Linear)
    assert linears.count() == 1  # h @ self.w, inside the tanh branch
    lowered = pzb.lower(loraify_linears_in_selection(linears, 2, jax.random.key(4)))
    # An input taking the branch that holds the weight, small enough that tanh does not saturate.
    direction = jnp.broadcast_to(jnp.sign(model.proj.weight.sum(0)), (5, 4))
    x = next(x for x in (s * direction for s in (0.25, 0.5, 1.0, 2.0, 4.0)) if jax.vmap(model.proj)(x).mean() > 0)
    assert_outputs_match(lowered(x), model(x), same_computation=False)
    _, losses = train_lora(lowered, x, jnp.zeros((5, 4)))
    assert losses[-1] < losses[0]


def test_nnx_cond_reading_a_param_in_a_branch_traces_and_lowers_back():
    model = NnxGated(nnx.Rngs(0))
    lifted = pzb.lift(model, jnp.ones((2, 3, 4)), strict=True)
    assert pzb.select(lifted).at_instances_of(pzb.nn.Switch).count() == 1
    for x in (jnp.ones((2, 3, 4)), -jnp.ones((2, 3, 4)), jax.random.normal(jax.random.key(6), (1, 5, 4))):
        assert_outputs_match(lifted.positional(x), model(x), same_computation=False)
    lowered = pzb.lower(lifted)
    assert nnx.graphdef(lowered) == nnx.graphdef(model)
