"""Ablation (zero, mean, resample, head knockout) on pzb.nn, stock-layer and traced custom models.

References are independent: weight surgery on the original Equinox / NNX
module (zeroing a head's slice of the output projection), or a pure-jax
forward pass of the traced model with the per-head outputs edited.
"""

from __future__ import annotations

import pathlib
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.core.errors import NamedAxisError, PzbridgeError, SelectionError
from pzbridge.toolshed.ablation import Resample, ablate, head_sites, knockout_heads
from pzbridge.toolshed.where import Where

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from intervention_models import (
    D_MODEL,
    HEADS,
    eqx_mha,
    lifted_tiny_lm,
    nnx_mha,
    pzb_attention,
    stream,
    tokens,
)

TOL = {"rtol": 2e-5, "atol": 2e-5}


def forward(model, toks: jax.Array, edit=None) -> jax.Array:
    """Pure-jax TinyLM forward; ``edit(layer, z)`` rewrites the per-head outputs z (batch, heads, seq, proj)."""
    x = model.embed[toks]
    for layer, attn in enumerate(model.attns):
        q, k, v = (jnp.einsum("bsd,hdk->bhsk", x, w) for w in (attn.W_Q, attn.W_K, attn.W_V))
        scores = jnp.einsum("bhqk,bhsk->bhqs", q, k) / jnp.sqrt(q.shape[-1])
        seq = toks.shape[1]
        scores = jnp.where(jnp.tril(jnp.ones((seq, seq), bool)), scores, -1e9)
        z = jnp.einsum("bhqs,bhsk->bhqk", jax.nn.softmax(scores, axis=-1), v)
        if edit is not None:
            z = edit(layer, z)
        x = x + jnp.einsum("bhqk,hkd->bqd", z, attn.W_O)
    return x @ model.unembed


def head_outputs(model, toks: jax.Array, layer: int) -> jax.Array:
    seen = {}

    def keep(l, z):
        seen[l] = z
        return z

    forward(model, toks, keep)
    return seen[layer]


def logits(lifted, toks: jax.Array) -> np.ndarray:
    return np.asarray(lifted(pzb.nx.wrap(toks, "batch", "seq")).unwrap("batch", "seq", "features"))


# -- head knockout on the three kinds of model ---------------------------------------------


def zero_head(weights: jax.Array, head: int, axis: int, size: int) -> jax.Array:
    index = [slice(None)] * weights.ndim
    index[axis] = slice(head * size, (head + 1) * size)
    return weights.at[tuple(index)].set(0.0)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), head=st.integers(0, HEADS - 1))
def test_knockout_on_pzb_attention_equals_zeroing_the_heads_output_weights(seed: int, head: int) -> None:
    model = pzb_attention(seed)
    x = pzb.nx.wrap(stream(seed, 2, 4, D_MODEL), "batch", "seq", "features")
    knocked = knockout_heads(model, head)
    out_w = pzb.select(model).at_instances_of(pzb.Parameter).where(lambda p: p.label == "attn.output.weights")
    surgery = out_w.apply(lambda p: pzb.Parameter(p.value.untag("heads").at[head].set(0.0).tag("heads"), p.label))
    np.testing.assert_allclose(knocked(x).unwrap("batch", "seq", "features"),
                               surgery(x).unwrap("batch", "seq", "features"), **TOL)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), head=st.integers(0, HEADS - 1))
def test_knockout_on_lifted_equinox_attention_equals_equinox_weight_surgery(seed: int, head: int) -> None:
    mha = eqx_mha(seed)
    lifted = pzb.lift(mha)
    x = stream(seed, 4, D_MODEL)
    knocked = knockout_heads(lifted, head)
    size = mha.output_proj.weight.shape[1] // HEADS
    surgery = eqx.tree_at(lambda m: m.output_proj.weight, mha, zero_head(mha.output_proj.weight, head, 1, size))
    np.testing.assert_allclose(knocked.positional(x, x, x), surgery(x, x, x), **TOL)
    np.testing.assert_array_equal(lifted.positional(x, x, x), mha(x, x, x))  # the source is untouched


@settings(max_examples=6, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), head=st.integers(0, HEADS - 1))
def test_knockout_on_lifted_nnx_attention_equals_nnx_weight_surgery(seed: int, head: int) -> None:
    lifted = pzb.lift(nnx_mha(seed))
    x = stream(seed, 2, 4, D_MODEL)
    knocked = knockout_heads(lifted, head)
    surgery = nnx_mha(seed)  # an independent copy to operate on
    surgery.out.kernel[...] = surgery.out.kernel[...].at[head].set(0.0)
    np.testing.assert_allclose(knocked.positional(x), surgery(x), **TOL)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), heads=st.lists(st.integers(0, HEADS - 1), max_size=2, unique=True))
def test_knockout_on_traced_model_equals_pure_jax_with_heads_zeroed(seed: int, heads: list[int]) -> None:
    model, lifted = lifted_tiny_lm(seed)
    toks = tokens(seed, 2, 5)
    knocked = knockout_heads(lifted, heads)  # default sites: every W_O (both layers)
    mask = jnp.isin(jnp.arange(HEADS), jnp.asarray(heads, jnp.int32))[None, :, None, None]
    want = forward(model, toks, lambda layer, z: jnp.where(mask, 0.0, z))
    np.testing.assert_allclose(logits(knocked, toks), want, **TOL)


def test_head_sites_per_model_kind() -> None:
    assert head_sites(pzb_attention(0)) == [Where(layer="AttendToValues")]
    assert head_sites(pzb.lift(eqx_mha(0))) == [Where(layer="AttendToValues")]
    assert head_sites(lifted_tiny_lm(0)[1]) == [Where(label="attns.0.W_O", side="before"),
                                                Where(label="attns.1.W_O", side="before")]
    with pytest.raises(SelectionError, match="found no per-head outputs"):
        head_sites(pzb.nn.Sequential([pzb.nn.Identity()]))


def test_knockout_in_one_layer_only() -> None:
    model, lifted = lifted_tiny_lm(5)
    toks = tokens(5, 2, 5)
    knocked = knockout_heads(lifted, 2, at=Where(label="attns.1.W_O", side="before"))
    want = forward(model, toks, lambda layer, z: z.at[:, 2].set(0.0) if layer == 1 else z)
    np.testing.assert_allclose(logits(knocked, toks), want, **TOL)


# -- laws -------------------------------------------------------------------------------------


@settings(max_examples=6, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), how=st.sampled_from(["zero", "mean", "resample"]))
def test_ablating_no_unit_is_a_bitwise_identity(seed: int, how: str) -> None:
    _, lifted = lifted_tiny_lm(seed)
    toks = tokens(seed, 3, 5)
    ref = pzb.nx.wrap(tokens(seed + 7, 4, 5), "batch", "seq")
    kwargs = {} if how == "zero" else {"reference": ref}
    if how == "resample":
        kwargs["key"] = jax.random.key(seed)
    knocked = knockout_heads(lifted, [], how=how, **kwargs)
    np.testing.assert_array_equal(logits(knocked, toks), logits(lifted, toks))
    for model in (pzb_attention(seed), pzb.lift(nnx_mha(seed))):
        x = pzb.nx.wrap(stream(seed, 2, 4, D_MODEL), "batch", "seq", "features")
        np.testing.assert_array_equal(knockout_heads(model, slice(0, 0))(x).unwrap("batch", "seq", "features"),
                                      model(x).unwrap("batch", "seq", "features"))


@settings(max_examples=5, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), how=st.sampled_from(["zero", "mean", "resample"]))
def test_ablation_under_jit_equals_eager(seed: int, how: str) -> None:
    _, lifted = lifted_tiny_lm(seed)
    toks = pzb.nx.wrap(tokens(seed, 3, 5), "batch", "seq")
    ref = pzb.nx.wrap(tokens(seed + 7, 4, 5), "batch", "seq")
    kwargs = {"zero": {}, "mean": {"reference": ref}, "resample": {"reference": ref, "key": jax.random.key(seed)}}
    knocked = ablate(lifted, Where(label="attns.0.W_O", side="before", index={"heads": 1}), how, **kwargs[how])
    jitted = jax.jit(lambda m, x: m(x))(pzb.freeze_params(knocked), toks)
    np.testing.assert_allclose(jitted.unwrap("batch", "seq", "features"),
                               knocked(toks).unwrap("batch", "seq", "features"), rtol=1e-5, atol=1e-5)


# -- mean and resample against pure jax ---------------------------------------------------------


@settings(max_examples=6, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), head=st.integers(0, HEADS - 1), layer=st.integers(0, 1))
def test_mean_ablation_from_a_reference_batch(seed: int, head: int, layer: int) -> None:
    model, lifted = lifted_tiny_lm(seed)
    toks, ref = tokens(seed, 2, 5), tokens(seed + 3, 6, 5)
    site = Where(label=f"attns.{layer}.W_O", side="before", index={"heads": head})
    ablated = ablate(lifted, site, "mean", reference=pzb.nx.wrap(ref, "batch", "seq"), over=("batch", "seq"))
    mean = head_outputs(model, ref, layer)[:, head].mean(axis=(0, 1))  # (proj,)
    want = forward(model, toks, lambda l, z: z.at[:, head].set(mean) if l == layer else z)
    np.testing.assert_allclose(logits(ablated, toks), want, **TOL)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), head=st.integers(0, HEADS - 1))
def test_mean_ablation_over_the_activations_own_axes(seed: int, head: int) -> None:
    model, lifted = lifted_tiny_lm(seed)
    toks = tokens(seed, 3, 5)
    ablated = ablate(lifted, Where(label="attns.0.W_O", side="before", index={"heads": head}), "mean", over="seq")
    want = forward(model, toks, lambda l, z: z.at[:, head].set(z[:, head].mean(axis=1, keepdims=True)) if l == 0 else z)
    np.testing.assert_allclose(logits(ablated, toks), want, **TOL)


@settings(max_examples=5, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), head=st.integers(0, HEADS - 1))
def test_resampling_gives_each_example_some_reference_examples_activation(seed: int, head: int) -> None:
    model, lifted = lifted_tiny_lm(seed)
    toks, ref = tokens(seed, 4, 5), tokens(seed + 3, 3, 5)
    site = Where(label="attns.1.W_O", side="before", index={"heads": head})
    key = jax.random.key(seed)
    resampled = logits(ablate(lifted, site, "resample", reference=pzb.nx.wrap(ref, "batch", "seq"), key=key), toks)
    ref_z = head_outputs(model, ref, 1)[:, head]  # (ref batch, seq, proj)
    candidates = np.stack([forward(model, toks, lambda l, z, j=j: z.at[:, head].set(ref_z[j]) if l == 1 else z)
                           for j in range(ref.shape[0])])  # (ref, batch, seq, vocab)
    errors = np.abs(candidates - resampled[None]).max(axis=(2, 3))  # (ref, batch)
    assert (errors.min(axis=0) < 1e-4).all()
    again = logits(ablate(lifted, site, "resample", reference=pzb.nx.wrap(ref, "batch", "seq"), key=key), toks)
    np.testing.assert_array_equal(again, resampled)


def test_resample_layer_draws_uniformly_with_replacement() -> None:
    ref = pzb.nx.wrap(jnp.arange(4.0), "batch")
    out = Resample(ref, jax.random.key(0))(pzb.nx.zeros({"batch": 4000}))
    counts = np.bincount(np.asarray(out.unwrap("batch")).astype(int), minlength=4)
    assert (np.abs(counts / 4000 - 0.25) < 0.03).all()


# -- errors ------------------------------------------------------------------------------------


def test_bad_ablation_arguments_raise_clear_errors() -> None:
    _, lifted = lifted_tiny_lm(0)
    site = Where(label="attns.0.W_O", side="before")
    ref = pzb.nx.wrap(tokens(1, 2, 5), "batch", "seq")
    with pytest.raises(PzbridgeError, match="how must be one of"):
        ablate(lifted, site, "shuffle")
    with pytest.raises(PzbridgeError, match="needs over="):
        ablate(lifted, site, "mean")
    with pytest.raises(PzbridgeError, match="needs reference="):
        ablate(lifted, site, "resample", key=jax.random.key(0))
    with pytest.raises(PzbridgeError, match="needs key="):
        ablate(lifted, site, "resample", reference=ref)
    with pytest.raises(NamedAxisError, match=r"lacks the axes \['sample'\]"):
        ablate(lifted, site, "mean", reference=ref, over="sample")
    with pytest.raises(PzbridgeError, match="already indexes 'heads'"):
        knockout_heads(lifted, 0, at=Where(label="attns.0.W_O", side="before", index={"heads": 1}))
    with pytest.raises(NamedAxisError, match=r"index names axes \['heads'\]"):
        knockout_heads(lifted, 0, at=Where(module="attns.0"))(ref)  # the call's output has no heads axis
