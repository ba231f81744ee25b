"""Capture only shapes, capture every layer, isolate a submodel with its inputs and state."""

from __future__ import annotations

import pathlib
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.core.errors import SelectionError, format_path
from pzbridge.toolshed.capture import Isolated, capture_all, capture_shapes, isolate
from pzbridge.toolshed.intermediates import capture_intermediates
from pzbridge.toolshed.where import Where

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from intervention_models import (
    D_MODEL,
    lifted_tiny_lm,
    nnx_mha,
    pzb_attention,
    stream,
    tokens,
)


def shape_of(value: Any) -> tuple:
    if not pzb.nx.is_namedarray(value):  # a traced constant can be a plain array
        return (None, tuple(jnp.shape(value)), jnp.dtype(value.dtype))
    return (dict(value.named_shape), tuple(value.positional_shape), jnp.dtype(value.dtype))


@settings(max_examples=6, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 3), seq=st.integers(2, 6))
def test_capture_shapes_equals_the_shapes_of_a_real_capture(seed: int, batch: int, seq: int) -> None:
    _, lifted = lifted_tiny_lm(seed)
    x = pzb.nx.wrap(tokens(seed, batch, seq), "batch", "seq")
    site = Where(layer="Linear")
    out_shape, shapes = capture_shapes(lifted, site, x)
    out, values = capture_intermediates(lifted, site, x)
    assert list(shapes) == list(values)
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree_util.tree_leaves(shapes))
    assert {p: shape_of(v) for p, v in shapes.items()} == {p: shape_of(v) for p, v in values.items()}
    assert shape_of(out_shape) == shape_of(out)


def test_capture_all_records_every_innermost_layer_of_a_traced_model() -> None:
    model, lifted = lifted_tiny_lm(0)
    toks = tokens(0, 2, 5)
    x = pzb.nx.wrap(toks, "batch", "seq")
    out, acts = capture_all(lifted, x)
    innermost = pzb.select(lifted).at_instances_of(pzb.nn.Layer, innermost=True).get_keypaths()
    assert list(acts) == [format_path(p) for p in innermost]
    np.testing.assert_array_equal(out.unwrap("batch", "seq", "features"), lifted(x).unwrap("batch", "seq", "features"))
    # The W_O output of layer 0 is that attention's output: compare with the original Equinox code.
    (w_o,) = (format_path(p) for p in Where(label="attns.0.W_O").select(lifted).get_keypaths())
    want = jax.vmap(lambda t: model.attns[0](model.embed[t]))(toks)
    np.testing.assert_allclose(acts[w_o].unwrap("batch", "seq", "features"), want, rtol=1e-5, atol=1e-5)
    _, shapes = capture_all(lifted, x, shapes_only=True)
    assert {p: shape_of(v) for p, v in shapes.items()} == {p: shape_of(v) for p, v in acts.items()}


@pytest.mark.parametrize("make", [pzb_attention, lambda seed: pzb.lift(nnx_mha(seed))], ids=["pzb_nn", "nnx"])
def test_capture_all_on_pzb_and_stock_models_keeps_the_output(make) -> None:
    model = make(1)
    x = pzb.nx.wrap(stream(1, 2, 4, D_MODEL), "batch", "seq", "features")
    out, acts = capture_all(model, x)
    np.testing.assert_array_equal(out.unwrap("batch", "seq", "features"), model(x).unwrap("batch", "seq", "features"))
    weights = [v for p, v in acts.items() if "logits_to_weights" in p and "heads" in v.named_shape]
    assert weights and np.allclose(weights[0].sum("kv_seq").unwrap(*weights[0].sum("kv_seq").named_shape), 1.0,
                                   atol=1e-5)


def _renamed_repeats(values: list[Any]) -> int:
    """How many values only re-wrap arrays of earlier values in another structure (e.g. renamed axes)."""
    seen_leaves: set[int] = set()
    seen: set[Any] = set()
    count = 0
    for value in values:
        leaves, treedef = jax.tree_util.tree_flatten(value)
        key = (id(value),) if not leaves else (treedef, *map(id, leaves))
        if key not in seen and leaves and all(id(leaf) in seen_leaves for leaf in leaves):
            count += 1
        seen.add(key)
        seen_leaves.update(map(id, leaves))
    return count


@settings(max_examples=4, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 3), seq=st.integers(2, 6))
def test_jitted_capture_all_adds_no_equation_and_returns_each_value_once(seed: int, batch: int, seq: int) -> None:
    # The savers are data edits resolved while tracing: the captured program is the plain one with more outputs.
    # Only the model's output (also the last layer's) and values re-wrapped under other axis names repeat.
    _, traced = lifted_tiny_lm(seed)
    cases = [(traced, pzb.nx.wrap(tokens(seed, batch, seq), "batch", "seq")),
             (pzb_attention(seed), pzb.nx.wrap(stream(seed, batch, seq, D_MODEL), "batch", "seq", "features"))]
    for model, x in cases:
        frozen = pzb.freeze_params(model)
        plain = jax.make_jaxpr(lambda m, v: m(v))(frozen, x).jaxpr
        seen: list[Any] = []

        def run(m: Any, v: Any, seen: list[Any] = seen) -> Any:
            out, acts = capture_all(m, v)
            seen[:] = list(acts.values())
            return out, acts

        captured = jax.make_jaxpr(run)(frozen, x).jaxpr
        assert len(captured.eqns) == len(plain.eqns)
        repeats = len(captured.outvars) - len({id(v) for v in captured.outvars})
        assert repeats <= _renamed_repeats(seen) + 1
        assert len(captured.outvars) <= 1 + len(seen)
        _, acts = jax.jit(capture_all)(frozen, x)
        _, eager = capture_all(model, x)
        assert list(acts) == list(eager)
        for path in eager:
            np.testing.assert_allclose(np.asarray(jax.tree_util.tree_leaves(acts[path])),
                                       np.asarray(jax.tree_util.tree_leaves(eager[path])), rtol=1e-5, atol=1e-6)


def test_traced_capture_all_under_jit_writes_fewer_outputs_than_paths() -> None:
    # The traced model passes values on (identity branches, no-op casts): many paths, one output each value.
    _, traced = lifted_tiny_lm(0)
    x = pzb.nx.wrap(tokens(0, 2, 5), "batch", "seq")
    frozen = pzb.freeze_params(traced)
    outvars = jax.make_jaxpr(lambda m, v: capture_all(m, v)[1])(frozen, x).jaxpr.outvars
    paths = len(capture_all(traced, x)[1])
    assert len(outvars) < 0.9 * paths


def test_capture_all_before_records_inputs() -> None:
    model = pzb.nn.Sequential([pzb.nn.Elementwise(jnp.exp), pzb.nn.Elementwise(jnp.negative)])
    _, acts = capture_all(model, pzb.nx.wrap(jnp.zeros(2), "f"), where="before")
    assert [a.unwrap("f").tolist() for a in acts.values()] == [[0.0, 0.0], [1.0, 1.0]]


# -- isolate ------------------------------------------------------------------------------------


@settings(max_examples=6, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16))
def test_isolated_block_reruns_alone_and_matches_the_original_module(seed: int) -> None:
    model, lifted = lifted_tiny_lm(seed)
    x = pzb.nx.wrap(tokens(seed, 2, 5), "batch", "seq")
    block = isolate(lifted, Where(module="attns.1"), x)
    assert isinstance(block, Isolated)
    np.testing.assert_array_equal(block.run().unwrap("batch", "seq", "features"),
                                  block.output.unwrap("batch", "seq", "features"))
    other = pzb.nx.wrap(stream(seed, 2, 5, D_MODEL), "batch", "seq", "features")
    np.testing.assert_allclose(block.run(other).unwrap("batch", "seq", "features"),
                               jax.vmap(model.attns[1])(other.unwrap("batch", "seq", "features")), rtol=1e-5, atol=1e-5)
    jitted = jax.jit(lambda b, v: b.run(v))(block, other)
    np.testing.assert_allclose(jitted.unwrap("batch", "seq", "features"),
                               block.run(other).unwrap("batch", "seq", "features"), rtol=1e-5, atol=1e-6)


@pzb.pytree_dataclass
class CountingAdd(pzb.nn.Layer):
    """Adds the counter's value to the input, then increments the counter."""

    counter: Any

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        y = x + self.counter.value + side_inputs.get("offset", 0.0)
        self.counter.value = self.counter.value + 1.0
        return y


def test_isolate_records_state_as_it_was_when_the_block_ran() -> None:
    counter = pzb.StateVariable(jnp.asarray(10.0), "count")
    model = pzb.nn.Sequential([CountingAdd(counter), pzb.nn.Elementwise(jnp.negative), CountingAdd(counter)])
    x = pzb.nx.wrap(jnp.zeros(2), "f")
    block = isolate(model, Where(path="sublayers[2]"), x, offset=0.5)
    # The first CountingAdd advanced the shared counter to 11 before the second one ran.
    assert block.inputs.unwrap("f").tolist() == [-10.5, -10.5]
    assert block.side_inputs == {"offset": 0.5}
    assert [float(v.value) for v in block.variables] == [11.0]
    assert block.run().unwrap("f").tolist() == block.output.unwrap("f").tolist() == [1.0, 1.0]
    assert float(counter.value) == 10.0  # neither isolate nor run wrote the source's state
    live = block.bound()
    assert live.counter is not counter and float(live.counter.value) == 11.0
    live(x)
    assert float(live.counter.value) == 12.0 and float(counter.value) == 10.0


def test_isolate_needs_exactly_one_layer() -> None:
    model = pzb.nn.Sequential([pzb.nn.Identity(), pzb.nn.Identity()])
    with pytest.raises(SelectionError, match=r"exactly one layer, found 2: \['sublayers\[0\]', 'sublayers\[1\]'\]"):
        isolate(model, Where(layer="Identity"), 1.0)
