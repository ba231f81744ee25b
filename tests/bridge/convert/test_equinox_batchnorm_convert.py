"""Equinox BatchNorm -> NNX through ``pzb.convert``: statistics, training, train / eval switches, and back.

``eqx.nn.BatchNorm`` keeps its statistics in an ``eqx.nn.State`` and reduces
over the ``vmap`` axis named by ``axis_name``; NNX modules are called on the
batch. ``pzb.convert(model, x, to="nnx", state=state)`` gives an NNX module
computing, on a batch, what ``jax.vmap(model, axis_name="batch")`` computes,
its statistics in NNX Variables updated by each training call as Equinox
updates the State (both modes: ``"batch"`` and ``"ema"``, whose training
normalisation NNX's own BatchNorm does not have, so the layer runs in the
adapter). ``model.eval()`` / ``model.train()`` switch it as they switch
``nnx.BatchNorm``, and converting back gives the Equinox classes, with
``eqx.nn.State(back)`` holding the current statistics.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.core.errors import LowerError


def _build(mode: str, momentum: float, width: int, front: str, affine: bool = True, inference: bool = False,
           axis_name: str = "batch", seed: int = 0) -> tuple[eqx.Module, eqx.nn.State, tuple[int, ...]]:
    """A BatchNorm model as Equinox code writes it, its State and one example's shape."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    norm = eqx.nn.BatchNorm(width, axis_name=axis_name, mode=mode, momentum=momentum, channelwise_affine=affine,
                            inference=inference)
    if front == "linear":
        layers, shape = [eqx.nn.Linear(3, width, key=k1), norm, eqx.nn.Lambda(jax.nn.relu),
                         eqx.nn.Linear(width, 2, key=k2)], (3,)
    elif front == "conv":
        layers, shape = [eqx.nn.Conv2d(2, width, 3, padding=1, key=k1), norm, eqx.nn.Lambda(jax.nn.relu)], (2, 5, 4)
    else:
        layers, shape = [norm], (width, 3)
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(layers)
    return model, state, shape


def _run(model: eqx.Module, xs: jax.Array, state: eqx.nn.State) -> tuple[jax.Array, eqx.nn.State]:
    """Equinox's way of calling a BatchNorm model on a batch."""
    return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(xs, state)


def _norm(model: eqx.nn.Sequential) -> eqx.nn.BatchNorm:
    return next(layer for layer in model.layers if isinstance(layer, eqx.nn.BatchNorm))


def _stats(model: eqx.nn.Sequential, state: eqx.nn.State) -> list[np.ndarray]:
    """The BatchNorm's State entries (mean, var, and the counter or first-call flag)."""
    norm = _norm(model)
    if norm.mode == "ema":
        return [*map(np.asarray, state.get(norm.ema_state_index)), np.asarray(state.get(norm.ema_first_time_index))]
    return [*map(np.asarray, state.get(norm.batch_state_index)), np.asarray(state.get(norm.batch_counter))]


def _structure(node: Any) -> Any:
    """Classes, fields and array shapes; a StateIndex by its marker (its initial value is where a State starts)."""
    if isinstance(node, eqx.nn.StateIndex):
        return "StateIndex", node.marker
    if isinstance(node, eqx.Module):
        return type(node).__name__, tuple((f.name, _structure(getattr(node, f.name))) for f in dataclasses.fields(node))
    if isinstance(node, (list, tuple)):
        return tuple(_structure(item) for item in node)
    if eqx.is_array(node):
        return "array", tuple(node.shape), str(node.dtype)
    return node


def _convert(model: eqx.Module, x: jax.Array, state: eqx.nn.State) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Equinox warns about mode= defaults; not this test's business.
        return pzb.convert(model, x, to="nnx", state=state)


def _close(got: Any, want: Any) -> None:
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


@settings(max_examples=12, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(mode=st.sampled_from(["batch", "ema"]), momentum=st.sampled_from([0.5, 0.9, 0.99]),
       width=st.integers(1, 5), front=st.sampled_from(["linear", "conv", "none"]), affine=st.booleans(),
       inference=st.booleans(), batch=st.integers(2, 5), calls=st.integers(1, 3))
def test_converted_batchnorm_follows_equinox_call_for_call_and_comes_back(mode, momentum, width, front, affine,
                                                                          inference, batch, calls):
    model, state, shape = _build(mode, momentum, width, front, affine, inference)
    xs = jax.random.normal(jax.random.key(1), (batch, *shape))
    converted = _convert(model, xs[0], state)
    assert isinstance(converted, nnx.Module)
    assert len(jax.tree_util.tree_leaves(nnx.state(converted, nnx.BatchStat))) == 2  # As nnx.BatchNorm keeps them.
    for call in range(calls):
        batch_xs = xs * (call + 1) + call
        want, state = _run(model, batch_xs, state)
        _close(converted(batch_xs), want)
    back = pzb.convert(converted, xs, to="equinox")
    assert _structure(back) == _structure(model)
    back_state = eqx.nn.State(back)
    for got, want in zip(_stats(back, back_state), _stats(model, state)):
        _close(got, want)
    got, back_state = _run(back, xs, back_state)
    want, state = _run(model, xs, state)
    _close(got, want)
    for got_stat, want_stat in zip(_stats(back, back_state), _stats(model, state)):
        _close(got_stat, want_stat)


@pytest.mark.parametrize("mode", ["batch", "ema"])
def test_converted_batchnorm_trains_with_nnx_optimizer_as_equinox_trains_it(mode):
    model, state, shape = _build(mode, 0.9, 6, "linear", seed=2)
    xs = jax.random.normal(jax.random.key(3), (16, *shape))
    ys = jnp.sin(xs.sum(-1, keepdims=True)) * jnp.ones((1, 2))
    converted = _convert(model, xs[0], state)
    # SGD: Adam divides by the gradient's size, so the ~1e-9 rounding of a gradient that is zero (the bias before
    # a BatchNorm on its first call) would become a full step.
    tx = optax.sgd(0.1)

    def equinox_loss(m: eqx.Module, s: eqx.nn.State) -> tuple[jax.Array, eqx.nn.State]:
        pred, s = _run(m, xs, s)
        return jnp.mean((pred - ys) ** 2), s

    @eqx.filter_jit
    def equinox_step(m: eqx.Module, s: eqx.nn.State, opt_state: Any) -> tuple[Any, ...]:
        (loss, s), grads = eqx.filter_value_and_grad(equinox_loss, has_aux=True)(m, s)
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(m, eqx.is_inexact_array))
        return eqx.apply_updates(m, updates), s, opt_state, loss

    @nnx.jit
    def nnx_step(m: nnx.Module, optimizer: nnx.Optimizer) -> jax.Array:
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(xs) - ys) ** 2))(m)
        optimizer.update(m, grads)
        return loss

    opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))
    optimizer = nnx.Optimizer(converted, tx, wrt=nnx.Param)
    losses = []
    for _ in range(15):
        model, state, opt_state, want = equinox_step(model, state, opt_state)
        got = nnx_step(converted, optimizer)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-4, atol=1e-6)
        losses.append(float(got))
    assert losses[-1] < 0.7 * losses[0]
    back = pzb.convert(converted, xs, to="equinox")
    for got_stat, want_stat in zip(_stats(back, eqx.nn.State(back)), _stats(model, state)):
        np.testing.assert_allclose(got_stat, want_stat, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["batch", "ema"])
def test_eval_and_train_switch_the_converted_batchnorm_as_they_switch_nnx_batchnorm(mode):
    model, state, shape = _build(mode, 0.9, 4, "conv")
    xs = jax.random.normal(jax.random.key(4), (3, *shape))
    converted = _convert(model, xs[0], state)
    _, state = _run(model, xs, state)
    converted(xs)  # One training call each.
    converted.eval()
    before = nnx.clone(converted)
    want, _ = _run(eqx.nn.inference_mode(model), xs + 1, state)
    _close(converted(xs + 1), want)
    for a, b in zip(jax.tree_util.tree_leaves(nnx.state(converted)), jax.tree_util.tree_leaves(nnx.state(before))):
        np.testing.assert_array_equal(a, b)  # Evaluation writes nothing.
    back = pzb.convert(converted, xs, to="equinox")
    assert _norm(back).inference
    converted.train()
    want, state = _run(model, xs, state)
    _close(converted(xs), want)


def test_converting_leaves_the_users_model_and_state_alone():
    model, state, shape = _build("ema", 0.9, 3, "linear")
    xs = jax.random.normal(jax.random.key(5), (4, *shape))
    before = [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(state)]
    _convert(model, xs[0], state)
    for leaf, old in zip(jax.tree_util.tree_leaves(state), before, strict=True):
        np.testing.assert_array_equal(np.asarray(leaf), old)
    _run(model, xs, state)  # Still a usable State (eqx.nn.State.set invalidates the State it is called on).


def test_a_batchnorm_reducing_over_another_axis_name_is_refused_with_the_fix():
    model, state, shape = _build("batch", 0.9, 3, "linear", axis_name="devices")
    with pytest.raises(LowerError, match="axis_name='batch'"):
        _convert(model, jnp.ones(shape), state)
