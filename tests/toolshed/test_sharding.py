"""Sharding by axis names on one device: specs, errors, placement of a copy, constraints, lowering.

The 8-device checks (real splits, sharded training) are in test_sharding_devices.py. Here a 1x1
mesh places arrays for real, and an ``AbstractMesh`` of shape (2, 4) checks divisibility without
devices.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

import pzbridge as pzb
from pzbridge.bridge.sharding import lower_sharded
from pzbridge.core.errors import PzbridgeError, SelectionError
from pzbridge.models.gpt import build_gpt
from pzbridge.testing.named_arrays import named_shapes, positional_shapes
from pzbridge.toolshed.sharding import (
    ConstrainSharding,
    ShardingError,
    ShardingRules,
    axis_rules,
    constrain_sharding,
    named_sharding,
    partition_spec,
    shard_inputs,
    shard_model,
    sharding_specs,
)
from pzbridge.toolshed.where import Where

MESH = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
BIG = AbstractMesh((2, 4), ("data", "model"))
SIZES = {"data": 2, "model": 4}
RULES = {"heads": "model", "batch": "data", "neurons": "model"}


def small_gpt():
    return build_gpt("gpt", jax.random.key(0), vocab_size=16, num_layers=1, num_heads=2, d_model=8, d_mlp=16,
                     max_seq_len=8)


def tokens():
    return pzb.nx.wrap(jnp.arange(12).reshape(2, 6) % 16, "batch", "seq")


def params(model):
    return pzb.select(model).at_instances_of(pzb.Parameter).get_sequence()


# -- rules ------------------------------------------------------------------------------------


def test_rules_normalise_entries_and_are_hashable():
    rules = ShardingRules({"a": "x", "b": ("y",), "c": ("x", "y"), "d": None, "e": ()})
    assert rules.as_dict() == {"a": "x", "b": "y", "c": ("x", "y"), "d": None, "e": None}
    assert hash(rules) == hash(ShardingRules(rules.rules)) and rules == ShardingRules(rules.as_dict())
    assert axis_rules({"a": "x"}, b="y") == ShardingRules({"a": "x", "b": "y"})
    assert rules.mesh_axes("unlisted") is None and rules.mesh_axes(None) is None


@pytest.mark.parametrize("bad, words", [
    ({"heads": 3}, "mesh axis name"),
    ({"heads": ("model", "model")}, "twice"),
    ({"": "model"}, "axis names"),
    ([("a", "x"), ("a", "y")], "twice"),
])
def test_bad_rules_are_rejected(bad, words):
    with pytest.raises(ShardingError, match=words) as err:
        ShardingRules(bad)
    assert "Fix:" in str(err.value) and isinstance(err.value, PzbridgeError)


# -- specs ------------------------------------------------------------------------------------

MESH_CHOICES = st.sampled_from([None, "data", "model", ("data", "model"), ("model", "data")])
POOL = ["batch", "seq", "heads", "features", "neurons", "kv"]


def _uses_a_mesh_axis_twice(entries):
    used = [a for e in entries if e is not None for a in ((e,) if isinstance(e, str) else e)]
    return len(used) != len(set(used))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(positional=positional_shapes(max_axes=2), shape=named_shapes(max_axes=4, names=POOL),
       rules=st.dictionaries(st.sampled_from(POOL), MESH_CHOICES, max_size=6))
def test_every_spec_entry_is_the_rule_of_the_axis_stored_there(positional, shape, rules):
    x = pzb.nx.NamedArray(jnp.zeros(positional + tuple(shape.values())), shape)
    wanted = (None,) * len(positional) + tuple(ShardingRules(rules).as_dict().get(n) for n in shape)
    if _uses_a_mesh_axis_twice(wanted):
        with pytest.raises(ShardingError, match="used by both"):
            partition_spec(x, rules)
        return
    spec = partition_spec(x, rules)
    assert len(spec) == x.data_array.ndim and tuple(spec) == wanted
    # Untagging the last name makes a view whose positional axis is the last data axis (no transpose):
    # that axis is now replicated, every other entry still follows the name stored there.
    if shape:
        view = x.untag_prefix(list(shape)[-1])
        assert view.data_array is x.data_array  # same storage, so the same data axes are sharded
        assert tuple(partition_spec(view, rules)) == wanted[:-1] + (None,)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(size=st.integers(1, 16), mesh_axes=st.sampled_from(["data", "model", ("data", "model")]))
def test_named_sharding_divides_or_names_both_sizes(size, mesh_axes):
    parts = int(np.prod([SIZES[a] for a in ((mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes)]))
    if size % parts == 0:
        sharding = named_sharding({"heads": size}, BIG, {"heads": mesh_axes})
        assert isinstance(sharding, NamedSharding) and tuple(sharding.spec) == (mesh_axes,)
    else:
        with pytest.raises(ShardingError) as err:
            named_sharding({"heads": size}, BIG, {"heads": mesh_axes}, label="attn.query.weights")
        text = str(err.value)
        assert "attn.query.weights" in text and f"size {size}" in text and f"size {parts}" in text and "Fix:" in text


def test_spec_of_positional_and_unlisted_axes_is_replicated():
    x = pzb.nx.wrap(jnp.zeros((3, 2, 4, 5))).tag_prefix("batch").untag_prefix("batch")  # all positional
    assert partition_spec(x, RULES) == P(None, None, None, None)
    y = pzb.nx.wrap(jnp.zeros((3, 2, 4)), "seq", "batch", "heads")
    assert partition_spec(y, RULES) == P(None, "data", "model")
    assert named_sharding(y.named_shape, BIG, RULES).spec == P(None, "data", "model")


def test_mesh_axis_missing_from_the_mesh_is_named():
    with pytest.raises(ShardingError, match="'modle', which the mesh does not have") as err:
        named_sharding({"heads": 4}, BIG, {"heads": "modle"}, label="w")
    assert "['data', 'model']" in str(err.value) and str(err.value).startswith("w:")


def test_one_mesh_axis_for_two_array_axes_is_an_error():
    with pytest.raises(ShardingError, match="mesh axis 'model' is used by both axis 'heads' and axis 'features'"):
        named_sharding({"heads": 4, "features": 8}, BIG, {"heads": "model", "features": "model"})


def test_unnamed_input_is_an_error():
    with pytest.raises(ShardingError, match="named array"):
        partition_spec(jnp.zeros(3), RULES)


# -- placing a model --------------------------------------------------------------------------


def test_shard_model_places_a_copy_and_keeps_sharing():
    gpt = small_gpt()
    before = [(p, p.value) for p in params(gpt)]
    placed = shard_model(gpt, MESH, RULES)
    assert all(p.value is value for p, value in before), "the input's variables were changed"
    new = params(placed)
    assert not {id(p) for p in new} & {id(p) for p, _ in before}
    # The embedding table is read by the lookup and by the decode: still one Parameter.
    assert placed.sublayers[0].table.embeddings is placed.sublayers[-1].table.embeddings
    for p in new:
        assert isinstance(p.value.data_array.sharding, NamedSharding)
        assert p.value.data_array.sharding.spec == partition_spec(p.value, RULES)
    out, ref = jax.jit(lambda m, x: m(x))(pzb.freeze_params(placed), shard_inputs(tokens(), MESH, RULES)), gpt(tokens())
    np.testing.assert_allclose(out.unwrap("batch", "seq", "vocabulary"), ref.unwrap("batch", "seq", "vocabulary"),
                               atol=1e-5)


def test_shard_model_state_frozen_values_slots_and_raw_arrays():
    named = pzb.nx.wrap(jnp.ones((2, 4)), "batch", "heads")
    state = pzb.StateVariable(named, "cache")
    tree = {"s": state, "s2": state, "frozen": pzb.Parameter(named, "f").freeze(), "slot": pzb.ParameterSlot("x"),
            "raw": pzb.Parameter(jnp.ones(3), "raw"), "empty": pzb.StateVariable(None, "empty")}
    placed = shard_model(tree, MESH, RULES)
    assert placed["s"] is placed["s2"] and placed["s"] is not state and state.value is named
    assert placed["s"].value.data_array.sharding.spec == P("data", "model")
    assert placed["frozen"].value.data_array.sharding.spec == P("data", "model")
    assert placed["slot"] == pzb.ParameterSlot("x") and placed["empty"].value is None
    assert placed["raw"].value.sharding == NamedSharding(MESH, P())
    unplaced = shard_model(tree, MESH, RULES, state=False)
    assert unplaced["s"] is not state and unplaced["s"].value is named  # a copy, not shared with the input


def test_shard_model_names_the_variable_that_does_not_fit():
    w = pzb.Parameter(pzb.nx.wrap(jnp.ones((3, 2)), "heads", "features"), "blocks.0.attn.query.weights")
    with pytest.raises(ShardingError, match="'blocks.0.attn.query.weights'.*mesh does not have"):
        shard_model([w], MESH, {"heads": "tensor"})
    with pytest.raises(ShardingError, match="expected a jax.sharding.Mesh"):
        shard_model([w], "mesh", RULES)
    with pytest.raises(ShardingError, match="expected a jax.sharding.Mesh"):
        shard_model([w], BIG, RULES)  # an AbstractMesh has no devices to place on
    with pytest.raises(ShardingError, match="Mesh .or AbstractMesh."):
        named_sharding({"heads": 4}, None, RULES)


def test_sharding_specs_lists_every_variable_by_label():
    gpt = small_gpt()
    specs = sharding_specs(gpt, RULES)
    assert set(specs) == {p.label for p in params(gpt)}
    assert specs["gpt.blocks.0.attn.query.weights"] == P(None, "model", None)
    assert specs["gpt.blocks.0.mlp.out.weights"] == P("model", None)
    with pytest.raises(ShardingError, match="size 2"):
        sharding_specs(gpt, RULES, mesh=BIG)  # 2 heads on a 4-way model axis
    tree = [pzb.StateVariable({"a": pzb.nx.wrap(jnp.ones(2), "batch"), "b": jnp.ones(2)}, "pair"),
            pzb.StateVariable(None, "empty")]
    assert sharding_specs(tree, RULES) == {"pair": {"a": P("data"), "b": P()}}
    assert sharding_specs(tree, RULES, state=False) == {}


def test_shard_inputs_places_named_and_plain_arrays():
    out = shard_inputs({"x": tokens(), "mask": jnp.ones(3), "n": 3}, MESH, RULES)
    assert out["x"].data_array.sharding.spec == P("data", None)
    assert out["mask"].sharding == NamedSharding(MESH, P()) and out["n"] == 3


# -- constraints ------------------------------------------------------------------------------


def test_constraint_layer_adds_one_constraint_per_named_array():
    layer = ConstrainSharding(ShardingRules({"batch": "data"}), MESH)
    x = {"a": pzb.nx.wrap(jnp.ones((2, 3)), "batch", "f"), "b": pzb.nx.wrap(jnp.ones(2), "batch"), "c": 1}
    jaxpr = str(jax.make_jaxpr(lambda v: layer(v))(x))
    assert jaxpr.count("sharding_constraint") == 2
    eager = layer(x)  # outside jit the constraint places the values; other leaves pass unchanged
    assert pzb.tree_equal(eager, x) and eager["c"] == 1
    with pytest.raises(ShardingError, match="expected a named array"):
        layer(jnp.ones(3))


def test_constraint_without_mesh_uses_the_mesh_set_around_the_call():
    layer = ConstrainSharding({"batch": "data"})
    x = pzb.nx.wrap(jnp.ones((2, 3)), "batch", "f")
    with pytest.raises(ShardingError, match="no mesh"):
        layer(x)
    with jax.set_mesh(MESH):
        assert "sharding_constraint" in str(jax.make_jaxpr(layer)(x))


def test_constrain_sharding_inserts_after_selected_layers_by_where():
    gpt = small_gpt()
    edited = constrain_sharding(gpt, Where(layer="Residual"), RULES, MESH)
    layers = pzb.select(edited).at_instances_of(ConstrainSharding).get_sequence()
    assert len(layers) == 2 and all("sublayers[1]" in layer.name for layer in layers)
    before = constrain_sharding(gpt, pzb.nn.Residual, RULES, MESH, where="before")
    assert [type(layer).__name__ for layer in before.sublayers[1].sublayers] == [
        "ConstrainSharding", "Residual", "ConstrainSharding", "Residual"]
    np.testing.assert_array_equal(edited(tokens()).unwrap("batch", "seq", "vocabulary"),
                                  gpt(tokens()).unwrap("batch", "seq", "vocabulary"))
    with pytest.raises(SelectionError):
        constrain_sharding(gpt, Where(layer="Conv"), RULES, MESH)


def test_bad_constraint_rules_fail_at_trace_time_with_the_path():
    edited = constrain_sharding(small_gpt(), Where(layer="Residual"), {"batch": "data", "seq": "data"}, MESH)
    with pytest.raises(ShardingError, match=r"ConstrainSharding at sublayers\[1\].*used by both"):
        jax.eval_shape(lambda m, x: m(x), pzb.freeze_params(edited), tokens())


# -- traced custom modules and lowering ---------------------------------------------------------


class Attention(eqx.Module):
    W_Q: jax.Array
    W_O: jax.Array

    def __call__(self, x):
        q = jnp.einsum("sd,hdk->hsk", x, self.W_Q)
        scores = jax.nn.softmax(jnp.einsum("hqk,hsk->hqs", q, q), axis=-1)
        return jnp.einsum("hqs,hsk,hkd->qd", scores, q, self.W_O)


class Block(eqx.Module):
    attn: Attention
    mlp: eqx.nn.MLP

    def __call__(self, x):
        x = x + self.attn(x)
        return x + jax.vmap(self.mlp)(x)


def eqx_block():
    k = jax.random.split(jax.random.key(1), 3)
    return Block(Attention(0.3 * jax.random.normal(k[0], (2, 8, 4)), 0.3 * jax.random.normal(k[1], (2, 4, 8))),
                 eqx.nn.MLP(8, 8, 16, 1, key=k[2]))


def test_traced_equinox_module_is_placed_and_lowered_with_its_arrays():
    block, x = eqx_block(), jax.random.normal(jax.random.key(2), (5, 8))
    lifted = pzb.lift(block, x, strict=True)
    specs = sharding_specs(lifted, RULES)
    assert specs["attn.W_Q"] == P("model", None, None) and specs["attn.W_O"] == P("model", None, None)
    placed = shard_model(lifted, MESH, RULES)
    lowered = lower_sharded(placed)
    assert type(lowered) is Block
    w_q = [p for p in params(placed) if p.label == "attn.W_Q"][0]
    assert lowered.attn.W_Q is w_q.value.data_array  # the placed buffer itself
    assert lowered.attn.W_Q.sharding == NamedSharding(MESH, P("model", None, None))
    assert not isinstance(block.attn.W_Q.sharding, NamedSharding), "the user's module was changed"
    np.testing.assert_allclose(lowered(x), block(x), atol=1e-6)


def test_nnx_lowering_writes_out_sharding_from_placement():
    lin = nnx.Linear(4, 6, rngs=nnx.Rngs(0))
    lowered = lower_sharded(pzb.lift(lin), MESH, {"features_out": "model"})
    assert lowered.kernel.get_metadata()["out_sharding"] == (None, "model")
    assert lowered.bias.get_metadata()["out_sharding"] == (None,)
    assert lowered.kernel.get_metadata()["mesh"] == MESH
    specs = nnx.get_partition_spec(nnx.state(lowered))
    named = nnx.get_named_sharding(nnx.state(lowered), MESH)
    assert specs["kernel"].get_value() == P(None, "model")
    assert named["kernel"].get_value() == lowered.kernel.get_raw_value().sharding
    assert "out_sharding" not in lin.kernel.get_metadata(), "the user's Variable was changed"
    assert lowered.kernel is not lin.kernel


def test_lower_sharded_needs_mesh_and_rules_together():
    with pytest.raises(ShardingError, match="both mesh and rules"):
        lower_sharded(pzb.lift(nnx.Linear(2, 2, rngs=nnx.Rngs(0))), MESH)
    # Without either, an unplaced model lowers as pzb.lower does, with no metadata added.
    lowered = lower_sharded(pzb.lift(nnx.Linear(2, 2, rngs=nnx.Rngs(0))))
    assert "out_sharding" not in lowered.kernel.get_metadata()


class Stack(eqx.Module):
    layers: Block  # every array has a leading (3,) axis, run by lax.scan

    def __call__(self, x):
        arrays, static = eqx.partition(self.layers, eqx.is_array)
        return jax.lax.scan(lambda h, block: (eqx.combine(block, static)(h), None), x, arrays)[0]


def test_scanned_stack_keeps_layers_replicated_and_heads_split():
    def make(key):
        k = jax.random.split(key, 3)
        return Block(Attention(0.3 * jax.random.normal(k[0], (2, 8, 4)), 0.3 * jax.random.normal(k[1], (2, 4, 8))),
                     eqx.nn.MLP(8, 8, 16, 1, key=k[2]))

    stack = Stack(eqx.filter_vmap(make)(jax.random.split(jax.random.key(3), 3)))
    x = jax.random.normal(jax.random.key(4), (5, 8))
    lifted = pzb.lift(stack, x, strict=True)
    assert pzb.select(lifted).at_instances_of(pzb.nn.LayerStack).count() == 1
    specs = sharding_specs(lifted, RULES)
    w_q = [p for p in params(lifted) if p.label.endswith("W_Q")][0]
    assert tuple(w_q.value.named_axes)[:2] == ("layers", "heads") and specs[w_q.label] == P(None, "model", None, None)
    placed = shard_model(lifted, MESH, {**RULES, "layers": None})
    got = jax.jit(lambda m, v: m(v))(pzb.freeze_params(placed), pzb.nx.wrap(x, "seq", "features"))
    np.testing.assert_allclose(got.unwrap("seq", "features"), stack(x), atol=1e-5)
    lowered = lower_sharded(placed)
    assert type(lowered) is Stack
    assert lowered.layers.attn.W_Q.sharding == NamedSharding(MESH, P(None, "model", None, None))
    np.testing.assert_allclose(lowered(x), stack(x), atol=1e-5)


def test_constraints_lower_to_modules_that_still_constrain():
    lin = eqx.nn.Linear(4, 3, key=jax.random.key(0))
    low = lower_sharded(constrain_sharding(pzb.lift(lin), pzb.nn.Linear, {"features": "model"}, MESH))
    x = jnp.ones(4)
    assert "sharding_constraint" in str(jax.make_jaxpr(lambda v: low(v))(x))
    np.testing.assert_array_equal(eqx.filter_jit(lambda m, v: m(v))(low, x), lin(x))
    nlin = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    nlow = lower_sharded(constrain_sharding(pzb.lift(nlin), pzb.nn.Linear, {"batch": "data"}, MESH))
    xb = jnp.ones((2, 4))
    assert "sharding_constraint" in str(jax.make_jaxpr(lambda v: nlow(v))(xb))
    np.testing.assert_array_equal(nnx.jit(lambda m, v: m(v))(nlow, xb), nlin(xb))


def test_constraint_inside_a_traced_module_by_where():
    block, x = eqx_block(), jax.random.normal(jax.random.key(2), (5, 8))
    lifted = pzb.lift(block, x, strict=True)
    pinned = constrain_sharding(lifted, Where(module="attn"), {"seq": "data"}, MESH)
    assert pzb.select(pinned).at_instances_of(ConstrainSharding).count() == 1
    named_x = pzb.nx.wrap(x, "seq", "features")
    jaxpr = str(jax.make_jaxpr(lambda m, v: m(v))(pzb.freeze_params(pinned), named_x))
    assert jaxpr.count("sharding_constraint") == 1
    np.testing.assert_allclose(pinned(named_x).unwrap("seq", "features"), block(x), atol=1e-6)
    lowered = lower_sharded(pinned)  # an edited glue lowers to an adapter that runs the constraint
    assert "sharding_constraint" in str(jax.make_jaxpr(lambda v: lowered(v))(x))
    np.testing.assert_allclose(lowered(x), block(x), atol=1e-6)
