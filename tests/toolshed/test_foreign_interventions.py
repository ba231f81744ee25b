"""Capture and interventions on what stays ``Foreign``, for Equinox and NNX.

A module without a rule is lifted to ``Foreign`` (its code kept, its
children lifted). These tests pin that the toolshed still works there:

- a capture saver on a child of a ``Foreign`` records, eagerly and under
  ``jax.jit`` / ``pzb.variable_jit``, what the original child computed;
- an edited child is still called by the original code exactly as the
  original child was (several positional inputs, ``mask=``, ``key=``,
  keyword-passed inputs), before and after lowering;
- an NNX intervention holding a plain ``NamedArray`` lowers to an
  ``NnxAdapter`` whose array is data, and lifts back to the same layer.

Outputs are compared with a tolerance where the lifted layer runs other
primitives than the framework (a named contraction instead of ``x @ w``).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pzbridge as pzb
from pzbridge.bridge.equinox.adapter import EquinoxAdapter
from pzbridge.bridge.equinox.attention import EqxMultiheadAttention
from pzbridge.bridge.equinox.linear import EqxLinear
from pzbridge.bridge.nnx.adapter import NnxAdapter
from pzbridge.bridge.nnx.linear import NnxLinear
from pzbridge.core.errors import PzbridgeError, VariableError
from pzbridge.nn.foreign import Foreign
from pzbridge.toolshed.intermediates import SaveIntermediate, capture_intermediates, insert_layers
from pzbridge.toolshed.interventions import AddVector, InterveneWith, Patch, ZeroAblation, insert_intervention

RTOL = 1e-6
ATOL = 1e-6


def _close(actual, expected) -> None:
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=RTOL, atol=ATOL)


def _batch_first(named):
    return named.untag_prefix("batch").unwrap()


def _frozen(model):
    return pzb.freeze_params(pzb.freeze_state_vars(model))


def _foreign_named(name: str):
    return lambda node: isinstance(node, Foreign) and node.template.class_name == name


# Equinox: capture inside a Foreign. ---------------------------------------------------


class EqxResidual(eqx.Module):
    inner: eqx.nn.Linear

    def __call__(self, x):
        return jax.nn.relu(self.inner(x)) + x


class EqxOuter(eqx.Module):
    block: EqxResidual
    head: eqx.nn.Linear

    def __call__(self, x):
        return self.head(self.block(x))


class EqxVmapsItsChild(eqx.Module):
    inner: eqx.nn.Linear

    def __call__(self, x):
        return jax.vmap(self.inner)(x)


class EqxUnusedChild(eqx.Module):
    used: eqx.nn.Linear
    spare: eqx.nn.Linear

    def __call__(self, x):
        return self.used(x)


def _eqx_residual() -> EqxResidual:
    return EqxResidual(eqx.nn.Linear(3, 3, key=jax.random.key(0)))


def _batch(n: int = 4, features: int = 3, seed: int = 1) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (n, features))


def _batched(x: jax.Array):
    # A root Foreign's own axes are unnamed; the named batch axis is vectorised over.
    return pzb.nx.wrap(x).tag_prefix("batch")


CHILD = "body.children['inner']"


def test_equinox_capture_inside_foreign_child_records_the_child_output() -> None:
    block = _eqx_residual()
    x = _batch()
    out, acts = capture_intermediates(pzb.lift(block), EqxLinear, _batched(x))
    assert list(acts) == [CHILD]
    assert dict(acts[CHILD].named_shape) == {"batch": 4, "features": 3}
    _close(acts[CHILD].unwrap("batch", "features"), jax.vmap(block.inner)(x))
    _close(_batch_first(out), jax.vmap(block)(x))


def test_equinox_capture_inside_foreign_child_before_records_the_child_input() -> None:
    x = _batch()
    _, acts = capture_intermediates(pzb.lift(_eqx_residual()), EqxLinear, _batched(x), where="before")
    _close(acts[CHILD].unwrap("batch", "features"), x)


def test_equinox_capture_inside_foreign_child_under_jit() -> None:
    block = _eqx_residual()
    lifted, x = pzb.lift(block), _batch()

    @jax.jit
    def run(model, inputs):
        return capture_intermediates(model, EqxLinear, inputs)

    out, acts = run(_frozen(lifted), _batched(x))
    _close(acts[CHILD].unwrap("batch", "features"), jax.vmap(block.inner)(x))
    _close(_batch_first(out), jax.vmap(block)(x))


def test_equinox_capture_inside_foreign_child_under_variable_jit() -> None:
    block = _eqx_residual()
    lifted, x = pzb.lift(block), _batch()
    run = pzb.variable_jit(lambda model, inputs: capture_intermediates(model, pzb.nn.Linear, inputs))
    _, acts = run(lifted, _batched(x))
    (path,) = acts
    # The first primitive of the lifted Linear is the matmul, before the bias.
    _close(acts[path].unwrap("batch", "features"), x @ block.inner.weight.T)


def test_equinox_capture_in_nested_foreign_records_the_grandchild() -> None:
    outer = EqxOuter(_eqx_residual(), eqx.nn.Linear(3, 2, key=jax.random.key(2)))
    x = _batch()
    out, acts = capture_intermediates(pzb.lift(outer), EqxLinear, _batched(x))
    assert list(acts) == ["body.children['block'].children['inner']", "body.children['head']"]
    _close(acts["body.children['block'].children['inner']"].unwrap("batch", "features"),
           jax.vmap(outer.block.inner)(x))
    _close(acts["body.children['head']"].unwrap("batch", "features"), jax.vmap(outer)(x))
    _close(_batch_first(out), jax.vmap(outer)(x))


def test_equinox_stateful_saver_inside_foreign_is_written_by_an_ordinary_call() -> None:
    block = _eqx_residual()
    probe = pzb.StateVariable(None, "probe")
    lifted = insert_layers(pzb.lift(block), EqxLinear, lambda path, node: SaveIntermediate("probe", saved=probe))
    x = jnp.arange(3.0)
    lifted.positional(x)
    _close(probe.value.unwrap("features"), block.inner(x))


def test_equinox_capture_does_not_write_the_models_variables() -> None:
    lifted = pzb.lift(_eqx_residual())
    before = [(p.label, p.value) for p in pzb.unbind_variables(lifted)[1]]
    capture_intermediates(lifted, EqxLinear, _batched(_batch()))
    after = [(p.label, p.value) for p in pzb.unbind_variables(lifted)[1]]
    assert [label for label, _ in before] == [label for label, _ in after]
    assert all(a is b for (_, a), (_, b) in zip(before, after))


def test_equinox_saver_under_a_transform_inside_foreign_code_is_an_error() -> None:
    lifted = pzb.lift(EqxVmapsItsChild(eqx.nn.Linear(3, 3, key=jax.random.key(0))))
    with pytest.raises(VariableError, match=r"EqxVmapsItsChild.*under a JAX transformation"):
        capture_intermediates(lifted, EqxLinear, pzb.nx.wrap(_batch()))


def test_equinox_saver_on_a_child_the_code_never_calls_is_reported() -> None:
    keys = jax.random.split(jax.random.key(0))
    lifted = pzb.lift(EqxUnusedChild(eqx.nn.Linear(3, 3, key=keys[0]), eqx.nn.Linear(3, 3, key=keys[1])))
    spare = pzb.select(lifted).at(lambda m: m.body.children["spare"])
    with pytest.raises(PzbridgeError, match=r"captured:body.children\['spare'\].* never ran.*Foreign"):
        capture_intermediates(lifted, spare, pzb.nx.wrap(jnp.ones(3)))


# NNX: capture inside a Foreign ("bug 3": a LowerError about an unbound slot). ---------


class NnxResidual(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.inner = nnx.Linear(3, 3, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.inner(x)) + x


class NnxOuter(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.block = NnxResidual(rngs)
        self.head = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(self.block(x))


def _nnx_named(x: jax.Array):
    return pzb.nx.wrap(x, "batch", "features")


def test_nnx_capture_inside_foreign_child_records_the_child_output() -> None:
    block = NnxResidual(nnx.Rngs(0))
    x = _batch()
    out, acts = capture_intermediates(pzb.lift(block), NnxLinear, _nnx_named(x))
    assert list(acts) == [CHILD]
    assert dict(acts[CHILD].named_shape) == {"batch": 4, "features": 3}
    _close(acts[CHILD].unwrap("batch", "features"), block.inner(x))
    _close(out.unwrap("batch", "features"), block(x))


def test_nnx_capture_inside_foreign_child_under_jit() -> None:
    block = NnxResidual(nnx.Rngs(0))
    lifted, x = pzb.lift(block), _batch()

    @jax.jit
    def run(model, inputs):
        return capture_intermediates(model, NnxLinear, inputs)

    _, acts = run(_frozen(lifted), _nnx_named(x))
    _close(acts[CHILD].unwrap("batch", "features"), block.inner(x))


def test_nnx_capture_inside_foreign_child_under_variable_jit() -> None:
    block = NnxResidual(nnx.Rngs(0))
    lifted, x = pzb.lift(block), _batch()
    run = pzb.variable_jit(lambda model, inputs: capture_intermediates(model, NnxLinear, inputs, where="before"))
    _, acts = run(lifted, _nnx_named(x))
    _close(acts[CHILD].unwrap("batch", "features"), x)


def test_nnx_capture_in_nested_foreign_records_every_child() -> None:
    outer = NnxOuter(nnx.Rngs(0))
    x = _batch()
    _, acts = capture_intermediates(pzb.lift(outer), NnxLinear, _nnx_named(x))
    _close(acts["body.children['block'].children['inner']"].unwrap("batch", "features"), outer.block.inner(x))
    _close(acts["body.children['head']"].unwrap("batch", "features"), outer(x))


def test_nnx_capture_leaves_the_user_module_untouched() -> None:
    block = NnxResidual(nnx.Rngs(0))
    state_before = jax.tree.leaves(nnx.state(block))
    capture_intermediates(pzb.lift(block), NnxLinear, _nnx_named(_batch()))
    assert all(a is b for a, b in zip(state_before, jax.tree.leaves(nnx.state(block))))


# Bug 1: an edited Equinox child keeps the original call signature. ----------------------


class Blk(eqx.Module):
    attn: eqx.nn.MultiheadAttention

    def __call__(self, x):
        return self.attn(x, x, x)


class MaskedBlk(eqx.Module):
    attn: eqx.nn.MultiheadAttention

    def __call__(self, x, mask=None, *, key=None):
        return x + self.attn(x, x, x, mask=mask, key=key)


class KeywordBlk(eqx.Module):
    attn: eqx.nn.MultiheadAttention

    def __call__(self, x):
        return self.attn(query=x, key_=x, value=x)


class InnerNoKey(eqx.Module):
    proj: eqx.nn.Linear

    def __call__(self, x):
        return jax.nn.tanh(jax.vmap(self.proj)(x))


class Outer(eqx.Module):
    inner: MaskedBlk
    tail: InnerNoKey

    def __call__(self, x, *, key=None):
        return self.tail(self.inner(x, key=key))


def _mha(dropout: float = 0.0, seed: int = 0) -> eqx.nn.MultiheadAttention:
    return eqx.nn.MultiheadAttention(2, 8, dropout_p=dropout, key=jax.random.key(seed))


def _tokens(seq: int = 5) -> jax.Array:
    return jax.random.normal(jax.random.key(7), (seq, 8))


def _doubled(model):
    return insert_intervention(model, EqxMultiheadAttention, InterveneWith(lambda y: y * 2))


def test_ablated_equinox_child_is_called_with_the_original_positional_inputs() -> None:
    edited = insert_intervention(pzb.lift(Blk(_mha())), EqxMultiheadAttention, ZeroAblation())
    out = edited.positional(_tokens())
    assert out.shape == (5, 8)
    np.testing.assert_array_equal(out, np.zeros((5, 8)))


def test_edited_equinox_child_receives_mask_as_the_original_did() -> None:
    mha, x = _mha(), _tokens()
    mask = jnp.tril(jnp.ones((5, 5), bool))
    out = _doubled(pzb.lift(MaskedBlk(mha))).positional(x, mask=mask)
    _close(out, x + 2 * mha(x, x, x, mask=mask))
    # The mask reached the attention: without it the result differs.
    assert not np.allclose(out, x + 2 * mha(x, x, x))


def test_edited_equinox_child_receives_the_dropout_key() -> None:
    mha, x, key = _mha(dropout=0.5), _tokens(), jax.random.key(3)
    out = _doubled(pzb.lift(MaskedBlk(mha))).positional(x, key=key)
    _close(out, x + 2 * mha(x, x, x, key=key))


def test_edited_equinox_child_called_with_keyword_inputs() -> None:
    block, x = KeywordBlk(_mha()), _tokens()
    _close(_doubled(pzb.lift(block)).positional(x), 2 * block(x))


def test_edited_child_below_nested_custom_block_passing_key() -> None:
    mha, x, key = _mha(dropout=0.5), _tokens(), jax.random.key(4)
    outer = Outer(MaskedBlk(mha), InnerNoKey(eqx.nn.Linear(8, 8, key=jax.random.key(5))))
    out = _doubled(pzb.lift(outer)).positional(x, key=key)
    _close(out, outer.tail(x + 2 * mha(x, x, x, key=key)))


def test_edited_nested_custom_block_without_key_is_not_passed_one() -> None:
    outer = Outer(MaskedBlk(_mha()), InnerNoKey(eqx.nn.Linear(8, 8, key=jax.random.key(5))))
    edited = insert_intervention(pzb.lift(outer), _foreign_named("InnerNoKey"), ZeroAblation())
    np.testing.assert_array_equal(edited.positional(_tokens(), key=jax.random.key(0)), np.zeros((5, 8)))


def test_lowered_edited_equinox_child_runs_natively_and_lifts_back() -> None:
    mha, x, key = _mha(dropout=0.5), _tokens(), jax.random.key(3)
    mask = jnp.tril(jnp.ones((5, 5), bool))
    edited = _doubled(pzb.lift(MaskedBlk(mha)))
    expected = x + 2 * mha(x, x, x, mask=mask, key=key)
    lowered = pzb.lower(edited)
    assert type(lowered) is MaskedBlk
    assert type(lowered.attn) is EquinoxAdapter and lowered.attn.calls_like is eqx.nn.MultiheadAttention
    _close(lowered(x, mask, key=key), expected)
    _close(eqx.filter_jit(lambda m, a: m(a, mask, key=key))(lowered, x), expected)
    again = pzb.lower(pzb.lift(lowered))
    assert type(again.attn) is EquinoxAdapter and again.attn.calls_like is eqx.nn.MultiheadAttention
    _close(again(x, mask=mask, key=key), expected)


def test_edited_equinox_child_called_wrongly_names_the_original_class() -> None:
    lowered = pzb.lower(_doubled(pzb.lift(Blk(_mha()))))
    with pytest.raises(TypeError, match="MultiheadAttention.*value"):
        lowered.attn(_tokens(), _tokens())


def test_lora_on_a_foreign_child_still_lowers_natively() -> None:
    block = _eqx_residual()
    adapted = pzb.toolshed.loraify_linears_in_selection(
        pzb.select(pzb.lift(block)).at_instances_of(pzb.nn.Linear), rank=1, init_base_rng=jax.random.key(3))
    lowered = pzb.lower(adapted)
    assert type(lowered.inner).__name__ == "LoRALinear"
    _close(lowered(jnp.ones(3)), block(jnp.ones(3)))


# Bug 2: NNX interventions holding a plain NamedArray lower. ------------------------------


def _nnx_linear() -> nnx.Linear:
    return nnx.Linear(3, 3, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "intervention",
    [
        AddVector(pzb.nx.wrap(jnp.array([1.0, -2.0, 0.5]), "features")),
        Patch(pzb.nx.wrap(jnp.array([3.0, 4.0, 5.0]), "features")),
        ZeroAblation(mask=pzb.nx.wrap(jnp.array([True, False, True]), "features")),
    ],
    ids=["AddVector", "Patch", "masked ZeroAblation"],
)
def test_nnx_intervention_holding_a_named_array_lowers_and_lifts_back(intervention) -> None:
    linear, x = _nnx_linear(), _batch(2)
    edited = insert_intervention(pzb.lift(linear), pzb.nn.AddBias, intervention)
    lowered = pzb.lower(edited)
    adapters = [m for _, m in nnx.iter_graph(lowered) if isinstance(m, NnxAdapter) and list(m.arrays)]
    assert len(adapters) == 1
    expected = edited.positional(x)
    np.testing.assert_array_equal(lowered(x), expected)
    np.testing.assert_array_equal(nnx.jit(lambda m, a: m(a))(lowered, x), expected)
    # The array is data, not a trainable parameter.
    assert not any(leaf is adapters[0].arrays[0] for leaf in jax.tree.leaves(nnx.state(lowered, nnx.Param)))
    relifted = [layer for layer in pzb.select(pzb.lift(lowered)).at_instances_of(type(intervention)).get_sequence()]
    assert relifted == [intervention]


def test_nnx_add_vector_lowered_by_itself() -> None:
    steer = AddVector(pzb.nx.wrap(jnp.array([1.0, 2.0]), "features"), scale=0.5)
    adapter = pzb.lower(steer, framework="nnx")
    assert type(adapter) is NnxAdapter
    np.testing.assert_array_equal(adapter(jnp.zeros((1, 2))), [[0.5, 1.0]])
    back = pzb.lift(adapter).body
    assert back == steer and back.vector.data_array is steer.vector.data_array
