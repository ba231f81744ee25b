"""Laws of LowRankAdapter / loraify / merge on lifted models, against pure-jax references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import pzbridge as pzb
from pzbridge.core.errors import SelectionError, VariableError
from pzbridge.nn.basic import NamedEinsum
from pzbridge.nn.linear import Linear
from pzbridge.toolshed.lora import LowRankAdapter, is_lora_parameter, loraify_linears_in_selection, merge_lora

# loraify rejects a rank above both the input and the output size.
configs = st.fixed_dictionaries(
    {
        "d_in": st.integers(1, 5),
        "d_out": st.integers(1, 5),
        "heads": st.sampled_from([None, 2, 3]),
        "rank": st.integers(1, 4),
        "alpha": st.sampled_from([None, 1.0, 4.0]),
        "in_first": st.booleans(),
        "seed": st.integers(0, 2**16),
    }
).map(lambda cfg: {**cfg, "rank": min(cfg["rank"], max(cfg["d_in"], cfg["d_out"] * (cfg["heads"] or 1)))})


def _linear(cfg):
    """A Linear with weight stored (in, out[, heads]) or ([heads,] out, in), and its raw (in, out, heads) array."""
    heads = cfg["heads"] or 1
    raw = np.random.default_rng(cfg["seed"]).normal(size=(cfg["d_in"], cfg["d_out"], heads)).astype(np.float32)
    names = ("features", "features_out", "heads")
    if cfg["in_first"]:
        weight = pzb.nx.wrap(raw if cfg["heads"] else raw[..., 0], *(names if cfg["heads"] else names[:2]))
    else:
        data = np.transpose(raw, (2, 1, 0))
        weight = pzb.nx.wrap(data if cfg["heads"] else data[0], *(names[::-1] if cfg["heads"] else names[1::-1]))
    return Linear(pzb.Parameter(weight, "block.dense.kernel"), ("features",), ("features",)), raw


def _input(cfg):
    heads = cfg["heads"] or 1
    data = np.random.default_rng(cfg["seed"] + 1).normal(size=(3, heads, cfg["d_in"])).astype(np.float32)
    if cfg["heads"]:
        return pzb.nx.wrap(data, "batch", "heads", "features"), data
    return pzb.nx.wrap(data[:, 0], "batch", "features"), data


def _output(y, cfg):
    return y.unwrap("batch", "heads", "features") if cfg["heads"] else y.unwrap("batch", "features")[:, None]


# Each example compiles eager ops for new shapes: keep the count modest (2 CPU cores).
@settings(max_examples=20)
@given(configs)
def test_adapted_linear_starts_equal_to_the_original_reference(cfg):
    layer, raw = _linear(cfg)
    adapted = loraify_linears_in_selection(pzb.select(layer).at_instances_of(Linear), cfg["rank"], jax.random.key(1),
                                           alpha=cfg["alpha"])
    x, data = _input(cfg)
    reference = np.einsum("bhi,ioh->bho", data, raw)
    np.testing.assert_allclose(_output(adapted(x), cfg), reference, rtol=1e-5, atol=1e-5)
    assert adapted.base is layer and adapted.base.weights is layer.weights
    assert not np.any(np.asarray(adapted.lora_b.value.data_array))


@settings(max_examples=20)
@given(configs)
def test_adapter_output_and_merge_match_the_pure_jax_formula(cfg):
    layer, raw = _linear(cfg)
    adapted = loraify_linears_in_selection(pzb.select(layer).at_instances_of(Linear), cfg["rank"], jax.random.key(1),
                                           alpha=cfg["alpha"])
    heads = cfg["heads"] or 1
    b_raw = np.random.default_rng(cfg["seed"] + 2).normal(size=(cfg["rank"], cfg["d_out"], heads)).astype(np.float32)
    b_names = ("lora_rank", "features_out", "heads") if cfg["heads"] else ("lora_rank", "features_out")
    adapted.lora_b.value = pzb.nx.wrap(b_raw if cfg["heads"] else b_raw[..., 0], *b_names).order_as(
        *adapted.lora_b.value.named_shape)
    a_raw = np.asarray(adapted.lora_a.value.unwrap("features", "lora_rank"))
    scale = (cfg["rank"] if cfg["alpha"] is None else cfg["alpha"]) / cfg["rank"]
    x, data = _input(cfg)
    update = scale * np.einsum("ir,roh->ioh", a_raw, b_raw)
    reference = np.einsum("bhi,ioh->bho", data, raw + update)
    np.testing.assert_allclose(_output(adapted(x), cfg), reference, rtol=1e-4, atol=1e-4)

    merged = merge_lora(adapted)
    assert type(merged) is Linear and merged.weights.label == "block.dense.kernel"
    assert tuple(merged.weights.value.named_shape) == tuple(layer.weights.value.named_shape)
    names = ("features", "features_out", "heads") if cfg["heads"] else ("features", "features_out")
    got = merged.weights.value.unwrap(*names)
    np.testing.assert_allclose(got if cfg["heads"] else got[..., None], raw + update, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_output(merged(x), cfg), reference, rtol=1e-4, atol=1e-4)


def test_labels_follow_the_weight_label():
    layer, _ = _linear({"d_in": 2, "d_out": 2, "heads": None, "rank": 1, "alpha": None, "in_first": True, "seed": 0})
    adapted = loraify_linears_in_selection(pzb.select(layer).at_instances_of(Linear), 1, jax.random.key(0))
    assert (adapted.lora_a.label, adapted.lora_b.label) == ("block.dense.lora_a", "block.dense.lora_b")
    assert is_lora_parameter(adapted.lora_a) and not is_lora_parameter(adapted.base.weights)


def test_shared_weight_gets_one_adapter_pair_and_merge_stays_shared():
    layer = Linear.from_config("tied", jax.random.key(0), {"features": 3}, {"features": 3})
    model = pzb.nn.Sequential([layer, pzb.nn.Elementwise(jnp.tanh), layer])
    adapted = loraify_linears_in_selection(pzb.select(model).at_instances_of(Linear), 2, jax.random.key(1))
    first, last = adapted.sublayers[0], adapted.sublayers[2]
    assert first.lora_a is last.lora_a and first.lora_b is last.lora_b
    assert len(pzb.unbind_params(adapted)[1]) == 3
    first.lora_b.value = first.lora_b.value + 1.0
    merged = merge_lora(adapted)
    assert merged.sublayers[0].weights is merged.sublayers[2].weights
    assert merged.sublayers[0].weights is not layer.weights
    # The input models are untouched.
    assert isinstance(adapted.sublayers[0], LowRankAdapter)
    np.testing.assert_array_equal(layer.weights.value.data_array, Linear.from_config(
        "tied", jax.random.key(0), {"features": 3}, {"features": 3}).weights.value.data_array)


def test_named_einsum_is_adapted_and_merged():
    w = pzb.Parameter(pzb.nx.wrap(jax.random.normal(jax.random.key(0), (4, 2, 3)), "features", "heads", "proj"), "e.w")
    einsum = NamedEinsum((w,), ("features",))
    adapted = loraify_linears_in_selection(pzb.select(einsum).at_instances_of(NamedEinsum), 2, jax.random.key(1))
    adapted.lora_b.value = adapted.lora_b.value + 0.5
    x = pzb.nx.wrap(jax.random.normal(jax.random.key(2), (5, 4)), "seq", "features")
    a = adapted.lora_a.value.unwrap("features", "lora_rank")
    b = adapted.lora_b.value.unwrap("lora_rank", "heads", "proj")
    reference = jnp.einsum("sf,fhp->shp", x.unwrap("seq", "features"), w.value.unwrap("features", "heads", "proj")
                           + jnp.einsum("fr,rhp->fhp", a, b))
    np.testing.assert_allclose(adapted(x).unwrap("seq", "heads", "proj"), reference, rtol=1e-5, atol=1e-5)
    merged = merge_lora(adapted)
    np.testing.assert_allclose(merged(x).unwrap("seq", "heads", "proj"), reference, rtol=1e-5, atol=1e-5)


def test_loraify_with_no_key_gives_slots():
    layer = Linear.from_config("d", jax.random.key(0), {"features": 2}, {"features": 2})
    adapted = loraify_linears_in_selection(pzb.select(layer).at_instances_of(Linear), 1, None)
    assert isinstance(adapted.lora_a, pzb.ParameterSlot) and adapted.lora_b.label == "d.lora_b"


def test_selecting_a_non_linear_raises_with_the_path():
    model = pzb.nn.Sequential([pzb.nn.Identity()])
    with pytest.raises(SelectionError, match=r"sublayers\[0\].*Linear"):
        loraify_linears_in_selection(pzb.select(model).at_instances_of(pzb.nn.Identity), 1, jax.random.key(0))


def test_unbound_base_weight_raises():
    layer = Linear.from_config("d", None, {"features": 2}, {"features": 2})
    with pytest.raises(VariableError, match="unbound slot"):
        loraify_linears_in_selection(pzb.select(layer).at_instances_of(Linear), 1, jax.random.key(0))


def test_rank_above_both_sizes_is_rejected_but_a_narrow_head_keeps_one_rank():
    head = Linear.from_config("head", jax.random.key(0), {"features": 3}, {"features": 1})
    adapted = loraify_linears_in_selection(pzb.select(head).at_instances_of(Linear), 3, jax.random.key(1))
    assert adapted.rank == 3  # over-parameterised (A @ B has rank <= 1) but exact: one rank fits a whole model
    with pytest.raises(SelectionError, match=r"expected rank <= 3, found 4"):
        loraify_linears_in_selection(pzb.select(head).at_instances_of(Linear), 4, jax.random.key(1))


@pytest.mark.parametrize("rank", [0, -1])
def test_non_positive_rank_is_rejected(rank):
    layer = Linear.from_config("d", jax.random.key(0), {"features": 2}, {"features": 2})
    with pytest.raises(SelectionError, match="rank"):
        loraify_linears_in_selection(pzb.select(layer).at_instances_of(Linear), rank, jax.random.key(0))
