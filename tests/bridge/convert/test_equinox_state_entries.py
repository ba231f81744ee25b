"""Custom Equinox modules that read and set ``eqx.nn.State`` entries of their own ``StateIndex`` es.

A step counter, an EMA buffer, a fixed-size KV cache: written
``state.get(self.index)`` / ``state = state.set(self.index, new)`` in the
module's own ``__call__``. Traced lifting reads each entry as a
``StateVariable`` and stores the new values after each call; lowering gives
the original class and ``lower_with_state`` the current State; edited glue
lowers to a stateful adapter; conversion to NNX and back keeps the entries.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from classifier_steps import equinox_classifier_run, nnx_classifier_losses
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.bridge.equinox.state import lower_with_state
from pzbridge.bridge.equinox.state_entries import StateEntry
from pzbridge.bridge.tracing.state_writes import WritesState
from pzbridge.core.errors import LiftError, NamedAxisError
from pzbridge.nn.dataflow import Traced
from pzbridge.nn.foreign import Foreign
from pzbridge.nn.named_ops import ApplyPrimitive
from pzbridge.testing.stateful_equinox import WarmupBlock, run_batch


def _clone(state: eqx.nn.State) -> eqx.nn.State:
    """A copy of ``state`` (Equinox spends a State once it is set)."""
    leaves, treedef = jax.tree_util.tree_flatten(state)
    return jax.tree_util.tree_unflatten(treedef, leaves)


class Tracker(eqx.Module):
    """A linear layer that counts its calls and keeps an EMA of its outputs in its own State entries."""

    linear: eqx.nn.Linear
    count: eqx.nn.StateIndex
    ema: eqx.nn.StateIndex
    momentum: float = eqx.field(static=True)

    def __init__(self, width: int, key: jax.Array, momentum: float = 0.9) -> None:
        self.linear = eqx.nn.Linear(width, width, key=key)
        self.count = eqx.nn.StateIndex(jnp.array(0))  # weakly typed, as real code writes it
        self.ema = eqx.nn.StateIndex(jnp.zeros(width))
        self.momentum = momentum

    def __call__(self, x: jax.Array, state: eqx.nn.State) -> tuple[jax.Array, eqx.nn.State]:
        y = self.linear(x)
        ema = state.get(self.ema)
        state = state.set(self.count, state.get(self.count) + 1)
        state = state.set(self.ema, self.momentum * ema + (1 - self.momentum) * y)
        return y + ema, state


class WarmupNet(eqx.Module):
    """Warm-up blocks in a list, the State threaded by hand, then a readout."""

    blocks: list[WarmupBlock]
    head: eqx.nn.Linear

    def __init__(self, width: int, depth: int, key: jax.Array) -> None:
        keys = jax.random.split(key, depth + 1)
        self.blocks = [WarmupBlock(width, k, warmup=2.0 + i) for i, k in enumerate(keys[:-1])]
        self.head = eqx.nn.Linear(width, 2, key=keys[-1])

    def __call__(self, x: jax.Array, state: eqx.nn.State) -> tuple[jax.Array, eqx.nn.State]:
        for block in self.blocks:
            x, state = block(x, state)
        return self.head(x), state


class CachedAttention(eqx.Module):
    """One-token decoding step of single-head attention over a fixed-size KV cache kept in the State."""

    qkv: eqx.nn.Linear
    out: eqx.nn.Linear
    cache: eqx.nn.StateIndex
    width: int = eqx.field(static=True)
    length: int = eqx.field(static=True)

    def __init__(self, width: int, length: int, key: jax.Array) -> None:
        k1, k2 = jax.random.split(key)
        self.qkv = eqx.nn.Linear(width, 3 * width, key=k1)
        self.out = eqx.nn.Linear(width, width, key=k2)
        self.cache = eqx.nn.StateIndex((jnp.zeros((length, width)), jnp.zeros((length, width)), jnp.array(0)))
        self.width, self.length = width, length

    def __call__(self, x: jax.Array, state: eqx.nn.State) -> tuple[jax.Array, eqx.nn.State]:
        q, k, v = jnp.split(self.qkv(x), 3)
        keys, values, position = state.get(self.cache)
        keys = jax.lax.dynamic_update_slice(keys, k[None], (position, 0))
        values = jax.lax.dynamic_update_slice(values, v[None], (position, 0))
        scores = jnp.where(jnp.arange(self.length) <= position, keys @ q / jnp.sqrt(self.width), -jnp.inf)
        attended = jax.nn.softmax(scores) @ values
        return self.out(attended), state.set(self.cache, (keys, values, position + 1))


def _named(x: jax.Array) -> Any:
    return pzb.nx.wrap(x, "features")


def test_a_module_setting_its_own_entries_is_traced_and_updates_them_as_equinox() -> None:
    model, state = eqx.nn.make_with_state(Tracker)(3, jax.random.key(0))
    x = jnp.arange(3.0)
    lifted = pzb.lift(model, x, state, strict=True)
    assert isinstance(lifted.body, Traced) and isinstance(lifted.body.body, WritesState)
    entries = pzb.select(lifted).at_instances_of(StateEntry).get_sequence()
    assert sorted(v.label for e in entries for v in e.variables) == ["count", "ema"]
    # The entries hold the very variables the body writes.
    assert {id(v) for e in entries for v in e.variables} == {id(t) for t in lifted.body.body.targets}
    reference = _clone(state)
    for step in range(3):
        xt = x + step
        want, reference = model(xt, reference)
        np.testing.assert_allclose(lifted(_named(xt)).unwrap("features"), want, atol=1e-6)
    back, back_state = lower_with_state(lifted)
    assert type(back) is Tracker and back.count.marker == model.count.marker
    assert int(back_state.get(back.count)) == 3
    np.testing.assert_allclose(back_state.get(back.ema), reference.get(model.ema), atol=1e-6)
    again, _ = back(x, back_state)
    want, _ = model(x, reference)
    np.testing.assert_allclose(again, want, atol=1e-6)
    model(x, state)  # the user's State was not spent by lifting


def test_entries_are_state_under_variable_jit_and_calls_match_eager() -> None:
    model, state = eqx.nn.make_with_state(Tracker)(4, jax.random.key(1), momentum=0.5)
    x = jax.random.normal(jax.random.key(2), (4,))
    eager, jitted = pzb.lift(model, x, state), pzb.lift(model, x, state)
    call = pzb.variable_jit(lambda m, a: m(a))
    for _ in range(3):
        np.testing.assert_allclose(call(jitted, _named(x)).unwrap("features"),
                                   eager(_named(x)).unwrap("features"), atol=1e-6)
    assert int(jitted.body.extras["count"].variables[0].value.unwrap()) == 3


def test_blocks_with_counters_lift_lower_and_convert_to_nnx_and_back() -> None:
    model, state = eqx.nn.make_with_state(WarmupNet)(4, 3, jax.random.key(3))
    xs = jax.random.normal(jax.random.key(4), (5, 4))
    lifted = pzb.lift(model, xs[0], state, strict=True)
    reference = _clone(state)
    for _ in range(3):
        want, reference = model(xs[0], reference)
        np.testing.assert_allclose(lifted(_named(xs[0])).unwrap("features"), want, atol=1e-5)
    back, back_state = lower_with_state(lifted)
    assert type(back) is WarmupNet and [float(back_state.get(b.step)) for b in back.blocks] == [3.0, 3.0, 3.0]

    converted = pzb.convert(model, xs[0], state, to="nnx")
    reference = _clone(state)
    for _ in range(2):  # a batch call advances each counter once, as Equinox's named vmap does
        want, reference = run_batch(model, xs, reference)
        np.testing.assert_allclose(converted(xs), want, atol=1e-5)
    counters = jax.tree_util.tree_leaves(nnx.state(converted, nnx.Variable))
    assert all(isinstance(leaf, jax.Array) for leaf in counters)  # raw arrays, no pzbridge type inside NNX
    back = pzb.convert(converted, xs, to="equinox")
    assert type(back) is WarmupNet and all(type(b) is WarmupBlock for b in back.blocks)
    back_state = eqx.nn.State(back)
    assert [float(back_state.get(b.step)) for b in back.blocks] == [2.0, 2.0, 2.0]
    got, _ = run_batch(back, xs, back_state)
    want, _ = run_batch(model, xs, reference)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_converted_counters_advance_while_nnx_and_equinox_train() -> None:
    model, state = eqx.nn.make_with_state(WarmupNet)(3, 2, jax.random.key(5))
    xs = jax.random.normal(jax.random.key(6), (8, 3))
    labels = jnp.arange(8) % 2
    converted = pzb.convert(model, xs[0], state, to="nnx")
    losses = nnx_classifier_losses(converted, xs, labels, 20)
    assert losses[-1] < losses[0]
    back = pzb.convert(converted, xs, to="equinox")
    back_state = eqx.nn.State(back)
    assert [float(back_state.get(b.step)) for b in back.blocks] == [20.0, 20.0]
    back, back_state, eqx_losses = equinox_classifier_run(back, back_state, xs, labels, 10)
    assert eqx_losses[-1] < eqx_losses[0]
    assert [float(back_state.get(b.step)) for b in back.blocks] == [30.0, 30.0]


def test_a_kv_cache_in_the_state_decodes_as_equinox_and_refuses_a_shared_batch() -> None:
    model, state = eqx.nn.make_with_state(CachedAttention)(4, 6, jax.random.key(7))
    tokens = jax.random.normal(jax.random.key(8), (4, 4))
    lifted = pzb.lift(model, tokens[0], state, strict=True)
    reference = _clone(state)
    for token in tokens:
        want, reference = model(token, reference)
        np.testing.assert_allclose(lifted(_named(token)).unwrap("features"), want, atol=1e-5)
    back, back_state = lower_with_state(lifted)
    assert type(back) is CachedAttention and int(back_state.get(back.cache)[2]) == 4
    for got, want in zip(back_state.get(back.cache), reference.get(model.cache)):
        np.testing.assert_allclose(got, want, atol=1e-6)
    # One cache cannot hold the keys of every example of a batch (Equinox's named vmap refuses it too).
    with pytest.raises(NamedAxisError, match="depends on each example"):
        lifted(pzb.nx.wrap(tokens, "batch", "features"))


def test_edited_glue_lowers_to_a_stateful_adapter_carrying_the_entries() -> None:
    model, state = eqx.nn.make_with_state(Tracker)(3, jax.random.key(9))
    x = jnp.arange(3.0)
    lifted = pzb.lift(model, x, state)
    output_add = pzb.select(lifted).at_instances_of(ApplyPrimitive).where(
        lambda p: p.primitive.name == "add" and p.operand_order == (("input", 0), ("constant", 0)))
    assert output_add.count() == 1  # y + ema
    edited = output_add.apply(lambda add: pzb.nn.Sequential([add, pzb.nn.Elementwise(jnp.negative)]))
    adapter = pzb.lower(edited)
    assert adapter.is_stateful()
    adapter_state, reference = eqx.nn.State(adapter), _clone(state)
    for step in range(3):
        got, adapter_state = adapter(x + step, adapter_state)
        want, reference = model(x + step, reference)
        np.testing.assert_allclose(got, -want, atol=1e-6)
    relifted = pzb.lift(adapter, state=adapter_state)  # the entries come back from the adapter's State
    want, reference = model(x, reference)
    np.testing.assert_allclose(relifted(_named(x)).unwrap("features"), -want, atol=1e-6)


class ReadsABuffer(eqx.Module):
    """Reads a fixed buffer from its State entry and never sets it."""

    linear: eqx.nn.Linear
    offset: eqx.nn.StateIndex

    def __call__(self, x: jax.Array, state: eqx.nn.State) -> tuple[jax.Array, eqx.nn.State]:
        return self.linear(x) + state.get(self.offset), state


class DropsItsWrite(eqx.Module):
    """Sets an entry but returns only the output: Equinox drops the new State, so the entry keeps its value."""

    index: eqx.nn.StateIndex

    def __call__(self, x: jax.Array, state: eqx.nn.State) -> jax.Array:
        state.set(self.index, state.get(self.index) + 1)
        return x * 2


class GrowsItsEntry(eqx.Module):
    """Sets an entry to a value of another shape (Equinox's State.set refuses it)."""

    index: eqx.nn.StateIndex

    def __call__(self, x: jax.Array, state: eqx.nn.State) -> tuple[jax.Array, eqx.nn.State]:
        return x, state.set(self.index, jnp.concatenate([state.get(self.index), x]))


def test_read_only_and_dropped_entries_are_kept_unchanged() -> None:
    key = jax.random.key(10)
    reader, state = eqx.nn.make_with_state(ReadsABuffer)(eqx.nn.Linear(2, 2, key=key),
                                                         eqx.nn.StateIndex(jnp.array([1.0, -1.0])))
    lifted = pzb.lift(reader, jnp.ones(2), state, strict=True)
    assert not pzb.select(lifted).at_instances_of(WritesState).count()
    want, _ = reader(jnp.ones(2), _clone(state))
    np.testing.assert_allclose(lifted(_named(jnp.ones(2))).unwrap("features"), want, atol=1e-6)
    back, back_state = lower_with_state(lifted)
    np.testing.assert_array_equal(back_state.get(back.offset), [1.0, -1.0])

    dropper, state = eqx.nn.make_with_state(DropsItsWrite)(eqx.nn.StateIndex(jnp.array(5.0)))
    lifted = pzb.lift(dropper, jnp.ones(2), state, strict=True)
    lifted(_named(jnp.ones(2)))
    _, back_state = lower_with_state(lifted)
    assert float(back_state.get(dropper.index)) == 5.0


def test_an_entry_set_to_another_shape_stays_foreign_naming_why() -> None:
    model, state = eqx.nn.make_with_state(GrowsItsEntry)(eqx.nn.StateIndex(jnp.zeros(2)))
    assert isinstance(pzb.lift(model, jnp.ones(2), state).body, Foreign)
    with pytest.raises(LiftError, match="another structure, shape or dtype"):
        pzb.lift(model, jnp.ones(2), state, strict=True)


@settings(max_examples=15, database=None, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(width=st.integers(1, 4), momentum=st.sampled_from([0.0, 0.5, 0.9]), calls=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_lifted_entries_follow_equinox_call_after_call_and_lower_back(width: int, momentum: float, calls: int,
                                                                      seed: int) -> None:
    model, state = eqx.nn.make_with_state(Tracker)(width, jax.random.key(seed), momentum=momentum)
    xs = jax.random.normal(jax.random.key(seed + 1), (calls, width))
    lifted = pzb.lift(model, xs[0], state, strict=True)
    reference = _clone(state)
    for x in xs:
        want, reference = model(x, reference)
        np.testing.assert_allclose(lifted(_named(x)).unwrap("features"), want, atol=1e-5, rtol=1e-5)
    back, back_state = lower_with_state(lifted)
    assert type(back) is Tracker
    assert int(back_state.get(back.count)) == calls
    np.testing.assert_allclose(back_state.get(back.ema), reference.get(model.ema), atol=1e-5, rtol=1e-5)
