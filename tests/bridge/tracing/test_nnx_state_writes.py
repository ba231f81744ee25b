"""Traced lifting of NNX modules that update their own Variables during the call (issue 12).

References are the original modules, run on clones: after 1 and 3 calls the
lifted model's outputs and state equal the module's; lowering gives the
original classes back (same Variable types, ``nnx.graphdef`` equal) whose
Variables update in place like the original's, under ``nnx.jit`` too; the
user's module is never touched. Converted to Equinox, the written Variables
live in an ``eqx.nn.State`` (``y, state = model(x, state)``, batched under
``jax.vmap(..., axis_name="batch")``) and come back to NNX with their values.
"""

from __future__ import annotations

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.bridge.convert import convert
from pzbridge.bridge.equinox.adapter import EquinoxAdapter
from pzbridge.bridge.nnx.adapter import NnxAdapter
from pzbridge.bridge.tracing.state_writes import WritesState
from pzbridge.core.errors import LiftError, LowerError
from pzbridge.nn.dataflow import Traced
from pzbridge.testing.nnx_strategies import Counter, ScaleShift, Twice

# Tolerance where the lifted glue runs other primitives than NNX (a named mean over the batch for x.mean(0)).
TOL = {"atol": 1e-6, "rtol": 1e-6}


class Steps(nnx.Module):
    """Counts its calls in a custom Variable type and scales by a Param."""

    def __init__(self, width: int, seed: int) -> None:
        self.scale = nnx.Param(1.0 + 0.1 * jax.random.normal(jax.random.key(seed), (width,)))
        self.steps = Counter(jnp.zeros((), jnp.int32))

    def __call__(self, x: jax.Array) -> jax.Array:
        self.steps[...] += 1
        return x * self.scale[...]


class RunningMean(nnx.Module):
    """BatchNorm-like: a Linear, then centring by an EMA of the batch mean, written from the batch."""

    def __init__(self, width: int, seed: int, momentum: float = 0.9) -> None:
        self.linear = nnx.Linear(width, width, rngs=nnx.Rngs(seed))
        self.mean = nnx.BatchStat(jnp.zeros(width))
        self.momentum = momentum

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.linear(x)
        self.mean[...] = self.momentum * self.mean[...] + (1 - self.momentum) * h.mean(axis=0)
        return h - self.mean[...]


class LastInput(nnx.Module):
    """Writes a cache it never reads (the written value is the last batch's first row)."""

    def __init__(self, width: int) -> None:
        self.last = nnx.Cache(jnp.zeros(width))

    def __call__(self, x: jax.Array) -> jax.Array:
        self.last[...] = x[0]
        return jnp.tanh(x)


class Blocks(nnx.Module):
    """Runs an ``nnx.List`` of stateful blocks, then counts its own calls."""

    def __init__(self, width: int, seed: int) -> None:
        self.blocks = nnx.List([RunningMean(width, seed), Steps(width, seed + 1)])
        self.calls = nnx.Variable(jnp.zeros((), jnp.int32))

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        self.calls[...] = self.calls[...] + 1
        return x


def _input(width: int, seed: int = 7, batch: int = 4) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (batch, width))


def _raw(var: object) -> np.ndarray:
    return np.asarray(var.get_value() if isinstance(var, nnx.Variable) else var)  # plain array attributes too


def _states(module: nnx.Module) -> dict[str, np.ndarray]:
    """Every non-Param Variable's value by path (what the calls wrote)."""
    flat = nnx.to_flat_state(nnx.state(module, nnx.Not(nnx.Param)))
    return {".".join(map(str, path)): _raw(var) for path, var in flat}


def _values(module: nnx.Module) -> dict[str, np.ndarray]:
    return {".".join(map(str, path)): _raw(var) for path, var in nnx.to_flat_state(nnx.state(module))}


def _lifted_state(lifted: object) -> dict[str, np.ndarray]:
    out = {}
    for variable in pzb.select(lifted).at_instances_of(pzb.StateVariable).get_sequence():
        value = variable.value
        out[variable.label] = np.asarray(value.unwrap(*value.named_shape) if pzb.nx.is_namedarray(value) else value)
    return out


def _check_calls(module: nnx.Module, x: jax.Array, calls: int) -> object:
    """Lifts ``module``, calls the lifted model and a clone ``calls`` times, compares outputs and state."""
    before = _values(module)
    reference = nnx.clone(module)
    lifted = pzb.lift(module, x)
    assert pzb.select(lifted).at_instances_of(WritesState).count() >= 1
    for step in range(calls):
        xs = x * (step + 1)  # another batch each time: the statistics move
        np.testing.assert_allclose(lifted.positional(xs), reference(xs), **TOL)
    want = _states(reference)
    got = _lifted_state(lifted)
    for path, value in want.items():
        np.testing.assert_allclose(got[path], value, **TOL)
        assert got[path].dtype == value.dtype, path
    after = _values(module)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    return lifted


def test_a_counter_in_a_custom_variable_type_counts_lifted_calls():
    module = Steps(3, 0)
    lifted = _check_calls(module, _input(3), 3)
    assert isinstance(lifted.body, Traced)
    (steps,) = [v for v in pzb.select(lifted).at_instances_of(pzb.StateVariable).get_sequence()]
    assert steps.label == "steps" and int(steps.value.unwrap()) == 3
    assert int(module.steps[...]) == 0  # the user's module never ran


def test_a_running_mean_written_from_the_batch_matches_after_one_and_three_calls():
    for calls in (1, 3):
        _check_calls(RunningMean(4, 1), _input(4), calls)


def test_a_cache_only_written_is_lifted_and_lowered_as_a_cache():
    module = LastInput(3)
    x = _input(3)
    lifted = _check_calls(module, x, 1)
    lowered = pzb.lower(lifted)
    assert type(lowered) is LastInput and type(lowered.last) is nnx.Cache
    np.testing.assert_array_equal(lowered.last[...], x[0])  # the state the lifted call left
    lowered(x * 2)
    np.testing.assert_array_equal(lowered.last[...], x[0] * 2)


class GrowingCache(nnx.Module):
    """Appends every batch to a cache: the written value is larger than the one read."""

    def __init__(self, width: int) -> None:
        self.seen = nnx.Cache(jnp.zeros((1, width)))

    def __call__(self, x: jax.Array) -> jax.Array:
        self.seen.set_value(jnp.concatenate([self.seen[...], x]))
        return x * 2


def test_a_cache_that_grows_grows_in_the_lifted_and_the_lowered_model():
    module = GrowingCache(3)
    x = _input(3)
    lifted = _check_calls(module, x, 3)
    (seen,) = pzb.select(lifted).at_instances_of(pzb.StateVariable).get_sequence()
    assert seen.value.data_array.shape == (13, 3)
    lowered = pzb.lower(lifted)
    lowered(x)
    assert type(lowered.seen) is nnx.Cache and lowered.seen[...].shape == (17, 3)
    assert module.seen[...].shape == (1, 3)


def test_stateful_blocks_in_a_list_and_a_sequential_match_the_module():
    _check_calls(Blocks(3, 2), _input(3), 3)
    _check_calls(nnx.Sequential(Steps(3, 3), RunningMean(3, 4), Steps(3, 5)), _input(3), 3)


class Stats(nnx.Module):
    """Only holds Variables (never called): the parent's glue keeps its statistics here."""

    def __init__(self, width: int) -> None:
        self.mean = nnx.BatchStat(jnp.zeros(width))
        self.seen = nnx.Variable(jnp.zeros((), jnp.int32))


class Tracker(nnx.Module):
    """Writes the Variables of a child it does not call, after a LayerNorm child."""

    def __init__(self, width: int) -> None:
        self.linear = nnx.Linear(width, width, rngs=nnx.Rngs(0))
        self.norm = nnx.LayerNorm(width, rngs=nnx.Rngs(1))
        self.stats = Stats(width)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.norm(self.linear(x))
        self.stats.mean[...] = 0.5 * self.stats.mean[...] + 0.5 * h.mean(axis=0)
        self.stats.seen[...] += 1
        return h * 2


def test_writes_into_a_childs_variables_and_a_child_called_twice_match_the_module():
    module = Tracker(3)
    x = _input(3)
    lifted = _check_calls(module, x, 3)
    lowered = pzb.lower(lifted)
    assert nnx.graphdef(lowered) == nnx.graphdef(module) and type(lowered.stats.mean) is nnx.BatchStat
    reference = nnx.clone(module)
    for step in range(3):
        reference(x * (step + 1))
    np.testing.assert_allclose(lowered(x), reference(x), **TOL)
    assert int(lowered.stats.seen[...]) == int(reference.stats.seen[...]) == 4
    twice = _check_calls(Twice(Steps(3, 12)), x, 2)
    (steps,) = pzb.select(twice).at_instances_of(pzb.StateVariable).get_sequence()
    assert int(steps.value.unwrap()) == 4  # one shared child, two calls per call


def test_lowering_rebuilds_the_original_classes_whose_variables_update_in_place():
    module = Blocks(3, 6)
    x = _input(3)
    lifted = pzb.lift(module, x)
    lifted.positional(x)
    lowered = pzb.lower(lifted)
    assert nnx.graphdef(lowered) == nnx.graphdef(module)
    assert type(lowered.blocks[1].steps) is Counter and type(lowered.blocks[0].mean) is nnx.BatchStat
    reference = nnx.clone(module)
    reference(x)  # the state the lifted model has after one call
    for step in range(2):
        np.testing.assert_allclose(lowered(x + step), reference(x + step), **TOL)
    assert int(lowered.blocks[1].steps[...]) == 3 and int(lowered.calls[...]) == 3
    np.testing.assert_allclose(lowered.blocks[0].mean[...], reference.blocks[0].mean[...], **TOL)
    assert int(module.calls[...]) == 0


def test_the_lowered_module_updates_its_state_under_nnx_jit():
    module = RunningMean(4, 8)
    x = _input(4)
    lowered = pzb.lower(pzb.lift(module, x))
    reference = nnx.clone(module)
    step = nnx.jit(lambda m, a: m(a))
    for i in range(3):
        np.testing.assert_allclose(step(lowered, x * i), step(reference, x * i), **TOL)
    np.testing.assert_allclose(lowered.mean[...], reference.mean[...], **TOL)
    assert not np.array_equal(lowered.mean[...], module.mean[...])


def test_the_tied_param_stays_one_variable_and_the_counter_keeps_its_type():
    module = ScaleShift(3, 0)
    x = _input(3)
    lifted = _check_calls(module, x, 2)
    assert pzb.select(lifted).at_instances_of(pzb.Parameter).count() == 1
    lowered = pzb.lower(lifted)
    assert lowered.tied is lowered.scale and type(lowered.calls) is Counter
    assert int(lowered.calls[...]) == 2
    lowered(x)
    assert int(lowered.calls[...]) == 3


def test_stateless_call_and_variable_jit_return_the_new_state():
    module = RunningMean(3, 9)
    x = _input(3)
    lifted = pzb.lift(module, x)
    reference = nnx.clone(module)
    expected = reference(x)
    slots, values = pzb.unbind_variables(lifted.body, freeze=True)
    named = pzb.nx.wrap(x, "batch", "features")
    out, new_state = jax.jit(slots.stateless_call)(values, named)
    np.testing.assert_allclose(out.unwrap("batch", "features"), expected, **TOL)
    (mean,) = [v for v in new_state if v.label == "mean"]
    np.testing.assert_allclose(mean.value.unwrap("features"), reference.mean[...], **TOL)

    step = pzb.variable_jit(lambda body, a: body(a))
    step(lifted.body, named)
    np.testing.assert_allclose(_lifted_state(lifted)["mean"], reference.mean[...], **TOL)


def test_an_edited_glue_runs_in_an_adapter_that_still_updates_its_variables():
    module = Steps(3, 10)
    x = _input(3)
    lifted = pzb.lift(module, x)
    edited = pzb.select(lifted).at_instances_of(WritesState).apply(
        lambda layer: pzb.nn.Sequential([layer, pzb.nn.Elementwise(jax.nn.relu)]))
    adapter = pzb.lower(edited)
    assert isinstance(adapter, NnxAdapter)
    reference = nnx.clone(module)
    for _ in range(2):
        np.testing.assert_allclose(adapter(x), jax.nn.relu(reference(x)), **TOL)
    counts = [v for _, v in nnx.to_flat_state(nnx.state(adapter)) if isinstance(v, Counter)]
    assert [int(v[...]) for v in counts] == [2]


# Converted to Equinox: the written Variables travel in an eqx.nn.State. ---------------------------------


def _make(kind: str, width: int, seed: int) -> nnx.Module:
    return {
        "steps": lambda: Steps(width, seed),
        "running_mean": lambda: RunningMean(width, seed, 0.8),
        "last_input": lambda: LastInput(width),
        "blocks": lambda: Blocks(width, seed),
        "sequential": lambda: nnx.Sequential(Steps(width, seed), RunningMean(width, seed + 1), LastInput(width)),
    }[kind]()


def _named_vmap(converted: object) -> object:
    """The Equinox way to call a stateful per-example model on a batch (as for eqx.nn.BatchNorm)."""
    return jax.vmap(converted, axis_name="batch", in_axes=(0, None), out_axes=(0, None))


def _entry(converted: EquinoxAdapter, state: eqx.nn.State) -> dict[str, np.ndarray]:
    return {label: np.asarray(value) for label, value in state.get(converted.state_index).items()}


def _check_states(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    for path, value in want.items():
        np.testing.assert_allclose(got[path], value, **TOL)
        assert got[path].dtype == value.dtype, path


@settings(max_examples=10, derandomize=True, deadline=None)
@given(kind=st.sampled_from(["steps", "running_mean", "last_input", "blocks", "sequential"]), width=st.integers(2, 4),
       batch=st.integers(1, 3), calls=st.integers(1, 3), seed=st.integers(0, 5), jit=st.booleans())
def test_converted_to_equinox_the_written_variables_live_in_an_eqx_state_and_come_back(kind, width, batch, calls,
                                                                                     seed, jit):
    module = _make(kind, width, seed)
    before = _values(module)
    x = _input(width, seed, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = convert(module, x, to="equinox")
    assert isinstance(converted, EquinoxAdapter) and converted.is_stateful()
    state = eqx.nn.State(converted)
    step = eqx.filter_jit(lambda m, *a: _named_vmap(m)(*a)) if jit else lambda m, *a: _named_vmap(m)(*a)
    reference = nnx.clone(module)
    for i in range(calls):
        y, state = step(converted, x * (i + 1), state)
        np.testing.assert_allclose(y, reference(x * (i + 1)), **TOL)
    _check_states(_entry(converted, state), _states(reference))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = convert(converted, x[0], to="nnx", state=state)
    assert nnx.graphdef(back) == nnx.graphdef(module)
    _check_states(_states(back), _states(reference))
    np.testing.assert_allclose(back(x), reference(x), **TOL)
    _check_states(_states(back), _states(reference))
    after = _values(module)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # the user's module never ran


def test_a_call_outside_a_vmap_is_a_batch_of_one_and_eqx_sequential_threads_the_state():
    module = nnx.Sequential(Steps(3, 4), LastInput(3))  # outputs per example: no batch axis needed
    x = _input(3)
    converted = convert(module, x, to="equinox")
    assert not converted.needs_batch_axis
    y, state = converted(x[1], eqx.nn.State(converted))
    reference = nnx.clone(module)
    np.testing.assert_allclose(y, reference(x[1:2])[0], **TOL)
    _check_states(_entry(converted, state), _states(reference))

    module = Blocks(3, 4)  # centres by the batch mean: only a named vmap computes it
    converted = convert(module, x, to="equinox")
    assert converted.needs_batch_axis
    with pytest.raises(LowerError, match="mixes the examples of a batch.*Fix"):
        converted(x[1], eqx.nn.State(converted))
    chain = eqx.nn.Sequential([converted, eqx.nn.Lambda(jnp.tanh)])
    state = eqx.nn.State(chain)
    reference = nnx.clone(module)
    for _ in range(2):
        y, state = _named_vmap(chain)(x, state)
        np.testing.assert_allclose(y, jnp.tanh(reference(x)), **TOL)
    _check_states(_entry(converted, state), _states(reference))


def test_stateful_conversion_errors_name_the_fix():
    module = Steps(3, 0)
    x = _input(3)
    converted = convert(module, x, to="equinox")
    with pytest.raises(LowerError, match=r"y, state = model\(x, state\).*Fix"):
        converted(x[0])
    with pytest.raises(LiftError, match="state=.*Fix"):
        convert(converted, x[0], to="nnx")
    with pytest.raises(LowerError, match="keeps its shape.*Fix"):
        convert(GrowingCache(3), x, to="equinox")
    assert int(module.steps[...]) == 0


class WritesParam(nnx.Module):
    def __init__(self) -> None:
        self.w = nnx.Param(jnp.ones(3))

    def __call__(self, x: jax.Array) -> jax.Array:
        self.w[...] = self.w[...] * 0.5
        return x * self.w[...]


class WritesTwoNames(nnx.Module):
    def __init__(self) -> None:
        self.count = nnx.Variable(jnp.zeros(()))
        self.alias = self.count

    def __call__(self, x: jax.Array) -> jax.Array:
        self.count[...] += 1
        return x * self.alias[...]


@pytest.mark.parametrize(("module", "reason"), [
    (WritesParam(), "writes its Param 'w' in place"),
    (WritesTwoNames(), "also reaches under another name"),
])
def test_writes_that_cannot_be_expressed_stay_foreign_and_strict_names_them(module, reason):
    x = _input(3)
    lifted = pzb.lift(module, x)
    assert isinstance(lifted.body, pzb.nn.Foreign)
    with pytest.raises(LiftError, match=reason):
        pzb.lift(module, x, strict=True)


@settings(max_examples=12, derandomize=True, deadline=None)
@given(width=st.integers(1, 4), batch=st.integers(2, 3), calls=st.integers(1, 3), seed=st.integers(0, 5),
       momentum=st.sampled_from([0.0, 0.5, 0.9]))
def test_lifted_and_lowered_stateful_modules_match_the_module_for_any_width_and_calls(width, batch, calls, seed,
                                                                                     momentum):
    module = nnx.Sequential(RunningMean(width, seed, momentum), Steps(width, seed))
    x = _input(width, seed, batch)
    lifted = _check_calls(module, x, calls)
    lowered = pzb.lower(lifted)
    reference = nnx.clone(module)
    for step in range(calls):
        reference(x * (step + 1))
    np.testing.assert_allclose(lowered(x), reference(x), **TOL)
    assert _states(lowered).keys() == _states(reference).keys()
    for path, value in _states(reference).items():
        np.testing.assert_allclose(_states(lowered)[path], value, **TOL)
