"""Tests for stateless_call (pzbridge.core.variables_stateless)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pzbridge.core.errors import VariableConflictError, VariableError
from pzbridge.core.struct import Struct, pytree_dataclass
from pzbridge.core.variables import (
    Parameter,
    ParameterValue,
    StatelessCallable,
    StateVariable,
    StateVariableValue,
    stateless_call,
    unbind_variables,
)

floats = st.floats(-4, 4, allow_nan=False, width=32)


@pytree_dataclass
class CountingAffine(Struct):
    """y = w * x + b; counts calls in a state variable (w may be shared)."""

    w: Any
    b: Any
    calls: Any

    def __call__(self, x: jax.Array) -> jax.Array:
        self.calls.value = self.calls.value + 1
        return self.w.value * x + self.b.value


def _model(w: float, b: float, calls: int = 0) -> CountingAffine:
    return CountingAffine(
        Parameter(jnp.float32(w), "w"), Parameter(jnp.float32(b), "b"), StateVariable(jnp.int32(calls), "calls")
    )


def _reference(w: float, b: float, calls: int, x: float) -> tuple[float, int]:
    """Independent pure-numpy reference of one call."""
    return float(np.float32(w) * np.float32(x) + np.float32(b)), calls + 1


@given(floats, floats, st.integers(0, 5), floats)
def test_stateless_call_equals_direct_mutable_call(w: float, b: float, calls: int, x: float) -> None:
    direct_model = _model(w, b, calls)
    direct_out = direct_model(jnp.float32(x))
    slots, values = unbind_variables(_model(w, b, calls), freeze=True)
    out, new_state = stateless_call(slots, values, jnp.float32(x))
    expected_out, expected_calls = _reference(w, b, calls, x)
    assert float(out) == float(direct_out) == pytest.approx(expected_out)
    assert [s.label for s in new_state] == ["calls"] and isinstance(new_state[0], StateVariableValue)
    assert int(new_state[0].value) == int(direct_model.calls.value) == expected_calls


@given(floats, floats, st.integers(0, 5), floats)
def test_stateless_call_never_mutates_caller_objects(w: float, b: float, calls: int, x: float) -> None:
    model = _model(w, b, calls)
    held = [model.w.value, model.b.value, model.calls.value]
    _, values = unbind_variables(model, freeze=True)
    out, new_state = stateless_call(model, (), jnp.float32(x))  # Variables still bound: copied.
    assert [model.w.value, model.b.value, model.calls.value] == held  # Same array objects.
    assert all(a is b for a, b in zip([v.value for v in values], held))
    assert int(new_state[0].value) == calls + 1


def test_stateless_call_works_under_jit_and_grad() -> None:
    slots, values = unbind_variables(_model(3.0, 1.0), freeze=True)
    params = tuple(v for v in values if isinstance(v, ParameterValue))
    state = tuple(v for v in values if isinstance(v, StateVariableValue))

    @jax.jit
    def loss(params: tuple, state: tuple, x: jax.Array) -> tuple[jax.Array, tuple]:
        out, new_state = stateless_call(slots, params + state, x)
        return out**2, new_state

    (value, new_state), grads = jax.value_and_grad(loss, has_aux=True)(params, state, jnp.float32(2.0))
    # d/dw (w x + b)^2 = 2 (w x + b) x = 2 * 7 * 2; d/db = 2 * 7.
    assert float(value) == 49.0
    assert [g.label for g in grads] == ["w", "b"]
    assert float(grads[0].value) == 28.0 and float(grads[1].value) == 14.0
    assert int(new_state[0].value) == 1 and int(state[0].value) == 0


def test_given_values_override_variables_still_bound() -> None:
    model = _model(3.0, 1.0)
    out, _ = stateless_call(model, [ParameterValue(jnp.float32(10.0), "w")], jnp.float32(2.0))
    assert float(out) == 21.0 and float(model.w.value) == 3.0


def test_shared_variable_gets_one_fresh_copy() -> None:
    w = Parameter(jnp.float32(2.0), "w")

    @pytree_dataclass
    class Tied(Struct):
        a: Any
        b: Any

        def __call__(self) -> bool:
            return self.a is self.b

    slots, values = unbind_variables(Tied(w, w), freeze=True)
    assert stateless_call(slots, values) == (True, ())


def test_state_in_arguments_is_returned_in_order() -> None:
    model = _model(1.0, 0.0)
    extra = StateVariable(jnp.int32(7), "extra")

    @pytree_dataclass
    class UsesExtra(Struct):
        inner: Any

        def __call__(self, x: jax.Array, counter: Any) -> jax.Array:
            counter.value = counter.value * 2
            return self.inner(x)

    slots, values = unbind_variables(UsesExtra(model), freeze=True)
    _, new_state = stateless_call(slots, values, jnp.float32(1.0), extra)
    assert [s.label for s in new_state] == ["calls", "extra"]
    assert int(new_state[1].value) == 14 and int(extra.value) == 7


def test_stateless_call_errors() -> None:
    slots, values = unbind_variables(_model(1.0, 0.0), freeze=True)
    with pytest.raises(VariableError, match="expects frozen values"):
        stateless_call(slots, [Parameter(1.0, "w")], 1.0)
    with pytest.raises(VariableError, match="has no variable to bind"):
        stateless_call(slots, values[:1], 1.0)
    with pytest.raises(VariableError, match="no slot in the tree"):
        stateless_call(slots, values + (ParameterValue(0.0, "unused"),), 1.0)
    with pytest.raises(VariableConflictError):
        stateless_call(slots, values + (values[0],), 1.0)

    @pytree_dataclass
    class Leaky(Struct):
        w: Any

        def __call__(self) -> Any:
            return {"escaped": self.w}

    with pytest.raises(VariableError, match=r"escaped.*unbind_variables\(x, freeze=True\)"):
        stateless_call(Leaky(Parameter(1.0, "w")), ())


def test_partial_stateless_call_is_a_stateless_callable() -> None:
    slots, values = unbind_variables(_model(2.0, 0.0), freeze=True)
    fn: StatelessCallable = functools.partial(stateless_call, slots)
    assert isinstance(fn, StatelessCallable)
    assert float(fn(values, jnp.float32(3.0))[0]) == 6.0
