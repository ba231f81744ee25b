"""Converted models switch train / eval and take randomness the target framework's way.

An NNX model with ``nnx.Dropout`` converted to Equinox draws its masks from
the ``key=`` of each call (``jax.vmap(model)(xs, key=keys)``, as
``eqx.nn.Dropout`` does); without a key it draws what the NNX model's next
call would. ``eqx.nn.inference_mode(converted)`` switches its Dropouts and
BatchNorms off as NNX's ``model.eval()`` does, and converting back keeps the
mode.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.core.errors import LowerError


class DropoutBlock(nnx.Module):
    """An MLP block with dropout between its layers, as NNX code writes it."""

    def __init__(self, width: int, rate: float, rngs: nnx.Rngs) -> None:
        self.up = nnx.Linear(4, width, rngs=rngs)
        self.drop = nnx.Dropout(rate, rngs=rngs)
        self.down = nnx.Linear(width, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(self.drop(jax.nn.relu(self.up(x))))


def _model(kind: str, width: int, rate: float, seed: int) -> nnx.Module:
    if kind == "custom":
        return DropoutBlock(width, rate, nnx.Rngs(seed))
    return nnx.Sequential(nnx.Linear(4, width, rngs=nnx.Rngs(seed)), nnx.Dropout(rate, rngs=nnx.Rngs(seed + 1)),
                          nnx.Linear(width, 3, rngs=nnx.Rngs(seed + 2)))


def _batched(model: eqx.Module, xs: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """The converted model on a batch, as Equinox calls it (dropout draws for the whole batch: the named axis)."""
    if key is None:
        return jax.vmap(model, axis_name="batch")(xs)
    keys = jax.random.split(key, xs.shape[0])
    return jax.vmap(lambda x, k: model(x, key=k), axis_name="batch")(xs, keys)


@settings(max_examples=8, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(["custom", "sequential"]), rate=st.sampled_from([0.25, 0.5, 0.75]),
       seed=st.integers(0, 5), batch=st.integers(1, 3))
def test_converted_dropout_draws_from_each_calls_key_and_switches_with_inference_mode(kind, rate, seed, batch):
    model = _model(kind, 64, rate, seed)
    xs = jax.random.normal(jax.random.key(seed), (batch, 4))
    converted = pzb.convert(model, xs, to="equinox")
    first = nnx.clone(model)(xs)
    np.testing.assert_allclose(_batched(converted, xs), first, atol=1e-5, rtol=1e-5)  # No key: NNX's next draw.
    one, same, other = (_batched(converted, xs, jax.random.key(k)) for k in (1, 1, 2))
    np.testing.assert_array_equal(one, same)
    assert not np.allclose(one, other)  # 64 units: two keys give the same masks with probability < 1e-8.
    evaluating = eqx.nn.inference_mode(converted)
    model.eval()
    np.testing.assert_allclose(_batched(evaluating, xs, jax.random.key(1)), model(xs), atol=1e-5, rtol=1e-5)
    back = pzb.convert(evaluating, xs[0], to="nnx")
    assert type(back) is type(model)
    assert all(m.deterministic for _, m in nnx.iter_modules(back) if isinstance(m, nnx.Dropout))
    np.testing.assert_allclose(back(xs), model(xs), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(_batched(eqx.nn.inference_mode(evaluating, value=False), xs, jax.random.key(2)),
                                  other)


def test_a_converted_dropout_model_trains_with_fresh_masks_under_filter_jit():
    model = DropoutBlock(32, 0.5, nnx.Rngs(0))
    xs = jax.random.normal(jax.random.key(0), (8, 4))
    ys = jnp.sin(xs[:, :3])
    converted = pzb.convert(model, xs, to="equinox")

    @eqx.filter_jit
    def loss(m: eqx.Module, key: jax.Array) -> jax.Array:
        return jnp.mean((_batched(m, xs, key) - ys) ** 2)

    losses = [float(loss(converted, jax.random.key(k))) for k in range(4)]
    assert len(set(losses)) == 4  # Each step's key draws its own masks.
    grads = eqx.filter_grad(loss)(converted, jax.random.key(0))
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(eqx.filter(grads, eqx.is_array)))


def test_inference_mode_of_a_converted_batchnorm_uses_the_running_statistics():
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.BatchNorm(4, momentum=0.5, rngs=nnx.Rngs(1)))
    xs = jax.random.normal(jax.random.key(1), (5, 3))
    converted = pzb.convert(model, xs, to="equinox")
    state = eqx.nn.State(converted)
    run = jax.vmap(converted, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    _, state = run(xs, state)
    model(xs)  # The same training call as the converted one's.
    model.eval()
    got, after = jax.vmap(eqx.nn.inference_mode(converted), axis_name="batch", in_axes=(0, None),
                          out_axes=(0, None))(xs + 1, state)
    np.testing.assert_allclose(got, model(xs + 1), atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(after), jax.tree_util.tree_leaves(state)):
        np.testing.assert_array_equal(a, b)  # Evaluation writes nothing.


def test_jax_jit_tracing_the_inference_switch_is_refused_naming_filter_jit():
    model = DropoutBlock(8, 0.5, nnx.Rngs(0))
    xs = jnp.ones((2, 4))
    converted = pzb.convert(model, xs, to="equinox")
    with pytest.raises(LowerError, match="eqx.filter_jit"):
        jax.jit(lambda m, x: jax.vmap(m, axis_name="batch")(x))(converted, xs)
    plain = pzb.convert(Scaled(nnx.Rngs(0)), xs, to="equinox")
    assert type(plain).__name__ == "EquinoxAdapter"
    assert jax.jit(lambda m, x: jax.vmap(m)(x))(plain, xs).shape == (2, 4)  # Nothing to switch: plain jit works.
    np.testing.assert_array_equal(jax.vmap(eqx.nn.inference_mode(plain))(xs), jax.vmap(plain)(xs))


class Scaled(nnx.Module):
    """Glue on a raw parameter, no Dropout or BatchNorm."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.linear = nnx.Linear(4, 4, rngs=rngs)
        self.scale = nnx.Param(jnp.linspace(0.5, 1.5, 4))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear(x) * self.scale[...]
