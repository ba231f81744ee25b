"""``pzb.lower`` validates what it builds (issue 13, item 4): shapes, dtypes and layer types.

Each bad case edits a lifted model the way a careless user would (a weight
of the wrong shape, an ``int8`` parameter, a string where a layer was) and
asserts a :class:`~pzbridge.core.errors.LowerError` whose message starts with
the path and holds the expected value, the found value and a fix; the user's
module and the edited lifted model are unchanged by the failed ``lower``.
Property tests: an untouched lift of a random stock-layer model lowers (no
false positives), and resizing one random parameter is reported with its label.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.core.errors import LowerError
from pzbridge.testing.equinox_strategies import EquinoxExample, equinox_models
from pzbridge.testing.nnx_strategies import nnx_models

KEY = jax.random.key(0)


# -- Editing a lifted model --------------------------------------------------------------------------------------


def _params(tree: Any) -> dict[str, pzb.Parameter]:
    return {leaf.label: leaf for leaf in jax.tree_util.tree_leaves(tree) if isinstance(leaf, pzb.Parameter)}


def _resize(lifted: Any, label: str, **sizes: int) -> Any:
    """Gives parameter ``label`` a zero value with the same axis names and some sizes changed."""
    param = _params(lifted)[label]
    named = dict(param.value.named_shape)
    shape = [sizes.get(name, size) for name, size in named.items()]
    param.value = pzb.nx.wrap(jnp.zeros(shape, param.value.dtype), *named)
    return lifted


def _cast(lifted: Any, label: str, dtype: Any) -> Any:
    param = _params(lifted)[label]
    param.value = param.value.astype(dtype)
    return lifted


def _put(lifted: Any, where: Callable[[Any], Any], value: Any) -> Any:
    return pzb.select(lifted).at(where).set(value)


# -- The user's modules --------------------------------------------------------------------------------------------


class EqxHead(eqx.Module):
    """A custom Equinox module: Foreign without examples, traced with them."""

    lin: eqx.nn.Linear

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.lin(x))


class NnxHead(nnx.Module):
    """A custom NNX module: Foreign without examples, traced with them."""

    def __init__(self) -> None:
        self.lin = nnx.Linear(4, 4, rngs=nnx.Rngs(0))

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.lin(x))


def _eqx_sequential() -> eqx.nn.Sequential:
    return eqx.nn.Sequential([eqx.nn.Linear(4, 4, key=KEY), eqx.nn.Lambda(jax.nn.relu)])


def _nnx_sequential() -> nnx.Sequential:
    return nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), jax.nn.relu)


def _eqx_stack() -> eqx.nn.Linear:
    return eqx.filter_vmap(lambda k: eqx.nn.Linear(4, 4, key=k))(jax.random.split(KEY, 2))


def _nnx_stack() -> nnx.Linear:
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs: nnx.Rngs) -> nnx.Linear:
        return nnx.Linear(2, 2, use_bias=False, rngs=rngs)

    return make(nnx.Rngs(0))


@dataclasses.dataclass(frozen=True)
class Case:
    """A bad edit: ``make()`` builds the user's module, ``edit(lifted)`` breaks its lift."""

    id: str
    make: Callable[[], Any]
    edit: Callable[[Any], Any]
    where: str
    expected: str
    found: str
    example: tuple[Any, ...] = ()


CASES = [
    # Equinox: shapes and dtypes of the native modules built.
    Case("eqx/linear-weight", lambda: eqx.nn.Linear(4, 8, key=KEY), lambda m: _resize(m, "weight", features_out=5),
         "weight", "(8, 4)", "(5, 4)"),
    Case("eqx/linear-bias", lambda: eqx.nn.Linear(4, 8, key=KEY), lambda m: _resize(m, "bias", features=5),
         "bias", "(8,)", "(5,)"),
    Case("eqx/linear-int8", lambda: eqx.nn.Linear(4, 8, key=KEY), lambda m: _cast(m, "weight", jnp.int8),
         "weight", "float32", "int8"),
    Case("eqx/conv-kernel", lambda: eqx.nn.Conv2d(3, 8, 3, key=KEY),
         lambda m: _resize(m, "weight", kernel_height=5, kernel_width=5), "weight", "(8, 3, 3, 3)", "(8, 3, 5, 5)"),
    Case("eqx/conv-bias", lambda: eqx.nn.Conv2d(3, 8, 3, key=KEY), lambda m: _resize(m, "bias", channels=5),
         "bias", "(8, 1, 1)", "(5, 1, 1)"),
    Case("eqx/embedding", lambda: eqx.nn.Embedding(10, 4, key=KEY), lambda m: _resize(m, "weight", vocabulary=12),
         "weight", "(10, 4)", "(12, 4)"),
    Case("eqx/layernorm", lambda: eqx.nn.LayerNorm(4), lambda m: _resize(m, "weight", features=5),
         "weight", "(4,)", "(5,)"),
    Case("eqx/attention-query", lambda: eqx.nn.MultiheadAttention(2, 4, key=KEY),
         lambda m: _resize(m, "query_proj.weight", projection=6), "query_proj.weight", "(4, 4)", "(6, 4)"),
    Case("eqx/attention-output-int", lambda: eqx.nn.MultiheadAttention(2, 4, key=KEY),
         lambda m: _cast(m, "output_proj.weight", jnp.int32), "output_proj.weight", "float32", "int32"),
    # A layer stack: each block is checked under the vmap, so the shapes are one block's.
    Case("eqx/stacked-linear", _eqx_stack, lambda m: _resize(m, "weight", features_out=5),
         "weight", "(4, 4)", "(5, 4)"),
    # Equinox: something that is not a layer where a layer was.
    Case("eqx/sequential-string", _eqx_sequential, lambda m: _put(m, lambda t: t.body.sublayers[1], "relu"),
         "layers[1]", "pzbridge layer", "str 'relu'"),
    Case("eqx/sequential-int", _eqx_sequential, lambda m: _put(m, lambda t: t.body.sublayers[0], 3),
         "layers[0]", "pzbridge layer", "int 3"),
    Case("eqx/sequential-none", _eqx_sequential, lambda m: _put(m, lambda t: t.body.sublayers[1], None),
         "layers[1]", "pzbridge layer", "found None"),
    Case("eqx/foreign-child-string", lambda: EqxHead(eqx.nn.Linear(4, 4, key=KEY)),
         lambda m: _put(m, lambda t: t.body.children["lin"], "linear"), "lin", "pzbridge layer", "str 'linear'"),
    Case("eqx/traced-child-int", lambda: EqxHead(eqx.nn.Linear(4, 4, key=KEY)),
         lambda m: _put(m, lambda t: t.body.body.sublayers[0].layer, 7), "lin", "pzbridge layer", "int 7",
         example=(jnp.ones(4),)),
    Case("eqx/foreign-child-array", lambda: EqxHead(eqx.nn.Linear(4, 4, key=KEY)),
         lambda m: _put(m, lambda t: t.body.children["lin"], jnp.ones(3)), "lin", "pzb.Parameter", "shape (3,)"),
    # NNX: shapes and dtypes of the native modules built.
    Case("nnx/linear-kernel", lambda: nnx.Linear(4, 8, rngs=nnx.Rngs(0)),
         lambda m: _resize(m, "kernel", features_out=5), "kernel", "(4, 8)", "(4, 5)"),
    Case("nnx/linear-bias", lambda: nnx.Linear(4, 8, rngs=nnx.Rngs(0)), lambda m: _resize(m, "bias", features=5),
         "bias", "(8,)", "(5,)"),
    Case("nnx/linear-int8", lambda: nnx.Linear(4, 8, use_bias=False, rngs=nnx.Rngs(0)),
         lambda m: _cast(m, "kernel", jnp.int8), "kernel", "float32", "int8"),
    Case("nnx/conv-kernel", lambda: nnx.Conv(3, 8, (3, 3), rngs=nnx.Rngs(0)),
         lambda m: _resize(m, "kernel", kernel_height=5), "kernel", "(3, 3, 3, 8)", "(5, 3, 3, 8)"),
    Case("nnx/conv-bias", lambda: nnx.Conv(3, 8, (3, 3), rngs=nnx.Rngs(0)), lambda m: _resize(m, "bias", channels=2),
         "bias", "(8,)", "(2,)"),
    Case("nnx/embed", lambda: nnx.Embed(10, 4, rngs=nnx.Rngs(0)), lambda m: _resize(m, "embedding", vocabulary=12),
         "embedding", "(10, 4)", "(12, 4)"),
    Case("nnx/layernorm", lambda: nnx.LayerNorm(4, rngs=nnx.Rngs(0)), lambda m: _resize(m, "scale", features=5),
         "scale", "(4,)", "(5,)"),
    Case("nnx/attention-query", lambda: nnx.MultiHeadAttention(2, 4, decode=False, rngs=nnx.Rngs(0)),
         lambda m: _resize(m, "query.kernel", projection=3), "query.kernel", "(4, 2, 2)", "(4, 2, 3)"),
    Case("nnx/attention-out-bias", lambda: nnx.MultiHeadAttention(2, 4, decode=False, rngs=nnx.Rngs(0)),
         lambda m: _resize(m, "out.bias", features=6), "out.bias", "(4,)", "(6,)"),
    Case("nnx/stacked-int8", _nnx_stack, lambda m: _cast(m, "kernel", jnp.int8), "kernel", "float32", "int8"),
    # NNX: something that is not a layer where a layer was.
    Case("nnx/sequential-string", _nnx_sequential, lambda m: _put(m, lambda t: t.body.sublayers[1], "relu"),
         "layers[1]", "pzbridge layer", "str 'relu'"),
    Case("nnx/sequential-int", _nnx_sequential, lambda m: _put(m, lambda t: t.body.sublayers[0], 2),
         "layers[0]", "pzbridge layer", "int 2"),
    Case("nnx/foreign-child-string", NnxHead, lambda m: _put(m, lambda t: t.body.children["lin"], "linear"),
         "lin", "pzbridge layer", "str 'linear'"),
    Case("nnx/traced-child-none", NnxHead, lambda m: _put(m, lambda t: t.body.body.sublayers[0].layer, None),
         "lin", "pzbridge layer", "found None", example=(jnp.ones((2, 4)),)),
]


# -- Snapshots: nothing the user holds changes ---------------------------------------------------------------------


def _bits(leaf: Any) -> bytes:
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    return np.asarray(leaf).tobytes()


def _snapshot(obj: Any) -> Any:
    """Bitwise leaves (a variable by its value) and structure; an NNX module by every leaf of its state."""
    if isinstance(obj, nnx.Module):
        leaves = jax.tree_util.tree_leaves(nnx.state(obj))
        return "nnx", [_bits(leaf) for leaf in leaves], str(nnx.graphdef(obj))
    leaves, treedef = jax.tree_util.tree_flatten(obj)
    values = [leaf.value if isinstance(leaf, pzb.Parameter) else leaf for leaf in leaves]
    flat = jax.tree_util.tree_leaves(values, is_leaf=pzb.nx.is_namedarray)
    return str(treedef), [_bits(getattr(v, "data_array", v)) if hasattr(v, "dtype") else repr(v) for v in flat]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_lowering_raises_naming_path_expected_found_and_fix(case: Case) -> None:
    module = case.make()
    before = _snapshot(module)
    lifted = case.edit(pzb.lift(module, *case.example))
    edited = _snapshot(lifted)
    with pytest.raises(LowerError) as info:
        pzb.lower(lifted)
    message = str(info.value)
    assert message.startswith(f"{case.where}:"), message
    for part in (case.expected, case.found, "Fix:"):
        assert part in message, (part, message)
    assert _snapshot(module) == before
    assert _snapshot(lifted) == edited


def test_the_issue_example_fails_at_lower_not_later_inside_jax() -> None:
    lifted = _resize(pzb.lift(eqx.nn.Linear(4, 8, key=KEY)), "weight", features_out=5)
    with pytest.raises(LowerError, match=r"weight: eqx\.nn\.Linear\(in_features=4, out_features=8\)"):
        pzb.lower(lifted)


def test_frozen_integer_parameters_and_unchanged_integer_configs_lower() -> None:
    # Freezing is the fix the message offers for a parameter that should not train.
    lifted = _cast(pzb.lift(eqx.nn.Linear(4, 8, key=KEY)), "weight", jnp.int8)
    assert pzb.lower(pzb.freeze_params(lifted)).weight.dtype == jnp.int8
    # An NNX layer configured with integer parameters keeps them.
    module = nnx.Embed(5, 3, rngs=nnx.Rngs(0))
    module.embedding, module.param_dtype = nnx.Param(jnp.ones((5, 3), jnp.int32)), jnp.int32
    assert pzb.lower(pzb.lift(module)).embedding[...].dtype == jnp.int32
    # A float dtype other than the original one trains and is fine.
    lifted = _cast(pzb.lift(eqx.nn.Linear(4, 8, key=KEY)), "weight", jnp.bfloat16)
    assert pzb.lower(lifted).weight.dtype == jnp.bfloat16


def test_edits_that_keep_the_configuration_lower() -> None:
    lifted = pzb.lift(eqx.nn.Linear(4, 8, key=KEY))
    _params(lifted)["weight"].value = _params(lifted)["weight"].value * 2.0
    assert pzb.lower(lifted).weight.shape == (8, 4)
    # Layers built in pzbridge have no lifted configuration: their arrays only need to agree.
    fresh = pzb.nn.Linear.from_config("w", KEY, {"features": 3}, {"features": 5})
    assert pzb.lower(fresh, framework="equinox").weight.shape == (5, 3)
    assert pzb.lower(fresh, framework="nnx").kernel.shape == (3, 5)


# -- Properties over random stock-layer models ---------------------------------------------------------------------

_PROPERTY = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _resizable(lifted: Any) -> list[pzb.Parameter]:
    """Parameters of stock layers (named axes); Foreign raw arrays and PReLU slopes have no configuration."""
    return [p for label, p in sorted(_params(lifted).items())
            if pzb.nx.is_namedarray(p.value) and p.value.named_shape and not p.value.positional_shape
            and not label.endswith("negative_slope")]


def _assert_resize_reported(lifted: Any, data: st.DataObject) -> None:
    candidates = _resizable(lifted)
    if not candidates:
        return
    param = data.draw(st.sampled_from(candidates), label="parameter")
    first = next(iter(param.value.named_shape))
    _resize(lifted, param.label, **{first: param.value.named_shape[first] + 1})
    with pytest.raises(LowerError) as info:
        pzb.lower(lifted)
    assert repr(param.label) in str(info.value), str(info.value)


@_PROPERTY
@given(example=equinox_models(), data=st.data())
def test_random_equinox_models_lower_untouched_and_report_a_resized_parameter(
        example: EquinoxExample, data: st.DataObject) -> None:
    lifted = pzb.lift(example.model)
    pzb.lower(lifted)
    _assert_resize_reported(lifted, data)


@_PROPERTY
@given(drawn=nnx_models(), data=st.data())
def test_random_nnx_models_lower_untouched_and_report_a_resized_parameter(
        drawn: tuple[Any, jax.Array], data: st.DataObject) -> None:
    model, _ = drawn
    before = _snapshot(model)
    lifted = pzb.lift(model)
    pzb.lower(lifted)
    _assert_resize_reported(lifted, data)
    assert _snapshot(model) == before
