"""Traced lifting of custom Equinox modules written the way real code is written.

References are the original modules themselves: outputs at two sequence
lengths, eager and under jit, and ``lower(lift(m, x))`` giving ``m`` back.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_helpers import train_adapters

import pzbridge as pzb
from pzbridge.core.errors import LiftError
from pzbridge.nn.dataflow import CallChild, Traced
from pzbridge.nn.named_ops import Constant
from pzbridge.testing.numerics import assert_outputs_match
from pzbridge.toolshed.intermediates import capture_intermediates
from pzbridge.toolshed.lora import loraify_linears_in_selection, merge_lora


class HookPoint(eqx.Module):
    """TransformerLens-style identity hook."""

    def __call__(self, x):
        return x


class RMSNorm(eqx.Module):
    scale: jax.Array
    eps: float = 1e-6

    def __call__(self, x):
        var = jnp.mean(x * x, axis=-1, keepdims=True)
        return x * jax.lax.rsqrt(var + self.eps) * self.scale


class Attention(eqx.Module):
    """Einsum attention on raw arrays, heads split in the weights (TransformerLens layout)."""

    W_Q: jax.Array
    W_K: jax.Array
    W_V: jax.Array
    W_O: jax.Array
    hook_z: HookPoint

    def __call__(self, x):
        seq = x.shape[0]
        q = jnp.einsum("sd,hdk->hsk", x, self.W_Q)
        k = jnp.einsum("sd,hdk->hsk", x, self.W_K)
        v = jnp.einsum("sd,hdk->hsk", x, self.W_V)
        scores = jnp.einsum("hqk,hsk->hqs", q, k) / jnp.sqrt(q.shape[-1])
        scores = jnp.where(jnp.tril(jnp.ones((seq, seq), bool)), scores, -1e9)
        z = self.hook_z(jnp.einsum("hqs,hsk->hqk", jax.nn.softmax(scores, axis=-1), v))
        return jnp.einsum("hqk,hkd->qd", z, self.W_O)


class SplitHeadsAttention(eqx.Module):
    """Flat projections reshaped into heads (the common Llama / GPT-2 layout)."""

    qkv: eqx.nn.Linear
    out: eqx.nn.Linear
    heads: int = eqx.field(static=True)

    def __call__(self, x):
        seq, d = x.shape
        q, k, v = jnp.split(jax.vmap(self.qkv)(x), 3, axis=-1)
        q, k, v = (t.reshape(seq, self.heads, d // self.heads) for t in (q, k, v))
        scores = jnp.einsum("qhd,khd->hqk", q, k) * (d // self.heads) ** -0.5
        z = jnp.einsum("hqk,khd->qhd", jax.nn.softmax(scores, axis=-1), v).reshape(seq, d)
        return jax.vmap(self.out)(z)


class Block(eqx.Module):
    ln1: RMSNorm
    attn: eqx.Module
    ln2: RMSNorm
    mlp: eqx.nn.MLP

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + jax.vmap(self.mlp)(self.ln2(x))


class Model(eqx.Module):
    embed: eqx.nn.Embedding
    blocks: list
    final: RMSNorm

    def __call__(self, tokens):
        x = jax.vmap(self.embed)(tokens)
        for block in self.blocks:
            x = block(x)
        return self.final(x) @ self.embed.weight.T


def _normal(key, shape):
    return jax.random.normal(key, shape) * 0.3


def make_block(key, attention="einsum", d=8, heads=2):
    ks = jax.random.split(key, 6)
    if attention == "einsum":
        attn = Attention(*(_normal(k, s) for k, s in zip(ks[:4], [(heads, d, d // heads)] * 3 + [(heads, d // heads, d)])),
                         HookPoint())
    else:
        attn = SplitHeadsAttention(eqx.nn.Linear(d, 3 * d, key=ks[0]), eqx.nn.Linear(d, d, key=ks[1]), heads)
    return Block(RMSNorm(1.0 + _normal(ks[4], (d,))), attn, RMSNorm(jnp.ones(d)), eqx.nn.MLP(d, d, 16, 1, key=ks[5]))


def make_model(key, layers=2, vocab=11, d=8):
    ks = jax.random.split(key, layers + 1)
    blocks = [make_block(k, "einsum" if i % 2 == 0 else "split") for i, k in enumerate(ks[1:])]
    return Model(eqx.nn.Embedding(vocab, d, key=ks[0]), blocks, RMSNorm(jnp.ones(d)))


def _jit_positional(lifted, *args):
    return jax.jit(lambda m, *a: m.positional(*a))(pzb.freeze_variables(lifted), *args)


@pytest.mark.parametrize("attention", ["einsum", "split"])
def test_block_traces_without_foreign_and_matches_at_two_lengths(attention):
    block = make_block(jax.random.key(0), attention)
    lifted = pzb.lift(block, jnp.ones((5, 8)), strict=True)
    assert pzb.select(lifted).at_instances_of(pzb.nn.Foreign).count() == 0
    assert pzb.select(lifted).at_instances_of(pzb.nn.Residual).count() == 2
    for length in (5, 9):
        x = jax.random.normal(jax.random.key(length), (length, 8))
        assert_outputs_match(lifted.positional(x), block(x), same_computation=False)
        assert_outputs_match(_jit_positional(lifted, x), block(x), same_computation=False)


def test_traced_model_with_embedding_tied_unembedding_and_block_list():
    model = make_model(jax.random.key(1))
    tokens = jnp.array([1, 4, 2, 7, 3])
    lifted = pzb.lift(model, tokens, strict=True)
    assert pzb.select(lifted).at_instances_of(pzb.nn.Foreign).count() == 0
    assert pzb.select(lifted).at_instances_of(pzb.nn.Residual).count() == 4
    for length in (5, 8):
        t = jax.random.randint(jax.random.key(length), (length,), 0, 11)
        assert_outputs_match(lifted.positional(t), model(t), same_computation=False)
        assert_outputs_match(_jit_positional(lifted, t), model(t), same_computation=False)


def test_batch_is_just_another_named_axis():
    block = make_block(jax.random.key(2))
    lifted = pzb.lift(block, jnp.ones((5, 8)))
    x = jax.random.normal(jax.random.key(3), (3, 5, 8))
    out = lifted(pzb.nx.wrap(x, "batch", "seq", "features"))
    assert_outputs_match(out.unwrap("batch", "seq", "features"), jax.vmap(block)(x), same_computation=False)


def test_heads_are_a_named_axis_where_the_code_splits_heads():
    from pzbridge.nn.named_ops import SplitAxis

    for attention in ("einsum", "split"):
        lifted = pzb.lift(make_block(jax.random.key(4), attention), jnp.ones((5, 8)))
        layers = pzb.select(lifted).at_instances_of((pzb.nn.Linear, SplitAxis)).get_sequence()
        names = {n for layer in layers for n in (getattr(layer, "out_axis_names", ()) or (layer.first,))}
        assert "heads" in names


def test_lower_of_lift_gives_the_original_module_back():
    model = make_model(jax.random.key(5))
    lowered = pzb.lower(pzb.lift(model, jnp.array([1, 2, 3])))
    assert jax.tree_util.tree_structure(lowered) == jax.tree_util.tree_structure(model)
    assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(lowered), jax.tree_util.tree_leaves(model)))
    assert type(lowered.blocks[1].attn) is SplitHeadsAttention


def test_every_residual_stream_is_captured_and_equals_a_hand_written_reference():
    block = make_block(jax.random.key(6))
    lifted = pzb.lift(block, jnp.ones((5, 8)))
    x = jax.random.normal(jax.random.key(7), (5, 8))
    _, streams = capture_intermediates(lifted, pzb.nn.Residual, pzb.nx.wrap(x, "seq", "features"))
    after_attention = x + block.attn(block.ln1(x))
    after_mlp = after_attention + jax.vmap(block.mlp)(block.ln2(after_attention))
    values = [v.unwrap("seq", "features") for v in streams.values()]
    assert len(values) == 2
    assert_outputs_match(values[0], after_attention, same_computation=False)
    assert_outputs_match(values[1], after_mlp, same_computation=False)


def test_patching_the_stream_at_one_block_reproduces_the_clean_run_downstream():
    model = make_model(jax.random.key(8))
    lifted = pzb.lift(model, jnp.array([1, 2, 3, 4]))
    clean, corrupt = pzb.nx.wrap(jnp.array([1, 2, 3, 4]), "seq"), pzb.nx.wrap(jnp.array([5, 6, 7, 8]), "seq")
    residuals = pzb.select(lifted).at_instances_of(pzb.nn.Residual)
    _, clean_streams = capture_intermediates(lifted, residuals, clean)
    after_block0 = list(clean_streams.values())[1]
    patched = residuals.apply_with_selected_index(lambda i, layer: Constant(after_block0) if i == 1 else layer)
    expected, got = lifted(clean), patched(corrupt)
    names = tuple(expected.named_shape)
    assert not np.allclose(lifted(corrupt).unwrap(*names), expected.unwrap(*names))
    assert_outputs_match(got.unwrap(*names), expected.unwrap(*names), same_computation=False)


def train_lora(model, x, target, steps=20):
    """Trains only the LoRA factors of ``model`` (MSE to ``target``); returns ``(trained, losses)``."""
    return train_adapters(model, lambda m: jnp.mean((m(x) - target) ** 2), steps)


def test_lora_on_every_weight_contraction_trains_and_merges_back_to_the_original_classes():
    block = make_block(jax.random.key(9))
    lifted = pzb.lift(block, jnp.ones((5, 8)))
    linears = pzb.select(lifted).at_instances_of(pzb.nn.Linear)
    assert linears.count() == 6  # W_Q, W_K, W_V, W_O and the MLP's two layers
    edited = loraify_linears_in_selection(linears, 2, jax.random.key(10))
    model = pzb.lower(edited)
    x = jax.random.normal(jax.random.key(11), (5, 8))
    assert_outputs_match(model(x), block(x), same_computation=False)
    target = jax.random.normal(jax.random.key(12), (5, 8))

    trained, losses = train_lora(model, x, target)
    assert losses[-1] < losses[0]
    merged = pzb.lower(merge_lora(pzb.lift(trained, x)))
    assert type(merged) is Block and type(merged.attn) is Attention and type(merged.mlp) is eqx.nn.MLP
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(block)
    assert_outputs_match(merged(x), trained(x), same_computation=False, ulps=64)
    # Only the adapters trained: the base weights are the original arrays, bit for bit.
    assert np.array_equal(np.asarray(trained.mlp.layers[0].linear.weight), np.asarray(block.mlp.layers[0].weight))
    base = {v.label: v.value for v in trained.attn.values}
    assert np.array_equal(np.asarray(base["attn.W_Q"].unwrap(*base["attn.W_Q"].named_shape)),
                          np.asarray(block.attn.W_Q))


def test_untraceable_code_stays_foreign_and_strict_names_the_reason():
    class Branchy(eqx.Module):
        linear: eqx.nn.Linear

        def __call__(self, x):
            if jnp.sum(x) > 0:  # data-dependent Python control flow
                return self.linear(x)
            return x

    module = Branchy(eqx.nn.Linear(3, 3, key=jax.random.key(0)))
    assert isinstance(pzb.lift(module, jnp.ones(3)).body, pzb.nn.Foreign)
    with pytest.raises(LiftError, match="not traceable.*Branchy|Branchy.*not traceable"):
        pzb.lift(module, jnp.ones(3), strict=True)


def test_lifting_does_not_change_the_module_and_copies_no_array():
    block = make_block(jax.random.key(13))
    leaves = jax.tree_util.tree_leaves(block)
    lifted = pzb.lift(block, jnp.ones((5, 8)))
    assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(block), leaves))
    weights = {id(v.value.data_array) for v in pzb.select(lifted).at_instances_of(pzb.Parameter).get_sequence()
               if pzb.nx.is_namedarray(v.value)}
    assert id(block.attn.W_Q) in weights


def test_child_called_through_vmap_keeps_the_outside_axis_name():
    block = make_block(jax.random.key(14))
    lifted = pzb.lift(block, jnp.ones((5, 8)))
    mlp_calls = [c for c in pzb.select(lifted).at_instances_of(CallChild).get_sequence() if c.name == "mlp"]
    assert mlp_calls
    _, acts = capture_intermediates(lifted, lambda n: isinstance(n, CallChild) and n.name == "mlp",
                                    pzb.nx.ones({"seq": 5, "features": 8}))
    (act,) = acts.values()
    assert set(act.named_shape) == {"seq", "features"}


def test_traced_layer_is_selectable_by_original_class_name():
    model = make_model(jax.random.key(15))
    lifted = pzb.lift(model, jnp.array([1, 2]))
    names = [t.template.class_name for t in pzb.select(lifted).at_instances_of(Traced).get_sequence()]
    assert names[0] == "Model"


class TLBlock(eqx.Module):
    """TransformerLens layout: raw W_in / W_out arrays, identity hook points around the residual stream."""

    ln1: RMSNorm
    attn: Attention
    ln2: RMSNorm
    W_in: jax.Array
    W_out: jax.Array
    hook_resid_mid: HookPoint

    def __call__(self, x):
        x = self.hook_resid_mid(x + self.attn(self.ln1(x)))
        hidden = jax.nn.gelu(jnp.einsum("sd,dm->sm", self.ln2(x), self.W_in))
        return x + jnp.einsum("sm,md->sd", hidden, self.W_out)


class TLModel(eqx.Module):
    W_E: jax.Array
    W_pos: jax.Array
    blocks: list
    W_U: jax.Array

    def __call__(self, tokens):
        x = self.W_E[tokens] + self.W_pos[: tokens.shape[0]]
        for block in self.blocks:
            x = block(x)
        return x @ self.W_U


def make_tl_model(key, layers=2, vocab=13, d=8, heads=2, context=16):
    ks = jax.random.split(key, layers + 3)
    blocks = []
    for k in ks[3:]:
        b = make_block(k)
        kk = jax.random.split(k, 2)
        blocks.append(TLBlock(b.ln1, b.attn, b.ln2, _normal(kk[0], (d, 4 * d)), _normal(kk[1], (4 * d, d)),
                              HookPoint()))
    return TLModel(_normal(ks[0], (vocab, d)), _normal(ks[1], (context, d)), blocks, _normal(ks[2], (d, vocab)))


def test_transformer_lens_style_model_traces_fully_and_adapts_every_raw_weight():
    model = make_tl_model(jax.random.key(16))
    lifted = pzb.lift(model, jnp.array([1, 2, 3]), strict=True)
    assert pzb.select(lifted).at_instances_of(pzb.nn.Foreign).count() == 0
    assert pzb.select(lifted).at_instances_of(pzb.nn.Residual).count() == 4
    # Per block W_Q, W_K, W_V, W_O, W_in, W_out, plus the unembedding.
    assert pzb.select(lifted).at_instances_of(pzb.nn.Linear).count() == 13
    for length in (3, 7):
        t = jax.random.randint(jax.random.key(length), (length,), 0, 13)
        assert_outputs_match(lifted.positional(t), model(t), same_computation=False)
        assert_outputs_match(_jit_positional(lifted, t), model(t), same_computation=False)
    lowered = pzb.lower(lifted)
    assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(lowered), jax.tree_util.tree_leaves(model)))
    adapted = pzb.lower(loraify_linears_in_selection(pzb.select(lifted).at_instances_of(pzb.nn.Linear), 2,
                                                     jax.random.key(17)))
    t = jnp.array([4, 5, 6, 7])
    assert_outputs_match(adapted(t), model(t), same_computation=False)
