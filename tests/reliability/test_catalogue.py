"""A catalogue of bad inputs: each raises a clear pzbridge error and leaves the user's objects unchanged.

One row per mistake a careless user makes (issue 13), across lift, calling,
select, bind, lower, LoRA, named axes and training. A row names the bad call
(built fresh by a small function that also returns the user's objects), the
pzbridge error class, and three parts the message must contain: where (a
model path or the argument), what was expected and what was found; every
message must also say how to fix it (``Fix``). Before and after the call the
user's objects are snapshotted: Equinox / pzbridge trees by treedef and
bitwise leaves (a variable by its value), NNX modules by every leaf of
``nnx.state``; the two snapshots must be equal.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.tree_util import DictKey, SequenceKey

import pzbridge as pzb
from pzbridge.bridge.equinox.state import lower_with_state
from pzbridge.bridge.naming import AxisNaming
from pzbridge.core.abstract import check_concrete
from pzbridge.core.errors import (
    LiftError,
    LowerError,
    NamedAxisError,
    PzbridgeError,
    SelectionError,
    VariableConflictError,
    VariableError,
)
from pzbridge.core.selectors import combine
from pzbridge.core.variables import FrozenVariableError
from pzbridge.nn.dropout import Dropout
from pzbridge.nn.linear import Linear
from pzbridge.toolshed.checkpointing import CheckpointError
from pzbridge.toolshed.intermediates import resolve_selection
from pzbridge.toolshed.lora import loraify_linears_in_selection
from pzbridge.toolshed.training import Trainer, TrainingError

Build = Callable[[], tuple[Any, Callable[[], Any]]]
KEY = jax.random.key(0)


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input: ``build()`` gives ``(user_objects, bad_call)``; the message must hold the three parts."""

    id: str
    build: Build
    error: type[PzbridgeError]
    where: str
    expected: str
    found: str


# -- The user's objects ---------------------------------------------------------------------------------------


def _eqx_linear() -> eqx.nn.Linear:
    return eqx.nn.Linear(4, 3, key=KEY)


def _nnx_linear() -> nnx.Linear:
    return nnx.Linear(5, 4, rngs=nnx.Rngs(0))


def _pzb_linear() -> Linear:
    return Linear.from_config("d", KEY, {"features": 3}, {"features": 2})


def _int_linear() -> Linear:
    weight = pzb.nx.wrap(jnp.ones((3, 2), jnp.int32), "features", "features_out")
    return Linear(pzb.Parameter(weight, "w"), ("features",), ("features",))


class Scale(eqx.Module):
    """An Equinox module without a lifting rule."""

    w: jax.Array

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.w


class Head(eqx.Module):
    """A custom root: no rule, so it lifts to Foreign and runs its own __call__."""

    lin: eqx.nn.Linear

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.lin(x))


class NnxScale(nnx.Module):
    """An NNX module without a lifting rule."""

    def __init__(self) -> None:
        self.w = nnx.Param(jnp.ones(3))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.w


class Net(eqx.Module):
    """A model holding a BatchNorm (state in an eqx.nn.State)."""

    bn: eqx.nn.BatchNorm

    def __init__(self) -> None:
        self.bn = eqx.nn.BatchNorm(3, "batch", mode="batch")


class NormedNet(eqx.Module):
    """A BatchNorm beside a SpectralNorm, whose state pzbridge does not hold."""

    bn: eqx.nn.BatchNorm
    sn: eqx.nn.SpectralNorm

    def __init__(self) -> None:
        self.bn = eqx.nn.BatchNorm(2, "batch", mode="batch")
        self.sn = eqx.nn.SpectralNorm(eqx.nn.Linear(2, 2, key=KEY), "weight", key=jax.random.key(1))


def _tree() -> dict[str, Any]:
    return {"a": [1, 2], "b": 3}


def _batch() -> pzb.nx.NamedArray:
    return pzb.nx.wrap(jnp.ones((8, 3)), "batch", "features")


# -- Lift ----------------------------------------------------------------------------------------------------


def lift_int() -> tuple[Any, Callable[[], Any]]:
    return 3, lambda: pzb.lift(3)


def lift_function() -> tuple[Any, Callable[[], Any]]:
    return None, lambda: pzb.lift(lambda x: x)


def lift_strict_equinox() -> tuple[Any, Callable[[], Any]]:
    module = Scale(jnp.ones(3))
    return module, lambda: pzb.lift(module, strict=True)


def lift_strict_nnx() -> tuple[Any, Callable[[], Any]]:
    module = NnxScale()
    return module, lambda: pzb.lift(module, strict=True)


def lift_nnx_with_state() -> tuple[Any, Callable[[], Any]]:
    module = _nnx_linear()
    return module, lambda: pzb.lift(module, state={})


def lift_state_dict() -> tuple[Any, Callable[[], Any]]:
    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode="batch")
    return (bn, state), lambda: pzb.lift(bn, state={"running_mean": jnp.zeros(3)})


def lift_state_int() -> tuple[Any, Callable[[], Any]]:
    module = _eqx_linear()
    return module, lambda: pzb.lift(module, state=3)


def lift_state_of_another_model() -> tuple[Any, Callable[[], Any]]:
    bn, _ = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode="batch")
    _, other = eqx.nn.make_with_state(Net)()
    return (bn, other), lambda: pzb.lift(bn, state=other)


def lift_state_of_other_size() -> tuple[Any, Callable[[], Any]]:
    bn, _ = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode="batch")
    _, other = eqx.nn.make_with_state(eqx.nn.BatchNorm)(5, "batch", mode="batch")  # same markers, other sizes
    return (bn, other), lambda: pzb.lift(bn, state=other)


def lift_batchnorm_without_state() -> tuple[Any, Callable[[], Any]]:
    net, state = eqx.nn.make_with_state(Net)()
    return (net, state), lambda: pzb.lift(net)


def lift_naming_string() -> tuple[Any, Callable[[], Any]]:
    module = _eqx_linear()
    return module, lambda: pzb.lift(module, naming="embed")


def lift_input_names_of_wrong_rank() -> tuple[Any, Callable[[], Any]]:
    module = _eqx_linear()
    return module, lambda: pzb.lift(module, jnp.ones(4), input_names=[("a", "b")])


def naming_int() -> tuple[Any, Callable[[], Any]]:
    return None, lambda: AxisNaming(features=3)


def naming_empty() -> tuple[Any, Callable[[], Any]]:
    return None, lambda: AxisNaming(seq="")


def naming_spatial_twice() -> tuple[Any, Callable[[], Any]]:
    return None, lambda: AxisNaming(height="width")


def naming_seq_is_kv_seq() -> tuple[Any, Callable[[], Any]]:
    return None, lambda: AxisNaming(kv_seq="seq")


# -- Calling a lifted model ----------------------------------------------------------------------------------


def call_plain_array_equinox() -> tuple[Any, Callable[[], Any]]:
    module = _eqx_linear()
    lifted = pzb.lift(module)
    return (module, lifted), lambda: lifted(jnp.ones(4))


def call_plain_array_nnx() -> tuple[Any, Callable[[], Any]]:
    module = _nnx_linear()
    lifted = pzb.lift(module)
    return (module, lifted), lambda: lifted(jnp.ones((2, 5)))


def call_abstract_equinox_positional() -> tuple[Any, Callable[[], Any]]:
    lifted = pzb.lift(eqx.filter_eval_shape(eqx.nn.Linear, 4, 3, key=KEY))
    return lifted, lambda: lifted.positional(jnp.ones(4))


def call_abstract_equinox_named() -> tuple[Any, Callable[[], Any]]:
    lifted = pzb.lift(eqx.filter_eval_shape(eqx.nn.Linear, 4, 3, key=KEY))
    return lifted, lambda: lifted(pzb.nx.wrap(jnp.ones(4), "features"))


def call_abstract_nnx() -> tuple[Any, Callable[[], Any]]:
    module = nnx.eval_shape(lambda: nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
    lifted = pzb.lift(module)
    return (module, lifted), lambda: lifted.positional(jnp.ones((2, 4)))


def save_abstract() -> tuple[Any, Callable[[], Any]]:
    # The check pzb.checkpoint.save is to make before writing (pzbridge/checkpoint.py is edited elsewhere).
    lifted = pzb.lift(eqx.filter_eval_shape(eqx.nn.Linear, 4, 3, key=KEY))
    return lifted, lambda: check_concrete(lifted, "saving", CheckpointError)


def call_custom_root_named() -> tuple[Any, Callable[[], Any]]:
    module = Head(_eqx_linear())
    lifted = pzb.lift(module)
    return (module, lifted), lambda: lifted(pzb.nx.wrap(jnp.ones((2, 4)), "batch", "features"))


def call_positional_too_few_axes() -> tuple[Any, Callable[[], Any]]:
    module = _eqx_linear()
    lifted = pzb.lift(module)
    return (module, lifted), lambda: lifted.positional(jnp.ones(()))


def call_missing_axis() -> tuple[Any, Callable[[], Any]]:
    module = _eqx_linear()
    lifted = pzb.lift(module)
    return (module, lifted), lambda: lifted(pzb.nx.wrap(jnp.ones(4), "seq"))


def call_wrong_size() -> tuple[Any, Callable[[], Any]]:
    module = _eqx_linear()
    lifted = pzb.lift(module)
    return (module, lifted), lambda: lifted(pzb.nx.wrap(jnp.ones(5), "features"))


# -- Select --------------------------------------------------------------------------------------------------


def _on_tree(edit: Callable[[pzb.Selection], Any]) -> tuple[Any, Callable[[], Any]]:
    tree = _tree()
    return tree, lambda: edit(pzb.select(tree))


def select_set_on_empty() -> tuple[Any, Callable[[], Any]]:
    return _on_tree(lambda s: s.at_instances_of(str).set(0))


def select_unknown_keypath() -> tuple[Any, Callable[[], Any]]:
    return _on_tree(lambda s: s.at_keypaths([(DictKey("a"), SequenceKey(5))]))


def select_assert_count() -> tuple[Any, Callable[[], Any]]:
    return _on_tree(lambda s: s.at_pytree_leaves().assert_count_is(2))


def select_get_of_several() -> tuple[Any, Callable[[], Any]]:
    return _on_tree(lambda s: s.at_pytree_leaves().get())


def select_set_sequence_count() -> tuple[Any, Callable[[], Any]]:
    return _on_tree(lambda s: s.at_pytree_leaves().set_sequence([1]))


def select_set_by_path_missing() -> tuple[Any, Callable[[], Any]]:
    return _on_tree(lambda s: s.at_pytree_leaves().set_by_path({}))


def select_accessor_raises() -> tuple[Any, Callable[[], Any]]:
    return _on_tree(lambda s: s.at(lambda t: t["zz"]))


def select_accessor_not_a_node() -> tuple[Any, Callable[[], Any]]:
    return _on_tree(lambda s: s.at(lambda t: 5))


def select_pick_out_of_range() -> tuple[Any, Callable[[], Any]]:
    return _on_tree(lambda s: s.at_pytree_leaves().pick_nth_selected(7))


def select_where_array_bool() -> tuple[Any, Callable[[], Any]]:
    return _on_tree(lambda s: s.at_pytree_leaves().where(lambda x: jnp.array(True)))


def select_subtrees_where_string() -> tuple[Any, Callable[[], Any]]:
    return _on_tree(lambda s: s.at_subtrees_where(lambda x: "yes"))


def select_refine_non_selection() -> tuple[Any, Callable[[], Any]]:
    return _on_tree(lambda s: s.at_pytree_leaves().refine(lambda x: 3))


def select_remove_from_dict() -> tuple[Any, Callable[[], Any]]:
    return _on_tree(lambda s: s.at(lambda t: t["b"]).remove_from_parent())


def select_insert_into_dict() -> tuple[Any, Callable[[], Any]]:
    return _on_tree(lambda s: s.at(lambda t: t["b"]).insert_after(0))


def select_combine_nothing() -> tuple[Any, Callable[[], Any]]:
    return None, lambda: combine()


def select_resolve_bad_kind() -> tuple[Any, Callable[[], Any]]:
    model = _pzb_linear()
    return model, lambda: resolve_selection(model, 3)


def select_resolve_nothing() -> tuple[Any, Callable[[], Any]]:
    model = _pzb_linear()
    return model, lambda: resolve_selection(model, pzb.nn.Identity)


def select_resolve_stale() -> tuple[Any, Callable[[], Any]]:
    model = pzb.nn.Sequential([_pzb_linear()])
    stale = pzb.select([_pzb_linear(), _pzb_linear()]).at_instances_of(Linear)
    return model, lambda: resolve_selection(model, stale)


# -- Bind and variables --------------------------------------------------------------------------------------


def _slot_tree() -> list[Any]:
    return [pzb.ParameterSlot("w")]


def bind_non_variable() -> tuple[Any, Callable[[], Any]]:
    tree = _slot_tree()
    return tree, lambda: pzb.bind_variables(tree, [3])


def bind_missing() -> tuple[Any, Callable[[], Any]]:
    tree = _slot_tree()
    return tree, lambda: pzb.bind_variables(tree, [])


def bind_other_kind() -> tuple[Any, Callable[[], Any]]:
    tree, state = _slot_tree(), pzb.StateVariable(jnp.ones(2), "w")
    return (tree, state), lambda: pzb.bind_variables(tree, [state])


def bind_unused() -> tuple[Any, Callable[[], Any]]:
    tree, w, v = _slot_tree(), pzb.Parameter(jnp.ones(2), "w"), pzb.Parameter(jnp.ones(1), "v")
    return (tree, w, v), lambda: pzb.bind_variables(tree, [w, v])


def bind_label_twice() -> tuple[Any, Callable[[], Any]]:
    tree, a, b = _slot_tree(), pzb.Parameter(jnp.ones(2), "w"), pzb.Parameter(jnp.zeros(2), "w")
    return (tree, a, b), lambda: pzb.bind_variables(tree, [a, b])


def unbind_label_conflict() -> tuple[Any, Callable[[], Any]]:
    tree = [pzb.Parameter(jnp.ones(2), "w"), pzb.Parameter(jnp.zeros(2), "w")]
    return tree, lambda: pzb.unbind_variables(tree)


def unbind_params_with_non_callable_predicate() -> tuple[Any, Callable[[], Any]]:
    model = _pzb_linear()
    return model, lambda: pzb.unbind_params(model, "weights")


def unbind_state_vars_with_positional_freeze() -> tuple[Any, Callable[[], Any]]:
    model = _pzb_linear()
    return model, lambda: pzb.unbind_state_vars(model, True)


def variable_empty_label() -> tuple[Any, Callable[[], Any]]:
    return None, lambda: pzb.Parameter(jnp.ones(2), "")


def variable_frozen_assign() -> tuple[Any, Callable[[], Any]]:
    w = pzb.Parameter(jnp.ones(2), "w")
    return w, lambda: setattr(w.freeze(), "value", jnp.zeros(2))


def variable_unbound_slot_value() -> tuple[Any, Callable[[], Any]]:
    slot = pzb.ParameterSlot("w")
    return slot, lambda: slot.value


# -- Named axes ----------------------------------------------------------------------------------------------


def nx_named_axes_none() -> tuple[Any, Callable[[], Any]]:
    data = jnp.arange(5)
    return data, lambda: pzb.nx.NamedArray(data, named_axes=None)


def nx_named_axes_list() -> tuple[Any, Callable[[], Any]]:
    data = jnp.arange(5)
    return data, lambda: pzb.nx.NamedArray(data, named_axes=["seq"])


def nx_size_mismatch() -> tuple[Any, Callable[[], Any]]:
    data = jnp.zeros(3)
    return data, lambda: pzb.nx.NamedArray(data, named_axes={"s": 4})


def nx_duplicate_names() -> tuple[Any, Callable[[], Any]]:
    data = jnp.zeros((2, 2))
    return data, lambda: pzb.nx.wrap(data, "a", "a")


def nx_too_few_names() -> tuple[Any, Callable[[], Any]]:
    data = jnp.zeros((2, 2))
    return data, lambda: pzb.nx.wrap(data, "a")


def nx_int_name() -> tuple[Any, Callable[[], Any]]:
    data = jnp.zeros(2)
    return data, lambda: pzb.nx.wrap(data, 3)


def nx_add_conflicting_sizes() -> tuple[Any, Callable[[], Any]]:
    a, b = pzb.nx.wrap(jnp.zeros(2), "a"), pzb.nx.wrap(jnp.zeros(3), "a")
    return (a, b), lambda: a + b


def nx_untag_unknown() -> tuple[Any, Callable[[], Any]]:
    x = pzb.nx.wrap(jnp.zeros(2), "a")
    return x, lambda: x.untag("b")


def nx_unwrap_leaves_names() -> tuple[Any, Callable[[], Any]]:
    x = pzb.nx.wrap(jnp.zeros((2, 3)), "a", "b")
    return x, lambda: x.untag("a").unwrap()


def nx_tag_used_name() -> tuple[Any, Callable[[], Any]]:
    x = pzb.nx.wrap(jnp.zeros((2, 3))).tag_prefix("a")
    return x, lambda: x.tag("a")


def nx_nmap_conflicting_sizes() -> tuple[Any, Callable[[], Any]]:
    a, b = pzb.nx.wrap(jnp.zeros((2, 3))).tag_prefix("a"), pzb.nx.wrap(jnp.zeros((4, 3))).tag_prefix("a")
    return (a, b), lambda: pzb.nx.nmap(jnp.dot)(a, b)


def nn_dropout_rate() -> tuple[Any, Callable[[], Any]]:
    return None, lambda: Dropout(rate=2.0)


# -- LoRA ----------------------------------------------------------------------------------------------------


def _lora(model: Any, *args: Any, cls: type = Linear, **kwargs: Any) -> tuple[Any, Callable[[], Any]]:
    return model, lambda: loraify_linears_in_selection(pzb.select(model).at_instances_of(cls), *args, **kwargs)


def lora_int_key() -> tuple[Any, Callable[[], Any]]:
    return _lora(_pzb_linear(), 2, 0)


def lora_int32_linear() -> tuple[Any, Callable[[], Any]]:
    return _lora(_int_linear(), 2, KEY)


def lora_int32_equinox_linear() -> tuple[Any, Callable[[], Any]]:
    module = _eqx_linear()
    module = eqx.tree_at(lambda m: (m.weight, m.bias), module, (module.weight.astype(jnp.int32),
                                                                module.bias.astype(jnp.int32)))
    lifted = pzb.lift(module)
    return (module, lifted), _lora(lifted, 1, KEY)[1]


def lora_rank_above_dimensions_nnx() -> tuple[Any, Callable[[], Any]]:
    module = _nnx_linear()
    lifted = pzb.lift(module)
    return (module, lifted), _lora(lifted, 8, KEY)[1]


def lora_rank_above_dimensions() -> tuple[Any, Callable[[], Any]]:
    return _lora(_pzb_linear(), 50, KEY)


def lora_rank_zero() -> tuple[Any, Callable[[], Any]]:
    return _lora(_pzb_linear(), 0, KEY)


def lora_rank_negative() -> tuple[Any, Callable[[], Any]]:
    return _lora(_pzb_linear(), -2, KEY)


def lora_rank_float() -> tuple[Any, Callable[[], Any]]:
    return _lora(_pzb_linear(), 2.0, KEY)


def lora_rank_bool() -> tuple[Any, Callable[[], Any]]:
    return _lora(_pzb_linear(), True, KEY)


def lora_not_a_linear() -> tuple[Any, Callable[[], Any]]:
    return _lora(pzb.nn.Sequential([pzb.nn.Identity()]), 1, KEY, cls=pzb.nn.Identity)


def lora_rank_axis_in_use() -> tuple[Any, Callable[[], Any]]:
    return _lora(_pzb_linear(), 1, KEY, rank_axis="features")


def lora_unbound_weight() -> tuple[Any, Callable[[], Any]]:
    return _lora(pzb.unbind_params(_pzb_linear())[0], 1, KEY)


# -- Training ------------------------------------------------------------------------------------------------


def _train(model: Any, loss_fn: Callable[..., Any], *batch: Any) -> tuple[Any, Callable[[], Any]]:
    return model, lambda: Trainer(model, loss_fn, optax.sgd(0.1)).step(*batch)


def train_non_scalar_loss() -> tuple[Any, Callable[[], Any]]:
    return _train(_pzb_linear(), lambda m, x: m(x).unwrap("batch", "features"), _batch())


def train_named_loss() -> tuple[Any, Callable[[], Any]]:
    return _train(_pzb_linear(), lambda m, x: (m(x) ** 2).sum("batch"), _batch())


def train_integer_loss() -> tuple[Any, Callable[[], Any]]:
    return _train(_pzb_linear(), lambda m, x: jnp.int32(1), _batch())


def train_no_trainable_parameter() -> tuple[Any, Callable[[], Any]]:
    return _train(pzb.nn.Identity(), lambda m: jnp.float32(1.0))


# -- Lower ---------------------------------------------------------------------------------------------------


def lower_unknown_framework() -> tuple[Any, Callable[[], Any]]:
    layer = _pzb_linear()
    return layer, lambda: pzb.lower(layer)


def lower_bad_framework() -> tuple[Any, Callable[[], Any]]:
    module = _eqx_linear()
    lifted = pzb.lift(module)
    return (module, lifted), lambda: pzb.lower(lifted, framework="torch")


def lower_with_state_missing_entries() -> tuple[Any, Callable[[], Any]]:
    net, state = eqx.nn.make_with_state(NormedNet)()
    lifted = pzb.lift(net, state=state)
    return (net, state, lifted), lambda: lower_with_state(lifted)


# -- The table -----------------------------------------------------------------------------------------------

CASES: list[Case] = [
    # lift
    Case("lift/int", lift_int, LiftError, "<root>", "eqx.Module or an nnx.Module", "builtins.int"),
    Case("lift/function", lift_function, LiftError, "<root>", "eqx.Module or an nnx.Module", "function"),
    Case("lift/strict-equinox-no-rule", lift_strict_equinox, LiftError, "<root>", "lifting rule", "Scale"),
    Case("lift/strict-nnx-no-rule", lift_strict_nnx, LiftError, "<root>", "lifting rule", "NnxScale"),
    Case("lift/nnx-with-state", lift_nnx_with_state, LiftError, "<root>", "Equinox models", "nnx.Module"),
    Case("lift/state-dict", lift_state_dict, LiftError, "state=", "eqx.nn.State", "dict"),
    Case("lift/state-int", lift_state_int, LiftError, "state=", "eqx.nn.State", "int 3"),
    Case("lift/state-of-another-model", lift_state_of_another_model, LiftError, "batch_counter",
         "'BatchNorm.batch_counter'", "'Net.bn.batch_counter'"),
    Case("lift/state-of-other-size", lift_state_of_other_size, LiftError, "<root>", "(3,)", "(5,)"),
    Case("lift/batchnorm-without-state", lift_batchnorm_without_state, LiftError, "bn", "state=state",
         "no state="),
    Case("lift/naming-string", lift_naming_string, LiftError, "naming=", "AxisNaming", "str 'embed'"),
    Case("lift/input-names-rank", lift_input_names_of_wrong_rank, LiftError, "input_names[0]", "2 axes",
         "shape (4,)"),
    Case("naming/int", naming_int, NamedAxisError, "AxisNaming.features", "non-empty str", "int 3"),
    Case("naming/empty", naming_empty, NamedAxisError, "AxisNaming.seq", "non-empty str", "''"),
    Case("naming/spatial-twice", naming_spatial_twice, NamedAxisError, "AxisNaming", "distinct names",
         "height='width'"),
    Case("naming/seq-is-kv-seq", naming_seq_is_kv_seq, NamedAxisError, "AxisNaming", "distinct names",
         "kv_seq='seq'"),
    # calling a lifted model
    Case("call/plain-array-equinox", call_plain_array_equinox, NamedAxisError, "<root>", "pzb.nx.NamedArray",
         "shape (4,)"),
    Case("call/plain-array-nnx", call_plain_array_nnx, NamedAxisError, "<root>", "pzb.nx.NamedArray",
         "shape (2, 5)"),
    Case("call/abstract-equinox-positional", call_abstract_equinox_positional, VariableError, "weight",
         "real arrays", "ShapeDtypeStruct(shape=(3, 4)"),
    Case("call/abstract-equinox-named", call_abstract_equinox_named, VariableError, "weight", "real arrays",
         "ShapeDtypeStruct(shape=(3, 4)"),
    Case("call/abstract-nnx", call_abstract_nnx, VariableError, "kernel", "real arrays",
         "ShapeDtypeStruct(shape=(4, 3)"),
    Case("save/abstract", save_abstract, CheckpointError, "weight", "real arrays", "ShapeDtypeStruct"),
    Case("call/custom-root-named-input", call_custom_root_named, NamedAxisError, "<root>",
         "own axes to stay positional", "{'batch': 2, 'features': 4}"),
    Case("call/positional-too-few-axes", call_positional_too_few_axes, NamedAxisError, "argument 0",
         "at least 1 axes", "shape ()"),
    Case("call/missing-axis", call_missing_axis, NamedAxisError, "Linear 'weight'", "['features']",
         "{'seq': 4}"),
    Case("call/wrong-size", call_wrong_size, NamedAxisError, "Linear 'weight'", "'features': 4",
         "{'features': 5}"),
    # select
    Case("select/set-on-empty", select_set_on_empty, SelectionError, ".set()", "at least one selected node",
         "0 selected nodes"),
    Case("select/unknown-keypath", select_unknown_keypath, SelectionError, "at_keypaths",
         "keypaths of existing nodes", "['a'][5]"),
    Case("select/assert-count", select_assert_count, SelectionError, "['a'][0]", "Expected 2", "found 3"),
    Case("select/get-of-several", select_get_of_several, SelectionError, "Selection.get()", "exactly one",
         "3 selected nodes"),
    Case("select/set-sequence-count", select_set_sequence_count, SelectionError, "set_sequence",
         "one value per selected node", "got 1 values"),
    Case("select/set-by-path-missing", select_set_by_path_missing, SelectionError, "set_by_path",
         "exactly the selected keypaths", "missing"),
    Case("select/accessor-raises", select_accessor_raises, SelectionError, ".at()", "index only", "KeyError"),
    Case("select/accessor-not-a-node", select_accessor_not_a_node, SelectionError, ".at()",
         "a node of the selected subtree", "int 5"),
    Case("select/pick-out-of-range", select_pick_out_of_range, SelectionError, "pick_nth_selected(7)",
         "[-3, 3)", "index 7"),
    Case("select/where-array-bool", select_where_array_bool, SelectionError, "where", "Python bool",
         "ArrayImpl"),
    Case("select/subtrees-where-string", select_subtrees_where_string, SelectionError, "at_subtrees_where",
         "Python bool", "str"),
    Case("select/refine-non-selection", select_refine_non_selection, SelectionError, "refine(fn)",
         "must return a Selection", "returned int"),
    Case("select/remove-from-dict", select_remove_from_dict, SelectionError, "['b']",
         "element of a list or tuple", "held by a dict"),
    Case("select/insert-into-dict", select_insert_into_dict, SelectionError, "['b']",
         "element of a list or tuple", "held by a dict"),
    Case("select/combine-nothing", select_combine_nothing, SelectionError, "combine()", "at least one tree",
         "no arguments"),
    Case("select/resolve-bad-kind", select_resolve_bad_kind, SelectionError, "the selection",
         "a pzb.Selection, a layer class", "int 3"),
    Case("select/resolve-nothing", select_resolve_nothing, SelectionError, "the selection",
         "at least one layer", "class Identity"),
    Case("select/resolve-stale", select_resolve_stale, SelectionError, "the Selection", "exist in this model",
         "missing: ['[0]', '[1]']"),
    # bind and variables
    Case("bind/non-variable", bind_non_variable, VariableError, "bind_variables",
         "Parameter/StateVariable objects", "found int"),
    Case("bind/missing", bind_missing, VariableError, "ParameterSlot 'w' at [0]", "labelled 'w'",
         "Available labels: none"),
    Case("bind/other-kind", bind_other_kind, VariableError, "ParameterSlot 'w' at [0]", "expects a Parameter",
         "given a StateVariable"),
    Case("bind/unused", bind_unused, VariableError, "bind_variables", "no slot in the tree", "['v']"),
    Case("bind/label-twice", bind_label_twice, VariableConflictError, "bind_variables", "fills its slots once",
         "two entries labelled 'w'"),
    Case("unbind/label-conflict", unbind_label_conflict, VariableConflictError, "Parameter at [0]", "unique",
         "Parameter at [1]"),
    Case("unbind/params-non-callable-predicate", unbind_params_with_non_callable_predicate, VariableError,
         "unbind_params", "freeze= as a keyword", "str 'weights'"),
    Case("unbind/state-vars-positional-freeze", unbind_state_vars_with_positional_freeze, VariableError,
         "unbind_state_vars", "freeze= as a keyword", "bool True"),
    Case("variable/empty-label", variable_empty_label, VariableError, "Parameter", "non-empty string", "''"),
    Case("variable/frozen-assign", variable_frozen_assign, FrozenVariableError, "ParameterValue 'w'",
         "mutable variable", "is frozen"),
    Case("variable/unbound-slot-value", variable_unbound_slot_value, VariableError, "ParameterSlot 'w'",
         "bind it first", "unbound"),
    # named axes
    Case("nx/named-axes-none", nx_named_axes_none, NamedAxisError, "named_axes", "axis names to sizes",
         "NoneType None"),
    Case("nx/named-axes-list", nx_named_axes_list, NamedAxisError, "named_axes", "axis names to sizes",
         "list ['seq']"),
    Case("nx/size-mismatch", nx_size_mismatch, NamedAxisError, "NamedArray", "shape (3,)", "{'s': 4}"),
    Case("nx/duplicate-names", nx_duplicate_names, NamedAxisError, "tag", "each name once", "['a', 'a']"),
    Case("nx/too-few-names", nx_too_few_names, NamedAxisError, "tag", "one name per positional axis",
         "1 names"),
    Case("nx/int-name", nx_int_name, NamedAxisError, "tag", "strings", "[3]"),
    Case("nx/add-conflicting-sizes", nx_add_conflicting_sizes, NamedAxisError, "__add__", "size 2",
         "3 in operand 1"),
    Case("nx/untag-unknown", nx_untag_unknown, NamedAxisError, "untag", "named axes ['a']", "['b']"),
    Case("nx/unwrap-leaves-names", nx_unwrap_leaves_names, NamedAxisError, "unwrap", "pass them to unwrap",
         "['b'] remain"),
    Case("nx/tag-used-name", nx_tag_used_name, NamedAxisError, "tag", "pick new names", "already used"),
    Case("nx/nmap-conflicting-sizes", nx_nmap_conflicting_sizes, NamedAxisError, "nmap(dot)", "size 2",
         "4 in argument 1"),
    Case("nn/dropout-rate", nn_dropout_rate, PzbridgeError, "Dropout", "[0, 1]", "2.0"),
    # LoRA
    Case("lora/int-key", lora_int_key, SelectionError, "init_base_rng", "PRNG key", "int 0"),
    Case("lora/int32-linear", lora_int32_linear, SelectionError, "'w'", "floating-point", "int32"),
    Case("lora/int32-equinox-linear", lora_int32_equinox_linear, SelectionError, "'weight'", "floating-point",
         "int32"),
    Case("lora/rank-above-dimensions-nnx", lora_rank_above_dimensions_nnx, SelectionError, "'kernel'",
         "rank <= 5", "found 8"),
    Case("lora/rank-above-dimensions", lora_rank_above_dimensions, SelectionError, "'d.weights'", "rank <= 3",
         "found 50"),
    Case("lora/rank-zero", lora_rank_zero, SelectionError, "rank", "int >= 1", "int 0"),
    Case("lora/rank-negative", lora_rank_negative, SelectionError, "rank", "int >= 1", "int -2"),
    Case("lora/rank-float", lora_rank_float, SelectionError, "rank", "int >= 1", "float 2.0"),
    Case("lora/rank-bool", lora_rank_bool, SelectionError, "rank", "int >= 1", "bool True"),
    Case("lora/not-a-linear", lora_not_a_linear, SelectionError, "sublayers[0]",
         "pzb.nn.Linear or pzb.nn.NamedEinsum", "Identity"),
    Case("lora/rank-axis-in-use", lora_rank_axis_in_use, SelectionError, "'d.weights'", "unused name",
         "already has an axis named 'features'"),
    Case("lora/unbound-weight", lora_unbound_weight, VariableError, "'d.weights'", "bind the model's variables",
         "unbound slot"),
    # training
    Case("train/non-scalar-loss", train_non_scalar_loss, TrainingError, "loss_fn", "shape ()", "shape (8, 2)"),
    Case("train/named-loss", train_named_loss, TrainingError, "loss_fn", "scalar", "NamedArray"),
    Case("train/integer-loss", train_integer_loss, TrainingError, "loss_fn", "float array", "dtype int32"),
    Case("train/no-trainable-parameter", train_no_trainable_parameter, TrainingError, "build_train_step",
         "trainable Parameter", "checked []"),
    # lower
    Case("lower/unknown-framework", lower_unknown_framework, LowerError, "<root>", "framework='equinox'",
         "framework=None"),
    Case("lower/bad-framework", lower_bad_framework, LowerError, "<root>", "framework='nnx'",
         "framework='torch'"),
    Case("lower/with-state-missing-entries", lower_with_state_missing_entries, LowerError, "<root>",
         "state=state", "does not hold"),
]


# -- Snapshots -----------------------------------------------------------------------------------------------


def _frozen(leaf: Any) -> Any:
    """A leaf as comparable data: arrays as (dtype, shape, bytes), placeholders as themselves, others by identity."""
    if isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        array = np.asarray(leaf)
        return ("array", str(array.dtype), array.shape, array.tobytes())
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return ("placeholder", leaf.shape, str(leaf.dtype))
    return ("object", id(leaf))


def _nnx_snapshot(module: nnx.Module) -> list[Any]:
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(module))[0]
    return [("nnx", jax.tree_util.keystr(path), _frozen(leaf)) for path, leaf in leaves]


def snapshot(obj: Any) -> list[Any]:
    """Everything a bad call could change: structure, every array bit, every variable's value."""
    if isinstance(obj, nnx.Module):
        return _nnx_snapshot(obj)
    leaves, treedef = jax.tree_util.tree_flatten(obj, is_leaf=lambda x: isinstance(x, nnx.Module))
    out: list[Any] = [("treedef", treedef)]
    for leaf in leaves:
        if isinstance(leaf, nnx.Module):
            out.extend(_nnx_snapshot(leaf))
        elif isinstance(leaf, pzb.AbstractVariable) and hasattr(leaf, "value"):
            out.append(("variable", id(leaf), leaf.label, snapshot(leaf.value)))
        else:
            out.append(_frozen(leaf))
    return out


# -- Tests ---------------------------------------------------------------------------------------------------


def test_the_catalogue_is_large_and_its_ids_are_unique():
    ids = [case.id for case in CASES]
    assert len(ids) >= 40 and len(set(ids)) == len(ids)
    assert all(issubclass(case.error, PzbridgeError) for case in CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_raises_a_clear_error_and_changes_nothing(case):
    subject, bad_call = case.build()
    before = snapshot(subject)
    with pytest.raises(case.error) as info:
        bad_call()
    assert isinstance(info.value, PzbridgeError)
    message = str(info.value)
    for part in (case.where, case.expected, case.found, "Fix"):
        assert part in message, f"{case.id}: {part!r} not in message {message!r}"
    assert snapshot(subject) == before, f"{case.id}: the user's objects changed"


def test_snapshots_see_a_changed_nnx_state_leaf():
    # The snapshot itself must notice a change, or the catalogue's "unchanged" check proves nothing.
    module = _nnx_linear()
    before = snapshot(module)
    module.bias.set_value(module.bias.get_value().at[0].add(1.0))
    assert snapshot(module) != before


def test_snapshots_see_a_changed_parameter_value():
    model = _pzb_linear()
    before = snapshot(model)
    model.weights.value = model.weights.value * 2
    assert snapshot(model) != before
