"""The Where location language: data form, matching by class / path / label / module, named-axis indices."""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.core.errors import (
    NamedAxisError,
    PzbridgeError,
    SelectionError,
    format_path,
)
from pzbridge.toolshed.intermediates import capture_intermediates
from pzbridge.toolshed.interventions import (
    AtIndex,
    InterveneWith,
    ZeroAblation,
    insert_intervention,
    patch_activations,
)
from pzbridge.toolshed.where import AxisSlice, Where

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from intervention_models import D_MODEL, HEADS, lifted_tiny_lm, tokens

# -- data form ------------------------------------------------------------------------

names = st.text("abc.*[]0123_", min_size=1, max_size=8)
small = st.integers(-6, 6)
entries = st.one_of(
    small,
    st.lists(small, max_size=3).map(tuple),
    st.builds(AxisSlice, st.none() | small, st.none() | small, st.none() | st.sampled_from([-2, -1, 1, 2])),
)


@st.composite
def valid_wheres(draw: st.DrawFn) -> Where:
    fields = {name: draw(st.just("") | names) for name in ("layer", "path", "label", "module")}
    if not any(fields.values()):
        fields["layer"] = draw(names)
    index = draw(st.dictionaries(st.sampled_from(["seq", "heads", "batch", "f"]), entries, max_size=3))
    return Where(**fields, side=draw(st.sampled_from(["after", "before"])), index=index)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(where=valid_wheres())
def test_where_round_trips_through_json_text(where: Where) -> None:
    text = json.dumps(where.to_json())
    back = Where.from_json(json.loads(text))
    assert back == where
    assert hash(back) == hash(where)


def test_where_normalizes_mappings_lists_and_slices() -> None:
    where = Where(layer=pzb.nn.Linear, index={"heads": [0, 2], "seq": slice(1, None)})
    assert where.layer == "Linear"
    assert where.index == (("heads", (0, 2)), ("seq", AxisSlice(1, None, None)))
    assert where.to_json() == {"format": 1, "layer": "Linear",
                               "index": {"heads": [0, 2], "seq": {"start": 1, "stop": None, "step": None}}}


@pytest.mark.parametrize("bad, match", [
    ({"format": 1, "layer": "Linear", "code": "print()"}, r"unknown fields \['code'\]"),
    ({"format": 2, "layer": "Linear"}, "format 2 is not supported"),
    ({"layer": "Linear"}, "format None is not supported"),
    ({"format": 1, "layer": "Linear", "index": {"seq": {"start": 0, "eval": 1}}}, r"unknown slice fields \['eval'\]"),
    ({"format": 1, "layer": "Linear", "index": {"seq": "3"}}, "must be an int"),
    ({"format": 1, "layer": "Linear", "index": [["seq", 3]]}, "index must be a mapping"),
    ({"format": 1}, "at least one of layer="),
    ({"format": 1, "layer": "Linear", "side": "inside"}, "side must be 'after' or 'before'"),
])
def test_from_json_rejects_unknown_or_malformed_fields(bad: dict, match: str) -> None:
    with pytest.raises(PzbridgeError, match=match):
        Where.from_json(bad)


def test_constructor_rejects_bad_entries() -> None:
    with pytest.raises(PzbridgeError, match="must be an int, a list/tuple of ints or a slice"):
        Where(layer="Linear", index={"seq": 1.5})
    with pytest.raises(PzbridgeError, match="step must not be 0"):
        Where(layer="Linear", index={"seq": slice(None, None, 0)})
    with pytest.raises(PzbridgeError, match="must be a string"):
        Where(path=3)  # type: ignore[arg-type]


# -- matching ---------------------------------------------------------------------------


def mlp() -> pzb.nn.Sequential:
    keys = jax.random.split(jax.random.key(0), 2)
    return pzb.nn.Sequential([
        pzb.nn.Affine.from_config("block.in", keys[0], {"features": 3}, {"features": 4}),
        pzb.nn.Elementwise(jax.nn.relu),
        pzb.nn.Residual(pzb.nn.Affine.from_config("block.out", keys[1], {"features": 4}, {"features": 4})),
    ])


def paths(where: Where, model) -> list[str]:
    return [format_path(p) for p in where.select(model).get_keypaths()]


def test_path_patterns_accept_brackets_dots_and_wildcards() -> None:
    model = mlp()
    assert paths(Where(path="sublayers[1]"), model) == ["sublayers[1]"]
    assert paths(Where(path="sublayers.1"), model) == ["sublayers[1]"]
    assert paths(Where(path="sublayers[*].delta"), model) == ["sublayers[2].delta"]
    assert paths(Where(path="*"), model) == ["<root>"]  # outermost match, as selectors keep


def test_layer_names_match_simple_qualified_and_base_classes() -> None:
    model = mlp()
    assert paths(Where(layer="Elementwise"), model) == ["sublayers[1]"]
    assert paths(Where(layer="pzbridge.nn.linear.Affine"), model) == ["sublayers[0]", "sublayers[2].delta"]
    assert paths(Where(layer="Linear", path="sublayers[2]*"), model) == ["sublayers[2].delta.sublayers[0]"]


def test_label_matches_the_variables_a_layer_holds_directly() -> None:
    model = mlp()
    assert paths(Where(label="block.out.weights"), model) == ["sublayers[2].delta.sublayers[0]"]
    assert paths(Where(label="block.*.bias"), model) == ["sublayers[0].sublayers[1]", "sublayers[2].delta.sublayers[1]"]


def test_a_where_that_selects_nothing_lists_what_the_model_has() -> None:
    with pytest.raises(SelectionError, match=r"selects nothing.*sublayers\[1\] \(Elementwise\)"):
        Where(label="nope").select(mlp())


def test_traced_model_sites_by_label_and_module() -> None:
    model, lifted = lifted_tiny_lm(0)
    w_o = Where(label="attns.1.W_O").select(lifted).get()
    assert isinstance(w_o, pzb.nn.Linear) and w_o.in_axis_names == ("heads", "projection")
    assert Where(module="attns.*").select(lifted).count() == 2
    # The stream entering attns[1] is the embedding plus attns[0]'s output: compare with the original code.
    toks = tokens(0, 2, 5)
    _, acts = capture_intermediates(lifted, Where(module="attns.1", side="before"), pzb.nx.wrap(toks, "batch", "seq"))
    (value,) = acts.values()
    want = jax.vmap(lambda t: model.embed[t] + model.attns[0](model.embed[t]))(toks)
    np.testing.assert_allclose(value.unwrap("batch", "seq", "features"), want, rtol=1e-5, atol=1e-5)


def test_module_pattern_that_matches_nothing_names_the_traced_calls() -> None:
    _, lifted = lifted_tiny_lm(0)
    with pytest.raises(SelectionError, match=r"traced child calls: \['attns.0', 'attns.1'\]"):
        Where(module="blocks.0").select(lifted)


# -- indices ----------------------------------------------------------------------------


def reference_positions(entry, size: int) -> list[int]:
    if isinstance(entry, AxisSlice):
        return list(range(size))[entry.as_slice()]
    entry = (entry,) if isinstance(entry, int) else entry
    return [p % size for p in entry]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seq=st.integers(1, 5), heads=st.integers(1, 4), e_seq=entries, e_heads=entries)
def test_index_mask_and_take_agree_with_numpy_indexing(seq: int, heads: int, e_seq, e_heads) -> None:
    where = Where(layer="Layer", index={"seq": e_seq, "heads": e_heads})
    data = np.arange(seq * heads * 2, dtype=np.float32).reshape(seq, heads, 2)
    x = pzb.nx.wrap(jnp.asarray(data), "seq", "heads", "f")
    in_range = lambda e, n: isinstance(e, AxisSlice) or all(-n <= p < n for p in ((e,) if isinstance(e, int) else e))
    if not (in_range(e_seq, seq) and in_range(e_heads, heads)):
        with pytest.raises(NamedAxisError, match="outside an axis of size"):
            where.index_mask(x)
        return
    rows, cols = reference_positions(e_seq, seq), reference_positions(e_heads, heads)
    want_mask = np.zeros((seq, heads), bool)
    want_mask[np.ix_(rows, cols)] = True
    np.testing.assert_array_equal(where.index_mask(x).unwrap("seq", "heads"), want_mask)
    taken = where.take(x)
    want = data[np.ix_(rows, cols)] if rows and cols else np.zeros((len(rows), len(cols), 2))
    keep = [n for n, e in (("seq", e_seq), ("heads", e_heads)) if not isinstance(e, int)]
    if isinstance(e_seq, int):
        want = want[0]
    if isinstance(e_heads, int):
        want = want[:, 0] if not isinstance(e_seq, int) else want[0]
    np.testing.assert_array_equal(taken.unwrap(*keep, "f"), want)


def test_index_on_a_missing_axis_names_the_activation_axes() -> None:
    x = pzb.nx.zeros({"seq": 3})
    with pytest.raises(NamedAxisError, match=r"index names axes \['heads'\].*\{'seq': 3\}"):
        Where(layer="Layer", index={"heads": 0}).index_mask(x)


def test_capture_with_index_returns_the_indexed_part() -> None:
    _, lifted = lifted_tiny_lm(1)
    x = pzb.nx.wrap(tokens(1, 2, 5), "batch", "seq")
    site = Where(label="attns.0.W_O", side="before")
    _, whole = capture_intermediates(lifted, site, x)
    _, part = capture_intermediates(lifted, Where(label="attns.0.W_O", side="before", index={"heads": 1, "seq": [0, 4]}), x)
    (w,), (p,) = whole.values(), part.values()
    assert w.named_shape["heads"] == HEADS
    np.testing.assert_array_equal(p.unwrap("batch", "seq", "projection"),
                                  w.unwrap("batch", "seq", "heads", "projection")[:, [0, 4], 1])


# -- laws on every intervention site ------------------------------------------------------


@settings(max_examples=8, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), layer=st.integers(0, 1), side=st.sampled_from(["after", "before"]))
def test_identity_intervention_is_a_bitwise_no_op(seed: int, layer: int, side: str) -> None:
    _, lifted = lifted_tiny_lm(seed)
    x = pzb.nx.wrap(tokens(seed, 2, 5), "batch", "seq")
    for site in (Where(label=f"attns.{layer}.W_O", side=side), Where(module=f"attns.{layer}", side=side)):
        edited = insert_intervention(lifted, site, InterveneWith(lambda a: a))
        np.testing.assert_array_equal(edited(x).unwrap("batch", "seq", "features"),
                                      lifted(x).unwrap("batch", "seq", "features"))


@settings(max_examples=8, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), empty=st.sampled_from([(), AxisSlice(2, 2)]))
def test_an_index_naming_no_unit_is_a_bitwise_no_op(seed: int, empty) -> None:
    _, lifted = lifted_tiny_lm(seed)
    x = pzb.nx.wrap(tokens(seed, 2, 5), "batch", "seq")
    edited = insert_intervention(lifted, Where(label="attns.0.W_O", side="before", index={"heads": empty}),
                                 ZeroAblation())
    np.testing.assert_array_equal(edited(x).unwrap("batch", "seq", "features"),
                                  lifted(x).unwrap("batch", "seq", "features"))


@settings(max_examples=8, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), head=st.integers(0, HEADS - 1), pos=st.integers(-5, 4))
def test_where_index_equals_a_hand_built_mask(seed: int, head: int, pos: int) -> None:
    _, lifted = lifted_tiny_lm(seed)
    x = pzb.nx.wrap(tokens(seed, 2, 5), "batch", "seq")
    by_index = insert_intervention(lifted, Where(label="attns.1.W_O", side="before", index={"heads": head, "seq": pos}),
                                   ZeroAblation())
    mask = pzb.nx.wrap(jnp.arange(HEADS) == head, "heads") & pzb.nx.wrap(jnp.arange(5) == pos % 5, "seq")
    by_mask = insert_intervention(lifted, Where(label="attns.1.W_O", side="before"), ZeroAblation(mask=mask))
    np.testing.assert_array_equal(by_index(x).unwrap("batch", "seq", "features"),
                                  by_mask(x).unwrap("batch", "seq", "features"))


@settings(max_examples=6, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), head=st.integers(0, HEADS - 1))
def test_indexed_intervention_under_jit_equals_eager(seed: int, head: int) -> None:
    _, lifted = lifted_tiny_lm(seed)
    x = pzb.nx.wrap(tokens(seed, 2, 5), "batch", "seq")
    edited = insert_intervention(lifted, Where(label="attns.0.W_O", side="before", index={"heads": head}),
                                 ZeroAblation())
    jitted = jax.jit(lambda m, v: m(v))(pzb.freeze_params(edited), x)
    np.testing.assert_allclose(jitted.unwrap("batch", "seq", "features"),
                               edited(x).unwrap("batch", "seq", "features"), rtol=1e-5, atol=1e-6)


def test_patching_every_position_through_a_where_reproduces_the_source() -> None:
    _, lifted = lifted_tiny_lm(3)
    src = pzb.nx.wrap(tokens(3, 2, 5), "batch", "seq")
    tgt = pzb.nx.wrap(tokens(4, 2, 5), "batch", "seq")
    everywhere = Where(layer="Residual", index={"seq": slice(None)})  # the residual stream after each layer
    patched = patch_activations(lifted, src, tgt, at=everywhere)
    np.testing.assert_allclose(patched.unwrap("batch", "seq", "features"),
                               lifted(src).unwrap("batch", "seq", "features"), rtol=1e-5, atol=1e-6)
    at_last = patch_activations(lifted, src, tgt, at=Where(layer="Residual", index={"seq": -1}))
    # Causal model: only the last position reads the patched stream.
    np.testing.assert_allclose(at_last.unwrap("batch", "seq", "features")[:, :-1],
                               lifted(tgt).unwrap("batch", "seq", "features")[:, :-1], rtol=1e-5, atol=1e-6)


def test_side_given_twice_must_agree() -> None:
    with pytest.raises(SelectionError, match="give the side once"):
        insert_intervention(mlp(), Where(layer="Elementwise", side="before"), ZeroAblation(), where="after")


def test_at_index_rejects_interventions_that_change_the_shape() -> None:
    layer = AtIndex(InterveneWith(lambda a: a.sum("seq")), Where(layer="Layer", index={"seq": 0}))
    with pytest.raises(NamedAxisError, match="must keep the activation's shape"):
        layer(pzb.nx.ones({"seq": 2, "f": D_MODEL}))
