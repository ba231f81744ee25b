"""Linearised layers: equal to the layer at the point, the same Jacobian there, affine elsewhere."""

from __future__ import annotations

import pathlib
import sys

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.core.errors import PzbridgeError
from pzbridge.toolshed.linearize import Linearized, linearize
from pzbridge.toolshed.where import Where

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from intervention_models import D_MODEL, lifted_tiny_lm, pzb_attention, stream, tokens

TOL = {"rtol": 2e-5, "atol": 2e-5}


def arr(y: pzb.nx.NamedArray) -> np.ndarray:
    return np.asarray(y.unwrap("batch", "seq", "features"))


@settings(max_examples=6, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), scale=st.floats(-2.0, 2.0))
def test_linearized_attention_equals_the_layer_at_the_point_with_the_same_jvp(seed: int, scale: float) -> None:
    attn = pzb_attention(seed).sublayers[0].delta
    x0, t = (pzb.nx.wrap(stream(seed + w, 2, 4, D_MODEL), "batch", "seq", "features") for w in (0, 1))
    lin = Linearized(attn, x0)
    np.testing.assert_allclose(arr(lin(x0)), arr(attn(x0)), **TOL)
    _, lin_t = jax.jvp(lin, (x0,), (t,))
    _, ref_t = jax.jvp(attn, (x0,), (t,))
    np.testing.assert_allclose(arr(lin_t), arr(ref_t), **TOL)
    # Affine: lin(x0 + s t) = attn(x0) + s J t.
    np.testing.assert_allclose(arr(lin(x0 + scale * t)), arr(attn(x0)) + scale * arr(ref_t), rtol=1e-4, atol=1e-4)


@settings(max_examples=4, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16))
def test_linearize_a_traced_layer_keeps_the_output_at_the_point(seed: int) -> None:
    _, lifted = lifted_tiny_lm(seed)
    x = pzb.nx.wrap(tokens(seed, 2, 5), "batch", "seq")
    lin = linearize(lifted, Where(module="attns.1"), x)
    np.testing.assert_allclose(arr(lin(x)), arr(lifted(x)), rtol=1e-4, atol=1e-4)
    other = pzb.nx.wrap(tokens(seed + 7, 2, 5), "batch", "seq")
    assert not np.allclose(arr(lin(other)), arr(lifted(other)), rtol=1e-3, atol=1e-3)


def test_linearized_rejects_state_variables() -> None:
    with pytest.raises(PzbridgeError, match="holds state variables"):
        Linearized(pzb.toolshed.intermediates.SaveIntermediate("s", saved=pzb.StateVariable(None, "s")), None)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), batch=st.integers(2, 4))
def test_linearize_averaged_over_the_batch_expands_at_the_mean_input(seed: int, batch: int) -> None:
    # The averaged point, broadcast back, has "batch" last; jax.jvp refused a tangent laid out like x.
    model = pzb.nn.Sequential([pzb.nn.Elementwise(jax.numpy.tanh)])
    x = pzb.nx.wrap(stream(seed, batch, 3, D_MODEL), "batch", "seq", "features")
    lin = linearize(model, pzb.nn.Elementwise, x, average_over=("batch",))
    point = arr(x).mean(axis=0)
    want = np.tanh(point) + (1 - np.tanh(point) ** 2) * (arr(x) - point)
    np.testing.assert_allclose(arr(lin(x)), want, **TOL)
