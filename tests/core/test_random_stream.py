"""Tests for RandomStream (pzbridge.core.random_stream)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pzbridge.core.errors import StructError, VariableError
from pzbridge.core.random_stream import RandomStream
from pzbridge.core.struct import Struct, pytree_dataclass
from pzbridge.core.variable_jit import variable_jit
from pzbridge.core.variables import StateVariableValue, freeze_variables, stateless_call, unbind_variables

seeds = st.integers(0, 2**31 - 1)
KEY_MAKERS = {"typed": jax.random.key, "raw": jax.random.PRNGKey}


@pytree_dataclass
class _TwoKeys(Struct):
    stream: Any

    def __call__(self) -> tuple[jax.Array, jax.Array]:
        return self.stream.next_key(), self.stream.next_key()


def _data(key: jax.Array) -> list:
    return np.asarray(jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key).tolist()


@given(seeds, st.integers(1, 8), st.sampled_from(sorted(KEY_MAKERS)))
def test_keys_are_fold_in_of_the_offset(seed: int, n: int, kind: str) -> None:
    base = KEY_MAKERS[kind](seed)
    stream = RandomStream.from_base_key(base)
    keys = [stream.next_key() for _ in range(n)]
    # Independent reference: pure jax fold_in with 0..n-1.
    assert [_data(k) for k in keys] == [_data(jax.random.fold_in(base, i)) for i in range(n)]
    assert int(stream.offset.value) == n


@given(seeds, st.integers(2, 12))
def test_streams_are_deterministic_and_keys_distinct(seed: int, n: int) -> None:
    a = RandomStream.from_base_key(jax.random.key(seed))
    b = RandomStream.from_base_key(jax.random.key(seed))
    keys_a = [_data(a.next_key()) for _ in range(n)]
    keys_b = [_data(b.next_key()) for _ in range(n)]
    assert keys_a == keys_b
    assert len({tuple(k) for k in keys_a}) == n


def test_offset_advances_under_variable_jit() -> None:
    stream = RandomStream.from_base_key(jax.random.key(0))

    @variable_jit
    def sample(s: RandomStream) -> jax.Array:
        return jax.random.uniform(s.next_key(), (2,))

    first, second = sample(stream), sample(stream)
    assert int(stream.offset.value) == 2
    expected = jax.random.uniform(jax.random.fold_in(jax.random.key(0), 1), (2,))
    assert second.tolist() == expected.tolist() and first.tolist() != second.tolist()


def test_offset_comes_back_as_new_state_from_stateless_call() -> None:
    stream = RandomStream.from_base_key(jax.random.key(1), label="rng")
    slots, values = unbind_variables(stream, freeze=True)
    (_, k1), (new_offset,) = stateless_call(_TwoKeys(slots), values)
    assert isinstance(new_offset, StateVariableValue) and new_offset.label == "rng" and int(new_offset.value) == 2
    assert int(stream.offset.value) == 0
    assert _data(k1) == _data(jax.random.fold_in(jax.random.key(1), 1))


def test_split_and_fork() -> None:
    stream = RandomStream.from_base_key(jax.random.key(2), label="a")
    keys = stream.split(3)
    assert keys.shape == (3,)
    expected = jax.random.split(jax.random.fold_in(jax.random.key(2), 0), 3)
    assert _data(keys) == _data(expected)
    child = stream.fork("b")
    assert child.offset.label == "b" and int(child.offset.value) == 0 and int(stream.offset.value) == 2
    assert _data(child.next_key()) == _data(jax.random.fold_in(jax.random.fold_in(jax.random.key(2), 1), 0))


def test_frozen_or_unbound_offset_cannot_advance() -> None:
    frozen = freeze_variables(RandomStream.from_base_key(jax.random.key(0)))
    with pytest.raises(VariableError, match="not a mutable StateVariable"):
        frozen.next_key()
    slots, _ = unbind_variables(RandomStream.from_base_key(jax.random.key(0)))
    with pytest.raises(VariableError, match="not a mutable StateVariable"):
        slots.next_key()


@pytest.mark.parametrize("bad", [jnp.zeros(2, jnp.float32), 3, jnp.uint32(7)])
def test_base_key_must_be_a_prng_key(bad: Any) -> None:
    with pytest.raises(StructError, match="must be a JAX PRNG key"):
        RandomStream.from_base_key(bad)
