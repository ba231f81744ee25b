"""Tests for pzbridge/nn/combinators.py: composition laws against plain function composition."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError
from pzbridge.core.struct import pytree_dataclass
from pzbridge.nn.basic import ConstantRescale, Elementwise
from pzbridge.nn.combinators import (
    BranchAndAddTogether,
    BranchAndMultiplyTogether,
    CheckStructure,
    Identity,
    Residual,
    Sequential,
)
from pzbridge.nn.layer import Layer

pytestmark = pytest.mark.oldest  # also run against .ci/oldest-constraints.txt

FACTORS = st.lists(st.sampled_from([-2.0, 0.5, 1.0, 3.0]), min_size=1, max_size=4)


@settings(max_examples=15)
@given(FACTORS, st.integers(1, 4))
def test_sequential_composes_in_order_and_residual_adds_input(factors, n):
    x = nx.wrap(jnp.arange(float(n)) - 1.0, "features")
    layers = [ConstantRescale(f) for f in factors] + [Elementwise(jnp.tanh)]
    expected = np.tanh((np.arange(float(n)) - 1.0) * np.prod(factors))
    np.testing.assert_allclose(Sequential(layers)(x).unwrap("features"), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(Residual(Sequential(layers))(x).unwrap("features"), expected + np.arange(float(n)) - 1.0, atol=1e-5,
                               rtol=1e-6)


@settings(max_examples=15)
@given(FACTORS)
def test_branches_add_and_multiply(factors):
    x = nx.wrap(jnp.array([1.0, -2.0]), "features")
    branches = [ConstantRescale(f) for f in factors]
    xs = np.array([1.0, -2.0])
    np.testing.assert_allclose(BranchAndAddTogether(branches)(x).unwrap("features"), xs * sum(factors), rtol=1e-6)
    np.testing.assert_allclose(BranchAndMultiplyTogether(branches)(x).unwrap("features"),
                               np.prod([xs * f for f in factors], axis=0), rtol=1e-6)


@pytree_dataclass
class RecordSide(Layer):
    def __call__(self, x, /, **side_inputs):
        return x + side_inputs["offset"]


def test_side_inputs_reach_nested_sublayers_and_identity_passes_through():
    model = Sequential([Identity(), Residual(RecordSide()), BranchAndAddTogether([RecordSide(), Identity()])])
    # x=1 -> residual: 1 + (1 + 10) = 12 -> branches: (12 + 10) + 12 = 34
    assert model(1.0, offset=10.0) == 34.0
    assert Identity()(x := object()) is x


def test_check_structure_passes_through_and_reports_mismatch():
    x = nx.zeros({"batch": 2, "features": 3})
    assert CheckStructure({"features": 3})(x) is x
    assert CheckStructure({"features": None, "batch": 2}, exact=True)(x) is x
    with pytest.raises(NamedAxisError, match=r"CheckStructure at blocks\[0\]: expected named axes \{'features': 4\}"):
        CheckStructure({"features": 4}, where="blocks[0]")(x)
    with pytest.raises(NamedAxisError, match="exactly"):
        CheckStructure({"features": 3}, exact=True)(x)
