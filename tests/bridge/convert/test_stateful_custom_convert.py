"""Custom Equinox modules called ``y, state = model(x, state)`` (BatchNorm inside): traced, lowered, converted.

Real Equinox ResNets thread the ``eqx.nn.State`` by hand through blocks with
residual glue. Traced lifting follows the State through the child calls
(``pzb.lift(model, x, state)``), keeps the statistics in the lifted
BatchNorms, lowers back to the original classes with the current State
(``lower_with_state``), lowers edited glue to a stateful adapter, and
converts to NNX and back with equal outputs and statistics.
"""

from __future__ import annotations

import warnings
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from classifier_steps import equinox_classifier_run, nnx_classifier_losses
from flax import nnx
from hypothesis import HealthCheck, given, settings

import pzbridge as pzb
from pzbridge.bridge.equinox.state import EqxBatchNorm, lower_with_state
from pzbridge.bridge.output_check import check_output_shapes, disagreement_on_examples
from pzbridge.core.errors import LiftError, LowerError, NamedAxisError
from pzbridge.nn.dataflow import Traced
from pzbridge.nn.foreign import Foreign
from pzbridge.nn.named_mean import MeanAxes
from pzbridge.testing.stateful_equinox import (
    ConvBlock,
    ResNet,
    StatefulEquinoxExample,
    run_batch,
    stateful_equinox_models,
)


def _build(mode: str = "batch", channels: int = 4, depth: int = 2, seed: int = 0) -> tuple[ResNet, eqx.nn.State]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Equinox's note on BatchNorm defaults
        return eqx.nn.make_with_state(ResNet)(3, channels, depth, 5, jax.random.key(seed), mode=mode, momentum=0.9)


def _batch(size: int = 4, seed: int = 1) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (size, 3, 6, 6))


def _norms(model: Any) -> list[eqx.nn.BatchNorm]:
    found = jax.tree_util.tree_leaves(model, is_leaf=lambda v: isinstance(v, eqx.nn.BatchNorm))
    return [n for n in found if isinstance(n, eqx.nn.BatchNorm)]


def _statistics(model: Any, state: eqx.nn.State) -> list[np.ndarray]:
    """Every BatchNorm's (mean, var) and counter / first-call flag, in model order (markers may differ)."""
    out = []
    for norm in _norms(model):
        stats = norm.ema_state_index if norm.mode == "ema" else norm.batch_state_index
        flag = norm.ema_first_time_index if norm.mode == "ema" else norm.batch_counter
        out.extend(np.asarray(a, dtype=np.float64) for a in (*state.get(stats), state.get(flag)))
    return out


def _assert_statistics(model: Any, state: Any, reference: Any, reference_state: Any) -> None:
    got, want = _statistics(model, state), _statistics(reference, reference_state)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["batch", "ema"])
@pytest.mark.parametrize("as_keyword", [False, True])
def test_a_state_threading_resnet_lifts_traced_and_computes_the_original(mode: str, as_keyword: bool) -> None:
    model, state = _build(mode)
    xs = _batch()
    lifted = pzb.lift(model, xs[0], state=state, strict=True) if as_keyword else pzb.lift(model, xs[0], state,
                                                                                          strict=True)
    assert isinstance(lifted.body, Traced)
    assert not pzb.select(lifted).at_instances_of(Foreign).count()
    assert pzb.select(lifted).at_instances_of(EqxBatchNorm).count() == 4
    want, want_state = run_batch(model, xs, state)
    out = lifted(pzb.nx.wrap(xs, "batch", "channels", "height", "width"))
    np.testing.assert_allclose(out.unwrap("batch", "features"), want, atol=1e-5, rtol=1e-5)
    lowered, new_state = lower_with_state(lifted)  # The lifted BatchNorms updated their statistics as Equinox.
    _assert_statistics(lowered, new_state, model, want_state)
    run_batch(model, xs, state)  # The user's State was not spent by the lift (Equinox refuses a State once set).
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(state),
                                                     jax.tree_util.tree_leaves(_build(mode)[1])))


@pytest.mark.parametrize("mode", ["batch", "ema"])
def test_the_lift_time_checks_run_a_state_threading_model_as_a_batch_of_one(mode: str) -> None:
    model, state = _build(mode)
    x = _batch()[0]
    lifted = pzb.lift(model, x, state)
    assert disagreement_on_examples(model, lifted, "equinox", (x, state), {}) is None
    other, _ = _build(mode, seed=7)  # same structure, other weights: the values differ, and the check says so
    assert "differs" in disagreement_on_examples(other, lifted, "equinox", (x, state), {})
    check_output_shapes(model, lifted, "equinox", (x, state), {})
    run_batch(model, _batch(), state)  # the checks ran on copies: the State is not spent


def test_an_example_with_a_size_one_axis_lifts_a_model_running_at_other_sizes() -> None:
    model, state = _build()
    lifted = pzb.lift(model, jnp.ones((3, 1, 5)), state, strict=True)  # height 1: traced on a widened copy
    for shape in ((4, 3, 1, 5), (4, 3, 4, 6)):
        xs = jax.random.normal(jax.random.key(2), shape)
        want, _ = run_batch(model, xs, state)
        out = lifted(pzb.nx.wrap(xs, "batch", "channels", "height", "width"))
        np.testing.assert_allclose(out.unwrap("batch", "features"), want, atol=1e-5, rtol=1e-5)


def test_lowering_gives_the_original_classes_and_the_current_state() -> None:
    model, state = _build()
    xs = _batch()
    lifted = pzb.lift(model, xs[0], state)
    lifted(pzb.nx.wrap(xs, "batch", "channels", "height", "width"))
    lowered, new_state = lower_with_state(lifted)
    assert type(lowered) is ResNet and all(type(b) is ConvBlock for b in lowered.blocks)
    assert all(type(n) is eqx.nn.BatchNorm for n in _norms(lowered))
    assert lowered.blocks[0].conv1.weight is model.blocks[0].conv1.weight  # no copies
    _, after_one = run_batch(model, xs, state)
    got, got_state = run_batch(lowered, xs, new_state)
    want, want_state = run_batch(model, xs, after_one)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    _assert_statistics(lowered, got_state, model, want_state)


def test_inference_mode_runs_per_example_without_a_batch_axis() -> None:
    model, state = _build()
    model = eqx.nn.inference_mode(model)
    x = _batch()[0]
    lifted = pzb.lift(model, x, state)
    assert isinstance(lifted.body, Traced)
    want = model(x, state)[0]
    np.testing.assert_allclose(lifted.positional(x), want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))
    with pytest.raises(NamedAxisError, match="found an eqx.nn.State"):  # the lifted model holds its state
        lifted.positional(x, state)


@pytest.mark.parametrize("mode", ["batch", "ema"])
def test_converted_to_nnx_computes_the_batch_trains_and_updates_its_statistics(mode: str) -> None:
    model, state = _build(mode)
    xs = _batch()
    converted = pzb.convert(model, xs[0], state, to="nnx")
    want, want_state = run_batch(model, xs, state)
    np.testing.assert_allclose(converted(xs), want, atol=1e-5, rtol=1e-5)
    assert len(jax.tree_util.tree_leaves(nnx.state(converted, nnx.BatchStat))) >= 8
    back = pzb.convert(converted, xs, to="equinox")  # the statistics after one training call come back
    assert type(back) is ResNet and all(type(n) is eqx.nn.BatchNorm for n in _norms(back))
    _assert_statistics(back, eqx.nn.State(back), model, want_state)

    losses = nnx_classifier_losses(converted, xs, jnp.arange(4) % 5, 8)
    assert losses[-1] < losses[0]


def test_converted_back_to_equinox_trains_with_filter_value_and_grad() -> None:
    model, state = _build()
    xs = _batch()
    back = pzb.convert(pzb.convert(model, xs[0], state, to="nnx"), xs, to="equinox")
    back, back_state, losses = equinox_classifier_run(back, eqx.nn.State(back), xs, jnp.arange(4) % 5, 8)
    assert losses[-1] < losses[0]
    counters = [back_state.get(n.batch_counter) for n in _norms(back)]
    assert all(int(c) == 8 for c in counters)  # the statistics updated at every training step


def _structure(model: Any) -> Any:
    """Classes, fields and parameter shapes (a StateIndex as a leaf: its initial value is the current State)."""
    leaves, treedef = jax.tree_util.tree_flatten(eqx.filter(model, eqx.is_inexact_array),
                                                 is_leaf=lambda v: isinstance(v, eqx.nn.StateIndex))
    return treedef, [getattr(leaf, "shape", leaf.marker if isinstance(leaf, eqx.nn.StateIndex) else None)
                     for leaf in leaves]


def _plain(value: Any) -> Any:
    return value.unwrap(*value.named_shape) if pzb.nx.is_namedarray(value) else value


def _negated_pool(model: ResNet, x: jax.Array, state: eqx.nn.State) -> tuple[jax.Array, eqx.nn.State]:
    x = model.stem(x)
    for block in model.blocks:
        x, state = block(x, state)
    return model.head(-jnp.mean(x, axis=(1, 2))), state


def test_edited_glue_lowers_to_a_stateful_adapter_that_gathers_the_batch() -> None:
    model, state = _build()
    xs = _batch()
    lifted = pzb.lift(model, xs[0], state)
    edited = pzb.select(lifted).at_instances_of(MeanAxes).apply(
        lambda mean: pzb.nn.Sequential([mean, pzb.nn.Elementwise(jnp.negative)]))
    adapter = pzb.lower(edited)
    assert adapter.is_stateful()
    got, got_state = run_batch(adapter, xs, eqx.nn.State(adapter))
    want, want_state = jax.vmap(lambda a, s: _negated_pool(model, a, s), axis_name="batch", in_axes=(0, None),
                                out_axes=(0, None))(xs, state)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    relifted = pzb.lift(adapter, state=got_state)  # its statistics come back from its State
    held = [np.asarray(_plain(v.value), dtype=np.float64)
            for norm in pzb.select(relifted).at_instances_of(EqxBatchNorm).get_sequence()
            for v in (norm.running_mean, norm.running_var, norm.counter)]
    for g, w in zip(held, _statistics(model, want_state), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-5)
    with pytest.raises(LowerError, match="axis_name='batch'"):
        adapter(xs[0], eqx.nn.State(adapter))


class OpensTheState(eqx.Module):
    """Custom code reading and setting a State entry of its own."""

    linear: eqx.nn.Linear
    index: eqx.nn.StateIndex

    def __init__(self, key: jax.Array) -> None:
        self.linear = eqx.nn.Linear(3, 3, key=key)
        self.index = eqx.nn.StateIndex(jnp.zeros(3))

    def __call__(self, x: jax.Array, state: eqx.nn.State) -> tuple[jax.Array, eqx.nn.State]:
        total = state.get(self.index) + x
        return self.linear(total), state.set(self.index, total)


class ReadsAChildsEntry(eqx.Module):
    """Custom code opening the State at a ``StateIndex`` its child holds (not one of its own)."""

    inner: OpensTheState

    def __call__(self, x: jax.Array, state: eqx.nn.State) -> tuple[jax.Array, eqx.nn.State]:
        return x + state.get(self.inner.index), state


def test_code_opening_the_state_at_a_childs_index_stays_foreign_naming_why() -> None:
    model, state = eqx.nn.make_with_state(ReadsAChildsEntry)(OpensTheState(jax.random.key(0)))
    x = jnp.ones(3)
    assert isinstance(pzb.lift(model, x, state).body, Foreign)
    with pytest.raises(LiftError, match=r"opens the eqx.nn.State itself \(state.get.*holds no eqx.nn.StateIndex"):
        pzb.lift(model, x, state, strict=True)


def test_a_second_state_in_the_example_is_refused() -> None:
    model, state = _build()
    _, other = _build(seed=1)
    with pytest.raises(LiftError, match="same State as state="):
        pzb.lift(model, _batch()[0], other, state=state)


@settings(max_examples=30, database=None, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(stateful_equinox_models())
def test_random_stateful_models_convert_to_nnx_and_back_with_outputs_statistics_and_classes(
        example: StatefulEquinoxExample) -> None:
    model, state, xs = example.model, example.state, example.batch
    lifted = pzb.lift(model, *example.args, state, strict=True)
    assert not pzb.select(lifted).at_instances_of(Foreign).count()
    converted = pzb.convert(model, *example.args, state, to="nnx")
    want, want_state = run_batch(model, xs, state)
    np.testing.assert_allclose(converted(xs), want, atol=1e-5, rtol=1e-5)
    back = pzb.convert(converted, xs, to="equinox")
    assert _structure(back) == _structure(model)
    assert [(n.inference, n.mode, n.momentum) for n in _norms(back)] == [
        (n.inference, n.mode, n.momentum) for n in _norms(model)]
    _assert_statistics(back, eqx.nn.State(back), model, want_state)  # one training call in NNX, as in Equinox
    got, _ = run_batch(back, xs, eqx.nn.State(back))
    again, _ = run_batch(model, xs, want_state)
    np.testing.assert_allclose(got, again, atol=1e-5, rtol=1e-5)
