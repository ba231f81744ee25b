"""Damaged checkpoints, bad saves, and SIGKILL at any moment of a save (issue 13, item 5).

Two parts:

- **Bad cases.** Each damaged directory or bad save raises a
  :class:`~pzbridge.core.errors.CheckpointError` whose message names the
  directory, what was expected and what was found, and a fix; every file
  under the checkpoint directory is byte-for-byte the same afterwards (a
  failed save also leaves no version and no temporary directory).
- **Fault test.** Saves are SIGKILLed at seeded random moments, both during
  the write and during the removal of old versions. One fork server imports
  jax once and forks a fresh child per kill (so a kill costs a fork, not a
  2-4 s interpreter start). Two kinds of kill: a *kill-point hook* (the child
  wraps the file-system functions pzbridge, orbax and shutil call and
  SIGKILLs itself just before the k-th call, k drawn from a seeded RNG, so
  every step between two Python-level file operations is hit) and a *timer*
  (the server SIGKILLs the child after a seeded random delay, which also
  lands inside tensorstore's C++ writes). After each kill: every listed
  version restores bitwise to what was saved in it, the latest is the last
  save that returned (or the one in flight, if it committed), no numbered
  directory without a commit marker exists, and a new save works and leaves
  no hidden leftovers.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pzbridge as pzb
from pzbridge import checkpoint
from pzbridge.core.errors import PzbridgeError
from pzbridge.toolshed import checkpoint_store as store

CheckpointError = checkpoint.CheckpointError


# -- Helpers ---------------------------------------------------------------------------------------------------


def _model(value: float = 1.0) -> list[Any]:
    return [pzb.Parameter(pzb.nx.wrap(jnp.full((8, 4), value), "rows", "cols"), "w"),
            pzb.StateVariable(jnp.int32(3), "count")]


def _target() -> list[Any]:
    return _model(0.0)


def _snapshot(root: pathlib.Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (directories as None) with its bytes."""
    if not root.exists():
        return {}
    if root.is_file():
        return {".": root.read_bytes()}
    return {
        path.relative_to(root).as_posix(): None if path.is_dir() else path.read_bytes()
        for path in sorted(root.rglob("*"))
    }


def _assert_error(call: Callable[[], Any], root: pathlib.Path, expected: str, found: str,
                  watch: pathlib.Path | None = None) -> str:
    """``call`` raises a CheckpointError naming ``root``, expected and found, and a fix; no file changes."""
    watched = watch or root
    before = _snapshot(watched)
    with pytest.raises(CheckpointError) as info:
        call()
    message = str(info.value)
    assert str(root) in message, message
    assert "expected" in message and expected in message, message
    assert "found" in message and found in message, message
    assert "Fix:" in message, message
    assert _snapshot(watched) == before, "the failed call changed files"
    return message


def _saved(tmp_path: pathlib.Path, value: float = 1.0) -> pathlib.Path:
    root = tmp_path / "ckpt"
    checkpoint.save(root, _model(value))
    return root


def _largest_file(directory: pathlib.Path) -> pathlib.Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _reseal(version: pathlib.Path) -> None:
    """Re-records the marker after a deliberate edit: the damage then reaches orbax / the description checks."""
    (version / store.COMMIT_FILE).unlink()
    store.seal(version)


def _no_leftovers(root: pathlib.Path) -> bool:
    return not [p.name for p in root.iterdir() if p.name.startswith(".") or "tmp" in p.name]


# -- Which versions count --------------------------------------------------------------------------------------


def test_checkpoint_error_is_a_pzbridge_error_exported_with_the_others():
    assert checkpoint.CheckpointError is pzb.errors.CheckpointError
    assert issubclass(CheckpointError, PzbridgeError) and issubclass(CheckpointError, ValueError)


def test_an_empty_numbered_directory_beside_a_good_version_is_ignored(tmp_path):
    root = _saved(tmp_path, 1.0)
    (root / "2").mkdir()
    assert checkpoint.versions(root) == [1]
    target = _target()
    checkpoint.restore(root, target)
    assert float(target[0].value.data_array[0, 0]) == 1.0
    _assert_error(lambda: checkpoint.restore(root, _target(), version=2), root,
                  "committed steps [1]", "step 2 uncommitted (no commit marker")
    # The next save takes a fresh number and leaves the user's 2/ alone.
    assert checkpoint.save(root, _model(5.0)).name == "3"
    assert (root / "2").is_dir() and checkpoint.versions(root) == [3]


def test_only_uncommitted_numbered_directories_is_an_error(tmp_path):
    root = tmp_path / "ckpt"
    (root / "1").mkdir(parents=True)
    (root / "2").write_text("not a checkpoint")
    _assert_error(lambda: checkpoint.restore(root, _target()), root, "a committed step",
                  "1/ (no commit marker pzbridge_commit.json), 2/ (a file, not a directory)")


@pytest.mark.parametrize("marker", ["", "{half", '{"format": "other", "files": {}}'])
def test_a_damaged_commit_marker_means_not_committed(tmp_path, marker):
    root = _saved(tmp_path)
    (root / "1" / store.COMMIT_FILE).write_text(marker)
    assert checkpoint.versions(root) == []
    _assert_error(lambda: checkpoint.load_variables(root), root, "a committed step", "commit marker")


def test_missing_directory_and_file_instead_of_directory(tmp_path):
    _assert_error(lambda: checkpoint.restore(tmp_path / "nope", _target()), tmp_path / "nope",
                  "a checkpoint directory", "nothing", watch=tmp_path)
    (tmp_path / "file").write_text("x")
    _assert_error(lambda: checkpoint.read_description(tmp_path / "file"), tmp_path / "file",
                  "a checkpoint directory", "a file", watch=tmp_path)


def test_hidden_leftovers_of_killed_saves_are_not_listed_and_the_next_save_removes_them(tmp_path):
    root = _saved(tmp_path)
    half_deleted = root / f"{store.TRASH}1-dead"
    shutil.copytree(root / "1", half_deleted)
    (half_deleted / store.COMMIT_FILE).unlink()
    staging = root / f"{store.STAGING}dead.orbax-checkpoint-tmp-1"
    shutil.copytree(root / "1", staging)
    assert checkpoint.versions(root) == [1]
    checkpoint.save(root, _model(2.0))
    assert sorted(p.name for p in root.iterdir()) == ["2"]


# -- Damaged files ---------------------------------------------------------------------------------------------


def test_truncated_array_file(tmp_path):
    root = _saved(tmp_path)
    damaged = _largest_file(root / "1" / "arrays")
    damaged.write_bytes(damaged.read_bytes()[:10])
    where = damaged.relative_to(root / "1").as_posix()
    for verify in (True, False):  # Sizes are compared even without the content hashes.
        message = _assert_error(lambda verify=verify: checkpoint.restore(root, _target(), verify=verify), root / "1",
                                "bytes", "found 10 (truncated")
        assert where in message and "step is damaged" in message


def test_corrupt_array_file_of_the_same_size(tmp_path):
    target = _target()
    root = _saved(tmp_path)
    damaged = _largest_file(root / "1" / "arrays")
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    _assert_error(lambda: checkpoint.restore(root, target), root / "1", "sha256", "(the bytes changed")
    assert float(target[0].value.data_array[0, 0]) == 0.0  # nothing loaded


def test_corrupt_orbax_files_behind_a_consistent_marker_give_a_checkpoint_error(tmp_path):
    root = _saved(tmp_path)
    manifest = root / "1" / "arrays" / "manifest.ocdbt"
    manifest.write_bytes(b"\x00" * manifest.stat().st_size)
    _reseal(root / "1")
    _assert_error(lambda: checkpoint.restore(root, _target()), root / "1", "orbax data pzbridge can read", "Error")


def test_previous_version_is_offered_when_the_latest_is_damaged(tmp_path):
    root = tmp_path / "ckpt"
    checkpoint.save(root, _model(1.0), keep=2)
    checkpoint.save(root, _model(2.0), keep=2)
    shutil.rmtree(root / "2" / "arrays")
    message = _assert_error(lambda: checkpoint.restore(root, _target()), root / "2", "a directory of", "found none")
    assert "arrays/" in message and "step=1" in message
    target = _target()
    checkpoint.restore(root, target, version=1)
    assert float(target[0].value.data_array[0, 0]) == 1.0


def test_bad_description_json(tmp_path):
    root = _saved(tmp_path)
    description = root / "1" / "description" / "metadata"
    description.write_text("{not json")
    _assert_error(lambda: checkpoint.read_description(root), root / "1", "bytes", "found 9")
    _reseal(root / "1")  # The same garbage, recorded as if saved so: orbax's JSON error is wrapped.
    _assert_error(lambda: checkpoint.read_description(root), root / "1", "orbax data", "Error")


@pytest.mark.parametrize(
    ("edit", "expected", "found"),
    [
        (lambda d: d.update(format="someone-else/2"), "format 'pzbridge-checkpoint/2'", "format 'someone-else/2'"),
        (lambda d: d.update(format="pzbridge-checkpoint/3"), "versions 1 to 2",
         "'pzbridge-checkpoint/3', written by a newer pzbridge"),
        (lambda d: d.update(model="torch"), "describe writes it", "unknown model kind 'torch'"),
        (lambda d: d.pop("variables"), "a description as pzb.checkpoint.describe writes it", "KeyError: 'variables'"),
        (lambda d: d["variables"][0].update(kind="Buffer"), "describe writes it", "unknown kind 'Buffer'"),
        (lambda d: d["variables"][0]["leaves"][0].update(shape="8x4"), "describe writes it", "bad leaf"),
    ],
    ids=["format", "newer-format", "model-kind", "no-variables", "kind", "shape"],
)
def test_description_of_the_wrong_form(tmp_path, edit, expected, found):
    root = _saved(tmp_path)
    path = root / "1" / "description" / "metadata"
    description = json.loads(path.read_text())
    edit(description)
    path.write_text(json.dumps(description))
    _reseal(root / "1")
    _assert_error(lambda: checkpoint.restore(root, _target()), root / "1", expected, found)


def test_missing_arrays_directory(tmp_path):
    root = _saved(tmp_path)
    shutil.rmtree(root / "1" / "arrays")
    message = _assert_error(lambda: checkpoint.load_variables(root), root / "1", "a directory of", "found none")
    assert "arrays/" in message


# -- Bad saves -------------------------------------------------------------------------------------------------


def test_saving_into_a_file(tmp_path):
    path = tmp_path / "weights"
    path.write_text("my notes")
    _assert_error(lambda: checkpoint.save(path, _model()), path, "a directory", "a file", watch=tmp_path)
    _assert_error(lambda: checkpoint.save(path / "sub", _model()), path / "sub", "a directory that can be created",
                  "NotADirectoryError", watch=tmp_path)


@pytest.mark.parametrize(
    ("build", "found"),
    [
        (lambda: {"w": jnp.ones(2)}, "a dict with no pzbridge variables"),
        (lambda: [jnp.ones(2), 3.0], "a list with no pzbridge variables"),
    ],
    ids=["dict", "list"],
)
def test_saving_an_unlifted_module(tmp_path, build, found):
    root = tmp_path / "ckpt"
    _assert_error(lambda: checkpoint.save(root, build()), root, "a lifted model holding pzbridge variables", found,
                  watch=tmp_path)
    assert not root.exists()  # nothing created, no temporary directory
    checkpoint.save(root, _model())
    _assert_error(lambda: checkpoint.save(root, build()), root, "a lifted model", found)
    assert checkpoint.versions(root) == [1] and _no_leftovers(root)


def test_saving_an_abstract_model_or_with_a_bad_keep(tmp_path):
    root = _saved(tmp_path)
    abstract = pzb.lift(eqx.filter_eval_shape(eqx.nn.Linear, 4, 3, key=jax.random.key(0)))
    _assert_error(lambda: checkpoint.save(root, abstract), root, "an array", "ShapeDtypeStruct")
    _assert_error(lambda: checkpoint.save(root, _model(), keep=0), root, "keep to be an integer >= 1", "keep=0")
    _assert_error(lambda: checkpoint.save(root, [pzb.Parameter("text", "w")]), root, "arrays", "str")


def _disk_full(*args: Any, **kwargs: Any) -> None:
    raise OSError(28, "No space left on device")


def _break(patch: pytest.MonkeyPatch, step: str) -> None:
    import orbax.checkpoint as ocp

    if step != "orbax":
        patch.setattr(store, step, _disk_full)
        return
    real = ocp.Checkpointer.save

    def write_then_fail(self: Any, *args: Any, **kwargs: Any) -> None:
        real(self, *args, **kwargs)  # everything written, then the disk fills up
        _disk_full()

    patch.setattr(ocp.Checkpointer, "save", write_then_fail)


@pytest.mark.parametrize("step", ["orbax", "seal", "publish"])
def test_a_failed_write_leaves_no_version_and_no_temporary_directory(tmp_path, monkeypatch, step):
    existing = _saved(tmp_path)
    for root in (tmp_path / "fresh" / "sub", existing):
        before = _snapshot(tmp_path)
        with monkeypatch.context() as patch:
            _break(patch, step)
            _assert_error(lambda root=root: checkpoint.save(root, _model(7.0)), root,
                          "to write and commit the new version", "No space left on device", watch=tmp_path)
        assert _snapshot(tmp_path) == before  # directories the save created are gone again
    assert checkpoint.versions(existing) == [1]


# -- Fault test: SIGKILL at seeded random moments --------------------------------------------------------------

SEED = 20240613
HOOK_RUNS = 24  # kills just before the k-th file-system call
TIMER_RUNS = 8  # kills after a random delay
KEEP = 1  # every save also removes the previous version, so removals are killed as often as writes
_HOOKED_OS = ("open", "mkdir", "rename", "replace", "unlink", "rmdir", "fsync", "scandir", "listdir")
_SERVER = "import sys; sys.path.insert(0, sys.argv[1]); import test_checkpoint_faults as t; t.serve(sys.argv[2])"


def fault_model(stamp: int) -> list[Any]:
    """What the ``stamp``-th save writes: values derived from the stamp, and the stamp itself."""
    rng = np.random.default_rng(stamp)
    weights = rng.standard_normal((32, 64)).astype(np.float32)
    bias = rng.standard_normal(16).astype(jnp.bfloat16)
    return [pzb.Parameter(pzb.nx.wrap(jnp.asarray(weights), "rows", "cols"), "w"),
            pzb.Parameter(jnp.asarray(bias), "b"), pzb.StateVariable(jnp.int32(stamp), "stamp")]


def _arrays(model: list[Any]) -> list[np.ndarray]:
    return [np.asarray(v.value.data_array if pzb.nx.is_namedarray(v.value) else v.value) for v in model]


def _restored_stamp(root: pathlib.Path, version: int) -> int:
    """Restores ``version``; asserts it is bitwise what its save wrote; returns its stamp."""
    target = fault_model(0)
    checkpoint.restore(root, target, version=version)
    stamp = int(target[2].value)
    for got, want in zip(_arrays(target), _arrays(fault_model(stamp)), strict=True):
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), f"version {version} differs from its save"
    return stamp


# The fork server and its children (they run in the subprocess, not under pytest).


def serve(root: str) -> None:
    """Reads one JSON order a line; forks a child that saves in a loop and is killed; answers one JSON line."""
    for line in sys.stdin:
        order = json.loads(line)
        progress, child_end = os.pipe()
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            os.close(progress)
            _child(pathlib.Path(root), order, child_end)
        os.close(child_end)
        print(json.dumps(_watch(pid, order, progress)), flush=True)


def _watch(pid: int, order: dict[str, Any], progress: int) -> dict[str, Any]:
    with os.fdopen(progress, "rb") as lines:
        first = lines.readline()  # b"ready\n": the child is about to save
        if order["mode"] == "timer":
            time.sleep(order["delay"])
            os.kill(pid, signal.SIGKILL)
        text = (first + lines.read()).decode()
    _, status = os.waitpid(pid, 0)
    done = [int(word.split()[1]) for word in text.splitlines() if word.startswith("done ")]
    calls = [int(word.split()[1]) for word in text.splitlines() if word.startswith("calls ")]
    seconds = [float(word.split()[1]) for word in text.splitlines() if word.startswith("seconds ")]
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    return {"killed": killed, "status": status, "done": done, "calls": calls, "seconds": seconds}


def _child(root: pathlib.Path, order: dict[str, Any], progress: int) -> None:
    try:
        def say(text: str) -> None:
            os.write(progress, f"{text}\n".encode())  # os.write: not hooked, not buffered

        models = [fault_model(order["start"] + i) for i in range(order["cycles"])]  # jax work before the hook
        calls = _arm(order.get("k"))
        say("ready")
        for model in models:
            start = time.perf_counter()
            checkpoint.save(root, model, keep=KEEP)
            say(f"done {int(model[2].value)}")
            say(f"calls {calls[0]}")
            say(f"seconds {time.perf_counter() - start}")
    except BaseException:  # noqa: BLE001 - reported through the exit status and stderr
        traceback.print_exc()
        os._exit(3)
    os._exit(0)


def _arm(k: int | None) -> list[int]:
    """Counts the file-system calls the process makes; SIGKILLs it just before the k-th."""
    count = [0]

    def hooked(function: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            count[0] += 1
            if count[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return function(*args, **kwargs)

        return call

    for name in _HOOKED_OS:
        setattr(os, name, hooked(getattr(os, name)))
    builtins.open = io.open = hooked(io.open)
    return count


class _Server:
    """The parent's handle on the fork server."""

    def __init__(self, root: pathlib.Path, log: Any) -> None:
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-c", _SERVER, str(pathlib.Path(__file__).parent), str(root)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env, text=True,
        )
        self.log = log

    def run(self, **order: Any) -> dict[str, Any]:
        self.process.stdin.write(json.dumps(order) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            self.log.seek(0)
            pytest.fail(f"the fork server died:\n{self.log.read()[-4000:]}")
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()  # end of orders: the server exits
        self.process.wait(timeout=60)
        self.process.stdout.close()


def _check_after_kill(root: pathlib.Path, last_done: int, stamp: int) -> None:
    """The invariants after a kill; then a save of ``stamp`` works and leaves nothing hidden behind."""
    listed = checkpoint.versions(root)
    assert listed and sorted(store.numbered(root)) == listed, f"incomplete version listed or left: {os.listdir(root)}"
    assert len(listed) <= KEEP + 1  # killed between the new version's rename and the removal of the old one
    stamps = [_restored_stamp(root, version) for version in listed]
    assert stamps == sorted(stamps) and stamps[-1] in (last_done, last_done + 1), (stamps, last_done)
    checkpoint.save(root, fault_model(stamp), keep=KEEP)
    assert _restored_stamp(root, checkpoint.versions(root)[-1]) == stamp
    assert len(checkpoint.versions(root)) == KEEP and _no_leftovers(root), os.listdir(root)


@pytest.mark.slow  # ~30 s on 2 cores; CI runs it (32 kills, >= 20 asserted)
def test_sigkill_at_random_moments_of_save_and_removal_keeps_the_latest_version_exact(tmp_path):
    rng = random.Random(SEED)
    root = tmp_path / "ckpt"
    checkpoint.save(root, fault_model(1), keep=KEEP)
    stamp = 2
    with tempfile.TemporaryFile("w+") as log:
        server = _Server(root, log)
        try:
            calibration = server.run(mode="count", start=stamp, cycles=3)
            assert calibration["status"] == 0 and len(calibration["done"]) == 3, calibration
            stamp += 3
            per_save = calibration["calls"][-1] - calibration["calls"][-2]  # a steady save: write + removal
            window = sum(calibration["seconds"][:2])  # a fresh child's first two saves
            last_call = calibration["calls"][0] + per_save  # anywhere in the child's first two saves
            orders = [{"mode": "hook", "k": rng.randint(1, last_call)} for _ in range(HOOK_RUNS)]
            orders += [{"mode": "timer", "delay": rng.uniform(0.0, window)} for _ in range(TIMER_RUNS)]
            killed = 0
            for order in orders:
                report = server.run(start=stamp, cycles=20, **order)
                assert report["killed"] or report["status"] == 0, (order, report)
                killed += report["killed"]
                last_done = report["done"][-1] if report["done"] else stamp - 1
                stamp += 20
                _check_after_kill(root, last_done, stamp)
                stamp += 1
        finally:
            server.close()
    assert killed >= 20, f"only {killed} of {len(orders)} runs were killed mid-save"
