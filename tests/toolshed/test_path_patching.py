"""Path patching and multi-source interchange on a worlds axis, against separate runs and hand-computed references.

The separate-run reference is the three-pass recipe written with the
ordinary tools (capture, ``Patch``, ``AddVector``): (1) capture the source's
sender and the clean run's frozen components and receivers; (2) rerun clean
with the sender patched from the source and the components patched clean,
capture the receivers; (3) rerun clean adding, at each receiver, what pass 2
changed there.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.core.errors import NamedAxisError, PzbridgeError, SelectionError
from pzbridge.toolshed.intermediates import capture_intermediates
from pzbridge.toolshed.interventions import (
    AddVector,
    Patch,
    insert_intervention,
    patch_activations,
)
from pzbridge.toolshed.path_patching import (
    SelectWorlds,
    TransferWorlds,
    interchange,
    patch_paths,
    residual_deltas,
)
from pzbridge.toolshed.where import Where
from pzbridge.toolshed.worlds import stack_worlds, unstack_worlds

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from intervention_models import D_MODEL, HEADS, lifted_tiny_lm, stream, tokens

TOL = {"rtol": 2e-5, "atol": 2e-5}


# -- the three kinds of model -------------------------------------------------------------------------


def pzb_two_layer(seed: int) -> pzb.nn.Sequential:
    """Two residual attention layers and a final linear map, all pzb.nn."""
    ks = jax.random.split(jax.random.key(seed), 3)
    attn = [pzb.nn.Attention.from_config(f"attn{i}", ks[i], d_model=D_MODEL, num_heads=HEADS, qk_size=2)
            for i in range(2)]
    head = pzb.nn.Linear.from_config("head", ks[2], {"features": D_MODEL}, {"features": D_MODEL})
    return pzb.nn.Sequential([pzb.nn.Residual(attn[0]), pzb.nn.Residual(attn[1]), head])


def stock_chain(seed: int) -> Any:
    """Stock Equinox layers, lifted by their rules: Linear, tanh, Linear, tanh, Linear."""
    ks = jax.random.split(jax.random.key(seed), 3)
    model = eqx.nn.Sequential([eqx.nn.Linear(3, 4, key=ks[0]), eqx.nn.Lambda(jnp.tanh), eqx.nn.Linear(4, 4, key=ks[1]),
                               eqx.nn.Lambda(jnp.tanh), eqx.nn.Linear(4, 2, key=ks[2])])
    return pzb.lift(model)


@dataclasses.dataclass(frozen=True)
class Case:
    """A model kind with a path (sender, receivers, frozen components) and its inputs."""

    name: str
    sender: Where
    receivers: tuple[Where, ...]
    freeze: tuple[Where, ...]

    def model(self, seed: int) -> Any:
        if self.name.startswith("pzb"):
            return pzb_two_layer(seed)
        if self.name.startswith("stock"):
            return stock_chain(seed)
        return lifted_tiny_lm(seed)[1]

    def inputs(self, seed: int, n: int) -> list[Any]:
        if self.name.startswith("pzb"):
            return [pzb.nx.wrap(stream(seed + w, 2, 4, D_MODEL), "batch", "seq", "features") for w in range(n)]
        if self.name.startswith("stock"):
            return [pzb.nx.wrap(stream(seed + w, 2, 3), "batch", "features") for w in range(n)]
        return [pzb.nx.wrap(tokens(seed + w, 2, 5), "batch", "seq") for w in range(n)]


CASES = [
    # One head of layer 0 -> layer 1's input (its residual skip keeps the clean stream).
    Case("pzb head to next layer", Where(label="attn0.output.weights", side="before", index={"heads": 1}),
         (Where(path="sublayers[1].delta", side="before"),), (Where(path="sublayers[1].delta"),)),
    # Layer 0 -> the query of one head of layer 1, and the direct path to the final map.
    Case("pzb layer to a query head and the output", Where(path="sublayers[0].delta"),
         (Where(label="attn1.query.weights", index={"heads": 2}), Where(label="head.weights", side="before")),
         (Where(path="sublayers[1].delta"),)),
    # The first linear's output -> both later linears' inputs, the middle linear frozen.
    Case("stock chain", Where(label="layers.0.bias"),
         (Where(label="layers.2.weight", side="before"), Where(label="layers.4.weight", side="before")),
         (Where(label="layers.2.bias"),)),
    # One head of layer 0 -> layer 1 (frozen) and the logits.
    Case("traced head to layer and logits", Where(label="attns.0.W_O", side="before", index={"heads": 0}),
         (Where(module="attns.1", side="before"), Where(label="unembed", side="before")), (Where(module="attns.1"),)),
    # Layer 0 -> layer 1's keys only, at the last two positions.
    Case("traced layer to keys", Where(module="attns.0"),
         (Where(label="attns.1.W_K", index={"seq": [3, 4]}),), (Where(module="attns.1"),)),
]


def values(y: Any) -> np.ndarray:
    names = sorted(y.named_shape)
    return np.asarray(y.unwrap(*names))


# -- the separate-run reference ------------------------------------------------------------------------


def whole(at: Where) -> Where:
    return dataclasses.replace(at, index=())


def capture(model: Any, at: Where, x: Any) -> Any:
    _, captured = capture_intermediates(model, whole(at), x, where=at.side)
    assert len(captured) == 1, list(captured)
    return next(iter(captured.values()))


def separate_runs(model: Any, case: Case, clean: Any, source: Any) -> Any:
    sent = capture(model, case.sender, source)
    frozen = [capture(model, f, clean) for f in case.freeze]
    before = [capture(model, r, clean) for r in case.receivers]
    second = model
    for at, value in zip(case.freeze, frozen):
        second = insert_intervention(second, at, Patch(value))
    second = insert_intervention(second, case.sender, Patch(sent))
    after = [capture(second, r, clean) for r in case.receivers]
    third = model
    for at, old, new in zip(case.receivers, before, after):
        third = insert_intervention(third, at, AddVector(new - old))
    return third(clean)


# -- laws ----------------------------------------------------------------------------------------------


@settings(max_examples=5, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), case=st.sampled_from(range(len(CASES))),
       routes=st.lists(st.integers(0, 2), min_size=3, max_size=3))
def test_one_worlds_pass_equals_separate_path_patched_runs(seed: int, case: int, routes: list[int]) -> None:
    c = CASES[case]
    model = c.model(seed)
    inputs = c.inputs(seed, 3)
    patched = patch_paths(model, c.sender, list(c.receivers), routes, freeze=list(c.freeze))
    worlds = unstack_worlds(patched(stack_worlds(inputs)))
    for w, source in enumerate(routes):
        expected = model(inputs[w]) if source == w else separate_runs(model, c, inputs[w], inputs[source])
        np.testing.assert_allclose(values(worlds[w]), values(expected), **TOL)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), case=st.sampled_from(range(len(CASES))), n=st.integers(1, 3))
def test_identity_routes_are_a_bitwise_no_op(seed: int, case: int, n: int) -> None:
    c = CASES[case]
    model = c.model(seed)
    stacked = stack_worlds(c.inputs(seed, n))
    patched = patch_paths(model, c.sender, list(c.receivers), tuple(range(n)), freeze=list(c.freeze))
    np.testing.assert_array_equal(values(patched(stacked)), values(model(stacked)))


@settings(max_examples=6, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), head=st.integers(0, HEADS - 1))
def test_every_consumer_as_receiver_equals_activation_patching_on_a_traced_model(seed: int, head: int) -> None:
    _, model = lifted_tiny_lm(seed)
    clean, corrupt = (pzb.nx.wrap(tokens(seed + w, 2, 5), "batch", "seq") for w in (0, 1))
    sender = Where(label="attns.0.W_O", side="before", index={"heads": head})
    consumers = [Where(module="attns.1", side="before"), Where(label="unembed", side="before")]
    patched = patch_paths(model, sender, consumers, (1, 1))  # The default freeze: both layers' deltas.
    path = unstack_worlds(patched(stack_worlds([clean, corrupt])))[0]
    np.testing.assert_allclose(values(path), values(patch_activations(model, corrupt, clean, at=sender)), **TOL)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16))
def test_every_consumer_as_receiver_equals_activation_patching_on_pzb_and_stock_models(seed: int) -> None:
    pzb_model = pzb_two_layer(seed)
    sender = Where(label="attn0.output.weights", side="before", index={"heads": 0})
    consumers = [Where(path="sublayers[1].delta", side="before"), Where(label="head.weights", side="before")]
    clean, corrupt = CASES[0].inputs(seed, 2)
    path = unstack_worlds(patch_paths(pzb_model, sender, consumers, (1, 1))(stack_worlds([clean, corrupt])))[0]
    np.testing.assert_allclose(values(path), values(patch_activations(pzb_model, corrupt, clean, at=sender)), **TOL)

    stock = stock_chain(seed)
    clean, corrupt = CASES[2].inputs(seed, 2)
    sender = Where(label="layers.0.weight")
    path = unstack_worlds(patch_paths(stock, sender, Where(label="layers.0.bias", side="before"), (1, 1))(
        stack_worlds([clean, corrupt])))[0]
    np.testing.assert_allclose(values(path), values(patch_activations(stock, corrupt, clean, at=sender)), **TOL)


NOT_DEPENDING = [
    # (case index, a sender and a receiver that does not read it)
    (0, Where(label="attn1.output.weights", side="before"), Where(label="attn1.query.weights")),  # same layer
    (2, Where(label="layers.2.bias"), Where(label="layers.0.weight", side="before")),              # upstream
    (3, Where(label="attns.1.W_O", side="before", index={"heads": 1}), Where(label="attns.1.W_Q")),  # same layer
]


@settings(max_examples=8, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), pick=st.sampled_from(range(3)))
def test_a_receiver_that_does_not_read_the_sender_changes_nothing(seed: int, pick: int) -> None:
    case, sender, receiver = NOT_DEPENDING[pick]
    c = CASES[case]
    model = c.model(seed)
    clean, corrupt = c.inputs(seed, 2)
    path = unstack_worlds(patch_paths(model, sender, receiver, (1, 1))(stack_worlds([clean, corrupt])))[0]
    np.testing.assert_allclose(values(path), values(model(clean)), **TOL)


def test_a_path_blocked_by_a_frozen_component_changes_nothing() -> None:
    # In the stock chain the first linear reaches the last only through the (frozen) middle one.
    model = stock_chain(3)
    clean, corrupt = CASES[2].inputs(3, 2)
    blocked = patch_paths(model, Where(label="layers.0.bias"), Where(label="layers.4.weight", side="before"), (1, 1),
                          freeze=Where(label="layers.2.bias"))
    np.testing.assert_allclose(values(unstack_worlds(blocked(stack_worlds([clean, corrupt])))[0]),
                               values(model(clean)), **TOL)
    open_path = patch_paths(model, Where(label="layers.0.bias"), Where(label="layers.4.weight", side="before"),
                            (1, 1), freeze=None)
    assert not np.allclose(values(unstack_worlds(open_path(stack_worlds([clean, corrupt])))[0]),
                           values(model(clean)), **TOL)


@settings(max_examples=4, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), case=st.sampled_from(range(len(CASES))))
def test_jit_equals_eager(seed: int, case: int) -> None:
    c = CASES[case]
    model = c.model(seed)
    stacked = stack_worlds(c.inputs(seed, 2))
    patched = patch_paths(model, c.sender, list(c.receivers), (1, 0), freeze=list(c.freeze))
    jitted = jax.jit(lambda m, x: m(x))(pzb.freeze_params(patched), stacked)
    np.testing.assert_allclose(values(jitted), values(patched(stacked)), rtol=1e-5, atol=1e-6)


def linear_model(seed: int) -> pzb.nn.Sequential:
    ks = jax.random.split(jax.random.key(seed), 3)
    lin = [pzb.nn.Linear.from_config(name, k, {"features": 3}, {"features": 3}) for name, k in zip("abc", ks)]
    return pzb.nn.Sequential([pzb.nn.Residual(lin[0]), pzb.nn.Residual(lin[1]), lin[2]])


@settings(max_examples=8, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16))
def test_two_layer_linear_model_matches_the_hand_computed_path(seed: int) -> None:
    model = linear_model(seed)
    a, b, c = (np.asarray(layer.weights.value.unwrap("features", "features_out"), np.float64)
               for layer in (model.sublayers[0].delta, model.sublayers[1].delta, model.sublayers[2]))
    x, xc = (np.asarray(jax.random.normal(jax.random.key(seed + w), (2, 3))) for w in (1, 2))
    clean, corrupt = (pzb.nx.wrap(jnp.asarray(v), "batch", "features") for v in (x, xc))
    np.testing.assert_allclose(values(model(clean)), ((x + x @ a) + (x + x @ a) @ b) @ c, rtol=1e-5, atol=1e-5)
    # a's corrupt output reaches b's input only; the stream itself keeps a's clean output.
    expected = (x + x @ a + (x + xc @ a) @ b) @ c
    patched = patch_paths(model, Where(label="a.weights"), Where(label="b.weights", side="before"), (1, 1))
    out = unstack_worlds(patched(stack_worlds([clean, corrupt])))
    np.testing.assert_allclose(values(out[0]), expected, rtol=1e-5, atol=1e-5)
    # Another batch shape (4 worlds inside) may round differently: a few ulp, not bitwise.
    np.testing.assert_allclose(values(out[1]), values(model(corrupt)), **TOL)
    # The direct path to the output alone: c reads a's corrupt output, b sees the clean one.
    direct = patch_paths(model, Where(label="a.weights"), Where(label="c.weights", side="before"), (1, 1))
    np.testing.assert_allclose(values(unstack_worlds(direct(stack_worlds([clean, corrupt])))[0]),
                               (x + xc @ a + (x + x @ a) @ b) @ c, rtol=1e-5, atol=1e-5)
    # A receiver at a frozen component's own output reads the sender world there before it is frozen
    # (b is linear, so receiving at its output equals receiving at its input).
    at_output = patch_paths(model, Where(label="a.weights"), Where(label="b.weights"), (1, 1))
    np.testing.assert_allclose(values(unstack_worlds(at_output(stack_worlds([clean, corrupt])))[0]), expected,
                               rtol=1e-5, atol=1e-5)


def test_default_freeze_is_every_residual_delta_but_the_senders() -> None:
    _, model = lifted_tiny_lm(0)
    assert [pzb.errors.format_path(p) for p in residual_deltas(model)] == [
        "body.body.sublayers[3].delta", "body.body.sublayers[4].delta"]
    stacked = stack_worlds(CASES[3].inputs(0, 2))
    c = CASES[3]
    default = patch_paths(model, c.sender, list(c.receivers), (1, 1))(stacked)
    explicit = patch_paths(model, c.sender, list(c.receivers), (1, 1), freeze=list(c.freeze))(stacked)
    np.testing.assert_array_equal(values(default), values(explicit))


def test_patch_paths_leaves_the_model_unchanged() -> None:
    model = pzb_two_layer(0)
    before = jax.tree_util.tree_leaves(model)
    patch_paths(model, CASES[0].sender, list(CASES[0].receivers), (1, 1))
    after = jax.tree_util.tree_leaves(model)
    assert len(before) == len(after) and all(x is y for x, y in zip(before, after))


# -- multi-source interchange -------------------------------------------------------------------------


def separate_interchange(model: Any, sites: Sequence[tuple[Where, Any]], base: Any) -> Any:
    captured = [(at, capture(model, at, source)) for at, source in sites]
    for at, value in reversed(captured):  # The later place first: an insert before it cannot move it.
        model = insert_intervention(model, at, Patch(value))
    return model(base)


@settings(max_examples=5, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), sources=st.lists(st.integers(0, 2), min_size=2, max_size=2),
       traced=st.booleans())
def test_multi_source_interchange_in_one_pass_equals_patching_each_source(seed: int, sources: list[int],
                                                                          traced: bool) -> None:
    if traced:
        model, inputs = lifted_tiny_lm(seed)[1], CASES[3].inputs(seed, 3)
        at = [Where(label="attns.0.W_O", side="before", index={"heads": 0}), Where(module="attns.1", index={"seq": -1})]
    else:
        # Path-based sites: both are resolved on the original model, so the first insert cannot move the second.
        model, inputs = pzb_two_layer(seed), CASES[0].inputs(seed, 3)
        at = [Where(path="sublayers[0]"), Where(path="sublayers[1]", index={"seq": 0})]
    edited = interchange(model, [(at[0], (sources[0], 1, 2)), (at[1], (sources[1], 1, 2))])
    worlds = unstack_worlds(edited(stack_worlds(inputs)))
    reference = separate_interchange(model, [(a, inputs[s]) for a, s in zip(at, sources) if s != 0], inputs[0])
    np.testing.assert_allclose(values(worlds[0]), values(reference), **TOL)
    for w in (1, 2):
        np.testing.assert_array_equal(values(worlds[w]), values(unstack_worlds(model(stack_worlds(inputs)))[w]))


# -- errors --------------------------------------------------------------------------------------------


def test_errors_name_the_fix() -> None:
    model = pzb_two_layer(0)
    c = CASES[0]
    with pytest.raises(PzbridgeError, match=r"routes must name.*found \(0, 3\)"):
        patch_paths(model, c.sender, list(c.receivers), (0, 3))
    with pytest.raises(SelectionError, match="selects nothing"):
        patch_paths(model, c.sender, Where(label="nowhere"), (1, 1))
    with pytest.raises(PzbridgeError, match="freeze='everything' is not known"):
        patch_paths(model, c.sender, list(c.receivers), (1, 1), freeze="everything")
    patched = patch_paths(model, c.sender, list(c.receivers), (1, 1))
    with pytest.raises(NamedAxisError, match="axis 'worlds' of size 2"):
        patched(c.inputs(0, 1)[0])
    _, lm = lifted_tiny_lm(0)
    tokens_in = Where(layer="TakeAlongAxis", side="before")
    with pytest.raises(PzbridgeError, match=r"must be a float array.*not token ids"):
        patch_paths(lm, Where(module="attns.0"), tokens_in, (1, 1))(stack_worlds(CASES[3].inputs(0, 2)))
    with pytest.raises(PzbridgeError, match=r"indices must name worlds in \[0, 2\), found \(0, 2\)"):
        SelectWorlds((0, 2), size=2)
    with pytest.raises(PzbridgeError, match="one entry each per target"):
        TransferWorlds(targets=(0,), plus=(1, 2), minus=(2,))
    with pytest.raises(NamedAxisError, match=r"worlds \[3\] are outside the 2 worlds"):
        TransferWorlds(targets=(0,), plus=(3,), minus=(1,))(pzb.nx.zeros({"worlds": 2}))
    with pytest.raises(PzbridgeError, match="same worlds"):
        interchange(model, [(Where(path="sublayers[0]"), (1, 1)), (Where(path="sublayers[1]"), (0, 1, 2))])
