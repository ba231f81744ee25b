"""Trainable interchange interventions (DAS): laws, training on a frozen model, saving, on every kind of model."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge import checkpoint
from pzbridge.core.errors import LowerError, NamedAxisError, PzbridgeError
from pzbridge.toolshed.intermediates import capture_intermediates
from pzbridge.toolshed.interventions import patch_activations
from pzbridge.toolshed.specs import Spec, SpecError, load_spec, save_spec
from pzbridge.toolshed.trainable import (
    BoundlessMask,
    LowRankRotatedInterchange,
    RotatedSubspaceInterchange,
)
from pzbridge.toolshed.trainable_fit import (
    interchange_accuracy,
    intervened,
    train_intervention,
)
from pzbridge.toolshed.where import Where
from pzbridge.toolshed.worlds import RouteWorlds, stack_worlds, unstack_worlds

D_IN, HIDDEN, D_OUT = 4, 6, 8
TOL = {"rtol": 1e-5, "atol": 1e-5}


# -- Models of every kind: pzb.nn, a stock Equinox MLP, traced custom Equinox and NNX modules. -----------------

class RawMLP(eqx.Module):
    """Research-code MLP: einsum on raw arrays, one example at a time under jax.vmap."""

    w1: jax.Array
    b1: jax.Array
    w2: jax.Array

    def __call__(self, x: jax.Array) -> jax.Array:
        def one(v: jax.Array) -> jax.Array:
            return jnp.einsum("h,ho->o", jnp.tanh(jnp.einsum("i,ih->h", v, self.w1) + self.b1), self.w2)

        return jax.vmap(one)(x)


class NnxRawMLP(nnx.Module):
    """The same in Flax NNX, batched, raw Params read with ``[...]``."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.w1 = nnx.Param(jax.random.normal(rngs.params(), (D_IN, HIDDEN)) / math.sqrt(D_IN))
        self.w2 = nnx.Param(jax.random.normal(rngs.params(), (HIDDEN, D_OUT)) / math.sqrt(HIDDEN))

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("bh,ho->bo", jnp.tanh(jnp.einsum("bi,ih->bh", x, self.w1[...])), self.w2[...])


class ScanMLP(eqx.Module):
    """A scanned stack of residual tanh layers (``lax.scan`` over stacked weights), then a readout."""

    w_in: jax.Array
    ws: jax.Array
    readout: jax.Array

    def __call__(self, x: jax.Array) -> jax.Array:
        def body(h: jax.Array, w: jax.Array) -> tuple[jax.Array, None]:
            return h + jnp.tanh(h @ w), None

        h, _ = jax.lax.scan(body, jnp.tanh(x @ self.w_in), self.ws)
        return h @ self.readout


@dataclasses.dataclass(frozen=True)
class Case:
    """A lifted model, its interchange site, the site's feature axis and the output's axes."""

    name: str
    model: Any
    at: Where
    axis: str
    out_axes: tuple[str, ...]


def pzb_case(seed: int) -> Case:
    k1, k2 = jax.random.split(jax.random.key(seed))
    model = pzb.nn.Sequential([
        pzb.nn.Linear.from_config("in", k1, {"features": D_IN}, {"hidden": HIDDEN}),
        pzb.nn.Elementwise(jnp.tanh),
        pzb.nn.Linear.from_config("out", k2, {"hidden": HIDDEN}, {"logits": D_OUT}),
    ])
    return Case("pzb.nn", model, Where(layer="Elementwise"), "hidden", ("batch", "logits"))


def equinox_mlp_case(seed: int) -> Case:
    mlp = eqx.nn.MLP(D_IN, D_OUT, HIDDEN, 1, activation=jnp.tanh, key=jax.random.key(seed))
    return Case("eqx.nn.MLP", pzb.lift(mlp), Where(path="body.sublayers[1]"), "features", ("batch", "features"))


def traced_equinox_case(seed: int) -> Case:
    ks = jax.random.split(jax.random.key(seed), 3)
    raw = RawMLP(jax.random.normal(ks[0], (D_IN, HIDDEN)) / 2, jax.random.normal(ks[1], (HIDDEN,)) / 4,
                 jax.random.normal(ks[2], (HIDDEN, D_OUT)) / 2)
    lifted = pzb.lift(raw, jnp.ones((3, D_IN)), strict=True)
    return Case("traced eqx", lifted, Where(label="w2", side="before"), "features", ("batch", "features"))


def traced_nnx_case(seed: int) -> Case:
    lifted = pzb.lift(NnxRawMLP(nnx.Rngs(seed)), jnp.ones((3, D_IN)), strict=True)
    return Case("traced nnx", lifted, Where(label="w2", side="before"), "features", ("batch", "features"))


def traced_scan_case(seed: int) -> Case:
    ks = jax.random.split(jax.random.key(seed), 3)
    raw = ScanMLP(jax.random.normal(ks[0], (D_IN, HIDDEN)) / 2, jax.random.normal(ks[1], (3, HIDDEN, HIDDEN)) / 3,
                  jax.random.normal(ks[2], (HIDDEN, D_OUT)) / 2)
    lifted = pzb.lift(raw, jnp.ones((3, D_IN)), strict=True)
    assert pzb.select(lifted).at_instances_of(pzb.nn.LayerStack).count() == 1
    return Case("traced scan", lifted, Where(label="readout", side="before"), "features", ("batch", "features"))


CASES: list[Callable[[int], Case]] = [pzb_case, equinox_mlp_case, traced_equinox_case, traced_nnx_case,
                                      traced_scan_case]
CASE_IDS = ["pzb_nn", "eqx_mlp", "traced_eqx", "traced_nnx", "traced_scan"]


def inputs(seed: int, n: int) -> pzb.nx.NamedArray:
    return pzb.nx.wrap(jax.random.normal(jax.random.key(seed + 500), (n, D_IN)), "batch", "features")


def out(y: pzb.nx.NamedArray, case: Case) -> np.ndarray:
    return np.asarray(y.unwrap(*case.out_axes))


def base_world(model: Any, base: Any, source: Any) -> pzb.nx.NamedArray:
    return unstack_worlds(model(stack_worlds([base, source])))[0]


# -- A pure-numpy reference of DAS's interchange: R^T ((1 - m) R b + m R s). ---------------------------------

def reference_interchange(rotation: np.ndarray, mask: np.ndarray, base: np.ndarray, source: np.ndarray) -> np.ndarray:
    """``rotation`` is R (rotated x features); rows are examples."""
    r = rotation.astype(np.float64)
    rb, rs = base.astype(np.float64) @ r.T, source.astype(np.float64) @ r.T
    return ((1 - mask) * rb + mask * rs) @ r


def on_worlds(layer: Any, base: np.ndarray, source: np.ndarray, axis: str = "f") -> np.ndarray:
    x = stack_worlds([pzb.nx.wrap(jnp.asarray(base), "batch", axis), pzb.nx.wrap(jnp.asarray(source), "batch", axis)])
    return np.asarray(layer(x).unwrap("worlds", "batch", axis))


# -- Laws ---------------------------------------------------------------------------------------------------------

@settings(max_examples=6, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), d=st.integers(1, 6), n=st.integers(1, 3), identity=st.booleans())
def test_k0_is_a_bitwise_no_op_for_identity_and_random_rotations(seed: int, d: int, n: int, identity: bool) -> None:
    base = np.asarray(jax.random.normal(jax.random.key(seed), (n, d)))
    source = np.asarray(jax.random.normal(jax.random.key(seed + 1), (n, d)))
    init = "identity" if identity else "random"
    for layer in (RotatedSubspaceInterchange.from_config("r", jax.random.key(seed), {"f": d}, k=0, init=init),
                  LowRankRotatedInterchange.from_config("l", jax.random.key(seed), {"f": d}, k=0, init=init)):
        result = on_worlds(layer, base, source)
        np.testing.assert_array_equal(result[0], base)
        np.testing.assert_array_equal(result[1], source)  # the source world is never touched


@settings(max_examples=8, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), d=st.integers(1, 6), n=st.integers(1, 3), data=st.data())
def test_interchange_matches_the_numpy_reference_over_shapes_and_k(seed: int, d: int, n: int, data: Any) -> None:
    k = data.draw(st.integers(0, d), label="k")
    base = np.asarray(jax.random.normal(jax.random.key(seed), (n, d)))
    source = np.asarray(jax.random.normal(jax.random.key(seed + 1), (n, d)))
    key = jax.random.key(seed + 2)

    rotated = RotatedSubspaceInterchange.from_config("r", key, {"f": d}, k=k)
    rotation = np.asarray(rotated.rotation().unwrap("rotated", "f"))
    mask = (np.arange(d) < k).astype(np.float64)
    np.testing.assert_allclose(on_worlds(rotated, base, source)[0],
                               reference_interchange(rotation, mask, base, source), **TOL)

    low = LowRankRotatedInterchange.from_config("l", key, {"f": d}, k=k)
    q = np.asarray(low.basis().unwrap("f", "rotated"), np.float64)
    # Any rotation whose first k rows span the basis: complete it with an orthonormal complement.
    complete = np.linalg.qr(np.concatenate([q, np.eye(d)], axis=1))[0][:, :d] if k < d else q
    np.testing.assert_allclose(on_worlds(low, base, source)[0],
                               reference_interchange(complete.T, mask, base, source), **TOL)

    logits = jax.random.normal(jax.random.key(seed + 3), (d,))
    boundless = BoundlessMask.from_config("b", key, {"f": d}, temperature=0.5)
    boundless = dataclasses.replace(boundless, mask_logits=pzb.Parameter(pzb.nx.wrap(logits, "rotated"), "b.mask"))
    soft = np.asarray(jax.nn.sigmoid(logits / 0.5), np.float64)
    np.testing.assert_allclose(on_worlds(boundless, base, source)[0],
                               reference_interchange(np.asarray(boundless.rotation().unwrap("rotated", "f")), soft,
                                                     base, source), **TOL)


@pytest.mark.parametrize("make", CASES, ids=CASE_IDS)
def test_full_interchange_equals_patching_the_whole_site_from_the_source(make: Callable[[int], Case]) -> None:
    case = make(0)
    base, source = inputs(1, 5), inputs(2, 5)
    d = capture_intermediates(case.model, case.at, base)[1]
    (activation,) = d.values()
    size = activation.named_shape[case.axis]
    das = RotatedSubspaceInterchange.from_config("das", jax.random.key(3), {case.axis: size}, k=size)
    intervened_out = base_world(intervened(case.model, case.at, das), base, source)
    patched = patch_activations(case.model, source, base, at=case.at)
    # Not bitwise: b + Q Q^T (s - b) equals s only to rounding.
    np.testing.assert_allclose(out(intervened_out, case), out(patched, case), **TOL)


@pytest.mark.parametrize("make", CASES, ids=CASE_IDS)
def test_jit_equals_eager(make: Callable[[int], Case]) -> None:
    case = make(1)
    base, source = inputs(3, 4), inputs(4, 4)
    size = HIDDEN
    das = RotatedSubspaceInterchange.from_config("das", jax.random.key(5), {case.axis: size}, k=2)
    edited = intervened(case.model, case.at, das)
    worlds = stack_worlds([base, source])
    eager = edited(worlds)
    jitted = jax.jit(lambda m, x: m(x))(pzb.freeze_variables(edited), worlds)
    np.testing.assert_allclose(jitted.unwrap("worlds", *case.out_axes), eager.unwrap("worlds", *case.out_axes),
                               rtol=1e-5, atol=1e-6)


# -- Training on a frozen model --------------------------------------------------------------------------------

def planted(case: Case, k: int, seed: int) -> LowRankRotatedInterchange:
    """A fixed (plain-array) basis of k directions: the subspace DAS has to find."""
    q = np.linalg.qr(np.asarray(jax.random.normal(jax.random.key(seed + 900), (HIDDEN, k))))[0]
    return LowRankRotatedInterchange(pzb.nx.wrap(jnp.asarray(q, jnp.float32), case.axis, "rotated"), case.axis)


def mse(case: Case) -> Callable[[Any, Any], Any]:
    def loss(output: Any, target: Any) -> Any:
        diff = (output - target) ** 2
        return diff.mean(*diff.named_shape).unwrap()

    return loss


def param_arrays(model: Any) -> list[np.ndarray]:
    return [np.asarray(p.value.unwrap(*p.value.named_shape)) for p in pzb.unbind_params(model)[1]]


@pytest.mark.parametrize("make", CASES, ids=CASE_IDS)
def test_training_recovers_a_planted_subspace_with_the_model_frozen(make: Callable[[int], Case]) -> None:
    case = make(2)
    k = 2
    base, source = inputs(10, 128), inputs(11, 128)
    target = base_world(intervened(case.model, case.at, planted(case, k, 2)), base, source)
    before = param_arrays(case.model)
    das = LowRankRotatedInterchange.from_config("das", jax.random.key(7), {case.axis: HIDDEN}, k=k)
    start = np.asarray(das.weight.value.unwrap(case.axis, "rotated"))
    fit = train_intervention(case.model, case.at, das, base, source, target, loss=mse(case),
                             optimizer=optax.adam(0.03), steps=800)
    assert fit.intervention is das
    assert not np.array_equal(np.asarray(das.weight.value.unwrap(case.axis, "rotated")), start)  # trained in place
    assert fit.losses[-10:].mean() < 1e-3 * fit.losses[0], fit.losses[[0, -1]]
    # The model's parameters are untouched, bitwise, and still the same objects' values.
    for a, b in zip(before, param_arrays(case.model)):
        np.testing.assert_array_equal(a, b)
    q = np.asarray(das.basis().unwrap(case.axis, "rotated"))
    p = np.asarray(planted(case, k, 2).basis().unwrap(case.axis, "rotated"))
    assert np.abs(q @ q.T - p @ p.T).max() < 0.05  # the same subspace (projectors agree)


def test_only_intervention_parameters_get_gradients_and_the_rotation_stays_orthogonal() -> None:
    case = pzb_case(3)
    base, source = inputs(12, 64), inputs(13, 64)
    target = base_world(intervened(case.model, case.at, planted(case, 3, 3)), base, source)
    model_objects = pzb.unbind_params(case.model)[1]
    values_before = [p.value for p in model_objects]
    das = RotatedSubspaceInterchange.from_config("das", jax.random.key(8), {case.axis: HIDDEN}, k=3)
    fit = train_intervention(case.model, case.at, das, base, source, target, loss=mse(case),
                             optimizer=optax.adam(0.1), steps=60)
    assert all(p.value is v for p, v in zip(model_objects, values_before))  # never even reassigned
    assert [type(s).__name__ for s in jax.tree.leaves(fit.opt_state, is_leaf=pzb.nx.is_namedarray)
            if pzb.nx.is_namedarray(s)] == ["NamedArray"] * 2  # adam's mu and nu for the one rotation
    r = np.asarray(das.rotation().unwrap("rotated", case.axis), np.float64)
    np.testing.assert_allclose(r @ r.T, np.eye(HIDDEN), atol=1e-5)
    raw = np.asarray(das.weight.value.unwrap(case.axis, "rotated"))
    assert np.abs(raw.T @ raw - np.eye(HIDDEN)).max() > 1e-3  # the raw matrix moved off orthogonality; Q did not


def test_boundless_mask_trains_with_an_annealed_temperature() -> None:
    case = pzb_case(4)
    base, source = inputs(14, 64), inputs(15, 64)
    target = base_world(intervened(case.model, case.at, planted(case, 2, 4)), base, source)
    mask = BoundlessMask.from_config("bdas", jax.random.key(9), {case.axis: HIDDEN}, temperature=1.0)
    schedule = lambda step: 1.0 - 0.9 * step / 79
    fit = train_intervention(case.model, case.at, mask, base, source, target, loss=mse(case),
                             optimizer=optax.adam(0.05), steps=80, temperature_schedule=schedule,
                             penalty=lambda m: 1e-3 * m.mask_size())
    assert float(mask.temperature.value) == pytest.approx(0.1)
    assert fit.losses[-5:].mean() < 0.5 * fit.losses[0]
    soft = np.asarray(mask.mask().unwrap("rotated"))
    assert soft.min() >= 0.0 and soft.max() <= 1.0 and not np.allclose(soft, 0.5)


def test_interchange_accuracy_scores_neuron_sets_and_whole_site_patches() -> None:
    case = pzb_case(5)
    base, source = inputs(16, 50), inputs(17, 50)
    source_labels = case.model(source).argmax("logits").unwrap("batch")
    base_labels = case.model(base).argmax("logits").unwrap("batch")
    # Patching the whole site hands the source's prediction to the base run; interchanging nothing keeps the base's.
    assert interchange_accuracy(case.model, case.at, RouteWorlds((1, 1)), base, source, source_labels,
                                class_axis="logits") == 1.0
    nothing = LowRankRotatedInterchange.of_units({case.axis: HIDDEN}, [])
    assert interchange_accuracy(case.model, case.at, nothing, base, source, base_labels, class_axis="logits") == 1.0
    everything = LowRankRotatedInterchange.of_units({case.axis: HIDDEN}, list(range(HIDDEN)))
    assert interchange_accuracy(case.model, case.at, everything, base, source, source_labels,
                                class_axis="logits") == 1.0
    wrong = (source_labels + 1) % D_OUT
    assert interchange_accuracy(case.model, case.at, everything, base, source, wrong, class_axis="logits") == 0.0


def test_an_indexed_site_interchanges_only_there() -> None:
    model = pzb.nn.Sequential([pzb.nn.Identity()])
    base = pzb.nx.wrap(jnp.zeros((2, 3, 4)), "batch", "seq", "f")
    source = pzb.nx.wrap(jnp.ones((2, 3, 4)), "batch", "seq", "f")
    das = RotatedSubspaceInterchange.from_config("das", jax.random.key(0), {"f": 4}, k=4)
    result = base_world(intervened(model, Where(layer="Identity", index={"seq": 1}), das), base, source)
    values = np.asarray(result.unwrap("batch", "seq", "f"))
    np.testing.assert_array_equal(values[:, [0, 2]], 0.0)
    np.testing.assert_allclose(values[:, 1], 1.0, atol=1e-6)


# -- Saving: orbax checkpoints and specs ---------------------------------------------------------------------------

def test_trained_parameters_round_trip_through_an_orbax_checkpoint(tmp_path: Any) -> None:
    mask = BoundlessMask.from_config("bdas", jax.random.key(1), {"hidden": HIDDEN}, temperature=0.3, logit=1.5)
    checkpoint.save(str(tmp_path), mask)
    fresh = BoundlessMask.from_config("bdas", jax.random.key(2), {"hidden": HIDDEN})
    checkpoint.restore(str(tmp_path), fresh)
    for name in ("weight", "mask_logits"):
        np.testing.assert_array_equal(np.asarray(getattr(fresh, name).value.unwrap(*getattr(fresh, name).value.named_shape)),
                                      np.asarray(getattr(mask, name).value.unwrap(*getattr(mask, name).value.named_shape)))
    assert float(fresh.temperature.value) == pytest.approx(0.3)


@pytest.mark.parametrize("kind", ["rotated", "low_rank", "boundless"])
def test_interventions_round_trip_as_spec_operations(kind: str, tmp_path: Any) -> None:
    case = traced_equinox_case(6)
    key = jax.random.key(11)
    layer = {"rotated": lambda: RotatedSubspaceInterchange.from_config("das", key, {"features": HIDDEN}, k=2),
             "low_rank": lambda: LowRankRotatedInterchange.from_config("das", key, {"features": HIDDEN}, k=3),
             "boundless": lambda: BoundlessMask.from_config("das", key, {"features": HIDDEN}, temperature=0.7)}[kind]()
    spec = Spec().add(case.at, layer)
    save_spec(spec, tmp_path)
    loaded = load_spec(tmp_path)
    reloaded = loaded.edits[0][1]
    assert type(reloaded) is type(layer) and reloaded.weight.label == layer.weight.label
    base, source = inputs(20, 3), inputs(21, 3)
    np.testing.assert_array_equal(out(base_world(loaded.apply(case.model), base, source), case),
                                  out(base_world(spec.apply(case.model), base, source), case))


def test_a_malformed_spec_operation_is_refused() -> None:
    layer = RotatedSubspaceInterchange.from_config("das", jax.random.key(0), {"features": 3}, k=1)
    data, arrays = Spec().add(Where(layer="Identity"), layer).to_json()
    data["edits"][0]["params"]["k"] = "two"
    with pytest.raises(SpecError, match="k"):
        Spec.from_json(data, arrays)


# -- Errors ----------------------------------------------------------------------------------------------------------

def test_errors_name_what_was_expected_and_the_fix() -> None:
    das = RotatedSubspaceInterchange.from_config("das", jax.random.key(0), {"hidden": 3}, k=1)
    with pytest.raises(NamedAxisError, match="stack_worlds"):
        das(pzb.nx.zeros({"hidden": 3}))                              # no worlds axis
    with pytest.raises(NamedAxisError, match="'hidden': 3"):
        das(stack_worlds([pzb.nx.zeros({"features": 3})] * 2))         # the wrong feature axis
    with pytest.raises(PzbridgeError, match=r"k .* in \[0, 3\]"):
        RotatedSubspaceInterchange.from_config("das", jax.random.key(0), {"hidden": 3}, k=4)
    with pytest.raises(PzbridgeError, match="one-entry mapping"):
        LowRankRotatedInterchange.from_config("das", jax.random.key(0), {"a": 2, "b": 2}, k=1)
    with pytest.raises(PzbridgeError, match="routes"):
        RotatedSubspaceInterchange.from_config("das", jax.random.key(0), {"hidden": 3}, k=1, routes=(2, 0))
    case = pzb_case(0)
    x = inputs(0, 4)
    with pytest.raises(PzbridgeError, match="holds no Parameter"):
        train_intervention(case.model, case.at, LowRankRotatedInterchange.of_units({"hidden": HIDDEN}, [0]), x, x,
                           jnp.zeros(4, jnp.int32), steps=1)
    with pytest.raises(PzbridgeError, match="temperature_schedule"):
        train_intervention(case.model, case.at, das, x, x, jnp.zeros(4, jnp.int32), steps=1,
                           temperature_schedule=lambda s: 1.0)
    with pytest.raises(PzbridgeError, match="same number of examples"):
        train_intervention(case.model, case.at, das, x, inputs(1, 5), jnp.zeros(4, jnp.int32), steps=1)


def test_a_lowered_model_with_the_layer_runs_under_a_worlds_vmap_and_says_so_outside_one() -> None:
    case = equinox_mlp_case(0)
    das = RotatedSubspaceInterchange.from_config("das", jax.random.key(0), {"features": HIDDEN}, k=2)
    edited = pzb.toolshed.insert_intervention(case.model, case.at, das)
    lowered = pzb.lower(edited)
    assert isinstance(lowered, eqx.Module)
    base, source = inputs(7, 1), inputs(8, 1)
    want = base_world(edited, base, source)
    stacked = jnp.stack([base.unwrap("batch", "features")[0], source.unwrap("batch", "features")[0]])
    got = jax.vmap(lowered, axis_name="worlds")(stacked)
    np.testing.assert_allclose(got[0], want.unwrap("batch", "features")[0], **TOL)
    with pytest.raises(LowerError, match=r"jax.vmap\(model, axis_name=.worlds.\)"):
        lowered(jnp.ones(D_IN))
