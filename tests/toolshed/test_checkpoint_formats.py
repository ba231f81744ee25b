"""Checkpoint format 2: arrays under their labels, steps, optimizer state, lowered modules, format 1 still read."""

from __future__ import annotations

import pathlib
import shutil

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

import pzbridge as pzb
from pzbridge import checkpoint
from pzbridge.nn.linear import Linear
from pzbridge.toolshed.checkpoint_leaves import escape_key, unique_keys
from pzbridge.toolshed.training import trainable_values

FIXTURE = pathlib.Path(__file__).parent / "data" / "checkpoint_format1"


def _raw(leaf):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(leaf))
    return np.asarray(leaf)


def _bitwise(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(
        x.dtype == y.dtype and np.array_equal(_raw(x), _raw(y), equal_nan=True) for x, y in zip(la, lb))


def _orbax_arrays(step_dir: pathlib.Path, item: str = "arrays") -> dict:
    """Reads an item with orbax alone (an independent reader of what is on disk)."""
    return ocp.StandardCheckpointer().restore((step_dir / item).absolute())


# -- Labels on disk --------------------------------------------------------------------------------------------


def test_arrays_are_stored_under_their_labels(tmp_path):
    model = pzb.nn.Sequential([Linear.from_config("layers.0", jax.random.key(0), {"features": 2}, {"features": 3}),
                               Linear.from_config("layers.1", jax.random.key(1), {"features": 3}, {"features": 1})])
    path = checkpoint.save(tmp_path, model)
    on_disk = _orbax_arrays(path)
    assert sorted(on_disk) == ["layers.0.weights", "layers.1.weights"]
    np.testing.assert_array_equal(on_disk["layers.0.weights"], model.sublayers[0].weights.value.data_array)


def test_escaped_keys_are_distinct_where_orbax_would_merge_them():
    # orbax normalises "/" in names: "a" and "a/" would be the same array.
    assert unique_keys(["a", "a/", "a%2F", ""]) == ["a", "a%2F", "a%252F", "%"]
    assert escape_key("blocks[3].attn.query") == "blocks[3].attn.query"


@settings(max_examples=8, deadline=None, derandomize=True)
@given(labels=st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=4, unique=True))
def test_any_labels_round_trip_bitwise(tmp_path_factory, labels):
    root = tmp_path_factory.mktemp("labels")
    model = [pzb.Parameter(jnp.full((2,), float(i)), label) for i, label in enumerate(labels)]
    checkpoint.save(root, model)
    target = [pzb.Parameter(jnp.zeros((2,)), label) for label in labels]
    checkpoint.restore(root, target)
    assert [float(v.value[0]) for v in target] == [float(i) for i in range(len(labels))]


# -- Format 1 (keys v0_0) --------------------------------------------------------------------------------------


def _fixture_target():
    w = pzb.nx.wrap(jnp.zeros((2, 3), jnp.float32), "features", "features_out")
    b = pzb.nx.wrap(jnp.zeros(3, jnp.bfloat16), "features_out")
    return {"dense": [pzb.Parameter(w, "dense.weights"), pzb.Parameter(b, "dense.bias")],
            "count": pzb.StateVariable(jnp.int32(0), "count")}


def test_a_format_1_checkpoint_still_restores(tmp_path):
    root = tmp_path / "old"
    shutil.copytree(FIXTURE, root)  # written by pzbridge before format 2 (see tests/toolshed/data/README.md)
    description = checkpoint.read_description(root)
    assert description["format"] == "pzbridge-checkpoint/1" and description["step"] == 1
    assert description["variables"][0]["leaves"][0]["key"] == "v0_0"
    target = checkpoint.restore(root, _fixture_target())
    np.testing.assert_array_equal(target["dense"][0].value.data_array, np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(np.asarray(target["dense"][1].value.data_array, np.float32), [0.0, 0.25, 0.5])
    assert int(target["count"].value) == 7
    assert [v.label for v in checkpoint.load_variables(root)] == ["count", "dense.weights", "dense.bias"]


# -- Steps -----------------------------------------------------------------------------------------------------


def test_explicit_steps_latest_step_and_keep_all(tmp_path):
    w = pzb.Parameter(jnp.ones(2), "w")
    for step in (0, 100, 250):
        checkpoint.save(tmp_path, [w], step=step, keep=None)
    assert checkpoint.all_steps(tmp_path) == [0, 100, 250] and checkpoint.latest_step(tmp_path) == 250
    assert checkpoint.save(tmp_path, [w], keep=None).name == "251"  # no step: the next number
    with pytest.raises(checkpoint.CheckpointError, match="found step 100 already there"):
        checkpoint.save(tmp_path, [w], step=100)
    with pytest.raises(checkpoint.CheckpointError, match="after the latest committed step 251, found step=200"):
        checkpoint.save(tmp_path, [w], step=200)
    assert checkpoint.read_description(tmp_path, 100)["step"] == 100
    assert checkpoint.latest_step(tmp_path / "absent") is None


# -- Optimizer state -------------------------------------------------------------------------------------------


def test_optimizer_state_round_trips_bitwise_and_is_checked(tmp_path):
    model = Linear.from_config("d", jax.random.key(0), {"features": 3}, {"features": 2})
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    state = optimizer.init(trainable_values(model))
    state = jax.tree_util.tree_map(lambda a: a + 1, state)  # non-trivial values, count included
    checkpoint.save(tmp_path, model, opt_state=state, metadata={"epoch": 3})
    description = checkpoint.read_description(tmp_path)
    assert description["opt_state"]["trainable"] == ["d.weights"] and description["metadata"] == {"epoch": 3}
    assert "0.mu.0.data_array" not in description["opt_state"]["names"]  # chain: the adamw state is item 1
    like = optimizer.init(trainable_values(model))
    restored = checkpoint.restore_optimizer_state(tmp_path, like, model=model)
    assert _bitwise(restored, state)
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state)
    assert _bitwise(like, optimizer.init(trainable_values(model)))  # `like` untouched
    with pytest.raises(checkpoint.CheckpointError, match="optimizer state structure"):
        checkpoint.restore_optimizer_state(tmp_path, optax.sgd(0.1).init(trainable_values(model)))
    other = Linear.from_config("d", jax.random.key(0), {"features": 3}, {"features": 5})
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.restore_optimizer_state(tmp_path, optimizer.init(trainable_values(other)))
    assert "optimizer state structure" in str(info.value)  # the named shapes are part of the structure


def test_non_json_metadata_is_refused_before_writing(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="JSON-serialisable metadata"):
        checkpoint.save(tmp_path / "c", [pzb.Parameter(jnp.ones(2), "w")], metadata={"x": jnp.ones(2)})
    assert not (tmp_path / "c").exists()


# -- Lowered Equinox and NNX modules ---------------------------------------------------------------------------


def _eqx_mlp(key, width=4, depth=2):
    return eqx.nn.MLP(3, 2, width, depth, key=key)


@settings(max_examples=4, deadline=None, derandomize=True)
@given(width=st.integers(1, 5), depth=st.integers(0, 2))
def test_equinox_module_round_trips_bitwise_into_a_fresh_or_abstract_module(tmp_path_factory, width, depth):
    root = tmp_path_factory.mktemp("eqx")
    module = _eqx_mlp(jax.random.key(0), width, depth)
    checkpoint.save(root, module)
    for like in (_eqx_mlp(jax.random.key(1), width, depth),
                 eqx.filter_eval_shape(_eqx_mlp, jax.random.key(1), width, depth)):
        before = jax.tree_util.tree_leaves(like)
        restored = checkpoint.restore(root, like)
        assert type(restored) is eqx.nn.MLP and restored is not like
        assert _bitwise(eqx.filter(restored, eqx.is_array), eqx.filter(module, eqx.is_array))
        assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(like), before))  # the target is untouched
    np.testing.assert_array_equal(restored(jnp.ones(3)), module(jnp.ones(3)))


def test_equinox_arrays_are_stored_under_their_paths(tmp_path):
    module = eqx.nn.Sequential([eqx.nn.Linear(3, 4, key=jax.random.key(0)), eqx.nn.Lambda(jax.nn.relu)])
    path = checkpoint.save(tmp_path, module)
    assert sorted(_orbax_arrays(path)) == ["layers.0.bias", "layers.0.weight"]
    assert checkpoint.read_description(tmp_path)["model"] == "equinox"


def _nnx_model(seed):
    return nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(seed)), nnx.BatchNorm(4, rngs=nnx.Rngs(seed)),
                          nnx.Dropout(0.1, rngs=nnx.Rngs(seed + 1)))


def test_nnx_module_round_trips_into_a_new_module_and_never_touches_the_target(tmp_path):
    module = _nnx_model(0)
    module(jnp.ones((2, 3)))  # batch statistics and the dropout key count move
    path = checkpoint.save(tmp_path, module)
    assert "layers.1.mean" in _orbax_arrays(path) and "layers.2.rngs.key" in _orbax_arrays(path)
    kinds = {v["label"]: v["kind"] for v in checkpoint.read_description(tmp_path)["variables"]}
    assert kinds["layers.1.mean"] == "BatchStat" and kinds["layers.0.kernel"] == "Param"
    fresh = _nnx_model(5)
    before = jax.tree_util.tree_map(lambda x: x, nnx.state(fresh))
    restored = checkpoint.restore(tmp_path, fresh)
    assert _bitwise(nnx.state(restored), nnx.state(module))
    assert _bitwise(nnx.state(fresh), before) and not _bitwise(nnx.state(fresh), nnx.state(module))
    assert restored.layers[0].kernel is not fresh.layers[0].kernel  # no variable shared with the target
    abstract = checkpoint.restore(tmp_path, nnx.eval_shape(lambda: _nnx_model(9)))
    assert _bitwise(nnx.state(abstract), nnx.state(module))
    x = jnp.ones((2, 3))
    restored.eval(), module.eval()
    np.testing.assert_array_equal(restored(x), module(x))


def test_a_wrong_nnx_architecture_lists_every_difference_and_a_kind_mismatch_is_named(tmp_path):
    checkpoint.save(tmp_path, _nnx_model(0))
    wrong = nnx.Sequential(nnx.Linear(3, 5, rngs=nnx.Rngs(0)), nnx.BatchNorm(5, rngs=nnx.Rngs(0)))
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.restore(tmp_path, wrong)
    message = str(info.value)
    assert "'layers.0.kernel': shape (3, 4) in checkpoint, (3, 5) in model" in message
    assert "extra in checkpoint (not in the model): RngKey 'layers.2.rngs.key'" in message
    assert "structure at layers.2: Dropout in checkpoint, nothing in model" in message
    with pytest.raises(checkpoint.CheckpointError, match="holds a Flax NNX module, the target is an Equinox module"):
        checkpoint.restore(tmp_path, eqx.nn.Linear(3, 4, key=jax.random.key(0)))
    with pytest.raises(checkpoint.CheckpointError, match="expected a checkpoint of a lifted model"):
        checkpoint.load_variables(tmp_path)
