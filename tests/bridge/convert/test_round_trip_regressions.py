"""Round trips (Equinox <-> NNX) that other draws of the random-model strategies broke, pinned one law each.

Each case comes back home with the original's outputs and structure as
``tests/bridge/convert/test_round_trip.py`` compares them
(``_equinox_structure`` / ``_nnx_structure``), or is refused with a pzbridge
error naming a fix, never another exception.
"""

from __future__ import annotations

import warnings
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
from test_round_trip import _equinox_structure, _nnx_structure

import pzbridge as pzb
from pzbridge.bridge.convert import convert, convert_with_report
from pzbridge.bridge.equinox.sequential import PositionalJoin
from pzbridge.core.errors import PzbridgeError
from pzbridge.testing.equinox_strategies import Residual as EqxResidual
from pzbridge.testing.equinox_strategies import ScaledByWeight
from pzbridge.testing.nnx_strategies import Residual, Stack, Twice, _halve

FEW = settings(max_examples=6, database=None, derandomize=True, deadline=None,
               suppress_health_check=list(HealthCheck))


def _nnx_back(model: nnx.Module, x: jax.Array) -> nnx.Module:
    """NNX -> Equinox -> NNX, as the round-trip property runs it (a deterministic copy of ``model``)."""
    model = nnx.clone(model)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = convert(convert(model, x, to="equinox"), x[0], to="nnx")
    back.eval()
    return back


def _assert_nnx_round_trip(model: nnx.Module, x: jax.Array) -> nnx.Module:
    back = _nnx_back(model, x)
    assert _nnx_structure(back) == _nnx_structure(model)
    np.testing.assert_allclose(back(x), model(x), atol=1e-5, rtol=1e-5)
    return back


def _assert_equinox_round_trip(model: eqx.Module, *args: jax.Array) -> eqx.Module:
    batched = [jnp.stack([a, a * 0.5 - 0.25]) for a in args]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = convert(convert(model, *args, to="nnx"), *batched, to="equinox")
    assert _equinox_structure(back) == _equinox_structure(model)
    np.testing.assert_allclose(back(*args), model(*args), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(jax.vmap(back)(*batched), jax.vmap(model)(*batched), atol=1e-5, rtol=1e-5)
    return back


def _input(batch: int, width: int, seed: int) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (batch, width))


def _triple_minus_one(x: jax.Array) -> jax.Array:
    return x * 3.0 - 1.0


# A plain function inside an nnx.Sequential (not a known activation) comes back as that function. -------------


def test_residual_of_a_sequential_holding_a_plain_function_comes_back_as_that_sequential():
    rngs = nnx.Rngs(0)
    model = Residual(nnx.Sequential(nnx.Linear(2, 2, rngs=rngs), _halve, nnx.Linear(2, 2, rngs=rngs)))
    back = _assert_nnx_round_trip(model, _input(1, 2, 0))
    assert type(back.inner) is nnx.Sequential and back.inner.layers[1] is _halve


@FEW
@given(st.integers(1, 2), st.integers(2, 3), st.sampled_from([_halve, _triple_minus_one]),
       st.sampled_from(["residual", "twice", "stack", "root"]), st.integers(0, 99))
def test_sequentials_holding_plain_functions_come_back_with_the_same_items(batch, width, fn, wrapper, seed):
    rngs = nnx.Rngs(seed)
    seq = nnx.Sequential(nnx.Linear(width, 4, rngs=rngs), fn, nnx.Linear(4, width, rngs=rngs))
    model = {"residual": Residual, "twice": Twice, "root": lambda s: s,
             "stack": lambda s: Stack([s], {})}[wrapper](seq)
    back = _assert_nnx_round_trip(model, _input(batch, width, seed))
    functions = [layer for _, layer in nnx.iter_graph(back) if layer is fn]
    assert functions or any(item is fn for item in _sequential_items(back))


def _sequential_items(model: nnx.Module) -> list[Any]:
    return [item for _, node in nnx.iter_graph(model) if isinstance(node, nnx.Sequential) for item in node.layers]


@FEW
@given(st.integers(1, 2), st.integers(2, 3), st.sampled_from([_halve, _triple_minus_one, jax.nn.relu]),
       st.integers(0, 99))
def test_a_function_ending_a_sequential_keeps_its_axis_names(batch, width, fn, seed):
    # Nothing after the function names axes: it keeps the ones it got (it used to come back positional, so the
    # residual broadcast it against its input).
    rngs = nnx.Rngs(seed)
    model = Residual(nnx.Sequential(nnx.Linear(width, width, rngs=rngs), fn))
    back = _assert_nnx_round_trip(model, _input(batch, width, seed))
    assert back.inner.layers[1] is fn


# Custom modules inside a stock Sequential inside a custom module are traced too. ---------------------------


@FEW
@given(st.integers(1, 2), st.integers(2, 3), st.sampled_from(["first", "last"]), st.integers(0, 99))
def test_nnx_custom_modules_inside_a_sequential_inside_a_custom_module_are_traced(batch, width, where, seed):
    rngs = nnx.Rngs(seed)
    inner = Residual(nnx.Linear(width, width, rngs=rngs))
    items = [nnx.Linear(width, width, rngs=rngs), inner] if where == "last" else [inner, nnx.Linear(width, width,
                                                                                                    rngs=rngs)]
    _assert_nnx_round_trip(Residual(nnx.Sequential(*items)), _input(batch, width, seed))


@FEW
@given(st.integers(2, 3), st.sampled_from(["residual", "scaled"]), st.integers(0, 99))
def test_equinox_custom_modules_inside_a_sequential_inside_a_custom_module_are_traced(width, kind, seed):
    key = jax.random.key(seed)
    custom = (EqxResidual(eqx.nn.Linear(width, width, key=key)) if kind == "residual"
              else ScaledByWeight(eqx.nn.Identity(), jnp.linspace(0.5, 1.5, width)))
    model = EqxResidual(eqx.nn.Sequential([eqx.nn.Linear(width, width, key=key), custom]))
    _assert_equinox_round_trip(model, jax.random.normal(jax.random.key(seed + 1), (width,)))


# nnx.Einsum nested in a converted model comes back as nnx.Einsum. ------------------------------------------


@FEW
@given(st.integers(1, 2), st.integers(2, 3), st.booleans(),
       st.sampled_from(["residual", "twice", "sequential", "stack", "sequential_twice"]), st.integers(0, 99))
def test_nested_einsums_come_back_as_einsums(batch, width, bias, wrapper, seed):
    rngs = nnx.Rngs(seed)
    einsum = nnx.Einsum("ba,ac->bc", (width, width), (width,) if bias else None, rngs=rngs)
    model = {
        "residual": lambda: Residual(einsum),
        "twice": lambda: Twice(einsum),
        "sequential": lambda: nnx.Sequential(einsum),
        "stack": lambda: Stack([], {"b": einsum}),
        "sequential_twice": lambda: nnx.Sequential(Twice(einsum), nnx.Linear(width, width, rngs=rngs)),
    }[wrapper]()
    _assert_nnx_round_trip(model, _input(batch, width, seed))


@pytest.mark.parametrize("norm", [False, True])
def test_an_einsum_renamed_into_the_next_item_of_a_sequential_converts_to_equinox(norm):
    # The nnx.Sequential joins the einsum's output letter to the Linear's features with a rename; Equinox is
    # positional, so the rename is dropped from the eqx.nn.Sequential (it used to become a failing adapter).
    rngs = nnx.Rngs(3)
    items = [nnx.Einsum("ba,ac->bc", (3, 3), (3,), rngs=rngs), nnx.Linear(3, 3, rngs=rngs)]
    model = Residual(nnx.Sequential(*([nnx.RMSNorm(3, rngs=rngs)] if norm else []), *items))
    x = _input(2, 3, 4)
    converted = convert(model, x, to="equinox")
    np.testing.assert_allclose(jax.vmap(converted)(x), model(x), atol=1e-5, rtol=1e-5)
    # And back: re-lifted, the eqx.nn.Sequential joins the einsum's letter to the Linear's features again (it
    # came back computing an outer product, shape (3, 3) per example).
    _assert_nnx_round_trip(model, x)


@FEW
@given(st.integers(1, 2), st.integers(2, 4), st.booleans(), st.integers(0, 99))
def test_a_sequential_joining_differently_named_items_lifts_with_a_positional_join(batch, width, bias, seed):
    rngs = nnx.Rngs(seed)
    model = Residual(nnx.Sequential(nnx.Einsum("ba,ac->bc", (width, width), (width,) if bias else None, rngs=rngs),
                                    nnx.Linear(width, width, rngs=rngs)))
    x = _input(batch, width, seed)
    converted = convert(model, x, to="equinox")
    native = converted.natives[0]
    assert type(native) is eqx.nn.Sequential and len(native.layers) == 2  # positional: no join in Equinox
    relifted = pzb.lift(converted)
    assert pzb.select(relifted).at_instances_of(PositionalJoin).count() == 1
    np.testing.assert_allclose(relifted.positional(x), model(x), atol=1e-5, rtol=1e-5)
    _assert_nnx_round_trip(model, x)


def test_einsums_outside_a_conversion_still_lower_to_eqx_linear():
    import pzbridge as pzb

    einsum = nnx.Einsum("ba,ad->bd", (3, 3), (3,), rngs=nnx.Rngs(1))
    assert type(pzb.lower(pzb.lift(einsum).body, framework="equinox")) is eqx.nn.Linear
    _, report = convert_with_report(Twice(einsum), _input(2, 3, 0), to="equinox")
    assert [p.runs for p in report.adapters] == ["Traced(Twice)"]  # The einsum rides inside the root adapter.


# Stock roots whose rules record no calling convention convert with their examples. -------------------------


def test_plain_identity_converts_with_an_example():
    back = _assert_equinox_round_trip(eqx.nn.Identity(), jnp.ones(2))
    assert type(back) is eqx.nn.Identity


_SHAPE_KEEPING: dict[str, Callable[[], eqx.Module]] = {
    "identity": eqx.nn.Identity,
    "lambda": lambda: eqx.nn.Lambda(jnp.tanh),
    "dropout": lambda: eqx.nn.Dropout(0.5, inference=True),
    "sequential": lambda: eqx.nn.Sequential([eqx.nn.Lambda(jax.nn.relu), eqx.nn.Identity()]),
    "empty_sequential": lambda: eqx.nn.Sequential([]),
}


@FEW
@given(st.sampled_from(sorted(_SHAPE_KEEPING)), st.integers(1, 3), st.integers(2, 3), st.integers(0, 99))
def test_shape_keeping_equinox_roots_convert_with_examples(kind, rank, size, seed):
    x = jax.random.normal(jax.random.key(seed), (size,) * rank)
    _assert_equinox_round_trip(_SHAPE_KEEPING[kind](), x)


@FEW
@given(st.sampled_from(["empty", "activation", "function", "dropout"]), st.integers(1, 2), st.integers(2, 3),
       st.integers(0, 99))
def test_shape_keeping_nnx_roots_convert_with_examples(kind, batch, width, seed):
    model = {
        "empty": lambda: nnx.Sequential(),
        "activation": lambda: nnx.Sequential(jax.nn.relu),
        "function": lambda: nnx.Sequential(_halve),
        "dropout": lambda: nnx.Dropout(0.5, deterministic=True, rngs=nnx.Rngs(seed)),
    }[kind]()
    _assert_nnx_round_trip(model, _input(batch, width, seed))


# Self-attention inside an nnx.Sequential: converted, or refused with a fix, never a TypeError. ---------------


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("wrapper", ["residual", "stack", "root"])
def test_self_attention_inside_a_sequential_converts_or_is_refused_with_a_fix(batch, wrapper):
    rngs = nnx.Rngs(0)
    attention = nnx.MultiHeadAttention(1, 3, qkv_features=3, decode=False, rngs=rngs)
    seq = nnx.Sequential(attention, nnx.Linear(3, 3, rngs=rngs))
    model = {"residual": Residual, "stack": lambda s: Stack([s], {}), "root": lambda s: s}[wrapper](seq)
    x = _input(batch, 3, 1)
    try:
        back = _nnx_back(model, x)
    except PzbridgeError as error:  # NNX attends over the batch axis, which a per-example model cannot.
        assert batch > 1 and "Fix" in str(error)
        return
    assert _nnx_structure(back) == _nnx_structure(model)
    np.testing.assert_allclose(back(x), model(x), atol=1e-5, rtol=1e-5)


class NormedProjection(eqx.Module):
    """A custom block feeding a Linear's ``features`` into an ``eqx.nn.GroupNorm`` (channels by position)."""

    linear: eqx.nn.Linear
    norm: eqx.nn.GroupNorm

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.gelu(self.norm(self.linear(x)))


@settings(max_examples=8, database=None, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(groups=st.sampled_from([1, 2]), width=st.sampled_from([2, 4]), seed=st.integers(0, 2**16))
def test_a_linear_into_a_group_norm_in_custom_code_converts_and_comes_back(groups: int, width: int,
                                                                         seed: int) -> None:
    # Was: the traced GroupNorm got the Linear's axis named `features` and failed wanting `channels`.
    model = NormedProjection(eqx.nn.Linear(3, width, key=jax.random.key(seed)), eqx.nn.GroupNorm(groups, width))
    xs = jax.random.normal(jax.random.key(seed + 1), (2, 3))
    np.testing.assert_allclose(pzb.lift(model, xs[0], strict=True).positional(xs[0]), model(xs[0]), atol=1e-5)
    converted = convert(model, xs[0], to="nnx")
    np.testing.assert_allclose(converted(xs), jax.vmap(model)(xs), atol=1e-5)
    back = convert(converted, xs, to="equinox")
    assert _equinox_structure(back) == _equinox_structure(model)
    np.testing.assert_allclose(jax.vmap(back)(xs), jax.vmap(model)(xs), atol=1e-5)
