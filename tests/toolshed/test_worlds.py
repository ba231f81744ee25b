"""Patching across a worlds axis: one stacked pass equals separate patched runs."""

from __future__ import annotations

import pathlib
import sys

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.core.errors import NamedAxisError, PzbridgeError
from pzbridge.toolshed.interventions import patch_activations
from pzbridge.toolshed.where import Where
from pzbridge.toolshed.worlds import (
    RouteWorlds,
    patch_worlds,
    stack_worlds,
    unstack_worlds,
)

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from intervention_models import (
    D_MODEL,
    HEADS,
    lifted_tiny_lm,
    pzb_attention,
    stream,
    tokens,
)

TOL = {"rtol": 2e-5, "atol": 2e-5}
SITES = [
    Where(layer="Residual"),                                            # the residual stream after each layer
    Where(label="attns.1.W_O", side="before", index={"heads": 1}),      # one head of layer 1
    Where(module="attns.0", index={"seq": -1}),                         # layer 0's output at the last position
]


def out(y: pzb.nx.NamedArray) -> np.ndarray:
    return np.asarray(y.unwrap("batch", "seq", "features"))


@settings(max_examples=8, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), site=st.sampled_from(range(len(SITES))),
       routes=st.lists(st.integers(0, 2), min_size=3, max_size=3))
def test_one_worlds_pass_equals_separate_patched_runs(seed: int, site: int, routes: list[int]) -> None:
    _, lifted = lifted_tiny_lm(seed)
    inputs = [pzb.nx.wrap(tokens(seed + w, 2, 5), "batch", "seq") for w in range(3)]
    at = SITES[site]
    worlds = unstack_worlds(patch_worlds(lifted, at, routes)(stack_worlds(inputs)))
    for w, source in enumerate(routes):
        separate = lifted(inputs[w]) if source == w else patch_activations(lifted, inputs[source], inputs[w], at=at)
        np.testing.assert_allclose(out(worlds[w]), out(separate), **TOL)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 3))
def test_identity_routes_are_a_bitwise_no_op(seed: int, n: int) -> None:
    model = pzb_attention(seed)
    stacked = stack_worlds([pzb.nx.wrap(stream(seed + w, 2, 4, D_MODEL), "batch", "seq", "features") for w in range(n)])
    patched = patch_worlds(model, Where(layer="AttendToValues"), tuple(range(n)))
    np.testing.assert_array_equal(patched(stacked).unwrap("worlds", "batch", "seq", "features"),
                                  model(stacked).unwrap("worlds", "batch", "seq", "features"))


@settings(max_examples=5, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), head=st.integers(0, HEADS - 1))
def test_worlds_pass_under_jit_equals_eager_and_patching_a_head_on_pzb_attention(seed: int, head: int) -> None:
    model = pzb_attention(seed)
    clean, corrupt = (pzb.nx.wrap(stream(seed + w, 2, 4, D_MODEL), "batch", "seq", "features") for w in (0, 1))
    at = Where(layer="AttendToValues", index={"heads": head})
    patched = patch_worlds(model, at, (0, 0))
    eager = patched(stack_worlds([clean, corrupt]))
    jitted = jax.jit(lambda m, x: m(x))(pzb.freeze_params(patched), stack_worlds([clean, corrupt]))
    np.testing.assert_allclose(jitted.unwrap("worlds", "batch", "seq", "features"),
                               eager.unwrap("worlds", "batch", "seq", "features"), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out(unstack_worlds(eager)[1]), out(patch_activations(model, clean, corrupt, at=at)),
                               **TOL)


def test_route_errors_name_the_fix() -> None:
    with pytest.raises(PzbridgeError, match=r"routes must name.*found \(0, 2\)"):
        RouteWorlds((0, 2))
    with pytest.raises(NamedAxisError, match="axis 'worlds' of size 2"):
        RouteWorlds((0, 0))(pzb.nx.zeros({"seq": 3}))
    with pytest.raises(PzbridgeError, match="every input leaf must be a NamedArray"):
        stack_worlds([1.0, 2.0])
