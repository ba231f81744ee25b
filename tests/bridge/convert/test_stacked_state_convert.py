"""Stacked NNX blocks holding batch statistics (``nnx.vmap``-built, run by ``nnx.scan``): lift, lower, convert.

The pattern of NNX's scan-over-layers recipe: each block's BatchNorm keeps
its own running statistics, stacked along the layer axis like the weights.
They lift as stacked StateVariables that the LayerStack slices per step and
writes back stacked; before, the lift failed (an unexplained
``NamedAxisError`` from the BatchNorm rule, or the parent stayed Foreign).
"""

from __future__ import annotations

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
from pzbridge.bridge.convert import convert, convert_with_report
from pzbridge.core.errors import PzbridgeError

TOL = {"atol": 1e-5, "rtol": 1e-5}


class NormedBlock(nnx.Module):
    """Linear -> BatchNorm -> gelu, residual."""

    def __init__(self, d: int, momentum: float, rngs: nnx.Rngs) -> None:
        self.lin = nnx.Linear(d, d, rngs=rngs)
        self.bn = nnx.BatchNorm(d, momentum=momentum, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + jax.nn.gelu(self.bn(self.lin(x)))


class ScannedStack(nnx.Module):
    """Blocks made by ``nnx.vmap`` over split Rngs and run by ``nnx.scan``, then a head."""

    def __init__(self, d: int, depth: int, momentum: float, rngs: nnx.Rngs, block: type = NormedBlock) -> None:
        @nnx.split_rngs(splits=depth)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs: nnx.Rngs) -> nnx.Module:
            return block(d, momentum, rngs)

        self.blocks = make(rngs)
        self.head = nnx.Linear(d, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(h: jax.Array, block: nnx.Module) -> jax.Array:
            return block(h)

        return self.head(run(x, self.blocks))


def _model(d: int = 6, depth: int = 3, momentum: float = 0.9, train: bool = True) -> ScannedStack:
    model = ScannedStack(d, depth, momentum, nnx.Rngs(0))
    model.train() if train else model.eval()
    return model


def _x(d: int = 6, batch: int = 5) -> jax.Array:
    return jax.random.normal(jax.random.key(1), (batch, d))


def _stats(lifted: pzb.LiftedModel) -> dict[str, pzb.StateVariable]:
    return {v.label: v for v in pzb.select(lifted.body).at_instances_of(pzb.StateVariable).get_sequence()}


@settings(max_examples=8, database=None, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(d=st.integers(2, 5), depth=st.integers(1, 3), momentum=st.sampled_from([0.5, 0.9, 0.99]), train=st.booleans())
def test_stacked_batch_norm_lifts_with_the_originals_outputs_and_statistics(d, depth, momentum, train):
    model, x = _model(d, depth, momentum, train), _x(d)
    before = np.asarray(model.blocks.bn.mean[...]).copy()
    lifted = pzb.lift(model, x)
    reference = nnx.clone(model)
    np.testing.assert_allclose(lifted.positional(x), reference(x), **TOL)
    stats = _stats(lifted)
    assert set(stats) == {"blocks.bn.mean", "blocks.bn.var"}
    for name in ("mean", "var"):
        value = stats[f"blocks.bn.{name}"].value
        assert dict(value.named_shape) == {"layers": depth, "features": d}
        np.testing.assert_allclose(value.unwrap("layers", "features"), getattr(reference.blocks.bn, name)[...],
                                   **TOL)
    np.testing.assert_array_equal(model.blocks.bn.mean[...], before)  # The user's module is untouched.


def test_stacked_batch_norm_lowers_back_to_the_original_class_with_batch_stats():
    model, x = _model(), _x()
    lifted = pzb.lift(model, x)
    lifted.positional(x)  # One training call: the lifted statistics move.
    lowered = pzb.lower(lifted)
    assert nnx.graphdef(lowered) == nnx.graphdef(model)
    assert type(lowered.blocks.bn.mean) is nnx.BatchStat and lowered.blocks.bn.mean[...].shape == (3, 6)
    reference = nnx.clone(model)
    reference(x)
    np.testing.assert_allclose(lowered.blocks.bn.var[...], reference.blocks.bn.var[...], **TOL)
    np.testing.assert_allclose(nnx.clone(lowered)(x), nnx.clone(reference)(x), **TOL)


def test_stacked_batch_norm_lifts_without_examples():
    """The parent stays Foreign; its stacked children (BatchNorm among them) lift as layer stacks."""
    lifted = pzb.lift(_model())
    assert type(lifted.body).__name__ == "Foreign"
    stacks = pzb.select(lifted.body).at_instances_of(pzb.nn.LayerStack).get_sequence()
    assert len(stacks) == 2 and all(stack.size == 3 for stack in stacks)


def test_converted_to_equinox_the_statistics_travel_in_the_state_and_come_back():
    model, x = _model(), _x()
    reference = nnx.clone(model)
    want = reference(x)
    converted, report = convert_with_report(model, x, to="equinox")
    assert [p.module for p in report.natives if p.module == "Linear"] == ["Linear"]
    state = eqx.nn.State(converted)
    batched = jax.vmap(converted, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    got, new_state = batched(x, state)
    np.testing.assert_allclose(got, want, **TOL)

    back = convert(converted, x[0], to="nnx", state=new_state)
    assert nnx.graphdef(back) == nnx.graphdef(model)
    np.testing.assert_allclose(back.blocks.bn.mean[...], reference.blocks.bn.mean[...], **TOL)
    np.testing.assert_allclose(back.blocks.bn.var[...], reference.blocks.bn.var[...], **TOL)


def test_converted_stacked_batch_norm_trains_in_equinox():
    model, x = _model(), _x()
    converted = convert(model, x, to="equinox")
    state = eqx.nn.State(converted)
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(eqx.filter(converted, eqx.is_inexact_array))

    def loss_fn(m, state):
        out, state = jax.vmap(m, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)
        return jnp.mean((out - 1.0) ** 2), state

    @eqx.filter_jit
    def step(m, state, opt_state):
        (loss, state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(m, state)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(m, eqx.is_inexact_array))
        return eqx.apply_updates(m, updates), state, opt_state, loss

    losses = []
    for _ in range(12):
        converted, state, opt_state, loss = step(converted, state, opt_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    back = convert(converted, x[0], to="nnx", state=state)
    assert not np.allclose(back.blocks.bn.mean[...], model.blocks.bn.mean[...])  # Statistics moved as trained.


def test_eval_mode_stack_converts_to_a_stateless_per_example_equinox_model():
    model, x = _model(train=False), _x()
    converted = convert(model, x, to="equinox")
    np.testing.assert_allclose(jax.vmap(converted)(x), model(x), **TOL)


class DropBlock(nnx.Module):
    """Linear -> Dropout: each block has its own random stream (split Rngs)."""

    def __init__(self, d: int, momentum: float, rngs: nnx.Rngs) -> None:
        self.lin = nnx.Linear(d, d, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.drop(self.lin(x))


def test_stacked_dropout_is_refused_naming_the_random_stream():
    model = ScannedStack(4, 2, 0.9, nnx.Rngs(0), block=DropBlock)
    with pytest.raises(PzbridgeError, match=r"random stream.*'blocks\.drop\.rngs\.count'.*Fix"):
        pzb.lift(model, jnp.ones((2, 4)), strict=True)
