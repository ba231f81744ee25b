"""Stock Equinox layers whose per-example layout is their own convert as the root of a model, and come back.

``eqx.nn.Linear("scalar", n)`` / ``Linear(n, "scalar")`` take or return a
0-d array per example; ``eqx.nn.GroupNorm`` and ``eqx.nn.BatchNorm`` take
``(channels, *spatial)`` of any spatial rank, so the example decides how the
converted NNX module names its input (channels first, as Equinox).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pzbridge as pzb


def _structure(node: Any) -> Any:
    if isinstance(node, eqx.Module):
        return type(node).__name__, tuple((f.name, _structure(getattr(node, f.name))) for f in dataclasses.fields(node))
    if eqx.is_array(node):
        return "array", tuple(node.shape), str(node.dtype)
    return node


CASES = {
    "scalar input": (lambda k: eqx.nn.Linear("scalar", 3, key=k), ()),
    "scalar output": (lambda k: eqx.nn.Linear(3, "scalar", key=k), (3,)),
    "scalar both": (lambda k: eqx.nn.Linear("scalar", "scalar", key=k), ()),
    "group norm, 1 spatial axis": (lambda k: eqx.nn.GroupNorm(2, 4), (4, 5)),
    "group norm, 2 spatial axes": (lambda k: eqx.nn.GroupNorm(2, 6, channelwise_affine=False), (6, 3, 2)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_stock_root_with_its_own_layout_converts_to_nnx_and_back(case):
    build, shape = CASES[case]
    model = build(jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (3, *shape))
    converted = pzb.convert(model, xs[0], to="nnx")
    assert isinstance(converted, nnx.Module)
    want = jax.vmap(model)(xs)
    np.testing.assert_allclose(converted(xs), want, atol=1e-5, rtol=1e-5)
    back = pzb.convert(converted, xs, to="equinox")
    assert _structure(back) == _structure(model)
    np.testing.assert_allclose(jax.vmap(back)(xs), want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(back(xs[0]), model(xs[0]), atol=1e-5, rtol=1e-5)


def test_a_batchnorm_root_takes_channels_first_whatever_the_spatial_rank():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        norm, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode="batch")
    xs = jax.random.normal(jax.random.key(2), (4, 3, 5, 2))
    converted = pzb.convert(norm, xs[0], to="nnx", state=state)
    want, _ = jax.vmap(norm, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(xs, state)
    np.testing.assert_allclose(converted(xs), want, atol=1e-5, rtol=1e-5)
    assert jnp.shape(converted.variables[2].get_value()) == (3,)  # Statistics per channel (axis 1 of the batch).
