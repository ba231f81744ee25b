"""Lowered models holding worlds-axis interventions run in Equinox and NNX under a ``vmap`` naming ``worlds``.

An interchange or a patch reads world 0 *and* its source world. Lowered, the
model is per-example Equinox code (or batched NNX code); the adapter holding
the intervention gathers the worlds over ``jax.vmap(..., axis_name="worlds")``
(``nnx.vmap`` in NNX), runs the intervention on all of them and keeps its own
world. The laws: the lowered model equals the lifted one on the stacked
worlds, under jit too, and differentiates through the gathered worlds;
outside such a vmap, and for layers changing the number of worlds, a
``LowerError`` names the fix.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from test_trainable_interventions import D_IN, HIDDEN, TOL, RawMLP

import pzbridge as pzb
from pzbridge.core.errors import LowerError
from pzbridge.toolshed.interventions import insert_intervention
from pzbridge.toolshed.path_patching import patch_paths
from pzbridge.toolshed.trainable import LowRankRotatedInterchange, RotatedSubspaceInterchange
from pzbridge.toolshed.where import Where
from pzbridge.toolshed.worlds import patch_worlds, stack_worlds


class TwoLayer(nnx.Module):
    """A custom NNX module: Linear, tanh, Linear."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.a = nnx.Linear(D_IN, HIDDEN, rngs=rngs)
        self.b = nnx.Linear(HIDDEN, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.b(jnp.tanh(self.a(x)))


def _raw_mlp(seed: int) -> RawMLP:
    ks = jax.random.split(jax.random.key(seed), 3)
    return RawMLP(jax.random.normal(ks[0], (D_IN, HIDDEN)) / 2, jax.random.normal(ks[1], (HIDDEN,)) / 4,
                  jax.random.normal(ks[2], (HIDDEN, 5)) / 2)


def _stacked(worlds: list[jax.Array], *names: str) -> Any:
    return stack_worlds([pzb.nx.wrap(w, *names) for w in worlds])


@settings(max_examples=6, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), k=st.integers(0, HIDDEN), two_sources=st.booleans())
def test_a_lowered_traced_equinox_model_equals_the_lifted_one_on_stacked_worlds(seed: int, k: int,
                                                                               two_sources: bool) -> None:
    lifted = pzb.lift(_raw_mlp(seed), jnp.ones((3, D_IN)), strict=True)
    if two_sources:
        first = k // 2
        das = LowRankRotatedInterchange.from_config("das", jax.random.key(seed), {"features": HIDDEN},
                                                    k=(first, k - first), routes=((1, 1, 2), (2, 1, 2)))
    else:
        das = RotatedSubspaceInterchange.from_config("das", jax.random.key(seed), {"features": HIDDEN}, k=k)
    edited = insert_intervention(lifted, Where(label="w2", side="before"), das)
    worlds = [jax.random.normal(jax.random.key(seed + i), (3, D_IN)) for i in range(das.world_count())]
    want = edited(_stacked(worlds, "batch", "features")).unwrap("worlds", "batch", "features")
    lowered = pzb.lower(edited)
    assert isinstance(lowered, eqx.Module)
    run = jax.vmap(lowered, axis_name="worlds")
    np.testing.assert_allclose(run(jnp.stack(worlds)), want, **TOL)
    np.testing.assert_allclose(jax.jit(run)(jnp.stack(worlds)), want, **TOL)


def test_gradients_through_the_lowered_equinox_model_equal_the_lifted_ones() -> None:
    mlp = eqx.nn.MLP(D_IN, 2, HIDDEN, 1, activation=jnp.tanh, key=jax.random.key(1))
    lifted = pzb.lift(mlp)
    das = RotatedSubspaceInterchange.from_config("das", jax.random.key(2), {"features": HIDDEN}, k=2)
    edited = patch_worlds(insert_intervention(lifted, Where(path="body.sublayers[1]"), das),
                          Where(path="body.sublayers[2]"), (0, 1))  # an identity patch: routes kept
    worlds = [jax.random.normal(jax.random.key(3 + i), (D_IN,)) for i in range(2)]
    lowered = pzb.lower(edited)

    def lowered_loss(model: Any) -> jax.Array:
        return jnp.sum(jax.vmap(model, axis_name="worlds")(jnp.stack(worlds))[0] ** 2)

    grads = eqx.filter_grad(lowered_loss)(lowered)
    # The gathered worlds are differentiated through: a directional derivative matches finite differences.
    eps = 1e-3
    direction = jax.random.normal(jax.random.key(9), mlp.layers[0].weight.shape)
    bumped = eqx.tree_at(lambda m: m.layers[0].weight, lowered, lowered.layers[0].weight + eps * direction)
    numeric = (lowered_loss(bumped) - lowered_loss(lowered)) / eps
    analytic = jnp.sum(grads.layers[0].weight * direction)
    np.testing.assert_allclose(numeric, analytic, rtol=5e-2, atol=5e-3)


def test_a_lowered_nnx_model_runs_under_nnx_vmap_on_batched_worlds() -> None:
    model = TwoLayer(nnx.Rngs(0))
    xs = jax.random.normal(jax.random.key(1), (2, 5, D_IN))  # worlds, batch, features
    lifted = pzb.lift(model, xs[0], strict=True)
    das = RotatedSubspaceInterchange.from_config("das", jax.random.key(2), {"features": HIDDEN}, k=3)
    edited = insert_intervention(lifted, Where(label="b.kernel", side="before"), das)
    want = edited(_stacked(list(xs), "batch", "features")).unwrap("worlds", "batch", "features")
    lowered = pzb.lower(edited)
    assert isinstance(lowered, TwoLayer)
    got = nnx.vmap(lambda module, x: module(x), in_axes=(None, 0), axis_name="worlds")(lowered, xs)
    np.testing.assert_allclose(got, want, **TOL)
    with pytest.raises(LowerError, match="axis_name='worlds'"):
        lowered(xs[0])


def test_a_lowered_whole_site_patch_equals_running_the_source() -> None:
    mlp = eqx.nn.MLP(D_IN, 2, HIDDEN, 1, activation=jnp.tanh, key=jax.random.key(4))
    lowered = pzb.lower(patch_worlds(pzb.lift(mlp), Where(path="body.sublayers[1]"), (1, 1)))
    base, source = jax.random.normal(jax.random.key(5), (2, D_IN))
    got = jax.vmap(lowered, axis_name="worlds")(jnp.stack([base, source]))
    np.testing.assert_allclose(got[0], mlp(source), **TOL)  # the whole hidden layer from the source
    np.testing.assert_allclose(got[1], mlp(source), **TOL)


def test_path_patching_which_adds_helper_worlds_is_refused_when_lowered() -> None:
    mlp = eqx.nn.MLP(D_IN, 2, HIDDEN, 2, activation=jnp.tanh, key=jax.random.key(6))
    lifted = pzb.lift(mlp)
    edited = patch_paths(lifted, Where(path="body.sublayers[1]"), [Where(path="body.sublayers[3]")], (1, 1))
    lowered = pzb.lower(edited, framework="equinox")
    with pytest.raises(LowerError, match="adding or dropping worlds"):
        jax.vmap(lowered, axis_name="worlds")(jnp.ones((2, D_IN)))
