"""LayerStack against Penzai 0.2.5's documented semantics: from_sublayer_builder, per-layer vs shared
variables, carry through the layers, and state variables whose value is a custom pytree."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.core.errors import NamedAxisError
from pzbridge.nn import AddBias, Affine, Layer, LayerStack, stack_layers

CONFIG = {"name": "block", "input_axes": {"features": 3}, "output_axes": {"features": 3}}


@settings(max_examples=8, derandomize=True)
@given(st.integers(1, 4), st.integers(0, 1000))
def test_from_sublayer_builder_equals_running_the_layers_in_sequence(n, seed):
    key = jax.random.key(seed)
    stack = LayerStack.from_sublayer_builder(Affine.from_config, "layers", n, key, CONFIG)
    assert stack.size == n and stack.axis == "layers"
    x = pzb.nx.wrap(jnp.array([[1.0, -2.0, 0.5]]), "batch", "features")
    expected = x
    for i in range(n):  # the documented construction: layer i built from fold_in(key, i)
        expected = Affine.from_config(init_base_rng=jax.random.fold_in(key, i), **CONFIG)(expected)
    np.testing.assert_allclose(stack(x).unwrap("batch", "features"), expected.unwrap("batch", "features"),
                               rtol=1e-5, atol=1e-6)


def test_builder_without_rng_gives_one_slot_per_label():
    stack = LayerStack.from_sublayer_builder(Affine.from_config, "layers", 2, None, CONFIG)
    assert [type(v).__name__ for v in jax.tree_util.tree_leaves(stack, is_leaf=lambda v: isinstance(v, pzb.ParameterSlot))] == [
        "ParameterSlot", "ParameterSlot"]
    with pytest.raises(NamedAxisError, match="positive int"):
        LayerStack.from_sublayer_builder(Affine.from_config, "layers", 0, None, CONFIG)


def test_stack_layers_stacks_per_layer_values_and_rejects_mismatches():
    a = AddBias(pzb.Parameter(pzb.nx.wrap(jnp.array([1.0, 2.0]), "f"), "b", {"tag": 1}))
    b = AddBias(pzb.Parameter(pzb.nx.wrap(jnp.array([3.0, 4.0]), "f"), "b"))
    body = stack_layers([a, b], "depth")
    assert body.bias.label == "b" and body.bias.metadata == {"tag": 1}
    assert body.bias.value.unwrap("depth", "f").tolist() == [[1.0, 2.0], [3.0, 4.0]]
    out = LayerStack(body, "depth")(pzb.nx.wrap(jnp.zeros(2), "f"))
    assert out.unwrap("f").tolist() == [4.0, 6.0]
    with pytest.raises(NamedAxisError, match=r"layer 1 has variables \['c'\], layer 0 has \['b'\]"):
        stack_layers([a, AddBias(pzb.Parameter(pzb.nx.zeros({"f": 2}), "c"))])
    with pytest.raises(NamedAxisError, match="differs from layer 0 outside its variables"):
        stack_layers([pzb.nn.ConstantRescale(1.0), pzb.nn.ConstantRescale(2.0)])
    with pytest.raises(NamedAxisError, match="already has the stack axis"):
        stack_layers([AddBias(pzb.Parameter(pzb.nx.zeros({"layers": 2}), "b"))])


def test_a_parameter_without_the_axis_is_shared_by_every_layer():
    shared = pzb.Parameter(pzb.nx.wrap(jnp.array(1.0)), "shared")
    stack = LayerStack(AddBias(shared), length=3)
    assert float(stack(pzb.nx.wrap(jnp.array(0.0))).unwrap()) == 3.0


@pzb.pytree_dataclass
class Cache(pzb.Struct):
    calls: Any
    seen: Any


@pzb.pytree_dataclass
class Recorder(Layer):
    """Adds 1 and records, per layer, how often it ran and what it saw."""

    state: Any
    step: Any

    def __call__(self, x, /, **side_inputs):
        cache = self.state.value
        self.state.value = Cache(cache.calls + 1, x)
        return x + self.step.value


def test_state_whose_value_is_a_custom_pytree_is_sliced_and_restacked_leaf_by_leaf():
    state = pzb.StateVariable(Cache(pzb.nx.wrap(jnp.zeros(3), "layers"), pzb.nx.wrap(jnp.float32(0.0))), "cache")
    step = pzb.Parameter(pzb.nx.wrap(jnp.array([1.0, 10.0, 100.0]), "layers"), "step")
    stack = LayerStack(Recorder(state, step))
    out = stack(pzb.nx.wrap(jnp.float32(0.5)))
    assert float(out.unwrap()) == 111.5
    assert isinstance(state.value, Cache)
    assert state.value.calls.unwrap("layers").tolist() == [1.0, 1.0, 1.0]
    assert state.value.seen.unwrap("layers").tolist() == [0.5, 1.5, 11.5]
