"""Intervention specs: saved as JSON + npz, re-applied bitwise in a fresh process, malformed specs rejected."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.toolshed import Ablate, AddVector, Patch, Where, ZeroAblation
from pzbridge.toolshed.specs import Spec, SpecError, load_spec, register_spec_operation, save_spec

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import intervention_models as im  # noqa: E402


def _spec() -> Spec:
    vector = pzb.nx.wrap(jnp.linspace(-1.0, 1.0, im.D_MODEL), "features")
    mask = pzb.nx.wrap(jnp.array([True, False, True, False, True]), "seq")
    return (Spec()
            .add(Where(label="attns.0.W_O"), AddVector(vector, scale=0.5))
            .add(Where(label="attns.1.W_V", index={"heads": [0, 2]}), ZeroAblation())
            .add(Where(label="attns.1.W_O"), Ablate("mean", axes=("seq",), mask=mask), side="after"))


_RUN = """
import sys, numpy as np, jax.numpy as jnp
sys.path.insert(0, {here!r})
import intervention_models as im
import pzbridge as pzb
from pzbridge.toolshed.specs import load_spec
_, model = im.lifted_tiny_lm(0)
out = load_spec({directory!r}).apply(model).positional(jnp.arange(5) % im.VOCAB)
np.save({target!r}, np.asarray(out))
"""


def test_spec_reapplied_in_a_fresh_process_gives_bitwise_the_same_outputs(tmp_path):
    _, model = im.lifted_tiny_lm(0)
    spec = _spec()
    here_out = np.asarray(spec.apply(model).positional(jnp.arange(5) % im.VOCAB))
    save_spec(spec, tmp_path / "spec")
    target = tmp_path / "out.npy"
    subprocess.run([sys.executable, "-c", _RUN.format(here=str(HERE), directory=str(tmp_path / "spec"),
                                                      target=str(target))], check=True, timeout=120)
    np.testing.assert_array_equal(np.load(target, allow_pickle=False), here_out)
    assert load_spec(tmp_path / "spec") == spec


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


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.data())
def test_malformed_specs_always_raise_spec_error(data):
    spec_json, arrays = _spec().to_json()
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
