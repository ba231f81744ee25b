"""CheckpointManager: orbax's step conventions, retention, intervals, asynchronous saves and their errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import pzbridge as pzb
from pzbridge import checkpoint
from pzbridge.toolshed import checkpoint_io
from pzbridge.toolshed.checkpoint_manager import CheckpointManager


def _model(value: float):
    return [pzb.Parameter(jnp.full((64, 64), value), "w"), pzb.StateVariable(jnp.int32(int(value)), "n")]


def _restored_value(manager, step):
    target = _model(0.0)
    manager.restore(step, target)
    return float(target[0].value[0, 0])


@settings(max_examples=6, deadline=None, derandomize=True)
@given(keep=st.integers(1, 3), interval=st.integers(1, 3), asynchronous=st.booleans())
def test_retention_and_interval_follow_orbax(tmp_path_factory, keep, interval, asynchronous):
    """Law: after saving steps 0..9, the kept steps are the newest ``keep`` multiples of ``interval``."""
    manager = CheckpointManager(tmp_path_factory.mktemp("m"), max_to_keep=keep, save_interval_steps=interval,
                                async_save=asynchronous)
    saved = [manager.save(step, _model(float(step))) for step in range(10)]
    manager.wait_until_finished()
    expected = [step for step in range(10) if step % interval == 0]
    assert [step for step, did in enumerate(saved) if did] == expected
    assert manager.all_steps() == expected[-keep:] and manager.latest_step() == expected[-1]
    assert all(_restored_value(manager, step) == float(step) for step in manager.all_steps())


def test_an_async_save_writes_the_values_at_save_time(tmp_path):
    model = _model(1.0)
    with CheckpointManager(tmp_path) as manager:
        assert manager.save(5, model)
        model[0].value = jnp.full((64, 64), 2.0)  # training goes on while the write runs
    assert checkpoint.all_steps(tmp_path) == [5] and _restored_value(CheckpointManager(tmp_path), 5) == 1.0


def test_should_save_and_force(tmp_path):
    manager = CheckpointManager(tmp_path, save_interval_steps=10, async_save=False)
    assert manager.should_save(0) and not manager.should_save(5)
    assert not manager.save(5, _model(5.0)) and manager.save(5, _model(5.0), force=True)
    assert not manager.should_save(5) and manager.should_save(10)  # a step must come after the latest


def test_an_async_failure_is_raised_by_wait_until_finished_and_leaves_earlier_steps(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path)
    manager.save(1, _model(1.0))
    manager.wait_until_finished()
    started = threading.Event()

    def full_disk(*args, **kwargs):
        started.set()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_io, "write_step", full_disk)
    assert manager.save(2, _model(2.0))  # returns at once; the write fails in the background
    started.wait(30)
    with pytest.raises(checkpoint.CheckpointError, match="asynchronous save of step 2 .*No space left on device"):
        manager.wait_until_finished()
    manager.wait_until_finished()  # reported once
    assert manager.all_steps() == [1] and _restored_value(manager, None) == 1.0


def test_a_forced_save_of_an_existing_step_fails_at_once_not_in_the_thread(tmp_path):
    manager = CheckpointManager(tmp_path)  # asynchronous
    manager.save(4, _model(4.0))
    with pytest.raises(checkpoint.CheckpointError, match="found step 4 already there"):
        manager.save(4, _model(5.0), force=True)
    with pytest.raises(checkpoint.CheckpointError, match="after the latest committed step 4, found step=2"):
        manager.save(2, _model(2.0), force=True)
    manager.wait_until_finished()  # nothing failed in the background
    assert manager.all_steps() == [4] and _restored_value(manager, 4) == 4.0


def test_bad_manager_options():
    for options in ({"max_to_keep": 0}, {"save_interval_steps": True}):
        with pytest.raises(checkpoint.CheckpointError, match="expected .* to be an integer >= 1"):
            CheckpointManager("ckpt", **options)


def test_a_bad_model_is_refused_by_save_before_any_thread_starts(tmp_path):
    manager = CheckpointManager(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="a lifted model holding pzbridge variables"):
        manager.save(0, {"w": np.ones(2)})
    assert manager._thread is None and not any(tmp_path.iterdir())


_KILLED_ASYNC_SAVE = textwrap.dedent(
    """
    import sys, time
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    import pzbridge as pzb
    from pzbridge import checkpoint

    async def stall(self, *args, **kwargs):
        # The background thread has written every array; stall before orbax's rename.
        print("WRITTEN", flush=True)
        time.sleep(600)

    atomicity.AtomicRenameTemporaryPath.finalize = stall
    manager = checkpoint.CheckpointManager(sys.argv[1], max_to_keep=1)
    model = [pzb.Parameter(jnp.full((64, 64), 2.0), "w"), pzb.StateVariable(jnp.int32(2), "n")]
    assert manager.save(2, model)
    print("RETURNED", flush=True)  # save returned while the thread writes
    manager.wait_until_finished()
    """
)


def test_a_process_killed_during_an_async_save_keeps_the_previous_step(tmp_path):
    checkpoint.save(tmp_path, _model(1.0), step=1)
    process = subprocess.Popen([sys.executable, "-c", _KILLED_ASYNC_SAVE, str(tmp_path)], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    seen = set()
    try:
        deadline = time.monotonic() + 120
        while seen != {b"WRITTEN", b"RETURNED"} and time.monotonic() < deadline:
            line = process.stdout.readline().strip()
            if not line and process.poll() is not None:
                break
            seen.add(line)
        assert seen >= {b"WRITTEN", b"RETURNED"}, seen
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        process.stdout.close()
    manager = CheckpointManager(tmp_path)
    assert manager.all_steps() == [1] and _restored_value(manager, None) == 1.0
    manager.save(3, _model(3.0))  # the next save cleans the killed one's leftovers
    manager.wait_until_finished()
    assert manager.all_steps() == [1, 3] and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
