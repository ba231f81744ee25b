"""Trainer.fit as a streaming loop: lazy batches, batched loss fetches, timings, logging, callbacks, exact resume."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import pzbridge as pzb
from pzbridge import checkpoint
from pzbridge.nn.linear import Affine
from pzbridge.toolshed import training
from pzbridge.toolshed.training import CheckpointEvery, EvaluateEvery, Trainer, TrainingError


def _data(n: int = 16, seed: int = 0):
    x = jax.random.normal(jax.random.key(seed), (n, 3))
    y = x @ jnp.array([[1.0], [-2.0], [0.5]]) + 0.3
    return pzb.nx.wrap(x, "batch", "features"), pzb.nx.wrap(y, "batch", "features")


def _mse(model, x, y):
    return jnp.mean((model(x) - y).unwrap("batch", "features") ** 2)


def _model(seed: int = 1):
    return Affine.from_config("dense", jax.random.key(seed), {"features": 3}, {"features": 1})


def _batches(count: int):
    """Different data every step (so a resumed run must continue with the right batch)."""
    for i in range(count):
        yield _data(8, seed=100 + i)


def _values(model):
    return {v.label: np.asarray(v.value.data_array) for v in pzb.unbind_params(model)[1]}


def test_a_generator_is_pulled_one_batch_per_step_and_steps_bounds_an_endless_one():
    pulled = []

    def endless():
        i = 0
        while True:
            pulled.append(i)
            yield _data(8, seed=i)
            i += 1

    seen = []
    trainer = Trainer(_model(), _mse, optax.sgd(0.05))
    result = trainer.fit(endless(), steps=5, log_every=2,
                         callbacks=[lambda step, t, metrics: seen.append((step, len(pulled)))])
    assert seen == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5)]  # never a batch ahead of the step
    assert result.steps == 5 and len(result.losses) == 5 and trainer.step_count == 5


def test_losses_are_fetched_once_per_log_interval_not_every_step(monkeypatch):
    fetches = []
    real = training._fetch
    monkeypatch.setattr(training, "_fetch", lambda values: fetches.append(len(values)) or real(values))
    kinds = []
    result = Trainer(_model(), _mse, optax.sgd(0.05)).fit(
        [_data()] * 10, log_every=4, callbacks=[lambda s, t, m: kinds.append(type(m["loss"]))])
    assert fetches == [4, 4, 2]  # steps 1-4, 5-8, then the rest at the end
    assert all(issubclass(k, jax.Array) for k in kinds)  # callbacks get device values, not floats
    assert len(result.losses) == 10


def test_fit_logs_the_first_step_apart_and_ms_per_step(caplog):
    with caplog.at_level(logging.INFO, logger="pzbridge.training"):
        result = Trainer(_model(), _mse, optax.adam(1e-2)).fit([_data()] * 6, log_every=3, progress=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "pzbridge.training"]
    assert "first step" in lines[0] and "compilation included" in lines[0]
    assert lines[1].startswith("step 3/6  loss ") and lines[1].endswith("ms/step")
    assert lines[2].startswith("step 6/6  loss ")
    assert result.first_step_seconds > 0 and result.ms_per_step is not None and result.ms_per_step > 0
    # The first step compiles: it takes far longer than a steady step on any machine.
    assert result.first_step_seconds * 1e3 > result.ms_per_step


def test_a_nan_loss_names_the_first_bad_step_of_the_fetched_window():
    w = pzb.Parameter(jnp.float32(1.0), "w")
    trainer = Trainer(w, lambda m, t: jnp.where(t >= 2, jnp.nan, m.value ** 2), optax.sgd(0.1))
    with pytest.raises(TrainingError, match=r"loss became nan at step 3 \(batch 3/5\)") as info:
        trainer.fit([(jnp.int32(i),) for i in range(5)], log_every=5)  # steps 1..5 see t = 0..4
    assert "after step 5" in str(info.value)


@pytest.mark.parametrize("bad", [{"steps": -1}, {"log_every": 1.5}])
def test_bad_fit_arguments(bad):
    with pytest.raises(TrainingError, match="expected"):
        Trainer(_model(), _mse, optax.sgd(0.1)).fit([_data()], **bad)


def test_evaluate_and_checkpoint_callbacks_run_every_n_steps(tmp_path):
    x, y = _data()
    evaluation = EvaluateEvery(3, lambda m: {"mse": _mse(m, x, y)})
    saving = CheckpointEvery(4, tmp_path)
    trainer = Trainer(_model(), _mse, optax.adam(1e-2), callbacks=[evaluation, saving])
    trainer.fit([_data()] * 10, log_every=0)
    assert [step for step, _ in evaluation.history] == [3, 6, 9, 10]
    assert isinstance(evaluation.history[0][1]["mse"], np.ndarray)  # fetched to the host
    assert checkpoint.all_steps(tmp_path) == [4, 8, 10]  # every 4 steps, then the final one (max_to_keep=3)
    assert checkpoint.read_description(tmp_path)["opt_state"] is not None


def test_train_10_equals_train_5_save_restore_train_5_bitwise_in_the_same_trainer(tmp_path):
    straight = Trainer(_model(), _mse, optax.adam(1e-2))
    straight.fit(_batches(10), log_every=0)

    trainer = Trainer(_model(), _mse, optax.adam(1e-2))
    batches = _batches(10)
    trainer.fit(batches, steps=5, log_every=0)
    trainer.save(tmp_path)
    trainer.fit([_data(8, seed=999)] * 3, log_every=0)  # wander off, then come back to step 5
    assert trainer.restore(tmp_path) == 5 and trainer.step_count == 5
    trainer.fit(batches, log_every=0)  # the same jitted step runs on the same values: bitwise
    assert trainer.step_count == 10
    assert all(np.array_equal(a, b) for a, b in zip(_values(trainer.model).values(), _values(straight.model).values()))
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, trainer.opt_state, straight.opt_state))


@settings(max_examples=4, deadline=None, derandomize=True)
@given(split=st.integers(0, 6))
def test_resuming_a_fresh_trainer_from_any_step_continues_the_run(tmp_path_factory, split):
    """Law: train n == train k, save, restore into a fresh model and trainer, train n - k."""
    root = tmp_path_factory.mktemp("resume")
    straight = Trainer(_model(), _mse, optax.adam(1e-2))
    straight.fit(_batches(6), log_every=0)

    first = Trainer(_model(), _mse, optax.adam(1e-2))
    batches = _batches(6)
    first.fit(batches, steps=split, log_every=0)
    first.save(root)
    resumed = Trainer(_model(seed=7), _mse, optax.adam(1e-2))  # other initial values, other opt_state
    resumed.restore(root)
    resumed.fit(batches, log_every=0)
    assert resumed.step_count == 6
    # A fresh trainer compiles the same program again: equal to a few ulps (bitwise in practice on one machine).
    for a, b in zip(_values(resumed.model).values(), _values(straight.model).values()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(jax.tree_util.tree_leaves(resumed.opt_state), jax.tree_util.tree_leaves(straight.opt_state)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_restore_without_optimizer_state_or_into_another_optimizer_changes_nothing(tmp_path):
    trainer = Trainer(_model(), _mse, optax.adam(1e-2))
    trainer.fit([_data()] * 2, log_every=0)
    checkpoint.save(tmp_path / "plain", trainer.model)
    trainer.save(tmp_path / "adam")
    other = Trainer(_model(seed=5), _mse, optax.sgd(0.1, momentum=0.9))
    before = _values(other.model)
    with pytest.raises(checkpoint.CheckpointError, match="expected a step saved with opt_state"):
        other.restore(tmp_path / "plain")
    with pytest.raises(checkpoint.CheckpointError, match="optimizer state structure"):
        other.restore(tmp_path / "adam")
    after = _values(other.model)
    assert other.step_count == 0 and all(np.array_equal(before[k], after[k]) for k in before)
