"""Children the code never calls, holding arrays / Variables the parent reads and writes: lifted strictly, converted.

Real code keeps buffers in small holder modules (``self.stats.mean``, a
parameter bundle) that it reads and updates from the parent's ``__call__``.
They run no code of their own, so they stay ``Foreign`` for rebuilding even
under ``strict=True`` (``pzb.convert`` lifts strictly), while the traced body
uses their arrays.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pzbridge as pzb
from pzbridge.nn.dataflow import Traced


class Stats(nnx.Module):
    """Holds a running mean; never called."""

    def __init__(self, width: int) -> None:
        self.mean = nnx.BatchStat(jnp.zeros(width))


class Centred(nnx.Module):
    """Updates its holder child's running mean from the parent's code."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.linear = nnx.Linear(4, 4, rngs=rngs)
        self.stats = Stats(4)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.linear(x)
        self.stats.mean[...] = 0.9 * self.stats.mean[...] + 0.1 * h.mean(axis=0)
        return h - self.stats.mean[...]


def test_an_nnx_holder_child_written_by_its_parent_converts_to_equinox_and_back() -> None:
    model = Centred(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (3, 4))
    lifted = pzb.lift(model, x, strict=True)
    assert isinstance(lifted.body, Traced)
    lowered = pzb.lower(lifted)
    assert type(lowered) is Centred and type(lowered.stats) is Stats
    converted = pzb.convert(model, x, to="equinox")
    state = eqx.nn.State(converted)
    reference = nnx.clone(model)
    for _ in range(2):
        y, state = jax.vmap(converted, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)
        np.testing.assert_allclose(y, reference(x), atol=1e-6)
    back = pzb.convert(converted, x[0], to="nnx", state=state)
    assert type(back) is Centred and type(back.stats) is Stats and type(back.stats.mean) is nnx.BatchStat
    np.testing.assert_allclose(back.stats.mean[...], reference.stats.mean[...], atol=1e-6)
    assert float(jnp.abs(model.stats.mean[...]).max()) == 0.0  # the user's module is untouched


class Weights(eqx.Module):
    """A bundle of arrays the parent reads; never called."""

    w: jax.Array


class Projected(eqx.Module):
    params: Weights
    linear: eqx.nn.Linear

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear(x) @ self.params.w


def test_an_equinox_holder_child_read_by_its_parent_converts_to_nnx_and_back() -> None:
    model = Projected(Weights(jax.random.normal(jax.random.key(2), (3, 2))), eqx.nn.Linear(4, 3, key=jax.random.key(1)))
    xs = jax.random.normal(jax.random.key(0), (3, 4))
    lifted = pzb.lift(model, xs[0], strict=True)
    assert isinstance(lifted.body, Traced)
    np.testing.assert_allclose(lifted.positional(xs[0]), model(xs[0]), atol=1e-6)
    converted = pzb.convert(model, xs[0], to="nnx")
    np.testing.assert_allclose(converted(xs), jax.vmap(model)(xs), atol=1e-5)
    back = pzb.convert(converted, xs, to="equinox")
    assert type(back) is Projected and type(back.params) is Weights
    np.testing.assert_allclose(jax.vmap(back)(xs), jax.vmap(model)(xs), atol=1e-5)
