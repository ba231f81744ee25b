"""Every intervention and edit of the toolshed as a spec: recorded, saved, loaded, re-applied to a fresh model.

The law, for each operation: ``load(save(spec)).apply(fresh)`` computes
bitwise what the direct edit of another lift of the same model computes (the
same layers, so the same primitives in the same order). The references are
the toolshed functions called directly (``steer(model, ...)``), never the
spec code. The fresh-process form of the law is in test_specs.py.
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.models.gpt import build_gpt, make_kv_cached
from pzbridge.toolshed import (
    AddVector,
    AtIndex,
    ConstrainSharding,
    InterveneWith,
    Patch,
    RouteWorlds,
    SelectWorlds,
    ShardingRules,
    Steer,
    TransferWorlds,
    Where,
    ZeroAblation,
    ablate,
    add_kv_caches,
    cached_greedy_decode,
    constrain_sharding,
    insert_intervention,
    interchange,
    knockout_heads,
    linearize,
    patch_paths,
    patch_worlds,
    stack_worlds,
    steer,
)
from pzbridge.toolshed.ablation import Resample
from pzbridge.toolshed.specs import (
    Spec,
    SpecError,
    load_spec,
    save_spec,
    spec_functions,
    spec_operations,
)
from pzbridge.toolshed.trainable import BoundlessMask, LowRankRotatedInterchange

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import intervention_models as im

MESH = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))


def round_trip(spec: Spec) -> Spec:
    """Through the files, as another session would read them."""
    with tempfile.TemporaryDirectory() as directory:
        save_spec(spec, directory)
        json.loads(Path(directory, "spec.json").read_text())  # Plain JSON.
        return load_spec(directory)


def leaves(y: Any) -> list[np.ndarray]:
    flat = jax.tree_util.tree_leaves(y, is_leaf=pzb.nx.is_namedarray)
    return [np.asarray(v.unwrap(*sorted(v.named_shape))) if pzb.nx.is_namedarray(v) else np.asarray(v) for v in flat]


def assert_bitwise(a: Any, b: Any) -> None:
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def lms():
    """Two separate lifts of the traced custom Equinox LM: one edited directly, one through the spec."""
    return im.lifted_tiny_lm(0)[1], im.lifted_tiny_lm(0)[1]


def batch(seed: int) -> Any:
    return pzb.nx.wrap(im.tokens(seed, 2, 5), "batch", "seq")


def worlds(seed: int, n: int = 2) -> Any:
    return stack_worlds([batch(seed + w) for w in range(n)])


def heads_vector() -> Any:
    return pzb.nx.wrap(jnp.array([0.5, -1.0]), "projection")


def features(scale: float = 1.0) -> Any:
    return pzb.nx.wrap(scale * jnp.linspace(-1.0, 1.0, im.D_MODEL), "features")


# (name, function, args after the model, kwargs, input): the direct call and the recorded one make the same edit.
CALLS = [
    ("steer at positions, one head", steer,
     (Where(label="attns.0.W_O", side="before", index={"heads": 1, "seq": [0, 2]}), heads_vector()),
     {"scale": 0.5}, batch),
    ("steer with a trainable vector, last position", steer, (Where(module="attns.1"), pzb.Parameter(features(), "v")),
     {"positions": "last"}, batch),
    ("resample ablation", ablate, (Where(module="attns.0", index={"seq": [1, 3]}), "resample"),
     {"reference": batch(7), "key": jax.random.key(3)}, batch),
    ("mean ablation from a reference", ablate, (Where(label="attns.1.W_O", side="before"), "mean"),
     {"reference": batch(8)}, batch),
    ("knockout heads", knockout_heads, ([0, 2],), {"at": Where(label="attns.1.W_O", side="before")}, batch),
    ("worlds patching", patch_worlds, (Where(module="attns.0", index={"seq": 2}), (1, 1)), {}, worlds),
    ("path patching", patch_paths,
     (Where(label="attns.0.W_O", side="before", index={"heads": 0}),
      [Where(module="attns.1", side="before"), Where(label="unembed", side="before")], (1, 1)),
     {"freeze": [Where(module="attns.1")]}, worlds),
    ("interchange", interchange,
     ([(Where(module="attns.0", index={"seq": 0}), (1, 1, 2)), (Where(module="attns.1"), (2, 1, 2))],), {},
     lambda seed: worlds(seed, 3)),
    ("sharding constraint", constrain_sharding, (Where(module="attns.*"), {"batch": "data", "heads": "model"}, MESH),
     {}, batch),
    ("insert a patch", insert_intervention,
     (Where(module="attns.1", side="before", index={"seq": slice(3, None)}),
      Patch(pzb.nx.zeros({"seq": 5, "features": 6}))), {}, batch),
]


@pytest.mark.parametrize("case", CALLS, ids=[c[0] for c in CALLS])
def test_recorded_call_reapplied_to_a_fresh_lift_is_bitwise_the_direct_edit(lms, case):
    _, fn, args, kwargs, inputs = case
    model, fresh = lms
    spec = round_trip(Spec().record(fn, *args, **kwargs))
    assert spec == Spec().record(fn, *args, **kwargs)
    x = inputs(0)
    assert_bitwise(spec.apply(fresh)(x), fn(model, *args, **kwargs)(x))


# (name, site, layer, input): Spec.add of the layer against insert_intervention of the same layer.
LAYERS = [
    ("Resample", Where(module="attns.0"), Resample(pzb.nx.wrap(jnp.arange(36.0).reshape(3, 2, 6), "batch", "seq",
                                                               "features")[{"seq": 0}], jax.random.key(1)), batch),
    ("Steer with AtIndex", Where(label="attns.0.W_O", side="before"),
     Steer(AtIndex(AddVector(heads_vector(), 2.0), Where(layer="Layer", index={"heads": [0, 2]})), (1, -1)), batch),
    ("Steer with a slice", Where(module="attns.1"), Steer(AddVector(features()), pzb.toolshed.where.AxisSlice(1, None, 2)),
     batch),
    ("RouteWorlds", Where(module="attns.0"), RouteWorlds((1, 1)), worlds),
    ("SelectWorlds", Where(module="attns.0"), SelectWorlds((1, 0), 2), worlds),
    ("TransferWorlds", Where(module="attns.1", side="before"),
     TransferWorlds((0,), (1,), (0,), at=Where(layer="Layer", index={"seq": [4]}), site="x"), worlds),
    ("ConstrainSharding", Where(module="attns.1"), ConstrainSharding(ShardingRules({"seq": "model"}), MESH), batch),
    ("ConstrainSharding without a mesh", Where(module="attns.1"),
     ConstrainSharding(ShardingRules({"seq": ("data", "model")}), None, name="c"), batch),
    ("DAS low rank", Where(module="attns.0"),
     LowRankRotatedInterchange.from_config("das", jax.random.key(2), {"features": 6}, k=2), worlds),
    ("Boundless DAS", Where(module="attns.0"), BoundlessMask.from_config("b", jax.random.key(2), {"features": 6}), worlds),
]


@pytest.mark.parametrize("case", LAYERS, ids=[c[0] for c in LAYERS])
def test_layer_edit_reapplied_to_a_fresh_lift_is_bitwise_the_direct_insertion(lms, case):
    name, site, layer, inputs = case
    model, fresh = lms
    spec = round_trip(Spec().add(site, layer))
    assert spec == Spec().add(site, layer)
    x = inputs(0)
    expected = insert_intervention(model, site, layer)
    if name == "ConstrainSharding without a mesh":
        with jax.set_mesh(MESH):
            assert_bitwise(spec.apply(fresh)(x), expected(x))
    else:
        assert_bitwise(spec.apply(fresh)(x), expected(x))


def test_every_intervention_layer_of_the_toolshed_is_an_operation_or_refused():
    covered = set(spec_operations())
    assert {"Resample", "Steer", "AtIndex", "RouteWorlds", "SelectWorlds", "TransferWorlds", "ConstrainSharding",
            "RotatedSubspaceInterchange", "LowRankRotatedInterchange", "BoundlessMask"} <= covered
    assert {"steer", "ablate", "knockout_heads", "patch_worlds", "patch_paths", "interchange",
            "constrain_sharding", "add_kv_caches", "linearize"} <= set(spec_functions())


def test_steered_cached_decode_reapplies_with_its_counter():
    """The decoding counter (a StateVariable) is saved with its label and value; the decode is bitwise the same."""
    prompt = pzb.nx.wrap(jnp.array([[1, 2, 3], [4, 5, 6]]), "batch", "seq")
    site = Where(layer="TransformerBlock", path="sublayers[1]")
    vector = pzb.nx.wrap(3.0 * jax.random.normal(jax.random.key(1), (8,)), "features")

    def cached() -> Any:
        return make_kv_cached(build_gpt("g", jax.random.key(0), 13, 2, 2, 8, 16, 16), {"batch": 2}, 8)

    direct = steer(cached(), site, vector, positions=(1, 4), scale=0.5)
    layer = pzb.select(direct).at_instances_of(Steer).get()
    assert layer.position is not None and int(layer.position.value) == 0
    for spec in (Spec().record(steer, site, vector, positions=(1, 4), scale=0.5), Spec().add(site, layer)):
        again = round_trip(spec).apply(cached())
        reloaded = pzb.select(again).at_instances_of(Steer).get()
        assert reloaded.position.label == layer.position.label
        expected, got = cached_greedy_decode(direct, prompt, 3), cached_greedy_decode(again, prompt, 3)
        assert_bitwise((got.tokens, got.logits), (expected.tokens, expected.logits))


def test_kv_caches_then_steering_reapply_and_decode_bitwise():
    prompt = pzb.nx.wrap(jnp.array([[1, 2, 3], [4, 5, 6]]), "batch", "seq")
    site = Where(layer="TransformerBlock")  # Both blocks: steer gives each its own counter.
    vector = pzb.nx.wrap(jnp.linspace(-2.0, 2.0, 8), "features")
    spec = Spec().record(add_kv_caches, {"batch": 2}, 8).record(steer, site, vector, positions=slice(2, None))

    def gpt() -> Any:
        return build_gpt("g", jax.random.key(5), 13, 2, 2, 8, 16, 16)

    direct = steer(add_kv_caches(gpt(), {"batch": 2}, 8), site, vector, positions=slice(2, None))
    expected, got = cached_greedy_decode(direct, prompt, 3), cached_greedy_decode(round_trip(spec).apply(gpt()), prompt, 3)
    assert_bitwise((got.tokens, got.logits), (expected.tokens, expected.logits))


def test_linearize_reapplies_bitwise():
    x = pzb.nx.wrap(im.stream(3, 2, 4, im.D_MODEL), "batch", "seq", "features")
    args = (Where(path="sublayers[0].delta"), x)  # Positional-only parameters, passed positionally again.
    spec = round_trip(Spec().record(linearize, *args))
    y = x * 0.5
    assert_bitwise(spec.apply(pzb_model())(y), linearize(pzb_model(), *args)(y))


# -- refusals: code is not data -------------------------------------------------------------------


def test_functions_are_refused_with_the_fix():
    with pytest.raises(SpecError, match="cannot be written to a spec.*Fix: use a vector"):
        Spec().record(steer, Where(module="attns.0"), lambda x: 2.0 * x)
    with pytest.raises(SpecError, match="InterveneWith holds a Python function.*register_spec_operation"):
        Spec().add(Where(module="attns.0"), Steer(InterveneWith(jnp.tanh), "last"))
    with pytest.raises(SpecError, match="InterveneWith holds a Python function"):
        Spec().add(Where(module="attns.0"), InterveneWith(jnp.tanh))
    with pytest.raises(SpecError, match=r"site at= is the class Linear.*Fix: name it with a Where"):
        Spec().record(ablate, pzb.nn.Linear)
    with pytest.raises(SpecError, match="not a registered spec function"):
        Spec().record(jnp.tanh, Where(module="attns.0"))
    with pytest.raises(SpecError, match="Spec.record\\(steer\\).*Fix: pass the arguments"):
        Spec().record(steer, Where(module="attns.0"), features(), colour="red")
    with pytest.raises(SpecError, match="unbound slot or a frozen value"):
        Spec().add(Where(module="attns.0"), AddVector(pzb.Parameter(features(), "v").freeze()))


def test_malformed_calls_are_named():
    spec = Spec().record(steer, Where(module="attns.0"), features(), positions=(1, 2))
    data, arrays = spec.to_json()
    for change, message in [
        (lambda d: d["edits"][0].update(call="os.system"), "not an allowed function"),
        (lambda d: d["edits"][0]["args"].update(colour="red"), r"unknown fields \['colour'\]"),
        (lambda d: d["edits"][0]["args"].pop("at"), r"missing arguments \['at'\]"),
        (lambda d: d["edits"][0]["args"].update(positions={"eval": "1"}), "tag 'eval'"),
        (lambda d: d["edits"][0]["args"].update(vector_or_fn={"array": "a9", "axes": None}), "not in the arrays"),
    ]:
        bad = copy.deepcopy(data)
        change(bad)
        with pytest.raises(SpecError, match=message):
            Spec.from_json(bad, arrays)


def test_a_mesh_needs_its_devices():
    data, arrays = Spec().add(Where(module="attns.0"), ConstrainSharding(ShardingRules({}), MESH)).to_json()
    data["edits"][0]["params"]["mesh"]["mesh"]["devices"] = [12345]
    with pytest.raises(SpecError, match="Fix: load the spec where those devices exist"):
        Spec.from_json(data, arrays)


# -- the law for random parameters: save -> load -> apply == direct apply (a pzb.nn model, rebuilt fresh) --

SIZES = {"batch": 2, "seq": 4, "features": im.D_MODEL}


def pzb_model() -> Any:
    return im.pzb_attention(0)


def named(draw: Any, axes: tuple[str, ...], dtype: Any = jnp.float32) -> Any:
    shape = tuple(SIZES[a] for a in axes)
    if dtype is bool:
        return pzb.nx.wrap(jnp.asarray(np.array(draw(st.lists(st.booleans(), min_size=int(np.prod(shape)),
                                                                 max_size=int(np.prod(shape))))).reshape(shape)), *axes)
    seed = draw(st.integers(0, 2**16))
    return pzb.nx.wrap(jax.random.normal(jax.random.key(seed), shape), *axes)


sites = st.sampled_from([Where(path="sublayers[0].delta"), Where(path="sublayers[1]", side="before"),
                         Where(path="sublayers[1]")])
positions = st.one_of(st.sampled_from(["all", "last"]), st.lists(st.integers(-4, 5), min_size=1, max_size=3).map(tuple),
                      st.builds(slice, st.integers(0, 3) | st.none(), st.none(), st.integers(1, 2)))


@st.composite
def recorded_calls(draw: Any) -> tuple[Any, tuple, dict]:
    kind = draw(st.sampled_from(["steer", "ablate", "knockout_heads", "patch_worlds", "patch_paths", "interchange",
                                 "constrain_sharding"]))
    site = draw(sites)
    if kind == "steer":
        scale = draw(st.floats(-3, 3, allow_nan=False, width=32))
        return steer, (site, named(draw, ("features",))), {"positions": draw(positions), "scale": scale}
    if kind == "ablate":
        how = draw(st.sampled_from(["zero", "mean", "resample"]))
        kwargs = {} if how == "zero" else {"reference": named(draw, ("batch", "seq", "features"))}
        if how == "resample":
            kwargs["key"] = jax.random.key(draw(st.integers(0, 99)))
        return ablate, (Where(site.layer, site.path, side=site.side, index={"seq": draw(st.integers(0, 3))}), how), \
            kwargs
    if kind == "knockout_heads":
        heads = draw(st.lists(st.integers(0, im.HEADS - 1), min_size=1, max_size=2, unique=True))
        return knockout_heads, (heads,), {"how": draw(st.sampled_from(["zero", "mean"])), "over": "batch"}
    routes = tuple(draw(st.lists(st.integers(0, 1), min_size=2, max_size=2)))
    if kind == "patch_paths":
        sender = Where(layer="AttendToValues", index={"heads": draw(st.integers(0, im.HEADS - 1))})
        freeze = draw(st.sampled_from([None, "residual_deltas", [Where(path="sublayers[0].delta")]]))
        return patch_paths, (sender, [Where(path="sublayers[1]", side="before")], routes), {"freeze": freeze}
    if kind == "patch_worlds":
        return patch_worlds, (site, routes), {}
    if kind == "interchange":
        return interchange, ([(site, routes), (Where(path="sublayers[1]"), tuple(reversed(routes)))],), {}
    rules = {name: draw(st.sampled_from([None, "data", "model"])) for name in ("batch", "seq")}
    if rules["batch"] == rules["seq"] and rules["batch"] is not None:
        rules["seq"] = None
    return constrain_sharding, (site, rules, MESH), {}


def model_input(fn: Any) -> Any:
    x = pzb.nx.wrap(im.stream(0, 2, 4, im.D_MODEL), "batch", "seq", "features")
    return stack_worlds([x, x * 2.0]) if fn in (patch_worlds, patch_paths, interchange) else x


@settings(max_examples=35, deadline=None, derandomize=True)
@given(recorded_calls())
def test_recorded_calls_with_random_parameters_reapply_bitwise(call):
    fn, args, kwargs = call
    spec = round_trip(Spec().record(fn, *args, **kwargs))
    x = model_input(fn)
    assert_bitwise(spec.apply(pzb_model())(x), fn(pzb_model(), *args, **kwargs)(x))


@st.composite
def layer_edits(draw: Any) -> tuple[Where, Any, bool]:
    kind = draw(st.sampled_from(["Resample", "Steer", "AtIndex", "RouteWorlds", "SelectWorlds", "TransferWorlds",
                                 "ConstrainSharding", "Patch", "ZeroAblation"]))
    site = draw(sites)
    heads = Where(layer="Layer", index={"features": draw(st.lists(st.integers(0, 5), min_size=1, max_size=3))})
    if kind == "Resample":
        return site, Resample(named(draw, ("batch", "features")), jax.random.key(draw(st.integers(0, 99)))), False
    if kind == "Steer":
        edit = AddVector(named(draw, ("features",)), draw(st.floats(-2, 2, width=32)))
        edit = AtIndex(edit, heads) if draw(st.booleans()) else edit
        pos = draw(positions)
        return site, Steer(edit, pos if not isinstance(pos, slice) else pzb.toolshed.where.AxisSlice(
            pos.start, pos.stop, pos.step)), False
    if kind == "AtIndex":
        return site, AtIndex(ZeroAblation(), heads), False
    if kind == "RouteWorlds":
        return site, RouteWorlds(tuple(draw(st.lists(st.integers(0, 1), min_size=2, max_size=2)))), True
    if kind == "SelectWorlds":
        # Two worlds out: a residual adds the edited stream to the unedited one.
        return site, SelectWorlds(tuple(draw(st.lists(st.integers(0, 1), min_size=2, max_size=2))), 2), True
    if kind == "TransferWorlds":
        target = draw(st.integers(0, 1))
        return site, TransferWorlds((target,), (1 - target,), (target,), at=draw(st.sampled_from([None, heads]))), True
    if kind == "ConstrainSharding":
        return site, ConstrainSharding(ShardingRules({"features": draw(st.sampled_from([None, "model"]))}), MESH), False
    if kind == "Patch":
        mask = named(draw, ("seq",), bool) if draw(st.booleans()) else None
        return site, Patch(named(draw, ("seq", "features")), mask), False
    return site, ZeroAblation(named(draw, ("features",), bool)), False


@settings(max_examples=30, deadline=None, derandomize=True)
@given(layer_edits())
def test_layer_edits_with_random_parameters_reapply_bitwise(edit):
    site, layer, on_worlds = edit
    spec = round_trip(Spec().add(site, layer))
    x = pzb.nx.wrap(im.stream(1, 2, 4, im.D_MODEL), "batch", "seq", "features")
    x = stack_worlds([x, -x]) if on_worlds else x
    assert_bitwise(spec.apply(pzb_model())(x), insert_intervention(pzb_model(), site, layer)(x))


def test_running_an_applied_spec_never_moves_the_spec_state():
    """Regression: a saved Steer counter was the inserted object itself, so a run advanced the spec's copy."""
    counter = pzb.StateVariable(jnp.int32(0), "steer.position")
    spec = Spec().add(Where(path="sublayers[1]"), Steer(AddVector(features()), (1,), counter))
    x = pzb.nx.wrap(im.stream(0, 1, 2, im.D_MODEL), "batch", "seq", "features")
    first = spec.apply(pzb_model())
    first(x)
    assert int(counter.value) == 0
    assert_bitwise(spec.apply(pzb_model())(x), insert_intervention(pzb_model(), Where(path="sublayers[1]"),
                                                                    Steer(AddVector(features()), (1,),
                                                                          pzb.StateVariable(jnp.int32(0), "p")))(x))


def test_one_decoding_counter_at_several_sites_is_refused_with_the_fix():
    counter = pzb.StateVariable(jnp.int32(0), "steer.position")
    spec = Spec().add(Where(layer="TransformerBlock"), Steer(AddVector(pzb.nx.wrap(jnp.ones(8), "features")), (1,),
                                                             counter))
    gpt = make_kv_cached(build_gpt("g", jax.random.key(0), 13, 2, 2, 8, 16, 16), {"batch": 1}, 8)
    with pytest.raises(SpecError, match=r"selects 2 layers.*Fix: record the call instead"):
        spec.apply(gpt)
