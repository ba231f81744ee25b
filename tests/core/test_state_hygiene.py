"""State hygiene: an edited copy owns its state; traced values never leak into variables made outside a trace."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.core.errors import VariableError
from pzbridge.core.state_copy import fresh_state, shared_state
from pzbridge.models.gpt import build_gpt, make_kv_cached
from pzbridge.nn.kv_cache import KVCachingAttention
from pzbridge.toolshed import AddVector, insert_intervention

TOKENS = pzb.nx.wrap(jnp.array([[1, 2]]), "batch", "seq")


def _cached_gpt() -> pzb.nn.Layer:
    return make_kv_cached(build_gpt("g", jax.random.key(0), 5, 1, 1, 4, 8, 4), {"batch": 1})


def _cache_indices(model) -> list[int]:
    return [int(a.cache_index.value) for a in pzb.select(model).at_instances_of(KVCachingAttention).get_sequence()]


def test_running_a_steered_copy_leaves_the_original_kv_cache_alone():
    model = _cached_gpt()
    steered = insert_intervention(model, KVCachingAttention, AddVector(pzb.nx.wrap(jnp.ones(4), "features")))
    steered(TOKENS)
    assert _cache_indices(steered) == [2] and _cache_indices(model) == [0]
    assert shared_state(model, steered) == []


@pytest.mark.parametrize("edit", ["apply", "set", "insert_after", "remove_from_parent", "apply_and_inline"])
def test_every_selector_edit_gives_fresh_state(edit):
    model = _cached_gpt()
    sel = pzb.select(model).at_instances_of(KVCachingAttention)
    edited = {
        "apply": lambda: sel.apply(lambda a: pzb.nn.Sequential([a])),
        "set": lambda: pzb.select(model).at_instances_of(pzb.nn.EmbeddingLookup).set(pzb.nn.Identity()),
        "insert_after": lambda: sel.insert_after(pzb.nn.Identity()),
        "remove_from_parent": lambda: pzb.select(model).at_instances_of(pzb.nn.LayerNorm).remove_from_parent(),
        "apply_and_inline": lambda: sel.apply_and_inline(lambda a: [a, pzb.nn.Identity()]),
    }[edit]()
    assert shared_state(model, edited) == []
    # Same labels and values: a copy, not new state.
    old = {v.label: v.value for v in pzb.select(model).at_instances_of(pzb.StateVariable).get_sequence()}
    new = {v.label: v.value for v in pzb.select(edited).at_instances_of(pzb.StateVariable).get_sequence()}
    assert set(old) == set(new) and all(pzb.tree_equal(old[k], new[k]) for k in old)


def test_share_state_true_keeps_the_old_behaviour():
    model = _cached_gpt()
    steered = insert_intervention(model, KVCachingAttention, AddVector(pzb.nx.wrap(jnp.ones(4), "features")),
                                  share_state=True)
    steered(TOKENS)
    assert _cache_indices(model) == [2]
    kept = pzb.select(model).at_instances_of(KVCachingAttention).apply(lambda a: a, share_state=True)
    assert len(shared_state(model, kept)) == 3


def test_parameters_stay_shared_between_a_copy_and_its_source():
    model = _cached_gpt()
    edited = pzb.select(model).at_instances_of(KVCachingAttention).insert_after(pzb.nn.Identity())
    params = lambda m: {id(p) for p in pzb.select(m).at_instances_of(pzb.Parameter).get_sequence()}  # noqa: E731
    assert params(model) == params(edited)


def test_a_state_variable_put_in_by_the_edit_is_kept():
    counter = pzb.StateVariable(jnp.int32(0), label="mine")
    edited = pzb.select([pzb.StateVariable(1, label="old")]).at(lambda t: t[0]).set(counter)
    assert edited[0] is counter


# Trees of state variables with ties: index lists into a small pool.
_pools = st.integers(1, 4).flatmap(lambda n: st.tuples(st.just(n), st.lists(st.integers(0, n - 1), min_size=1,
                                                                            max_size=6)))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(_pools, st.booleans())
def test_fresh_copies_keep_ties_within_the_copy_and_share_nothing(pool_and_places, shared_param):
    n, places = pool_and_places
    pool = [pzb.StateVariable(np.float32(i), label=f"s{i}") for i in range(n)]
    weight = pzb.Parameter(np.float32(9), label="w")
    tree = {"state": [pool[i] for i in places], "w": weight, "extra": [weight] if shared_param else []}
    edited = pzb.select(tree).at(lambda t: t["w"]).apply(lambda p: p)
    for i, a in enumerate(places):
        for j, b in enumerate(places):
            assert (edited["state"][i] is edited["state"][j]) == (a == b)
        assert edited["state"][i] is not pool[a] and edited["state"][i].label == f"s{a}"
        assert edited["state"][i].value == pool[a].value
    assert edited["w"] is weight
    assert shared_state(tree, edited) == [] and fresh_state(edited, source=tree) is edited


def test_jit_of_a_parameter_only_model_works_and_equals_eager():
    model = build_gpt("g", jax.random.key(0), 5, 1, 1, 4, 8, 4)
    eager = model(TOKENS)
    assert pzb.tree_equal(jax.jit(model)(TOKENS), eager) or np.allclose(
        jax.jit(model)(TOKENS).data_array, eager.data_array, rtol=1e-6, atol=1e-6)
    by_argument = pzb.variable_jit(lambda m, x: m(x))(model, TOKENS)
    np.testing.assert_allclose(by_argument.data_array, eager.data_array, rtol=1e-6, atol=1e-6)


def test_jit_of_a_stateful_model_raises_a_pzbridge_error_naming_the_fix():
    model = _cached_gpt()
    with pytest.raises(VariableError, match=r"made outside the JAX transformation.*pzb\.variable_jit"):
        jax.jit(model)(TOKENS)
    assert _cache_indices(model) == [0]  # Nothing leaked: the cache still holds concrete values.
    assert not isinstance(pzb.select(model).at_instances_of(KVCachingAttention).get().cached_keys.value.data_array,
                          jax.core.Tracer)
    pzb.variable_jit(lambda m, x: m(x))(model, TOKENS)
    assert _cache_indices(model) == [2]


def test_variables_made_inside_a_trace_may_take_traced_values():
    @jax.jit
    def f(x):
        counter = pzb.StateVariable(jnp.zeros(()), label="c")
        counter.value = counter.value + x
        return counter.value

    assert float(f(jnp.float32(2.0))) == 2.0


def test_stateless_call_under_jit_is_unaffected():
    model = _cached_gpt()
    slots, values = pzb.unbind_variables(model, freeze=True)

    @jax.jit
    def run(values, x):
        return pzb.stateless_call(slots, values, x)

    out, new_values = run(values, TOKENS)
    assert dict(out.named_shape) == {"batch": 1, "seq": 2, "vocabulary": 5}
    assert _cache_indices(model) == [0]
