"""Standardize (Penzai 0.2.5 pz.nn.Standardize): (x - mean) / sqrt(var + eps) over named axes."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.core.errors import NamedAxisError
from pzbridge.nn import Standardize


def test_literal_values():
    x = pzb.nx.wrap(jnp.array([[1.0, 2.0, 3.0, 6.0], [2.0, 2.0, 2.0, 2.0]]), "batch", "f")
    out = Standardize(("f",), epsilon=0.0)(x[{"batch": 0}]).unwrap("f")
    # mean 3, population variance (4 + 1 + 0 + 9) / 4 = 3.5
    np.testing.assert_allclose(out, (np.array([1.0, 2.0, 3.0, 6.0]) - 3.0) / np.sqrt(3.5), rtol=1e-6)
    constant = Standardize("f", epsilon=1e-6)(x[{"batch": 1}]).unwrap("f")
    np.testing.assert_array_equal(constant, np.zeros(4))
    assert Standardize("f").across == ("f",)


def test_missing_axis_is_an_error():
    with pytest.raises(NamedAxisError, match=r"input lacks axes \['g'\]"):
        Standardize(("g",))(pzb.nx.zeros({"f": 2}))


@settings(max_examples=20, derandomize=True)
@given(st.lists(st.floats(-100, 100, allow_nan=False), min_size=2, max_size=6), st.integers(1, 3))
def test_matches_numpy_over_two_axes(values, reps):
    data = np.array(values * reps, np.float32).reshape(reps, len(values))
    x = pzb.nx.wrap(jnp.asarray(data), "a", "b")
    out = Standardize(("a", "b"), epsilon=1e-3)(x).unwrap("a", "b")
    expected = (data - data.mean()) / np.sqrt(data.var() + 1e-3)
    np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-4)
