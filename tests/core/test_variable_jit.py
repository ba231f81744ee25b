"""Tests for variable_jit (pzbridge.core.variable_jit)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pzbridge.core.errors import VariableError
from pzbridge.core.struct import Struct, pytree_dataclass
from pzbridge.core.variable_base import AbstractVariable
from pzbridge.core.variable_jit import variable_jit
from pzbridge.core.variables import Parameter, StateVariable


@pytree_dataclass
class Box(Struct):
    content: Any


def _counter(start: int = 0, label: str = "count") -> StateVariable:
    return StateVariable(jnp.int32(start), label)


@st.composite
def variable_trees(draw: st.DrawFn) -> tuple[list[Any], Any]:
    """(pool, tree): random lists/dicts/structs over a pool of variables with
    random sharing, plus array leaves; values are small float vectors."""
    n = draw(st.integers(1, 5))
    pool = [
        draw(st.sampled_from([Parameter, StateVariable]))(
            jnp.asarray(draw(st.lists(st.integers(-3, 3), min_size=2, max_size=2)), jnp.float32), f"v{i}"
        )
        for i in range(n)
    ]
    leaf = st.one_of(st.sampled_from(pool), st.integers(-2, 2).map(lambda i: jnp.full((2,), i, jnp.float32)))
    tree = draw(
        st.recursive(
            leaf,
            lambda c: st.one_of(st.lists(c, min_size=1, max_size=3), st.dictionaries(st.sampled_from("xyz"), c, min_size=1, max_size=2), c.map(Box)),
            max_leaves=8,
        )
    )
    return pool, tree


def _step(tree: Any, scale: jax.Array) -> jax.Array:
    """Reads every leaf; doubles every StateVariable (once per occurrence)."""
    total = jnp.zeros(2, jnp.float32)
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, AbstractVariable):
            total = total + leaf.value
            if isinstance(leaf, StateVariable):
                leaf.value = leaf.value * 2 + 1
        else:
            total = total + leaf
    return total * scale


def _reference(tree: Any, scale: float) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Independent numpy reference of _step on copied values, keyed by variable id."""
    values = {}
    total = np.zeros(2, np.float32)
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, AbstractVariable):
            current = values.setdefault(id(leaf), np.asarray(leaf.value))
            total = total + current
            if isinstance(leaf, StateVariable):
                values[id(leaf)] = current * 2 + 1
        else:
            total = total + np.asarray(leaf)
    return total * np.float32(scale), values


@given(variable_trees(), st.sampled_from([0.5, 2.0]))
def test_outputs_and_state_equal_the_unjitted_function(case: tuple[list[Any], Any], scale: float) -> None:
    pool, tree = case
    expected_out, expected_values = _reference(tree, scale)
    params_before = {id(v): v.value for v in pool if isinstance(v, Parameter)}
    out = variable_jit(_step)(tree, jnp.float32(scale))
    np.testing.assert_allclose(np.asarray(out), expected_out)
    for var in pool:
        if id(var) in expected_values:
            np.testing.assert_allclose(np.asarray(var.value), expected_values[id(var)])
        if isinstance(var, Parameter):
            assert var.value is params_before[id(var)]  # Never assigned: untouched.


@given(st.integers(1, 6))
def test_state_is_written_back_to_the_original_variable(calls: int) -> None:
    count = _counter()

    @variable_jit
    def tick(c: StateVariable) -> None:
        c.value = c.value + 1

    for _ in range(calls):
        tick(c=count)
    assert int(count.value) == calls


def test_assigned_parameters_are_written_back() -> None:
    w = Parameter(jnp.ones(3), "w")
    b = Parameter(jnp.zeros(3), "b")
    b_before = b.value

    @variable_jit
    def sgd(params: dict, lr: jax.Array) -> None:
        params["w"].value = params["w"].value - lr

    sgd({"w": w, "b": b}, jnp.float32(0.5))
    assert w.value.tolist() == [0.5, 0.5, 0.5] and b.value is b_before


def test_sharing_is_kept_inside_the_trace_and_after() -> None:
    shared = StateVariable(jnp.int32(0), "shared")
    seen = []

    @variable_jit
    def bump(tree: dict) -> None:
        seen.append(tree["a"] is tree["b"][0] and tree["a"] is not shared)
        tree["a"].value = tree["a"].value + 1
        tree["b"][0].value = tree["b"][0].value + 10

    bump({"a": shared, "b": [shared]})
    assert seen == [True] and int(shared.value) == 11


def test_no_retrace_for_same_structure_even_with_new_objects_and_values() -> None:
    traces = []

    @variable_jit
    def f(model: Box, x: jax.Array) -> jax.Array:
        traces.append(1)
        model.content[1].value = model.content[1].value + 1
        return model.content[0].value * x

    def build(v: float) -> Box:
        return Box([Parameter(jnp.full((2,), v), "w"), _counter()])

    for v in [1.0, 2.0, 3.0]:
        model = build(v)
        out = f(model, jnp.ones(2))
        assert out.tolist() == [v, v] and int(model.content[1].value) == 1
    assert len(traces) == 1


@pytest.mark.parametrize(
    "second",
    [
        lambda w, c: ([w, c, w],),  # Different tree structure.
        lambda w, c: ([w, _counter(label="other")],),  # Different label.
        lambda w, c: ([w, c], 3),  # Extra static leaf.
        lambda w, c: ([Parameter(w.value, "count"), StateVariable(c.value, "w")],),  # Kinds swapped.
    ],
)
def test_retrace_when_structure_labels_or_statics_change(second: Any) -> None:
    traces = []

    @variable_jit
    def f(tree: list, k: int = 1) -> jax.Array:
        traces.append(1)
        return sum(leaf.value.sum() for leaf in tree) * k

    w, c = Parameter(jnp.ones(2), "w"), _counter(1)
    f([w, c])
    f([w, c])
    assert len(traces) == 1
    f(*second(w, c))
    assert len(traces) == 2


def test_retrace_when_sharing_pattern_changes() -> None:
    traces = []

    @variable_jit
    def f(a: Parameter, b: Parameter) -> jax.Array:
        traces.append(a is b)
        return a.value + b.value

    w = Parameter(jnp.ones(()), "w")
    f(w, w)
    f(w, Parameter(jnp.ones(()), "w"))  # Same labels, but two objects now.
    f(w, w)
    assert traces == [True, False]


def test_static_leaves_are_static() -> None:
    traces = []

    @variable_jit
    def f(x: jax.Array, n: int, name: str, fn: Any) -> jax.Array:
        traces.append((n, name))
        return fn(x) * n

    assert float(f(jnp.float32(2.0), 3, "a", jnp.sin)) == pytest.approx(3 * np.sin(2.0), rel=1e-6)
    f(jnp.float32(5.0), 3, "a", jnp.sin)
    f(jnp.float32(5.0), 4, "a", jnp.sin)
    f(jnp.float32(5.0), 4, "b", jnp.sin)
    assert traces == [(3, "a"), (4, "a"), (4, "b")]


def test_returned_variables_are_the_originals() -> None:
    w, c = Parameter(jnp.ones(2), "w"), _counter()

    @variable_jit
    def f(model: dict) -> Any:
        model["c"].value = model["c"].value + 1
        return {"param": model["w"], "state": model["c"], "sum": model["w"].value.sum()}

    out = f({"w": w, "c": c})
    assert out["param"] is w and out["state"] is c and float(out["sum"]) == 2.0 and int(c.value) == 1


def test_returning_a_variable_created_inside_raises() -> None:
    @variable_jit
    def f(x: jax.Array) -> Any:
        return {"new": Parameter(x, "fresh")}

    with pytest.raises(VariableError, match=r"\['new'\].*created inside"):
        f(jnp.ones(2))


def test_donate_variables_still_writes_back() -> None:
    w, c = Parameter(jnp.ones(2), "w"), _counter()

    @variable_jit(donate_variables=True)
    def f(w: Parameter, c: StateVariable) -> jax.Array:
        c.value = c.value + 1
        return w.value * 2

    for _ in range(2):
        out = f(w, c)
    assert out.tolist() == [2.0, 2.0] and w.value.tolist() == [1.0, 1.0] and int(c.value) == 2


def test_method_decoration_binds_self() -> None:
    @pytree_dataclass
    class Counter(Struct):
        n: Any

        @variable_jit
        def tick(self, by: jax.Array) -> jax.Array:
            self.n.value = self.n.value + by
            return self.n.value

    counter = Counter(_counter())
    counter.tick(jnp.int32(2))
    assert int(counter.tick(jnp.int32(3))) == 5 and int(counter.n.value) == 5


def test_works_inside_an_outer_jit() -> None:
    @variable_jit
    def inner(c: StateVariable) -> None:
        c.value = c.value + 1

    @jax.jit
    def outer(start: jax.Array) -> jax.Array:
        c = StateVariable(start, "c")
        inner(c)
        inner(c)
        return c.value

    assert int(outer(jnp.int32(5))) == 7


def test_errors() -> None:
    with pytest.raises(VariableError, match="static_argnums"):
        variable_jit(lambda x: x, static_argnums=0)
    f = variable_jit(lambda x, s: x)
    with pytest.raises(VariableError, match=r"\[0\]\[1\] of type set"):
        f(jnp.ones(()), {1, 2})
    g = variable_jit(lambda v: v.value)
    with pytest.raises(VariableError, match="unhashable metadata"):
        g(Parameter(jnp.ones(()), "w", metadata={"bad": [1]}))
    assert float(g(Parameter(jnp.ones(()), "w", metadata={"ok": (1,)}))) == 1.0


def test_pytree_valued_variables_round_trip() -> None:
    kernel = Parameter({"w": jnp.ones((2, 2)), "b": (jnp.zeros(2),)}, "kernel")
    stats = StateVariable({"mean": jnp.zeros(2)}, "stats")

    @variable_jit
    def f(k: Parameter, s: StateVariable, x: jax.Array) -> jax.Array:
        y = k.value["w"] @ x + k.value["b"][0]
        s.value = {"mean": s.value["mean"] + y}
        return y

    out = f(kernel, stats, jnp.array([1.0, 2.0]))
    assert out.tolist() == [3.0, 3.0] and stats.value["mean"].tolist() == [3.0, 3.0]
    assert set(kernel.value) == {"w", "b"}
