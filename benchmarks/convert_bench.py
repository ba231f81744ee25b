"""Models converted between NNX and Equinox: the jitted calls against the original's, side by side in one process.

Two NNX models on a batch of 256, width 512 (``Linear -> BatchNorm -> relu ->
Linear``):

- in training mode: the BatchNorm normalises by the batch and writes its
  running statistics, so the converted Equinox model is stateful and runs
  under ``jax.vmap(..., axis_name="batch")`` (each example's call gathers
  the batch; the NNX computation runs once, unmapped);
- in inference mode: per example, the converted model runs under a plain
  ``jax.vmap`` (each example a batch of one) and, for comparison, under the
  named ``vmap`` too.

Measured: one forward call and one training step (``value_and_grad`` + SGD),
all jitted as pure functions of their arrays (NNX: ``nnx.split`` /
``nnx.merge`` inside ``jax.jit``; Equinox: ``eqx.partition`` / ``eqx.combine``). CPU seconds (``time.process_time``),
interleaved repetitions, medians; ratios converted / NNX.

And the other direction: an Equinox ``Linear -> BatchNorm -> relu -> Linear``
(``mode="batch"`` and ``"ema"``, training) converted to NNX, against the
original under ``jax.vmap(..., axis_name="batch")`` with its State (ratios
converted NNX / Equinox); and a custom Equinox ResNet (stem, two residual
blocks of two convolutions and BatchNorms, the State threaded by hand; 32
channels, 16x16 images, batch 32), traced and converted the same way; and
a custom MLP of two residual warm-up blocks whose own ``StateIndex`` counts
the calls (``state.get`` / ``state.set`` in ``__call__``; width 512, batch
256), whose counters become NNX Variables.

Run: ``python benchmarks/convert_bench.py``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from flax import nnx

import pzbridge as pzb
from pzbridge.testing.stateful_equinox import ResNet, StatefulStack, WarmupBlock

sys.path.insert(0, str(Path(__file__).parent))
from interleaved import interleaved_medians

WIDTH, BATCH, LR = 512, 256, 1e-2
RESNET_CHANNELS, RESNET_SIZE, RESNET_BATCH = 32, 16, 32


def _model(train: bool) -> nnx.Module:
    rngs = nnx.Rngs(0)
    model = nnx.Sequential(nnx.Linear(WIDTH, WIDTH, rngs=rngs), nnx.BatchNorm(WIDTH, rngs=rngs), jax.nn.relu,
                           nnx.Linear(WIDTH, WIDTH, rngs=rngs))
    if not train:
        model.eval()
    return model


def _nnx_calls(model: nnx.Module, x: jax.Array, target: jax.Array) -> tuple[Any, Any]:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def forward(params: Any, rest: Any) -> Any:
        module = nnx.merge(graphdef, params, rest, copy=True)
        return module(x), nnx.state(module, nnx.Not(nnx.Param))

    @jax.jit
    def step(params: Any, rest: Any) -> Any:
        def loss(params: Any) -> Any:
            module = nnx.merge(graphdef, params, rest, copy=True)
            return jnp.mean((module(x) - target) ** 2), nnx.state(module, nnx.Not(nnx.Param))

        (value, new_rest), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return jax.tree_util.tree_map(lambda p, g: p - LR * g, params, grads), new_rest, value

    return lambda: forward(params, rest), lambda: step(params, rest)


def _equinox_calls(converted: Any, x: jax.Array, target: jax.Array, named: bool) -> tuple[Any, Any]:
    stateful = converted.is_stateful()
    state = eqx.nn.State(converted) if stateful else None
    axis = {"axis_name": "batch"} if named else {}

    def run(model: Any) -> Any:
        if stateful:
            return jax.vmap(model, in_axes=(0, None), out_axes=(0, None), **axis)(x, state)
        return jax.vmap(model, **axis)(x), None

    # Arrays in, arrays out (as the NNX side): the compiled computations are compared, not eqx.filter_jit's
    # per-call flattening of the module.
    params, static = eqx.partition(converted, eqx.is_inexact_array)

    @jax.jit
    def forward(params: Any) -> Any:
        return run(eqx.combine(params, static))

    @jax.jit
    def step(params: Any) -> Any:
        def loss(params: Any) -> Any:
            y, new_state = run(eqx.combine(params, static))
            return jnp.mean((y - target) ** 2), new_state

        (value, new_state), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return jax.tree_util.tree_map(lambda p, g: p - LR * g, params, grads), new_state, value

    return lambda: forward(params), lambda: step(params)


def _equinox_model(mode: str) -> tuple[Any, eqx.nn.State]:
    k1, k2 = jax.random.split(jax.random.key(0))
    return eqx.nn.make_with_state(eqx.nn.Sequential)([
        eqx.nn.Linear(WIDTH, WIDTH, key=k1), eqx.nn.BatchNorm(WIDTH, "batch", mode=mode), eqx.nn.Lambda(jax.nn.relu),
        eqx.nn.Linear(WIDTH, WIDTH, key=k2)])


def _original_equinox_calls(model: Any, state: eqx.nn.State, x: jax.Array, target: jax.Array) -> tuple[Any, Any]:
    """The Equinox model as its users run it: a named vmap threading the State, arrays in and out."""
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def run(params: Any, state: eqx.nn.State) -> Any:
        return jax.vmap(eqx.combine(params, static), axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)

    @jax.jit
    def step(params: Any, state: eqx.nn.State) -> Any:
        def loss(params: Any) -> Any:
            y, new_state = run(params, state)
            return jnp.mean((y - target) ** 2), new_state

        (value, new_state), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return jax.tree_util.tree_map(lambda p, g: p - LR * g, params, grads), new_state, value

    forward = jax.jit(run)
    return lambda: forward(params, state), lambda: step(params, state)


def _equinox_cases() -> list[tuple[str, Any, eqx.nn.State, jax.Array, jax.Array]]:
    """(name, model, state, batch, target): the stock Sequential per mode, and a custom ResNet threading the State."""
    x = jax.random.normal(jax.random.key(1), (BATCH, WIDTH))
    target = jax.random.normal(jax.random.key(2), (BATCH, WIDTH))
    cases = [(f"Equinox BatchNorm mode={mode!r}", *_equinox_model(mode), x, target) for mode in ("batch", "ema")]
    resnet, state = eqx.nn.make_with_state(ResNet)(3, RESNET_CHANNELS, 2, 10, jax.random.key(3), mode="batch")
    images = jax.random.normal(jax.random.key(4), (RESNET_BATCH, 3, RESNET_SIZE, RESNET_SIZE))
    cases.append(("custom ResNet (traced)", resnet, state, images, jax.random.normal(jax.random.key(5),
                                                                                  (RESNET_BATCH, 10))))
    keys = jax.random.split(jax.random.key(6), 3)
    warm, warm_state = eqx.nn.make_with_state(StatefulStack)(
        [WarmupBlock(WIDTH, k) for k in keys[:2]], eqx.nn.Linear(WIDTH, WIDTH, key=keys[2]))
    cases.append(("custom warm-up MLP (own State)", warm, warm_state, x, target))
    return cases


def equinox_to_nnx_rows(reps: int = 7, inner: int = 20) -> list[dict[str, Any]]:
    """One row per (model, call): the original Equinox and the converted NNX CPU seconds and their ratio."""
    rows = []
    for name, model, state, x, target in _equinox_cases():
        converted = pzb.convert(model, x[0], state, to="nnx")
        eqx_forward, eqx_step = _original_equinox_calls(model, state, x, target)
        nnx_forward, nnx_step = _nnx_calls(converted, x, target)
        times = interleaved_medians([eqx_forward, nnx_forward, eqx_step, nnx_step], reps, inner,
                                    clock=time.process_time)
        for call, (original, ported) in (("forward", times[:2]), ("train step", times[2:])):
            rows.append({"model": name, "call": call, "original_ms": original * 1e3,
                         "converted_ms": ported * 1e3, "ratio": ported / original})
    return rows


def convert_rows(reps: int = 7, inner: int = 20) -> list[dict[str, Any]]:
    """One row per (model, call): NNX and converted CPU seconds and their ratio."""
    x = jax.random.normal(jax.random.key(1), (BATCH, WIDTH))
    target = jax.random.normal(jax.random.key(2), (BATCH, WIDTH))
    rows = []
    for name, train, variants in (("training BatchNorm (stateful)", True, (("named vmap", True),)),
                                  ("inference BatchNorm", False, (("plain vmap", False), ("named vmap", True)))):
        model = _model(train)
        converted = pzb.convert(model, x, to="equinox")
        nnx_forward, nnx_step = _nnx_calls(model, x, target)
        for label, named in variants:
            eqx_forward, eqx_step = _equinox_calls(converted, x, target, named)
            times = interleaved_medians([nnx_forward, eqx_forward, nnx_step, eqx_step], reps, inner,
                                        clock=time.process_time)
            for call, (nnx_time, eqx_time) in (("forward", times[:2]), ("train step", times[2:])):
                rows.append({"model": name, "call": f"{call}, {label}", "nnx_ms": nnx_time * 1e3,
                             "converted_ms": eqx_time * 1e3, "ratio": eqx_time / nnx_time})
    return rows


def main() -> None:
    print(f"{'model':32s} {'call':26s} {'nnx ms':>8s} {'converted ms':>13s} {'ratio':>6s}")
    for row in convert_rows():
        print(f"{row['model']:32s} {row['call']:26s} {row['nnx_ms']:8.3f} {row['converted_ms']:13.3f} "
              f"{row['ratio']:6.2f}")
    print(f"\n{'model (Equinox -> NNX)':32s} {'call':26s} {'eqx ms':>8s} {'converted ms':>13s} {'ratio':>6s}")
    for row in equinox_to_nnx_rows():
        print(f"{row['model']:32s} {row['call']:26s} {row['original_ms']:8.3f} {row['converted_ms']:13.3f} "
              f"{row['ratio']:6.2f}")


if __name__ == "__main__":
    main()
