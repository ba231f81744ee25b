"""The lift contract for Equinox: input untouched, strict mode errors, user rules, adapters."""

from __future__ import annotations

import copy

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

import pzbridge as pzb
from pzbridge.bridge import equinox_rule
from pzbridge.bridge.equinox.adapter import EquinoxAdapter
from pzbridge.bridge.equinox.traversal import new_module
from pzbridge.bridge.equinox.linear import EqxLinear
from pzbridge.core.errors import LiftError
from pzbridge.testing.equinox_strategies import ScaledByWeight, equinox_models


def _snapshot(module):
    leaves, treedef = jax.tree_util.tree_flatten(module)
    return treedef, [(id(leaf), np.asarray(leaf).copy()) if eqx.is_array(leaf) else leaf for leaf in leaves]


@given(equinox_models())
def test_lifting_and_lowering_never_change_the_input_module(example):
    before = _snapshot(example.model)
    shallow = copy.copy(example.model.__dict__)
    lifted = pzb.lift(example.model)
    pzb.lower(lifted)
    after = _snapshot(example.model)
    assert before[0] == after[0]
    for a, b in zip(before[1], after[1]):
        if isinstance(a, tuple):
            assert a[0] == b[0] and np.array_equal(a[1], b[1])
        else:
            assert a is b or a == b
    assert all(example.model.__dict__[k] is v for k, v in shallow.items())


class Unknown(eqx.Module):
    inner: eqx.nn.Linear

    def __call__(self, x):
        return self.inner(x)


class Outer(eqx.Module):
    blocks: list

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_strict_lift_names_class_path_and_how_to_register_a_rule():
    model = Outer([eqx.nn.Identity(), Unknown(eqx.nn.Linear(2, 2, key=jax.random.key(0)))])
    with pytest.raises(LiftError) as info:
        pzb.lift(model, strict=True)
    message = str(info.value)
    assert "Outer" in message and "<root>" in message and "equinox_rule" in message
    inner_only = eqx.nn.Sequential([eqx.nn.Identity(), Unknown(eqx.nn.Linear(2, 2, key=jax.random.key(0)))])
    with pytest.raises(LiftError, match=r"layers\[1\].*test_equinox_contract\.Unknown.*equinox_rule"):
        pzb.lift(inner_only, strict=True)


def test_known_layers_lift_under_strict():
    mlp = eqx.nn.MLP(3, 2, 4, 2, key=jax.random.key(0))
    assert type(pzb.lift(mlp, strict=True).body).__name__ == "EqxMLP"


class Doubler(eqx.Module):
    scale: jax.Array

    def __call__(self, x):
        return 2 * self.scale * x


def test_user_rule_is_used_for_lift_and_lower():
    @pzb.pytree_dataclass
    class LiftedDoubler(pzb.nn.Layer):
        scale: object

        def __call__(self, x, /, **side_inputs):
            return x * self.scale.value * 2

    @equinox_rule(source=Doubler, lifted=(LiftedDoubler,))
    class DoublerRule:
        def lift(self, module, ctx):
            return LiftedDoubler(ctx.child("scale").parameter(module.scale, ("features",)))

        def lower(self, layer, ctx):
            return new_module(Doubler, scale=ctx.child("scale").array(layer.scale, ("features",)))

    module = Doubler(jnp.arange(3.0))
    lifted = pzb.lift(module, strict=True)
    assert isinstance(lifted.body, LiftedDoubler)
    assert pzb.lower(lifted).scale is module.scale


def test_foreign_module_reading_weights_directly_still_sees_edits():
    model = ScaledByWeight(eqx.nn.Linear(2, 2, key=jax.random.key(0)), jnp.array([1.0, 2.0]))
    lifted = pzb.lift(model)
    edited = pzb.select(lifted).at_instances_of(EqxLinear).apply(
        lambda lin: pzb.nn.Sequential([lin, pzb.nn.ConstantRescale(3.0)]))
    x = jnp.array([0.5, -1.0])
    np.testing.assert_allclose(edited.positional(x), model(x) * 3.0, rtol=1e-6)
    lowered = pzb.lower(edited)
    assert lowered.weight is model.weight
    np.testing.assert_allclose(eqx.filter_jit(lambda m, v: m(v))(lowered, x), model(x) * 3.0, rtol=1e-6)


def test_pzbridge_only_layer_lowers_to_a_trainable_adapter():
    bias = pzb.nn.AddBias(pzb.Parameter(pzb.nx.wrap(jnp.array([1.0, 2.0, 3.0]), "features"), "b"))
    layer = pzb.nn.Sequential([pzb.nn.ConstantRescale(2.0), bias])
    lowered = pzb.lower(layer, framework="equinox")
    assert isinstance(lowered, eqx.nn.Sequential)
    assert all(isinstance(sub, EquinoxAdapter) for sub in lowered.layers)
    np.testing.assert_array_equal(lowered(jnp.ones(3)), jnp.array([3.0, 4.0, 5.0]))
    grads = eqx.filter_grad(lambda m: jnp.sum(m(jnp.ones(3)) ** 2))(lowered)
    np.testing.assert_array_equal(jax.tree_util.tree_leaves(grads)[0], 2 * jnp.array([3.0, 4.0, 5.0]))
