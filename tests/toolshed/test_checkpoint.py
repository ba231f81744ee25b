"""Orbax checkpoints of lifted models: bitwise round trip, all-or-nothing restore, atomic saves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

import pzbridge as pzb
from pzbridge import checkpoint
from pzbridge.nn.linear import Linear
from pzbridge.toolshed.lora import loraify_linears_in_selection
from pzbridge.testing.numerics import assert_bitwise_reproducible

pytestmark = pytest.mark.oldest  # also run against .ci/oldest-constraints.txt


def _values(model):
    return {v.label: v.value for v in pzb.unbind_variables(model)[1]}


def _bitwise_equal(a, b):
    leaves_a = jax.tree_util.tree_leaves(a)
    leaves_b = jax.tree_util.tree_leaves(b)
    return len(leaves_a) == len(leaves_b) and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
        for x, y in zip(leaves_a, leaves_b)
    )


@settings(max_examples=10)
@given(
    shape=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.int32]),
    seed=st.integers(0, 1000),
)
def test_save_restore_is_bitwise_for_named_and_plain_values(tmp_path_factory, shape, dtype, seed):
    root = tmp_path_factory.mktemp("ckpt")
    data = (jax.random.normal(jax.random.key(seed), tuple(shape)) * 100).astype(dtype)
    names = [f"a{i}" for i in range(len(shape))]
    model = [pzb.Parameter(pzb.nx.wrap(data, *names), "w"), pzb.StateVariable(data, "s"),
             pzb.StateVariable(jnp.uint32(seed), "count")]
    checkpoint.save(root, model)
    target = [pzb.Parameter(pzb.nx.wrap(jnp.zeros_like(data), *names), "w"), pzb.StateVariable(jnp.zeros_like(data), "s"),
              pzb.StateVariable(jnp.uint32(0), "count")]
    restored = checkpoint.restore(root, target)
    assert restored is target
    assert _bitwise_equal(_values(target), _values(model))
    assert tuple(target[0].value.named_shape) == tuple(names)


def test_restore_into_freshly_lifted_equinox_model_with_lora(tmp_path):
    def build(key):
        lifted = pzb.lift(eqx.nn.Sequential([eqx.nn.Linear(3, 4, key=key), eqx.nn.Linear(4, 2, key=key)]))
        return loraify_linears_in_selection(pzb.select(lifted).at_instances_of(Linear), 2, jax.random.key(9))

    model = build(jax.random.key(0))
    for variable in pzb.unbind_params(model)[1]:
        variable.value = variable.value + 0.25  # Make the adapters non-zero.
    checkpoint.save(tmp_path, model)
    fresh = build(jax.random.key(1))
    checkpoint.restore(tmp_path, fresh)
    assert _bitwise_equal(_values(fresh), _values(model))
    x = jnp.ones(3)
    assert_bitwise_reproducible(pzb.lower(fresh), pzb.lower(model), x)  # the same program on the restored values
    np.testing.assert_array_equal(pzb.lower(fresh)(x), pzb.lower(model)(x))


def test_restore_transposes_into_the_target_axis_order(tmp_path):
    data = jnp.arange(6.0).reshape(2, 3)
    checkpoint.save(tmp_path, [pzb.Parameter(pzb.nx.wrap(data, "a", "b"), "w")])
    target = [pzb.Parameter(pzb.nx.wrap(jnp.zeros((3, 2)), "b", "a"), "w")]
    checkpoint.restore(tmp_path, target)
    np.testing.assert_array_equal(target[0].value.unwrap("b", "a"), data.T)


def test_wrong_architecture_raises_one_error_listing_every_difference_and_loads_nothing(tmp_path):
    saved = pzb.nn.Sequential([
        Linear.from_config("a", jax.random.key(0), {"features": 3}, {"features": 4}),
        Linear.from_config("b", jax.random.key(1), {"features": 4}, {"features": 2}),
        Linear.from_config("gone", jax.random.key(2), {"features": 2}, {"features": 2}),
    ])
    checkpoint.save(tmp_path, saved)
    target = pzb.nn.Sequential([
        Linear.from_config("a", jax.random.key(3), {"features": 3}, {"features": 5}),  # wrong shape
        Linear.from_config("b", jax.random.key(4), {"features": 4}, {"hidden": 2}),  # wrong axes
        Linear.from_config("new", jax.random.key(5), {"features": 2}, {"features": 2}),  # missing
    ])
    before = {k: np.asarray(v.data_array) for k, v in _values(target).items()}
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.restore(tmp_path, target)
    message = str(info.value)
    assert "4 differences" in message
    assert "missing from checkpoint: Parameter 'new.weights'" in message
    assert "extra in checkpoint (not in the model): Parameter 'gone.weights'" in message
    assert "'a.weights': shape {'features': 3, 'features_out': 4}" in message
    assert "'b.weights': axes" in message and "hidden" in message
    assert "nothing was loaded" in message
    after = {k: np.asarray(v.data_array) for k, v in _values(target).items()}
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)


def test_structure_difference_is_reported(tmp_path):
    lin = Linear.from_config("a", jax.random.key(0), {"features": 2}, {"features": 2})
    checkpoint.save(tmp_path, pzb.nn.Sequential([lin]))
    with pytest.raises(checkpoint.CheckpointError, match="structure at <root>: Sequential in checkpoint, Residual"):
        checkpoint.restore(tmp_path, pzb.nn.Residual(lin))
    assert checkpoint.restore(tmp_path, pzb.nn.Residual(lin), check_structure=False).delta is lin


def test_load_variables_fills_a_model_built_with_slots(tmp_path):
    model = Linear.from_config("d", jax.random.key(0), {"features": 3}, {"features": 2})
    checkpoint.save(tmp_path, model)
    skeleton = Linear.from_config("d", None, {"features": 3}, {"features": 2})
    rebuilt = pzb.bind_variables(skeleton, checkpoint.load_variables(tmp_path))
    assert _bitwise_equal(_values(rebuilt), _values(model))
    assert _bitwise_equal(_values(checkpoint.restore(tmp_path, skeleton)), _values(model))


def test_nnx_lifted_model_round_trips_through_a_checkpoint(tmp_path):
    original = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    checkpoint.save(tmp_path, pzb.lift(original))
    fresh = pzb.lift(nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(5)), nnx.Linear(4, 2, rngs=nnx.Rngs(6))))
    checkpoint.restore(tmp_path, fresh)
    lowered = pzb.lower(fresh)
    assert nnx.graphdef(lowered) == nnx.graphdef(original)
    assert _bitwise_equal(nnx.state(lowered), nnx.state(original))


def test_keep_prunes_old_versions_only_after_a_finished_save(tmp_path):
    w = pzb.Parameter(jnp.ones(2), "w")
    for _ in range(3):
        checkpoint.save(tmp_path, [w], keep=2)
    assert checkpoint.versions(tmp_path) == [2, 3]


_KILLED_SAVE = textwrap.dedent(
    """
    import sys, time
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    import pzbridge as pzb
    from pzbridge import checkpoint

    async def stall(self, *args, **kwargs):
        # Every array is written to the temporary directory; stall before the rename.
        print("WRITTEN", flush=True)
        time.sleep(600)

    atomicity.AtomicRenameTemporaryPath.finalize = stall
    checkpoint.save(sys.argv[1], [pzb.Parameter(jnp.full((256, 256), 2.0), "w")])
    """
)


def test_save_killed_midway_leaves_the_previous_checkpoint_restorable(tmp_path):
    first = jnp.full((256, 256), 1.0)
    checkpoint.save(tmp_path, [pzb.Parameter(first, "w")])
    process = subprocess.Popen(
        [sys.executable, "-c", _KILLED_SAVE, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    try:
        deadline = time.monotonic() + 120
        line = b""
        while b"WRITTEN" not in line and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line and process.poll() is not None:
                break
        assert b"WRITTEN" in line, "the subprocess never reached the middle of its save"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        process.stdout.close()
    leftovers = [p.name for p in tmp_path.iterdir() if not p.name.isdigit()]
    assert leftovers and all("tmp" in name for name in leftovers)  # The killed save's unfinished directory.
    assert checkpoint.versions(tmp_path) == [1]
    target = [pzb.Parameter(jnp.zeros((256, 256)), "w")]
    checkpoint.restore(tmp_path, target)
    assert np.array_equal(np.asarray(target[0].value), np.asarray(first))
    # A later save still works and becomes the latest version.
    checkpoint.save(tmp_path, [pzb.Parameter(jnp.full((256, 256), 3.0), "w")])
    checkpoint.restore(tmp_path, target)
    assert float(target[0].value[0, 0]) == 3.0
