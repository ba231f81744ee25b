"""A weight the code reads more than once: tied embeddings, a matrix used with its transpose, a shared layer.

Each use of a traced weight is its own node reading one ``Parameter``; LoRA
adapts the contractions that are ``Linear`` s, and ``merge_lora`` folds an
adapter back only where every use of the weight is adapted (else it raises,
or with ``untie=True`` gives the adapted uses their own merged weight).
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lora_helpers import train_adapters

import pzbridge as pzb
from pzbridge.bridge.equinox import EquinoxAdapter
from pzbridge.core.errors import VariableError
from pzbridge.testing.numerics import assert_outputs_match
from pzbridge.toolshed.lora import LowRankAdapter, loraify_linears_in_selection, merge_lora

VOCAB, D = 11, 8


class TiedLM(eqx.Module):
    """Embedding by indexing a raw table, a residual MLP on raw arrays, unembedding with the table's transpose."""

    table: jax.Array  # (vocab, d)
    w_in: jax.Array
    w_out: jax.Array

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = self.table[ids]
        x = x + jax.nn.gelu(x @ self.w_in) @ self.w_out
        return x @ self.table.T


class Autoencoder(eqx.Module):
    """Encoder and decoder share one matrix: ``h = tanh(x @ W)``, ``y = h @ W.T``."""

    weight: jax.Array  # (d, code)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.tanh(x @ self.weight) @ self.weight.T


class TwiceApplied(eqx.Module):
    """One square matrix applied twice in the same orientation (a weight-tied recurrence)."""

    weight: jax.Array

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.tanh(jnp.tanh(x @ self.weight) @ self.weight)


def _normal(seed: int, shape: tuple[int, ...]) -> jax.Array:
    return 0.3 * jax.random.normal(jax.random.key(seed), shape)


def _tied_lm() -> TiedLM:
    return TiedLM(_normal(0, (VOCAB, D)), _normal(1, (D, 2 * D)), _normal(2, (2 * D, D)))


def _ids(length: int) -> jax.Array:
    return jax.random.randint(jax.random.key(length), (length,), 0, VOCAB)


def _nonzero_b(model):
    """Adapters with a non-zero ``B`` (as after training), so a merge changes the weight."""
    def perturb(adapter: LowRankAdapter) -> LowRankAdapter:
        b = adapter.lora_b
        return dataclasses.replace(adapter, lora_b=pzb.Parameter(b.value + 0.25, b.label))
    return pzb.select(model).at_instances_of(LowRankAdapter).apply(perturb)


@pytest.mark.parametrize("make, example", [
    (_tied_lm, _ids(5)),
    (lambda: Autoencoder(_normal(3, (D, 5))), _normal(4, (6, D))),
    (lambda: TwiceApplied(_normal(5, (D, D))), _normal(6, (6, D))),
])
def test_a_weight_read_twice_lifts_runs_at_two_sizes_and_lowers_back(make, example):
    model = make()
    lifted = pzb.lift(model, example, strict=True)
    for x in (example, jnp.concatenate([example, example[:3]])):
        assert_outputs_match(lifted.positional(x), model(x), same_computation=False)
    lowered = pzb.lower(lifted)
    assert type(lowered) is type(model)
    assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(lowered), jax.tree_util.tree_leaves(model)))


def test_lora_on_the_tied_unembedding_trains_and_a_merge_must_untie():
    model = _tied_lm()
    ids = _ids(6)
    lifted = pzb.lift(model, ids, strict=True)
    linears = pzb.select(lifted).at_instances_of(pzb.nn.Linear)
    assert linears.count() == 3  # w_in, w_out and the unembedding x @ table.T
    adapted = loraify_linears_in_selection(linears, 2, jax.random.key(7))
    target = jax.random.normal(jax.random.key(8), (6, VOCAB))
    trained, losses = train_adapters(pzb.lower(adapted), lambda m: jnp.mean((m(ids) - target) ** 2))
    assert losses[-1] < losses[0]

    relifted = pzb.lift(trained, ids)
    with pytest.raises(VariableError, match=r"'table'.*read without an adapter.*untie=True"):
        merge_lora(relifted)
    merged = merge_lora(relifted, untie=True)
    labels = sorted(v.label for v in pzb.select(merged).at_instances_of(pzb.Parameter).get_sequence())
    assert labels == ["table", "table.merged", "w_in", "w_out"]
    # The embedding still reads the original table; the unembedding reads the merged one.
    assert_outputs_match(merged.positional(ids), trained(ids), same_computation=False, ulps=64)
    lowered = pzb.lower(merged)
    assert isinstance(lowered, EquinoxAdapter)  # TiedLM has one field for two different tables
    assert_outputs_match(lowered(ids), trained(ids), same_computation=False, ulps=64)


def test_a_tie_split_after_lift_never_lowers_to_the_original_class_with_one_side_dropped():
    model = _tied_lm()
    ids = _ids(5)
    adapted = _nonzero_b(loraify_linears_in_selection(
        pzb.select(pzb.lift(model, ids)).at_instances_of(pzb.nn.Linear), 2, jax.random.key(9)))
    merged = merge_lora(adapted, untie=True)
    expected = adapted.positional(ids)
    assert not np.allclose(np.asarray(expected), np.asarray(model(ids)))
    assert_outputs_match(pzb.lower(merged)(ids), expected, same_computation=False, ulps=64)


def test_adapting_every_use_of_a_shared_weight_merges_exactly_into_the_original_class():
    model = TwiceApplied(_normal(5, (D, D)))
    x = _normal(6, (6, D))
    lifted = pzb.lift(model, x, strict=True)
    linears = pzb.select(lifted).at_instances_of(pzb.nn.Linear)
    assert linears.count() == 2
    adapted = _nonzero_b(loraify_linears_in_selection(linears, 2, jax.random.key(10)))
    adapters = pzb.select(adapted).at_instances_of(LowRankAdapter).get_sequence()
    assert len(adapters) == 2 and adapters[0].lora_a is adapters[1].lora_a  # one pair for one weight
    merged = merge_lora(adapted)
    assert_outputs_match(merged.positional(x), adapted.positional(x), same_computation=False, ulps=64)
    lowered = pzb.lower(merged)
    assert type(lowered) is TwiceApplied
    assert_outputs_match(lowered(x), adapted.positional(x), same_computation=False, ulps=64)


def test_lora_on_the_encoder_of_a_transposed_tie_runs_and_merges_only_when_untied():
    model = Autoencoder(_normal(3, (D, 5)))
    x = _normal(4, (6, D))
    lifted = pzb.lift(model, x, strict=True)
    adapted = _nonzero_b(loraify_linears_in_selection(
        pzb.select(lifted).at_instances_of(pzb.nn.Linear), 2, jax.random.key(11)))
    expected = adapted.positional(x)
    with pytest.raises(VariableError, match="'weight'"):
        merge_lora(adapted)
    merged = merge_lora(adapted, untie=True)
    assert_outputs_match(merged.positional(x), expected, same_computation=False, ulps=64)
    assert_outputs_match(pzb.lower(merged)(x), expected, same_computation=False, ulps=64)
