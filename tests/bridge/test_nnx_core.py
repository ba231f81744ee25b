"""NNX bridge machinery: sharing, mutation and aliasing, variables, Foreign calls, strict mode, adapters.

References are NNX itself (in-place updates, ``find_duplicates``, outputs) or literal values.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import pzbridge as pzb
from pzbridge.bridge.nnx.variables import NNX_TYPE
from pzbridge.bridge.nnx.adapter import NnxAdapter
from pzbridge.core.errors import LiftError
from pzbridge.core.variables import Parameter, StateVariable, unbind_variables
from pzbridge.nn.combinators import Residual
from pzbridge.nn.foreign import Foreign
from pzbridge.nn.linear import Affine
from pzbridge.testing.numerics import assert_outputs_match, assert_same_computation

pytestmark = pytest.mark.oldest  # also run against .ci/oldest-constraints.txt


class Tied(nnx.Module):
    def __init__(self):
        self.a = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
        self.b = self.a
        self.w = nnx.Param(jnp.arange(3.0))
        self.v = self.w
        self.offset = jnp.ones(3)

    def __call__(self, x):
        return self.b(self.a(x)) * self.w[...] + self.v[...] + self.offset


class UnknownBatchNorm(nnx.BatchNorm):
    """A subclass has no rule (rules match exact classes): it stays Foreign, so NNX's own code updates it."""


class WithNorm(nnx.Module):
    def __init__(self):
        self.lin = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
        self.bn = UnknownBatchNorm(3, momentum=0.5, rngs=nnx.Rngs(1))

    def __call__(self, x):
        return self.bn(self.lin(x))


def test_shared_variable_and_submodule_become_one_lifted_object_and_come_back_shared():
    model = Tied()
    body = pzb.lift(model).body
    assert body.children["a"] is body.children["b"]
    assert body.children["w"] is body.children["v"] and isinstance(body.children["w"], Parameter)
    lowered = pzb.lower(pzb.lift(model))
    assert lowered.a is lowered.b and lowered.w is lowered.v
    assert nnx.find_duplicates(lowered) == nnx.find_duplicates(model) == [[("a",), ("b",)], [("v",), ("w",)]]


def test_lift_keeps_the_very_same_buffers():
    model = Tied()
    body = pzb.lift(model).body
    assert body.children["w"].value is model.w.get_raw_value()
    assert body.children["a"].sublayers[0].weights.value.data_array is model.a.kernel.get_raw_value()


def test_lowered_and_original_do_not_alias_each_other():
    model = Tied()
    lifted = pzb.lift(model)
    lowered = pzb.lower(lifted)
    lowered.w.set_value(jnp.full(3, 7.0))
    lowered.a.kernel.set_value(jnp.zeros((3, 3)))
    assert np.array_equal(model.w[...], np.arange(3.0))
    assert not np.array_equal(model.a.kernel[...], np.zeros((3, 3)))
    model.w.set_value(jnp.full(3, -1.0))
    assert np.array_equal(lifted.body.children["w"].value, np.arange(3.0))


def test_plain_array_attribute_lifts_to_state_and_lowers_to_a_plain_array():
    model = Tied()
    offset = pzb.lift(model).body.children["offset"]
    assert isinstance(offset, StateVariable) and offset.metadata[NNX_TYPE] == "array"
    lowered = pzb.lower(pzb.lift(model))
    assert type(lowered.offset) is type(model.offset) and lowered.offset is model.offset


def test_variable_type_and_metadata_survive_the_round_trip():
    class Sharded(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((2, 3)), out_sharding=(None, "model"), eager_sharding=False)
            self.n = nnx.Intermediate(jnp.zeros(()))

        def __call__(self, x):
            return x

    model = Sharded()
    body = pzb.lift(model).body
    assert body.children["w"].metadata["out_sharding"] == (None, "model")
    assert isinstance(body.children["n"], StateVariable)
    lowered = pzb.lower(pzb.lift(model))
    assert type(lowered.n) is nnx.Intermediate
    assert lowered.w.get_metadata()["out_sharding"] == (None, "model")
    assert nnx.graphdef(lowered) == nnx.graphdef(model)


def test_strict_lift_names_class_path_and_fix():
    class Block(nnx.Module):
        def __init__(self):
            self.inner = nnx.Dict(custom=WithNorm())

        def __call__(self, x):
            return x

    with pytest.raises(LiftError) as info:
        pzb.lift(Block().inner, strict=True)
    message = str(info.value)
    assert "WithNorm" in message and "custom" in message and "nnx_rule(source=" in message


def test_foreign_batchnorm_training_statistics_match_nnx_in_place_update():
    model = WithNorm()
    x = jax.random.normal(jax.random.key(0), (4, 3))
    reference = nnx.clone(model)
    expected = reference(x)  # updates reference.bn.mean / var in place
    lifted = pzb.lift(model)
    np.testing.assert_allclose(lifted.positional(x), expected, rtol=1e-6, atol=1e-6)
    bn = lifted.body.children["bn"].children

    def lifted_stats(a):
        _, state = pzb.stateless_call(lambda l, b: l.positional(b), (), pzb.lift(model), a)
        return [v.value for v in sorted(state, key=lambda v: v.label)]

    def nnx_stats(a):
        m = nnx.clone(model)
        m(a)
        return [m.bn.mean[...], m.bn.var[...]]

    assert_same_computation(lifted_stats, nnx_stats, x)  # Foreign runs NNX's program: bitwise on any CPU
    assert np.array_equal(bn["mean"].value, reference.bn.mean[...])
    assert np.array_equal(bn["var"].value, reference.bn.var[...])
    assert np.array_equal(model.bn.mean[...], np.zeros(3))  # the user's module is untouched
    lowered = pzb.lower(lifted)
    assert np.array_equal(lowered.bn.mean[...], reference.bn.mean[...])


def test_foreign_statistics_flow_out_of_jitted_stateless_call():
    model = WithNorm()
    x = jax.random.normal(jax.random.key(1), (4, 3))
    reference = nnx.clone(model)
    reference(x)
    slots, values = unbind_variables(pzb.lift(model), freeze=True)

    @jax.jit
    def run(values, x):
        fresh = [v.unfreeze_as_copy() for v in values]
        out = pzb.bind_variables(slots, fresh).positional(x)
        return out, {v.label: v.value for v in fresh if isinstance(v, StateVariable)}

    _, state = run(values, x)
    # Jitted (fused by XLA) vs NNX's eager call: different programs, so within a few ulps, not bitwise.
    assert_outputs_match(state["bn.mean"], reference.bn.mean[...], same_computation=False)


def test_foreign_after_linear_in_sequential_consumes_features():
    class Double(nnx.Module):
        def __call__(self, x):
            return jnp.concatenate([x, x], axis=-1)

    model = nnx.Sequential(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), Double(), nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    x = jax.random.normal(jax.random.key(2), (5, 3))
    np.testing.assert_allclose(pzb.lift(model).positional(x), model(x), rtol=1e-6, atol=1e-6)


def test_pzbridge_only_layer_lowers_to_adapter_trained_by_nnx_optimizer_and_relifts():
    layer = Residual(Affine.from_config("dense", jax.random.key(0), {"features": 3}, {"features": 3}))
    adapter = pzb.lower(layer, framework="nnx")
    assert isinstance(adapter, NnxAdapter)
    x = jax.random.normal(jax.random.key(3), (8, 3))
    expected = layer(pzb.nx.wrap(x).tag("batch", "features")).untag("batch", "features").unwrap()
    np.testing.assert_allclose(adapter(x), expected, rtol=1e-6)
    optimizer = nnx.Optimizer(adapter, optax.sgd(0.1), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(adapter, optimizer)) for _ in range(5)]
    assert losses[-1] < losses[0]
    relifted = pzb.lift(adapter).body
    assert isinstance(relifted, Residual)
    trained = relifted.delta.sublayers[0].weights.value
    assert not np.array_equal(trained.untag("features", "features_out").unwrap(),
                              layer.delta.sublayers[0].weights.value.untag("features", "features_out").unwrap())


def test_equinox_linear_lowers_to_nnx_linear_with_the_same_outputs():
    linear = eqx.nn.Linear(3, 4, key=jax.random.key(0))
    lowered = pzb.lower(pzb.lift(linear), framework="nnx")
    assert type(lowered) is nnx.Linear
    assert np.array_equal(lowered.kernel[...], linear.weight.T)
    x = jax.random.normal(jax.random.key(1), (2, 3))
    np.testing.assert_allclose(lowered(x), jax.vmap(linear)(x), rtol=1e-6, atol=1e-6)


def test_foreign_is_returned_for_unknown_modules():
    assert isinstance(pzb.lift(WithNorm()).body, Foreign)
