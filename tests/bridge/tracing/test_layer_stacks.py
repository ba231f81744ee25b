"""Stacked layers: blocks made by ``eqx.filter_vmap`` and run by ``jax.lax.scan``, lifted as a ``LayerStack``.

The model is written as real Equinox code is: einsum attention on raw
arrays with a head axis, an MLP applied per token with ``jax.vmap``, layers
built by ``eqx.filter_vmap`` and run by ``lax.scan`` over
``eqx.partition``-ed arrays. References are the original module and a
hand-written loop over its blocks.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_equinox_tracing import train_lora

import pzbridge as pzb
from pzbridge.core.errors import LiftError
from pzbridge.nn.layer_stack import LayerStack
from pzbridge.testing.numerics import assert_outputs_match
from pzbridge.toolshed.interventions import Patch
from pzbridge.toolshed.intermediates import capture_intermediates, insert_layers
from pzbridge.toolshed.lora import is_lora_parameter, loraify_linears_in_selection, merge_lora

D, HEADS, LAYERS, VOCAB = 8, 2, 3, 13


class Attention(eqx.Module):
    wq: jax.Array  # (features, heads, head_dim)
    wk: jax.Array
    wv: jax.Array
    wo: jax.Array  # (heads, head_dim, features)

    def __init__(self, key: jax.Array) -> None:
        ks = jax.random.split(key, 4)
        shape = (D, HEADS, D // HEADS)
        self.wq, self.wk, self.wv = (jax.random.normal(k, shape) * 0.3 for k in ks[:3])
        self.wo = jax.random.normal(ks[3], (HEADS, D // HEADS, D)) * 0.3

    def __call__(self, x: jax.Array) -> jax.Array:
        q = jnp.einsum("sd,dhk->shk", x, self.wq)
        k = jnp.einsum("sd,dhk->shk", x, self.wk)
        v = jnp.einsum("sd,dhk->shk", x, self.wv)
        logits = jnp.einsum("shk,thk->hst", q, k) / jnp.sqrt(q.shape[-1]).astype(x.dtype)
        weights = jax.nn.softmax(logits, axis=-1)
        return jnp.einsum("hst,thk,hkd->sd", weights, v, self.wo)


class MLP(eqx.Module):
    up: eqx.nn.Linear
    down: eqx.nn.Linear

    def __init__(self, key: jax.Array) -> None:
        k1, k2 = jax.random.split(key)
        self.up, self.down = eqx.nn.Linear(D, 2 * D, key=k1), eqx.nn.Linear(2 * D, D, key=k2)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.gelu(self.up(x)))


class Block(eqx.Module):
    norm1: eqx.nn.LayerNorm
    attn: Attention
    norm2: eqx.nn.LayerNorm
    mlp: MLP

    def __init__(self, key: jax.Array) -> None:
        k1, k2 = jax.random.split(key)
        self.norm1, self.attn = eqx.nn.LayerNorm(D), Attention(k1)
        self.norm2, self.mlp = eqx.nn.LayerNorm(D), MLP(k2)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(jax.vmap(self.norm1)(x))
        return x + jax.vmap(self.mlp)(jax.vmap(self.norm2)(x))


class Transformer(eqx.Module):
    embed: eqx.nn.Embedding
    layers: Block  # every array has a leading (LAYERS,) axis
    norm: eqx.nn.LayerNorm
    unembed: eqx.nn.Linear

    def __init__(self, key: jax.Array) -> None:
        ks = jax.random.split(key, 3)
        self.embed = eqx.nn.Embedding(VOCAB, D, key=ks[0])
        self.layers = eqx.filter_vmap(Block)(jax.random.split(ks[1], LAYERS))
        self.norm, self.unembed = eqx.nn.LayerNorm(D), eqx.nn.Linear(D, VOCAB, key=ks[2])

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = jax.vmap(self.embed)(ids)
        arrays, static = eqx.partition(self.layers, eqx.is_array)

        def step(h: jax.Array, block_arrays: Block) -> tuple[jax.Array, None]:
            return eqx.combine(block_arrays, static)(h), None

        x, _ = jax.lax.scan(step, x, arrays)
        return jax.vmap(self.unembed)(jax.vmap(self.norm)(x))


def _block(model: Transformer, i: int) -> Block:
    arrays, static = eqx.partition(model.layers, eqx.is_array)
    return eqx.combine(jax.tree_util.tree_map(lambda a: a[i], arrays), static)


def _ids(length: int, seed: int = 0) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (length,), 0, VOCAB)


@pytest.fixture(scope="module")
def model() -> Transformer:
    return Transformer(jax.random.key(0))


@pytest.fixture(scope="module")
def lifted(model: Transformer) -> pzb.LiftedModel:
    return pzb.lift(model, _ids(5), strict=True)


def test_stacked_transformer_traces_without_foreign_and_matches_at_two_lengths(model, lifted):
    assert pzb.select(lifted).at_instances_of(pzb.nn.Foreign).count() == 0
    stacks = pzb.select(lifted).at_instances_of(LayerStack).get_sequence()
    assert len(stacks) == 1 and stacks[0].size == LAYERS and stacks[0].axis == "layers"
    jitted = jax.jit(lambda m, ids: m.positional(ids))
    for length in (5, 9):
        ids = _ids(length, length)
        assert_outputs_match(lifted.positional(ids), model(ids), same_computation=False)
        assert_outputs_match(jitted(pzb.freeze_variables(lifted), ids), model(ids), same_computation=False)


def test_every_weight_of_the_stack_carries_the_layers_axis_and_heads_are_named(lifted):
    labels = {v.label: dict(v.value.named_shape) for v in pzb.select(lifted).at_instances_of(
        pzb.Parameter).get_sequence()}
    stacked = {label: shape for label, shape in labels.items() if label.startswith("layers.")}
    assert stacked and all(shape.get("layers") == LAYERS for shape in stacked.values())
    assert all("layers" not in shape for label, shape in labels.items() if not label.startswith("layers."))
    assert "heads" in labels["layers.attn.wq"] and labels["layers.attn.wq"]["heads"] == HEADS


def test_lower_of_lift_gives_the_stacked_module_back_bitwise(model, lifted):
    lowered = pzb.lower(lifted)
    assert type(lowered) is Transformer and type(lowered.layers) is Block
    assert jax.tree_util.tree_structure(lowered) == jax.tree_util.tree_structure(model)
    for a, b in zip(jax.tree_util.tree_leaves(lowered), jax.tree_util.tree_leaves(model)):
        assert a.shape == b.shape and np.array_equal(np.asarray(a), np.asarray(b))


def test_a_stack_made_by_filter_vmap_lifts_without_an_example_and_lowers_back():
    keys = jax.random.split(jax.random.key(3), 2)
    stacked = eqx.filter_vmap(lambda k: eqx.nn.Linear(4, 4, key=k))(keys)
    lifted = pzb.lift(stacked)
    assert isinstance(lifted.body, LayerStack) and lifted.body.size == 2
    assert lifted.body.body.sublayers[0].weights.value.data_array is stacked.weight  # the buffer, not a copy
    x = jax.random.normal(jax.random.key(4), (4,))
    first, second = (eqx.combine(jax.tree_util.tree_map(lambda a: a[i], eqx.filter(stacked, eqx.is_array)),
                                 eqx.filter(stacked, eqx.is_array, inverse=True)) for i in range(2))
    assert_outputs_match(lifted.positional(x), second(first(x)), same_computation=False)
    assert eqx.tree_equal(pzb.lower(lifted), stacked)


def test_residual_streams_come_back_stacked_and_equal_a_hand_written_loop(model, lifted):
    assert pzb.select(lifted).at_instances_of(pzb.nn.Residual).count() == 2  # one block, run LAYERS times
    ids = _ids(6, 1)
    _, streams = capture_intermediates(lifted, pzb.nn.Residual, pzb.nx.wrap(ids, "seq"))
    after_attention, after_mlp = streams.values()
    x = jax.vmap(model.embed)(ids)
    for i in range(LAYERS):
        block = _block(model, i)
        mid = x + block.attn(jax.vmap(block.norm1)(x))
        x = mid + jax.vmap(block.mlp)(jax.vmap(block.norm2)(mid))
        assert_outputs_match(after_attention.unwrap("layers", "seq", "features")[i], mid, same_computation=False)
        assert_outputs_match(after_mlp.unwrap("layers", "seq", "features")[i], x, same_computation=False)


def test_patching_the_stream_at_one_block_reproduces_the_clean_run_downstream(lifted):
    clean, corrupt = pzb.nx.wrap(_ids(4, 2), "seq"), pzb.nx.wrap(_ids(4, 3), "seq")
    residuals = pzb.select(lifted).at_instances_of(pzb.nn.Residual)
    _, streams = capture_intermediates(lifted, residuals, clean)
    block_output = list(streams.values())[1]  # {layers, seq, features}
    at_block_1 = pzb.nx.wrap(jnp.arange(LAYERS) == 1, "layers")
    # A patch whose values and mask carry `layers` acts at one block of the stack only.
    patched = insert_layers(lifted, residuals.pick_nth_selected(1), lambda path, layer: Patch(block_output,
                                                                                               mask=at_block_1))
    expected = lifted(clean)
    names = tuple(expected.named_shape)
    assert not np.allclose(lifted(corrupt).unwrap(*names), expected.unwrap(*names))
    assert_outputs_match(patched(corrupt).unwrap(*names), expected.unwrap(*names), same_computation=False)


def test_lora_on_every_weight_contraction_of_the_stack_is_per_layer_trains_and_merges(model, lifted):
    linears = pzb.select(lifted).at_instances_of(pzb.nn.Linear)
    assert linears.count() == 7  # W_Q, W_K, W_V, W_O (einsum), the MLP's two layers, the unembedding
    edited = loraify_linears_in_selection(linears, 2, jax.random.key(10))
    adapters = [v for v in pzb.select(edited).at_instances_of(pzb.Parameter).get_sequence() if is_lora_parameter(v)]
    stacked_adapters = [a for a in adapters if a.label.startswith("layers.")]
    assert len(stacked_adapters) == 12 and all(a.value.named_shape["layers"] == LAYERS for a in stacked_adapters)
    lowered = pzb.lower(edited)
    ids, target = _ids(5, 4), jax.random.normal(jax.random.key(5), (5, VOCAB))
    assert_outputs_match(lowered(ids), model(ids), same_computation=False)
    trained, losses = train_lora(lowered, ids, target)
    assert losses[-1] < losses[0]
    # Each layer's adapter trained on its own: the stacked B factors differ per layer.
    b = np.asarray(trained.layers.mlp.up.lora_b)
    assert b.shape[0] == LAYERS and not np.allclose(b[0], b[1])
    assert np.array_equal(np.asarray(trained.layers.mlp.up.linear.weight), np.asarray(model.layers.mlp.up.weight))
    merged = pzb.lower(merge_lora(pzb.lift(trained, ids)))
    assert type(merged) is Transformer and type(merged.layers) is Block and type(merged.layers.mlp.up) is eqx.nn.Linear
    assert type(merged.layers.attn) is Attention
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(model)
    assert_outputs_match(merged(ids), trained(ids), same_computation=False, ulps=256)


@settings(max_examples=15, deadline=None)
@given(layers=st.integers(1, 4), scale=st.floats(-2.0, 2.0, allow_nan=False), seed=st.integers(0, 2**16))
def test_a_layer_stack_equals_running_its_slices_one_after_another(layers, scale, seed):
    key = jax.random.key(seed)
    w = jax.random.normal(key, (layers, 3, 3)) * scale
    b = jax.random.normal(jax.random.fold_in(key, 1), (layers, 3))
    weight = pzb.Parameter(pzb.nx.wrap(w, "layers", "features_out", "features"), "w")
    bias = pzb.Parameter(pzb.nx.wrap(b, "layers", "features"), "b")
    block = pzb.nn.Sequential([pzb.nn.Linear(weight, ("features",), ("features",)), pzb.nn.AddBias(bias),
                               pzb.nn.Elementwise(jnp.tanh)])
    x = jax.random.normal(jax.random.fold_in(key, 2), (2, 3))
    expected = x
    for i in range(layers):
        expected = jnp.tanh(expected @ w[i].T + b[i])
    got = LayerStack(block)(pzb.nx.wrap(x, "batch", "features")).unwrap("batch", "features")
    assert_outputs_match(got, expected, same_computation=False, ulps=16)


class RawStack(eqx.Module):
    """TransformerLens-style: the parent holds raw ``(layers, ...)`` arrays and scans over them itself."""

    w_in: jax.Array  # (layers, features, hidden)
    w_out: jax.Array  # (layers, hidden, features)

    def __call__(self, x: jax.Array) -> jax.Array:
        def step(h: jax.Array, weights: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
            w_in, w_out = weights
            return h + jnp.einsum("sh,hd->sd", jax.nn.relu(jnp.einsum("sd,dh->sh", h, w_in)), w_out), None

        return jax.lax.scan(step, x, (self.w_in, self.w_out))[0]


def test_raw_stacked_arrays_scanned_by_the_parent_become_per_layer_linears():
    k1, k2 = jax.random.split(jax.random.key(20))
    model = RawStack(jax.random.normal(k1, (LAYERS, D, 16)) * 0.3, jax.random.normal(k2, (LAYERS, 16, D)) * 0.3)
    lifted = pzb.lift(model, jnp.ones((4, D)), strict=True)
    assert pzb.select(lifted).at_instances_of(pzb.nn.Residual).count() == 1
    weights = [layer.weights.value for layer in pzb.select(lifted).at_instances_of(pzb.nn.Linear).get_sequence()]
    assert len(weights) == 2 and all(w.named_shape["layers"] == LAYERS for w in weights)
    for length in (4, 7):
        x = jax.random.normal(jax.random.key(length), (length, D))
        assert_outputs_match(lifted.positional(x), model(x), same_computation=False)
    lowered = pzb.lower(lifted)
    assert type(lowered) is RawStack and lowered.w_in is model.w_in and lowered.w_out is model.w_out


class Recurrent(eqx.Module):
    """A hand-written RNN: ``lax.scan`` over the time axis of its input, per-step outputs stacked."""

    cell: eqx.nn.Linear
    hidden: int = eqx.field(static=True)

    def __call__(self, xs: jax.Array) -> jax.Array:
        def step(h: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
            h = jnp.tanh(self.cell(jnp.concatenate([h, x])))
            return h, 2 * h

        _, ys = jax.lax.scan(step, jnp.zeros(self.hidden), xs)
        return ys


def test_a_scan_over_time_runs_the_body_per_step_and_stacks_its_outputs_along_the_input_axis():
    model = Recurrent(eqx.nn.Linear(3 + 4, 3, key=jax.random.key(21)), 3)
    lifted = pzb.lift(model, jnp.ones((5, 4)), strict=True)
    stack = pzb.select(lifted).at_instances_of(LayerStack).get_sequence()[0]
    assert stack.axis == "seq" and stack.xs_count == 1 and stack.ys_count == 1
    for length in (5, 8):
        xs = jax.random.normal(jax.random.key(length), (length, 4))
        assert_outputs_match(lifted.positional(xs), model(xs), same_computation=False)
    assert eqx.tree_equal(pzb.lower(lifted), model)


def test_a_stacked_model_of_abstract_arrays_lifts_and_lowers_to_the_same_shapes():
    model = eqx.filter_eval_shape(Transformer, jax.random.key(0))
    lifted = pzb.lift(model, jax.ShapeDtypeStruct((5,), jnp.int32), strict=True)
    assert pzb.select(lifted).at_instances_of(LayerStack).get_sequence()[0].size == LAYERS
    lowered = pzb.lower(lifted)
    assert jax.tree_util.tree_structure(lowered) == jax.tree_util.tree_structure(model)
    shapes = [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(lowered)]
    assert shapes == [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(model)]


class Branchy(eqx.Module):
    linear: eqx.nn.Linear

    def __call__(self, x: jax.Array) -> jax.Array:
        # A while loop: not expressible by traced lifting yet.
        return jax.lax.while_loop(lambda h: jnp.max(h) < 0.0, lambda h: h + 1.0, self.linear(x))


class ScansBranchy(eqx.Module):
    layers: Branchy

    def __call__(self, x: jax.Array) -> jax.Array:
        arrays, static = eqx.partition(self.layers, eqx.is_array)
        return jax.lax.scan(lambda h, p: (eqx.combine(p, static)(h), None), x, arrays)[0]


def test_a_scan_over_untraceable_blocks_traces_the_parent_around_foreign_blocks_and_strict_names_the_reason():
    model = ScansBranchy(eqx.filter_vmap(lambda k: Branchy(eqx.nn.Linear(4, 4, key=k)))(
        jax.random.split(jax.random.key(30), 2)))
    lifted = pzb.lift(model, jnp.ones(4))
    # The scan opens up; each stacked block stays Foreign (its while loop), names passing through it.
    assert not isinstance(lifted.body, pzb.nn.Foreign)
    assert pzb.select(lifted).at_instances_of(pzb.nn.Foreign).count() == 1
    x = jnp.ones(4)
    assert_outputs_match(lifted.positional(x), model(x), same_computation=True)
    assert eqx.tree_equal(pzb.lower(lifted), model)
    with pytest.raises(LiftError, match="layers"):
        pzb.lift(model, jnp.ones(4), strict=True)
