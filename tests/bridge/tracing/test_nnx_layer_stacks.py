"""NNX layer stacks: a Llama-style decoder whose blocks are made by ``nnx.vmap`` and run by ``nnx.scan``.

The blocks are the grouped-query decoder blocks of ``test_nnx_tracing``
(hand-written RMSNorm, einsum attention on raw ``nnx.Param`` s, SwiGLU of
``nnx.Linear`` s). References are the original module and a hand-written
loop over its blocks.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from test_nnx_tracing import DecoderBlock, RMSNorm, _assert_untouched, _snapshot, train_lora

import pzbridge as pzb
from pzbridge.bridge.nnx.stack import split_stacked
from pzbridge.nn.layer_stack import LayerStack
from pzbridge.testing.numerics import assert_outputs_match
from pzbridge.toolshed.intermediates import capture_intermediates
from pzbridge.toolshed.lora import loraify_linears_in_selection, merge_lora

LAYERS, VOCAB, DIM = 3, 11, 8


class StackedDecoder(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)

        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs: nnx.Rngs) -> DecoderBlock:
            return DecoderBlock(DIM, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.norm = RMSNorm(DIM, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def forward(x: jax.Array, block: DecoderBlock) -> jax.Array:
            return block(x)

        return self.embed.attend(self.norm(forward(self.embed(tokens), self.blocks)))


def _tokens(batch: int, length: int, seed: int = 0) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, VOCAB)


def _block(model: StackedDecoder, i: int) -> DecoderBlock:
    leaves, rebuild = split_stacked(model.blocks)
    return rebuild([leaf[i] for leaf in leaves])


@pytest.fixture(scope="module")
def model() -> StackedDecoder:
    return StackedDecoder(rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def lifted(model: StackedDecoder) -> pzb.LiftedModel:
    snapshot = _snapshot(model)
    lifted = pzb.lift(model, _tokens(2, 5), strict=True)
    _assert_untouched(model, snapshot)
    return lifted


def test_nnx_scan_over_vmapped_blocks_traces_to_a_layer_stack_and_matches_at_two_sizes(model, lifted):
    assert pzb.select(lifted).at_instances_of(pzb.nn.Foreign).count() == 0
    stacks = pzb.select(lifted).at_instances_of(LayerStack).get_sequence()
    assert len(stacks) == 1 and stacks[0].size == LAYERS
    assert pzb.select(lifted).at_instances_of(pzb.nn.Residual).count() == 2
    jitted = jax.jit(lambda m, t: m.positional(t))
    for batch, length in ((2, 5), (3, 8)):
        tokens = _tokens(batch, length, length)
        assert_outputs_match(lifted.positional(tokens), model(tokens), same_computation=False)
        assert_outputs_match(jitted(pzb.freeze_variables(lifted), tokens), model(tokens), same_computation=False)


def test_heads_and_the_layers_axis_are_named_on_the_stacked_weights(lifted):
    shapes = {v.label: dict(v.value.named_shape) for v in pzb.select(lifted).at_instances_of(
        pzb.Parameter).get_sequence()}
    assert shapes["blocks.attn.wq"]["layers"] == LAYERS and "heads" in shapes["blocks.attn.wq"]
    assert all(s.get("layers") == LAYERS for label, s in shapes.items() if label.startswith("blocks."))
    assert all("layers" not in s for label, s in shapes.items() if not label.startswith("blocks."))


def test_lower_of_lift_gives_the_nnx_vmap_module_back(model, lifted):
    lowered = pzb.lower(lifted)
    assert type(lowered) is StackedDecoder and nnx.graphdef(lowered) == nnx.graphdef(model)
    mine, theirs = jax.tree_util.tree_leaves(nnx.state(lowered)), jax.tree_util.tree_leaves(nnx.state(model))
    assert len(mine) == len(theirs) and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(mine, theirs))
    tokens = _tokens(2, 6, 1)
    assert_outputs_match(lowered(tokens), model(tokens), same_computation=True)


def test_residual_streams_come_back_stacked_and_equal_a_hand_written_loop(model, lifted):
    tokens = _tokens(2, 6, 2)
    _, streams = capture_intermediates(lifted, pzb.nn.Residual, pzb.nx.wrap(tokens, "batch", "seq"))
    after_attention, after_mlp = (v.unwrap("layers", "batch", "seq", "features") for v in streams.values())
    x = model.embed(tokens)
    for i in range(LAYERS):
        block = _block(model, i)
        mid = x + block.attn(block.attn_norm(x))
        x = mid + block.mlp(block.mlp_norm(mid))
        # A scan against an unrolled loop: rounding differs per layer and adds up along the stream.
        assert_outputs_match(after_attention[i], mid, same_computation=False, ulps=32)
        assert_outputs_match(after_mlp[i], x, same_computation=False, ulps=32)


def test_per_layer_lora_trains_with_nnx_optimizer_and_merges_back(model, lifted):
    linears = pzb.select(lifted).at_instances_of(LayerStack).at_instances_of(pzb.nn.Linear)
    assert linears.count() == 7  # wq, wk, wv, wo (einsums) and the SwiGLU's gate, up, down
    trainable = pzb.lower(loraify_linears_in_selection(linears, 2, jax.random.key(3)))
    tokens, target = _tokens(2, 5, 3), jax.random.normal(jax.random.key(4), (2, 5, VOCAB))
    assert_outputs_match(trainable(tokens), model(tokens), same_computation=False)
    lora = jax.tree_util.tree_leaves(nnx.state(trainable, nnx.LoRAParam))
    assert len(lora) == 14 and all(a.shape[0] == LAYERS for a in lora)
    base_before = [np.asarray(a) for a in jax.tree_util.tree_leaves(nnx.state(trainable, nnx.Not(nnx.LoRAParam)))]
    losses = train_lora(trainable, tokens, target)
    assert losses[-1] < losses[0]
    base_after = [np.asarray(a) for a in jax.tree_util.tree_leaves(nnx.state(trainable, nnx.Not(nnx.LoRAParam)))]
    assert all(np.array_equal(a, b) for a, b in zip(base_before, base_after))
    merged = pzb.lower(merge_lora(pzb.lift(trainable, tokens)))
    assert type(merged) is StackedDecoder and nnx.graphdef(merged) == nnx.graphdef(model)
    assert_outputs_match(merged(tokens), trainable(tokens), same_computation=False, ulps=256)


def test_a_stack_made_by_nnx_vmap_lifts_without_an_example_and_lowers_back():
    @nnx.split_rngs(splits=2)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs: nnx.Rngs) -> nnx.Linear:
        return nnx.Linear(4, 4, rngs=rngs)

    stacked = make(nnx.Rngs(5))
    lifted = pzb.lift(stacked)
    assert isinstance(lifted.body, LayerStack) and lifted.body.size == 2
    x = jax.random.normal(jax.random.key(6), (3, 4))
    leaves, rebuild = split_stacked(stacked)
    first, second = (rebuild([leaf[i] for leaf in leaves]) for i in range(2))
    assert_outputs_match(lifted.positional(x), second(first(x)), same_computation=False)
    lowered = pzb.lower(lifted)
    assert nnx.graphdef(lowered) == nnx.graphdef(stacked)
    assert np.array_equal(np.asarray(lowered.kernel[...]), np.asarray(stacked.kernel[...]))
