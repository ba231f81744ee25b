"""Per-rule NNX tests: each known layer lifts to its pzbridge form, round-trips exactly, computes the same."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.bridge.nnx.containers import LayerDict, LayerList, NnxFunction
from pzbridge.bridge.nnx.linear import NnxEinsum, NnxLinear, NnxLinearGeneral
from pzbridge.bridge.nnx.containers import NnxSequential
from pzbridge.nn.basic import Elementwise, NamedEinsum
from pzbridge.nn.foreign import Foreign
from pzbridge.nn.linear import AddBias, Linear
from pzbridge.testing.numerics import assert_same_outputs


def assert_round_trip(model):
    lowered = pzb.lower(pzb.lift(model))
    assert type(lowered) is type(model)
    assert nnx.graphdef(lowered) == nnx.graphdef(model)
    for a, b in zip(jax.tree.leaves(nnx.state(lowered)), jax.tree.leaves(nnx.state(model))):
        assert a is b  # same immutable buffers, new Variables
    return lowered


@given(st.integers(1, 4), st.integers(1, 4), st.booleans(), st.integers(0, 100))
def test_linear_lifts_to_named_linear_and_bias_and_matches_nnx(fin, fout, use_bias, seed):
    model = nnx.Linear(fin, fout, use_bias=use_bias, rngs=nnx.Rngs(seed))
    lifted = pzb.lift(model)
    assert isinstance(lifted.body, NnxLinear)
    assert [type(layer) for layer in lifted.body.sublayers] == [Linear, AddBias][: 1 + use_bias]
    assert dict(lifted.body.sublayers[0].weights.value.named_shape) == {"features": fin, "features_out": fout}
    x = jax.random.normal(jax.random.key(seed), (2, fin))
    # Bitwise (the jaxprs are NNX's) without a bias; the lifted bias is added in another layout: within ulps.
    assert_same_outputs(lifted.positional, model, x, bitwise=not use_bias)
    assert_round_trip(model)


def test_linear_with_non_default_precision_lifts_natively_and_exactly():
    # Non-default numerics lift to pzbridge layers that run NNX's own program (issue 10: LoRA must find them).
    model = nnx.Linear(2, 3, precision=jax.lax.Precision.HIGHEST, rngs=nnx.Rngs(0))
    lifted = pzb.lift(model)
    assert not isinstance(lifted.body, Foreign)
    x = jnp.ones((4, 2))
    assert_same_outputs(lifted.positional, model, x, bitwise=True)
    assert_round_trip(model)


def test_linear_general_names_several_axes():
    model = nnx.LinearGeneral((2, 3), (4, 5), axis=(-2, -1), rngs=nnx.Rngs(0))
    lifted = pzb.lift(model)
    assert isinstance(lifted.body, NnxLinearGeneral)
    assert dict(lifted.body.sublayers[0].weights.value.named_shape) == {
        "features_0": 2, "features_1": 3, "features_0_out": 4, "features_1_out": 5}
    x = jax.random.normal(jax.random.key(1), (6, 2, 3))
    np.testing.assert_allclose(lifted.positional(x), model(x), rtol=1e-6, atol=1e-6)
    assert_round_trip(model)


def test_linear_general_with_batch_axis_stays_foreign():
    model = nnx.LinearGeneral(3, 4, axis=1, batch_axis={0: 2}, rngs=nnx.Rngs(0))
    assert isinstance(pzb.lift(model).body, Foreign)
    assert_round_trip(model)


def test_einsum_axis_names_are_the_einsum_letters():
    model = nnx.Einsum("bta,ahd->bthd", (3, 2, 4), (2, 4), rngs=nnx.Rngs(0))
    lifted = pzb.lift(model)
    assert isinstance(lifted.body, NnxEinsum)
    einsum, bias = lifted.body.sublayers
    assert isinstance(einsum, NamedEinsum) and einsum.contract_axes == ("a",)
    assert dict(einsum.weights[0].value.named_shape) == {"a": 3, "h": 2, "d": 4}
    assert dict(bias.bias.value.named_shape) == {"h": 2, "d": 4}
    x = jax.random.normal(jax.random.key(2), (5, 7, 3))
    np.testing.assert_allclose(lifted.positional(x), model(x), rtol=1e-6, atol=1e-6)
    assert_round_trip(model)


def test_einsum_with_positional_letters_out_of_order_stays_foreign():
    model = nnx.Einsum("bta,ahd->tbhd", (3, 2, 4), rngs=nnx.Rngs(0))
    assert isinstance(pzb.lift(model).body, Foreign)
    x = jnp.ones((5, 7, 3))
    assert_same_outputs(pzb.lift(model).positional, model, x, bitwise=True)  # Foreign: NNX's own program


def test_sequential_lifts_layers_and_functions():
    custom = lambda x: x[..., ::-1]  # noqa: E731 - not elementwise: stays an NnxFunction
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), jax.nn.relu, custom, nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    lifted = pzb.lift(model)
    assert isinstance(lifted.body, NnxSequential)
    assert [type(s) for s in lifted.body.sublayers] == [NnxLinear, Elementwise, NnxFunction, NnxLinear]
    x = jax.random.normal(jax.random.key(3), (2, 3))
    np.testing.assert_allclose(lifted.positional(x), model(x), rtol=1e-6, atol=1e-6)
    assert_round_trip(model)


def test_sequential_joins_mismatched_axis_names_and_lowering_drops_the_rename():
    model = nnx.Sequential(nnx.Einsum("ba,ac->bc", (3, 3), rngs=nnx.Rngs(0)), nnx.Linear(3, 2, rngs=nnx.Rngs(1)))
    lifted = pzb.lift(model)
    x = jax.random.normal(jax.random.key(4), (2, 3))
    np.testing.assert_allclose(lifted.positional(x), model(x), rtol=1e-6, atol=1e-6)
    assert_round_trip(model)


def test_list_and_dict_lift_to_containers_and_round_trip():
    shared = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    layers = nnx.List([shared, nnx.Linear(2, 2, rngs=nnx.Rngs(1)), shared])
    lifted = pzb.lift(layers).body
    assert isinstance(lifted, LayerList) and lifted.items[0] is lifted.items[2]
    lowered = assert_round_trip(layers)
    assert lowered[0] is lowered[2]
    named = nnx.Dict(a=nnx.Linear(2, 2, rngs=nnx.Rngs(2)), b=nnx.BatchStat(jnp.zeros(2)))
    assert isinstance(pzb.lift(named).body, LayerDict)
    assert_round_trip(named)


@pytest.mark.parametrize("fin,fout", [(1, 1), (3, 2)])
def test_affine_built_in_pzbridge_lowers_to_nnx_linear(fin, fout):
    from pzbridge.nn.linear import Affine

    layer = Affine.from_config("dense", jax.random.key(0), {"features": fin}, {"features": fout})
    lowered = pzb.lower(layer, framework="nnx")
    assert type(lowered) is nnx.Linear and lowered.in_features == fin and lowered.use_bias
    x = jax.random.normal(jax.random.key(5), (2, fin))
    expected = layer(pzb.nx.wrap(x).tag("batch", "features")).untag("batch", "features").unwrap()
    np.testing.assert_allclose(lowered(x), expected, rtol=1e-6)
