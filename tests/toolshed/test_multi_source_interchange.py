"""Multi-source interchange (DAS of several causal variables): each block of coordinates read from its own source.

World 0 (the base) takes block ``g`` of the interchanged coordinates from
world ``routes[g][0]``; the update is ``b + sum_g Q_g (m_g * Q_g^T (s_g - b))``.
Laws against a numpy reference, reductions to the one-source layer, the
untouched worlds, training on a frozen model with ``Sources``, specs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_trainable_interventions import (
    HIDDEN,
    TOL,
    Case,
    inputs,
    mse,
    out,
    pzb_case,
    traced_equinox_case,
)

import pzbridge as pzb
from pzbridge.core.errors import NamedAxisError, PzbridgeError
from pzbridge.toolshed.specs import Spec, load_spec, save_spec
from pzbridge.toolshed.trainable import BoundlessMask, LowRankRotatedInterchange, RotatedSubspaceInterchange
from pzbridge.toolshed.trainable_fit import Sources, interchange_accuracy, intervened, train_intervention
from pzbridge.toolshed.worlds import RouteWorlds, stack_worlds, unstack_worlds

TWO_SOURCES = ((1, 1, 2), (2, 1, 2))  # block 0 of the base from world 1, block 1 from world 2


def _worlds(*rows: np.ndarray, axis: str = "f") -> Any:
    return stack_worlds([pzb.nx.wrap(jnp.asarray(r), "batch", axis) for r in rows])


def _on_worlds(layer: Any, *rows: np.ndarray) -> np.ndarray:
    return np.asarray(layer(_worlds(*rows)).unwrap("worlds", "batch", "f"))


def _reference(q: np.ndarray, blocks: tuple[int, ...], weights: np.ndarray, base: np.ndarray,
               sources: list[np.ndarray]) -> np.ndarray:
    """``b + sum_g Q_g (m_g * Q_g^T (s_g - b))`` in float64, rows are examples."""
    q, result, first = q.astype(np.float64), base.astype(np.float64), 0
    for size, source in zip(blocks, sources):
        basis = q[:, first:first + size]
        result = result + ((source - base) @ basis * weights[first:first + size]) @ basis.T
        first += size
    return result


def _layers(key: jax.Array, d: int, blocks: tuple[int, ...]) -> list[tuple[Any, np.ndarray, np.ndarray]]:
    """Each layer kind with ``blocks``, its basis ``Q`` (d x r) and its weights (r,)."""
    rotated = RotatedSubspaceInterchange.from_config("r", key, {"f": d}, k=blocks, routes=TWO_SOURCES)
    low = LowRankRotatedInterchange.from_config("l", key, {"f": d}, k=blocks, routes=TWO_SOURCES)
    boundless = BoundlessMask.from_config("b", key, {"f": d}, logit=0.7, routes=TWO_SOURCES,
                                          blocks=(blocks[0], d - blocks[0]))
    r = sum(blocks)
    return [
        (rotated, np.asarray(rotated.rotation().unwrap("rotated", "f")).T[:, :r], np.ones(r)),
        (low, np.asarray(low.basis().unwrap("f", "rotated")), np.ones(r)),
        (boundless, np.asarray(boundless.rotation().unwrap("rotated", "f")).T,
         np.asarray(boundless.mask().unwrap("rotated"), np.float64)),
    ]


@settings(max_examples=10, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), d=st.integers(2, 6), n=st.integers(1, 3), data=st.data())
def test_each_block_is_read_from_its_own_source_as_the_reference(seed: int, d: int, n: int, data: Any) -> None:
    first = data.draw(st.integers(0, d), label="k1")
    blocks = (first, data.draw(st.integers(0, d - first), label="k2"))
    base, s1, s2 = (np.asarray(jax.random.normal(jax.random.key(seed + i), (n, d))) for i in range(3))
    for layer, q, weights in _layers(jax.random.key(seed + 3), d, blocks):
        result = _on_worlds(layer, base, s1, s2)
        sizes = layer.blocks
        np.testing.assert_allclose(result[0], _reference(q, sizes, weights, base, [s1, s2]), **TOL)
        # The source worlds route to themselves in every block: bitwise untouched.
        np.testing.assert_array_equal(result[1], s1)
        np.testing.assert_array_equal(result[2], s2)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), d=st.integers(2, 6), data=st.data())
def test_with_one_source_in_every_block_it_is_the_one_source_interchange(seed: int, d: int, data: Any) -> None:
    first = data.draw(st.integers(0, d), label="k1")
    blocks = (first, data.draw(st.integers(0, d - first), label="k2"))
    key = jax.random.key(seed)
    base, source = (np.asarray(jax.random.normal(jax.random.key(seed + i), (2, d))) for i in (1, 2))
    multi = LowRankRotatedInterchange.from_config("l", key, {"f": d}, k=blocks, routes=((1, 1), (1, 1)))
    single = LowRankRotatedInterchange.from_config("l", key, {"f": d}, k=sum(blocks))
    np.testing.assert_allclose(_on_worlds(multi, base, source), _on_worlds(single, base, source), **TOL)
    # A base world routed to itself in every block is bitwise the base, whatever the sources hold.
    idle = LowRankRotatedInterchange.from_config("l", key, {"f": d}, k=blocks, routes=((0, 1, 2), (0, 1, 2)))
    np.testing.assert_array_equal(_on_worlds(idle, base, source, source)[0], base)


def _planted(axis: str, seed: int) -> LowRankRotatedInterchange:
    """Two fixed orthonormal directions, one per source: the subspaces DAS has to find."""
    q = np.linalg.qr(np.asarray(jax.random.normal(jax.random.key(seed + 900), (HIDDEN, 2))))[0]
    return LowRankRotatedInterchange(pzb.nx.wrap(jnp.asarray(q, jnp.float32), axis, "rotated"), axis,
                                     TWO_SOURCES, blocks=(1, 1))


def _base_world(model: Any, *worlds: Any) -> Any:
    return unstack_worlds(model(stack_worlds(list(worlds))))[0]


@pytest.mark.parametrize("make", [pzb_case, traced_equinox_case], ids=["pzb_nn", "traced_eqx"])
def test_training_with_two_sources_recovers_each_planted_direction(make: Any) -> None:
    case: Case = make(4)
    base, first, second = inputs(30, 128), inputs(31, 128), inputs(32, 128)
    planted = _planted(case.axis, 4)
    target = _base_world(intervened(case.model, case.at, planted), base, first, second)
    das = LowRankRotatedInterchange.from_config("das", jax.random.key(8), {case.axis: HIDDEN}, k=(1, 1),
                                                routes=TWO_SOURCES)
    fit = train_intervention(case.model, case.at, das, base, Sources(first, second), target, loss=mse(case),
                             optimizer=optax.adam(0.03), steps=800)
    assert fit.losses[-10:].mean() < 1e-3 * fit.losses[0], fit.losses[[0, -1]]
    got = np.asarray(das.basis().unwrap(case.axis, "rotated"))
    want = np.asarray(planted.basis().unwrap(case.axis, "rotated"))
    for g in range(2):  # each block found its own source's direction (up to sign)
        assert abs(float(got[:, g] @ want[:, g])) > 0.97, (g, got[:, g] @ want[:, g])
    # One source for both blocks cannot fit: the other variable keeps the base's value.
    single = LowRankRotatedInterchange.from_config("das1", jax.random.key(8), {case.axis: HIDDEN}, k=2)
    one = train_intervention(case.model, case.at, single, base, first, target, loss=mse(case),
                             optimizer=optax.adam(0.03), steps=300)
    assert one.losses[-10:].mean() > 10 * fit.losses[-10:].mean()


def test_accuracy_and_whole_site_routes_take_several_sources() -> None:
    model = pzb.nn.Sequential([pzb.nn.Identity()])
    base = pzb.nx.wrap(jnp.array([[1.0, 0.0, 0.0]]), "batch", "features")
    first = pzb.nx.wrap(jnp.array([[0.0, 1.0, 0.0]]), "batch", "features")
    second = pzb.nx.wrap(jnp.array([[0.0, 0.0, 5.0]]), "batch", "features")
    # The whole site from the second source.
    assert interchange_accuracy(model, pzb.nn.Identity, RouteWorlds((2, 1, 2)), base, Sources(first, second),
                                jnp.array([2])) == 1.0
    units = LowRankRotatedInterchange(pzb.nx.wrap(jnp.eye(3)[:, :2], "features", "rotated"), "features",
                                      TWO_SOURCES, blocks=(1, 1))  # unit 0 from source 1, unit 1 from source 2
    edited = intervened(model, pzb.nn.Identity, units)
    np.testing.assert_allclose(_base_world(edited, base, first, second).unwrap("batch", "features"),
                               [[0.0, 0.0, 0.0]], atol=1e-6)


def test_a_multi_source_layer_round_trips_as_a_spec_operation(tmp_path: Any) -> None:
    case = traced_equinox_case(6)
    layer = RotatedSubspaceInterchange.from_config("das", jax.random.key(12), {"features": HIDDEN}, k=(2, 1),
                                                   routes=TWO_SOURCES)
    spec = Spec().add(case.at, layer)
    save_spec(spec, tmp_path)
    reloaded = load_spec(tmp_path)
    assert reloaded.edits[0][1].blocks == (2, 1) and reloaded.edits[0][1].routes == TWO_SOURCES
    worlds = [inputs(40 + i, 3) for i in range(3)]
    np.testing.assert_array_equal(out(_base_world(reloaded.apply(case.model), *worlds), case),
                                  out(_base_world(spec.apply(case.model), *worlds), case))


def test_errors_name_the_blocks_routes_and_sources_expected() -> None:
    key = jax.random.key(0)
    with pytest.raises(PzbridgeError, match="one tuple of source worlds per block"):
        LowRankRotatedInterchange.from_config("l", key, {"f": 4}, k=(1, 1), routes=(1, 1, 2))
    with pytest.raises(PzbridgeError, match="routes must name"):
        LowRankRotatedInterchange.from_config("l", key, {"f": 4}, k=(1, 1), routes=((1, 1, 3), (2, 1, 2)))
    with pytest.raises(PzbridgeError, match=r"k .* in \[0, 4\]"):
        RotatedSubspaceInterchange.from_config("r", key, {"f": 4}, k=(3, 2), routes=TWO_SOURCES)
    mask = BoundlessMask.from_config("b", key, {"f": 4}, routes=TWO_SOURCES, blocks=(1, 1))
    with pytest.raises(NamedAxisError, match="add up to 2 coordinates"):
        mask(_worlds(*(np.zeros((1, 4)),) * 3))
    case = pzb_case(0)
    x = inputs(0, 4)
    das = LowRankRotatedInterchange.from_config("das", key, {"hidden": HIDDEN}, k=(1, 1), routes=TWO_SOURCES)
    with pytest.raises(PzbridgeError, match=r"reads 3 worlds.*Sources\(\.\.\.\) of 2"):
        train_intervention(case.model, case.at, das, x, x, jnp.zeros(4, jnp.int32), steps=1)
    with pytest.raises(PzbridgeError, match="same number of examples"):
        train_intervention(case.model, case.at, das, x, Sources(x, inputs(1, 5)), jnp.zeros(4, jnp.int32), steps=1)
    with pytest.raises(PzbridgeError, match="at least one source"):
        Sources()
