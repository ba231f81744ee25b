"""Examples flow into the items of stock containers: custom modules inside eqx/nnx Sequential are traced."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.nn.dataflow import Traced
from pzbridge.testing.equinox_strategies import Residual, ScaledByWeight
from pzbridge.testing.nnx_strategies import Residual as NnxResidual
from pzbridge.testing.nnx_strategies import Twice


@settings(max_examples=6, database=None, derandomize=True, deadline=None)
@given(width=st.integers(2, 5), out=st.integers(1, 4))
def test_custom_items_of_an_equinox_sequential_are_traced(width, out):
    key = jax.random.key(width * 10 + out)
    model = eqx.nn.Sequential([ScaledByWeight(eqx.nn.LayerNorm(width), jnp.arange(1.0, width + 1)),
                               eqx.nn.Linear(width, out, key=key), Residual(eqx.nn.Lambda(jnp.tanh))])
    x = jnp.linspace(-1.0, 1.0, width)
    lifted = pzb.lift(model, x, strict=True)
    assert [type(layer) for layer in lifted.body.sublayers][::2] == [Traced, Traced]
    np.testing.assert_allclose(lifted.positional(x), model(x), atol=1e-6)
    back = pzb.lower(lifted)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(model)
    assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(model)))


def test_without_an_example_the_items_stay_foreign():
    model = eqx.nn.Sequential([Residual(eqx.nn.Lambda(jnp.tanh))])
    assert type(pzb.lift(model).body.sublayers[0]).__name__ == "Foreign"


def test_custom_items_of_an_nnx_sequential_are_traced_and_the_module_is_untouched():
    rngs = nnx.Rngs(0)
    model = nnx.Sequential(NnxResidual(nnx.Linear(3, 3, rngs=rngs)), nnx.Linear(3, 4, rngs=rngs), jax.nn.relu,
                           Twice(nnx.LayerNorm(4, rngs=rngs)))
    graphdef, state = nnx.split(model)
    x = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
    lifted = pzb.lift(model, x, strict=True)
    assert sum(isinstance(layer, Traced) for layer in lifted.body.sublayers) == 2
    np.testing.assert_allclose(lifted.positional(x), model(x), atol=1e-6)
    back = pzb.lower(lifted)
    assert nnx.graphdef(back) == graphdef
    assert nnx.graphdef(model) == graphdef and jax.tree_util.tree_all(
        jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)), nnx.state(model), state))
