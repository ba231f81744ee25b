"""Cost of capture and patching under jit, relative to the plain model, and N worlds in one pass vs N passes.

Two models, each with its variables passed to ``jax.jit`` as frozen values:

- ``pzb.nn``: the reference GPT (:func:`pzbridge.models.gpt.build_gpt`, 4
  blocks, d_model 128, 4 heads, MLP 512, vocabulary 512);
- traced: the custom Equinox transformer of ``tracing_bench.py`` (einsum
  attention on raw ``W_Q/W_K/W_V/W_O``, ``jax.vmap``-ed MLP, residual adds
  in ``__call__``), lifted with ``pzb.lift(model, tokens)``, same sizes.

Rows (interleaved repetitions of compiled calls, medians; batch 8 x seq 64),
each timed twice: wall time and CPU time of the process (the steadier figure
when other work shares the machine):

- capture everything: ``capture_all`` (the output of every innermost layer)
  vs the plain model on the same input (target <= 1.05), and against two
  oracles (``capture_oracles.py``) that show what materialising the outputs
  costs by itself: the model hand-written in plain jax returning every
  operation's output, and the very program ``capture_all`` traces to with
  each distinct value it computes as a plain output (pzbridge's own cost is
  ours / that); the capture returned as a plain ``dict`` instead of a
  ``Captured`` (each repeated value copied into its own output buffer, as
  before); and capturing the residual stream only
  (``Where(layer="Residual")``, one value per block half);
- the same capture rows on a tiny GPT (1 block, d_model 16, batch 1 x seq 8),
  where dispatch, not compute, is the time;
- activation patching: ``patch_worlds`` at one head of block 1 on
  ``[clean, corrupt]`` vs the plain model on the same two worlds (target <= 1.05);
- path patching: ``patch_paths`` (head 0 of block 0 -> block 1's attention
  input) on ``[clean, corrupt]`` vs the plain model on the same two worlds
  (reported: it runs two helper worlds inside, so about 2x is expected, against
  3 passes for the separate-run recipe);
- N worlds: patching one clean run into N - 1 corrupted runs, as one
  ``patch_worlds`` pass on N stacked worlds vs N separate jitted passes (one
  capture on clean, N - 1 patched runs), for N in (2, 4, 8), and against the
  plain model on the same N stacked worlds (the routing's own cost).

Run: ``python benchmarks/interventions_bench.py [capture] [patch] [worlds]`` (default: all three).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from interleaved import interleaved_medians

import pzbridge as pzb
from pzbridge.models.gpt import build_gpt
from pzbridge.toolshed.capture import capture_all
from pzbridge.toolshed.intermediates import capture_intermediates
from pzbridge.toolshed.interventions import Patch, insert_intervention
from pzbridge.toolshed.path_patching import patch_paths
from pzbridge.toolshed.where import Where
from pzbridge.toolshed.worlds import patch_worlds, stack_worlds

sys.path.insert(0, str(Path(__file__).parent))
from capture_oracles import hand_written_equinox, hand_written_gpt, same_values_program
from tracing_bench import Transformer

VOCAB, D, HEADS, MLP, DEPTH, BATCH, SEQ = 512, 128, 4, 512, 4, 8, 64
WORLD_COUNTS = (2, 4, 8)
CLOCKS = (("wall", time.perf_counter), ("cpu", time.process_time))

_RUN = jax.jit(lambda model, x: model(x))
_CAPTURE_ALL = jax.jit(lambda model, x: capture_all(model, x))
_CAPTURE_STREAM = jax.jit(lambda model, x: capture_intermediates(model, Where(layer="Residual"), x))


@jax.jit
def _capture_all_as_dict(model: Any, x: Any) -> tuple[Any, dict[str, Any]]:
    """``capture_all`` with its result as a plain dict: every repeated value gets its own output buffer."""
    out, acts = capture_all(model, x)
    return out, dict(acts)


_ORACLES = {"gpt": jax.jit(hand_written_gpt), "equinox": jax.jit(hand_written_equinox)}


def _models() -> list[dict[str, Any]]:
    gpt = build_gpt("gpt", jax.random.key(0), vocab_size=VOCAB, num_layers=DEPTH, num_heads=HEADS, d_model=D,
                    d_mlp=MLP, max_seq_len=SEQ)
    traced = pzb.lift(Transformer(VOCAB, D, HEADS, MLP, DEPTH, jax.random.key(0)), jnp.arange(SEQ) % VOCAB,
                      strict=True)
    return [
        dict(name="pzb.nn GPT", model=gpt, oracle=_ORACLES["gpt"],
             head=Where(label="gpt.blocks.1.attn.output.weights", side="before", index={"heads": 0}),
             sender=Where(label="gpt.blocks.0.attn.output.weights", side="before", index={"heads": 0}),
             receiver=Where(path="sublayers[2].sublayers[0].delta", side="before")),
        dict(name="traced Equinox", model=traced, oracle=_ORACLES["equinox"],
             head=Where(label="blocks.1.attn.W_O", side="before", index={"heads": 0}),
             sender=Where(label="blocks.0.attn.W_O", side="before", index={"heads": 0}),
             receiver=Where(module="blocks.1.attn", side="before")),
    ]


def _tokens(seed: int, batch: int = BATCH, seq: int = SEQ, vocab: int = VOCAB) -> pzb.nx.NamedArray:
    return pzb.nx.wrap(jax.random.randint(jax.random.key(seed), (batch, seq), 0, vocab), "batch", "seq")


def _timed(calls: list[Callable[[], Any]], reps: int, inner: int) -> dict[str, list[float]]:
    """Interleaved medians of ``calls`` under each clock of :data:`CLOCKS`."""
    return {name: interleaved_medians(calls, reps, inner, clock=clock) for name, clock in CLOCKS}


def _row(model: str, metric: str, times: dict[str, list[float]], base: int, new: int, target: str) -> dict[str, Any]:
    return dict(model=model, metric=metric, target=target,
                **{f"{clock}_{which}": times[clock][i] for clock in times for which, i in (("base", base), ("new", new))})


def _capture_rows(name: str, model: Any, oracle: Callable[..., Any], x: Any, reps: int, inner: int
                  ) -> list[dict[str, Any]]:
    """Plain, capture_all, the two oracles and the residual stream, all on ``x``."""
    same = same_values_program(model, x)
    calls = (_RUN, _CAPTURE_ALL, oracle, same, _CAPTURE_STREAM, _capture_all_as_dict)
    times = _timed([lambda f=f: f(model, x) for f in calls], reps, inner)
    return [
        _row(name, "capture everything / plain", times, 0, 1, "<=1.05"),
        _row(name, "  capture / hand-written oracle", times, 2, 1, "report"),
        _row(name, "  hand-written oracle / plain", times, 0, 2, "report"),
        _row(name, "  capture / same-values program", times, 3, 1, "report"),
        _row(name, "  same-values program / plain", times, 0, 3, "report"),
        _row(name, "  as a plain dict (repeats copied)", times, 1, 5, "report"),
        _row(name, "capture the residual stream", times, 0, 4, "<=1.05"),
    ]


def _separate_passes(model: Any, at: Where, clean: Any, corrupt: list[Any]) -> Callable[[], Any]:
    """N separate jitted passes: capture the site on clean, then one patched run per corrupted input."""
    whole = Where(at.layer, at.path, at.label, at.module, at.side)

    @jax.jit
    def capture(m: Any, x: Any) -> Any:
        return capture_intermediates(m, whole, x, where=at.side)

    @jax.jit
    def patched_run(m: Any, values: Any, x: Any) -> Any:
        return insert_intervention(m, at, Patch(values))(x)

    def run() -> Any:
        out, captured = capture(model, clean)
        (values,) = captured.values()
        return [out] + [patched_run(model, values, x) for x in corrupt]

    return run


SECTIONS = ("capture", "patch", "worlds")


def rows(reps: int = 21, inner: int = 2, sections: tuple[str, ...] = SECTIONS) -> list[dict[str, Any]]:
    """Measures the rows of ``sections`` (see the module docstring); times in seconds, per clock."""
    results = []
    if "capture" in sections:
        tiny = build_gpt("gpt", jax.random.key(1), vocab_size=64, num_layers=1, num_heads=2, d_model=16, d_mlp=32,
                         max_seq_len=8)
        results += _capture_rows("tiny GPT", pzb.freeze_params(tiny), _ORACLES["gpt"], _tokens(0, 1, 8, 64),
                                 reps * 3, inner * 5)
    for spec in _models():
        model = pzb.freeze_params(spec["model"])
        x = _tokens(0)
        if "capture" in sections:
            results += _capture_rows(spec["name"], model, spec["oracle"], x, reps, inner)
        if "patch" in sections:
            two = stack_worlds([_tokens(0), _tokens(1)])
            worlds = patch_worlds(model, spec["head"], (0, 0))
            paths = patch_paths(model, spec["sender"], spec["receiver"], (1, 1))
            times = _timed([lambda m=m, v=two: _RUN(m, v) for m in (model, worlds, paths)], reps, inner)
            results += [
                _row(spec["name"], "patch_worlds, 2 worlds", times, 0, 1, "<=1.05"),
                _row(spec["name"], "patch_paths, 2 worlds", times, 0, 2, "report"),
            ]
        for n in WORLD_COUNTS if "worlds" in sections else ():
            inputs = [_tokens(w) for w in range(n)]
            stacked = stack_worlds(inputs)
            one_pass = patch_worlds(model, spec["head"], (0,) * n)
            times = _timed([_separate_passes(model, spec["head"], inputs[0], inputs[1:]),
                            lambda m=one_pass, s=stacked: _RUN(m, s),
                            lambda m=model, s=stacked: _RUN(m, s)], reps, inner)
            results += [
                _row(spec["name"], f"{n} worlds: one pass vs {n} passes", times, 0, 1, "report"),
                _row(spec["name"], f"{n} worlds: one pass vs plain", times, 2, 1, "<=1.05"),
            ]
    return results


def main(argv: list[str]) -> None:
    """Prints the table for the sections named in ``argv`` (default: all), and the load average."""
    sections = tuple(argv) or SECTIONS
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"unknown sections {unknown}; expected some of {list(SECTIONS)}")
    print(f"{'model':<15} {'metric':<34} {'base':>9} {'new':>9} {'wall':>6} {'cpu':>6} {'target':>7}")
    for row in rows(sections=sections):
        print(f"{row['model']:<15} {row['metric']:<34} {row['wall_base'] * 1e3:>7.2f}ms {row['wall_new'] * 1e3:>7.2f}ms "
              f"{row['wall_new'] / row['wall_base']:>6.3f} {row['cpu_new'] / row['cpu_base']:>6.3f} {row['target']:>7}")
    print("load average:", Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else "n/a")


if __name__ == "__main__":
    main(sys.argv[1:])
