"""Intervention specs: saved as JSON + npz, re-applied bitwise in a fresh process, malformed specs rejected."""

from __future__ import annotations

import copy
import functools
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.toolshed import Ablate, AddVector, Patch, Where, ZeroAblation
from pzbridge.toolshed.specs import (
    Spec,
    SpecError,
    load_spec,
    register_spec_operation,
    save_spec,
)

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import intervention_models as im


def _spec() -> Spec:
    vector = pzb.nx.wrap(jnp.linspace(-1.0, 1.0, im.D_MODEL), "features")
    mask = pzb.nx.wrap(jnp.array([True, False, True, False, True]), "seq")
    return (Spec()
            .add(Where(label="attns.0.W_O"), AddVector(vector, scale=0.5))
            .add(Where(label="attns.1.W_V", index={"heads": [0, 2]}), ZeroAblation())
            .add(Where(label="attns.1.W_O"), Ablate("mean", axes=("seq",), mask=mask), side="after"))


def _inputs(kind: str):
    """The input each saved spec is run on, here and in the fresh process (rebuilt there from this source)."""
    if kind == "tokens":
        return jnp.arange(5) % im.VOCAB
    clean = pzb.nx.wrap(im.tokens(0, 2, 5), "batch", "seq")
    return pzb.toolshed.stack_worlds([clean, pzb.nx.wrap(im.tokens(1, 2, 5), "batch", "seq")]) if kind == "worlds" \
        else clean


def _specs() -> dict[str, tuple[Spec, str]]:
    """One spec per kind of edit: layer insertions, recorded calls, state (a counter), keys, worlds, sharding."""
    from pzbridge.toolshed import (
        RouteWorlds,
        Steer,
        TransferWorlds,
        ablate,
        constrain_sharding,
        interchange,
        patch_paths,
        patch_worlds,
        steer,
    )
    from pzbridge.toolshed.ablation import Resample
    from pzbridge.toolshed.trainable import LowRankRotatedInterchange

    heads = pzb.nx.wrap(jnp.array([0.5, -1.0]), "projection")
    features = pzb.nx.wrap(jnp.linspace(-1.0, 1.0, im.D_MODEL), "features")
    reference = pzb.nx.wrap(im.tokens(9, 3, 5), "batch", "seq")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    counter = pzb.StateVariable(jnp.int32(0), "steer.position")
    return {
        "layers": (_spec(), "tokens"),
        "steer": (Spec().record(steer, Where(label="attns.0.W_O", side="before", index={"heads": 1, "seq": [0, 2]}),
                                heads, scale=0.5)
                  .add(Where(module="attns.1"), Steer(pzb.toolshed.AddVector(features), (1, 3), counter)), "batch"),
        "resample": (Spec().record(ablate, Where(module="attns.0", index={"seq": 2}), "resample", reference=reference,
                                   key=jax.random.key(4))
                     .add(Where(module="attns.1"), Resample(features[{"features": pzb.nx.wrap(jnp.zeros(2, int),
                                                                                              "batch")}],
                                                            jax.random.key(5))), "batch"),
        "worlds": (Spec().record(patch_worlds, Where(module="attns.0", index={"seq": 1}), (1, 1))
                   .record(interchange, [(Where(module="attns.1"), (0, 0))])
                   .add(Where(label="unembed", side="before"), RouteWorlds((1, 0))), "worlds"),
        "paths": (Spec().record(patch_paths, Where(label="attns.0.W_O", side="before", index={"heads": 0}),
                                [Where(module="attns.1", side="before"), Where(label="unembed", side="before")],
                                (1, 1), freeze=[Where(module="attns.1")])
                  .add(Where(module="attns.0"), TransferWorlds((1,), (0,), (1,))), "worlds"),
        "das and sharding": (Spec().add(Where(module="attns.0"), LowRankRotatedInterchange.from_config(
            "das", jax.random.key(2), {"features": im.D_MODEL}, k=2))
            .record(constrain_sharding, Where(module="attns.*"), {"batch": "data", "heads": "model"}, mesh), "worlds"),
    }


def _output(y) -> np.ndarray:
    return np.asarray(y.unwrap(*sorted(y.named_shape)) if pzb.nx.is_namedarray(y) else y)


_RUN = """
import json, sys, numpy as np, jax.numpy as jnp
sys.path.insert(0, {here!r})
import intervention_models as im
import pzbridge as pzb
from pzbridge.toolshed.specs import load_spec
import test_specs
_, model = im.lifted_tiny_lm(0)
for name, kind in json.loads({cases!r}).items():
    edited = load_spec({directory!r} + "/" + name).apply(model)
    x = test_specs._inputs(kind)
    out = edited.positional(x) if kind == "tokens" else edited(x)
    np.save({directory!r} + "/" + name + ".npy", test_specs._output(out))
"""


def test_spec_reapplied_in_a_fresh_process_gives_bitwise_the_same_outputs(tmp_path):
    _, model = im.lifted_tiny_lm(0)
    specs = _specs()
    here_out = {}
    for name, (spec, kind) in specs.items():
        edited, x = spec.apply(model), _inputs(kind)
        here_out[name] = _output(edited.positional(x) if kind == "tokens" else edited(x))
        save_spec(spec, tmp_path / name)
    cases = json.dumps({name: kind for name, (_, kind) in specs.items()})
    subprocess.run([sys.executable, "-c", _RUN.format(here=str(HERE), directory=str(tmp_path), cases=cases)],
                   check=True, timeout=300)
    for name, (spec, _) in specs.items():
        np.testing.assert_array_equal(np.load(tmp_path / f"{name}.npy", allow_pickle=False), here_out[name],
                                      err_msg=name)
        assert load_spec(tmp_path / name) == spec


def test_spec_applies_to_pzb_nn_and_stock_layer_models():
    vector = pzb.nx.wrap(jnp.ones(im.D_MODEL), "features")
    spec = Spec().add(Where(path="sublayers[1]"), AddVector(vector))
    data, arrays = spec.to_json()
    again = Spec.from_json(json.loads(json.dumps(data)), arrays)
    model = im.pzb_attention(0)
    x = pzb.nx.wrap(im.stream(0, 4, im.D_MODEL), "seq", "features")
    assert pzb.tree_equal(again.apply(model)(x), spec.apply(model)(x))
    x = im.stream(0, 4, im.D_MODEL)
    lifted = pzb.lift(im.nnx_mha(0), x)
    zero = Spec().add(Where(layer="Linear"), ZeroAblation())
    assert [c.new_class for c in pzb.diff(lifted, zero.apply(lifted)).added][:1] == ["ZeroAblation"]


def test_patch_round_trips_with_its_values():
    values = pzb.nx.wrap(jnp.arange(6.0).reshape(2, 3), "seq", "features")
    spec = Spec().add(Where(path="sublayers[0]"), Patch(values), side="before")
    data, arrays = spec.to_json()
    assert Spec.from_json(json.loads(json.dumps(data)), arrays) == spec


def test_unknown_field_and_operation_are_named():
    data, arrays = _spec().to_json()
    bad = copy.deepcopy(data)
    bad["edits"][0]["colour"] = "red"
    with pytest.raises(SpecError, match=r"spec.edits\[0\]: unknown fields \['colour'\]"):
        Spec.from_json(bad, arrays)
    bad = copy.deepcopy(data)
    bad["edits"][0]["operation"] = "os.system"
    with pytest.raises(SpecError, match="not an allowed operation"):
        Spec.from_json(bad, arrays)


def test_registering_twice_is_an_error():
    with pytest.raises(SpecError, match="already registered"):
        register_spec_operation("AddVector", AddVector, lambda l, p: {}, lambda p, g: None)


def test_arrays_file_with_pickled_objects_is_refused(tmp_path):
    save_spec(_spec(), tmp_path)
    np.savez(tmp_path / "arrays.npz", a0=np.array([object()], dtype=object))  # Needs pickle to read back.
    with pytest.raises(SpecError):
        load_spec(tmp_path)


@functools.cache
def _calls_json():
    specs = _specs()
    edits = sum((specs[name][0].edits for name in ("steer", "resample", "paths", "das and sharding")), ())
    return Spec(edits).to_json()


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=True) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _paths(tree, prefix=()):
    yield prefix
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _paths(v, (*prefix, i))


@pytest.mark.parametrize("which", ["layers", "calls"])
@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.data())
def test_malformed_specs_always_raise_spec_error(which, data):
    spec_json, arrays = _spec().to_json() if which == "layers" else _calls_json()
    mutated = copy.deepcopy(spec_json)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = list(_paths(mutated))
        path = data.draw(st.sampled_from(paths[1:]))
        parent = mutated
        for key in path[:-1]:
            parent = parent[key]
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = data.draw(_json_values)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[data.draw(st.text(min_size=1, max_size=5))] = data.draw(_json_values)
        else:
            parent.append(data.draw(_json_values))
    try:
        Spec.from_json(mutated, arrays)  # A harmless mutation (e.g. same value) may still load.
    except SpecError:
        pass
