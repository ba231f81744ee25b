"""``pzb.lift(..., axis_names=...)``: the user renames traced axes by module path.

Models are the stacked Equinox transformer of ``test_layer_stacks`` (einsum
attention on raw arrays with heads, scan over ``eqx.filter_vmap`` blocks) and
the NNX Llama-style decoder of ``test_nnx_tracing``.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from test_layer_stacks import Transformer, _ids
from test_nnx_tracing import Decoder

import pzbridge as pzb
from pzbridge.core.errors import LiftError
from pzbridge.testing.numerics import assert_outputs_match


def _parameter_shapes(lifted: pzb.LiftedModel) -> dict[str, dict[str, int]]:
    return {v.label: dict(v.value.named_shape)
            for v in pzb.select(lifted).at_instances_of(pzb.Parameter).get_sequence()}


def _renamed(shape: dict[str, int], mapping: dict[str, str]) -> dict[str, int]:
    return {mapping.get(name, name): size for name, size in shape.items()}


@pytest.fixture(scope="module")
def model() -> Transformer:
    return Transformer(jax.random.key(0))


@pytest.fixture(scope="module")
def plain(model: Transformer) -> pzb.LiftedModel:
    return pzb.lift(model, _ids(5), strict=True)


TRACED_NAMES = ("heads", "projection", "kv_seq", "seq")


@settings(max_examples=6, deadline=None)
@given(old=st.sampled_from(TRACED_NAMES), new=st.sampled_from(("h", "head_dim", "keys", "tokens")))
def test_a_rename_inside_the_scanned_attention_renames_exactly_those_axes_and_keeps_outputs(model, plain, old, new):
    mapping = {old: new}
    renamed = pzb.lift(model, _ids(5), strict=True, axis_names={"layers.attn": mapping})
    before, after = _parameter_shapes(plain), _parameter_shapes(renamed)
    assert before.keys() == after.keys()
    for label, shape in before.items():
        expected = _renamed(shape, mapping) if label.startswith("layers.attn.") else shape
        assert after[label] == expected, label
    ids = _ids(7, 1)
    assert_outputs_match(renamed.positional(ids), model(ids), same_computation=False)
    assert renamed.convention == plain.convention  # the parent renames at the call


def test_root_renames_change_the_calling_convention_and_named_calls_use_them(model):
    lifted = pzb.lift(model, _ids(5), strict=True, axis_names={"<root>": {"seq": "tokens"}})
    assert lifted.convention.inputs == (("tokens",),)
    ids = _ids(6)
    out = lifted(pzb.nx.wrap(ids, "tokens"))
    assert lifted.convention.output[0] == "tokens" and set(out.named_shape) == set(lifted.convention.output)
    assert_outputs_match(out.unwrap(*lifted.convention.output), model(ids), same_computation=False)


def test_wildcards_rename_every_matching_module_and_lower_gives_the_model_back(model):
    lifted = pzb.lift(model, _ids(5), strict=True, axis_names={"layers.*": {"projection": "head_dim"}})
    assert _parameter_shapes(lifted)["layers.attn.wq"]["head_dim"] == 4
    lowered = pzb.lower(lifted)
    assert type(lowered) is Transformer
    assert jax.tree_util.tree_structure(lowered) == jax.tree_util.tree_structure(model)
    for a, b in zip(jax.tree_util.tree_leaves(lowered), jax.tree_util.tree_leaves(model)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_nnx_decoder_renames_kv_heads_in_every_block():
    decoder = Decoder(rngs=nnx.Rngs(0))
    x = jax.random.randint(jax.random.key(1), (2, 5), 0, 11)
    plain = pzb.lift(decoder, x, strict=True)
    renamed = pzb.lift(decoder, x, strict=True, axis_names={"layers.*.attn": {"kv_heads": "groups"}})
    before, after = _parameter_shapes(plain), _parameter_shapes(renamed)
    changed = {label for label in before if before[label] != after[label]}
    assert changed and all(".attn." in label for label in changed)
    assert all("groups" in after[label] and "kv_heads" not in after[label] for label in changed)
    assert_outputs_match(renamed.positional(x), decoder(x), same_computation=False)


@pytest.mark.parametrize("axis_names, message", [
    ({"layer.attn": {"heads": "h"}}, "matches no traced module"),
    ({"layers.attn": {"head": "h"}}, "renames ['head']"),
    ({"layers.attn": {"projection": "heads"}}, "found ['heads'] twice"),
    ({"layers.attn": {"heads": ""}}, "expected non-empty names"),
    ({"layers.attn": ["heads"]}, "expected a path string"),
    ({"embed": {"features": "d"}}, "matches no traced module"),  # a rule's layer is not traced
])
def test_renames_that_do_nothing_or_clash_are_errors_naming_the_pattern(model, axis_names, message):
    with pytest.raises(LiftError, match="Fix") as error:
        pzb.lift(model, _ids(5), axis_names=axis_names)
    assert message in str(error.value) and next(iter(axis_names)) in str(error.value)


def test_axis_names_without_an_example_is_an_error(model):
    with pytest.raises(LiftError, match="no example input"):
        pzb.lift(model, axis_names={"layers.attn": {"heads": "h"}})
