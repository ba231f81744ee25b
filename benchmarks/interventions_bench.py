"""Cost of capture and patching under jit, relative to the plain model, and N worlds in one pass vs N passes.

Two models, each with its variables passed to ``jax.jit`` as frozen values:

- ``pzb.nn``: the reference GPT (:func:`pzbridge.models.gpt.build_gpt`, 4
  blocks, d_model 128, 4 heads, MLP 512, vocabulary 512);
- traced: the custom Equinox transformer of ``tracing_bench.py`` (einsum
  attention on raw ``W_Q/W_K/W_V/W_O``, ``jax.vmap``-ed MLP, residual adds
  in ``__call__``), lifted with ``pzb.lift(model, tokens)``, same sizes.

Rows (interleaved repetitions of compiled calls, medians; batch 8 x seq 64):

- capture everything: ``capture_all`` (the output of every innermost layer)
  vs the plain model on the same input (target <= 1.05), and capturing the
  residual stream only (``Where(layer="Residual")``, one value per block
  half) to separate the mechanism's cost from that of writing every
  intermediate out of the fused program;
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

Run: ``python benchmarks/interventions_bench.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

import pzbridge as pzb
from interleaved import interleaved_medians
from pzbridge.models.gpt import build_gpt
from pzbridge.toolshed.capture import capture_all
from pzbridge.toolshed.intermediates import capture_intermediates
from pzbridge.toolshed.interventions import Patch, insert_intervention
from pzbridge.toolshed.path_patching import patch_paths
from pzbridge.toolshed.where import Where
from pzbridge.toolshed.worlds import patch_worlds, stack_worlds

sys.path.insert(0, str(Path(__file__).parent))
from tracing_bench import Transformer

VOCAB, D, HEADS, MLP, DEPTH, BATCH, SEQ = 512, 128, 4, 512, 4, 8, 64
WORLD_COUNTS = (2, 4, 8)




_RUN = jax.jit(lambda model, x: model(x))
_CAPTURE_ALL = jax.jit(lambda model, x: capture_all(model, x))
_CAPTURE_STREAM = jax.jit(lambda model, x: capture_intermediates(model, Where(layer="Residual"), x))


def _models() -> list[dict[str, Any]]:
    gpt = build_gpt("gpt", jax.random.key(0), vocab_size=VOCAB, num_layers=DEPTH, num_heads=HEADS, d_model=D,
                    d_mlp=MLP, max_seq_len=SEQ)
    traced = pzb.lift(Transformer(VOCAB, D, HEADS, MLP, DEPTH, jax.random.key(0)), jnp.arange(SEQ) % VOCAB,
                      strict=True)
    return [
        dict(name="pzb.nn GPT", model=gpt,
             head=Where(label="gpt.blocks.1.attn.output.weights", side="before", index={"heads": 0}),
             sender=Where(label="gpt.blocks.0.attn.output.weights", side="before", index={"heads": 0}),
             receiver=Where(path="sublayers[2].sublayers[0].delta", side="before")),
        dict(name="traced Equinox", model=traced,
             head=Where(label="blocks.1.attn.W_O", side="before", index={"heads": 0}),
             sender=Where(label="blocks.0.attn.W_O", side="before", index={"heads": 0}),
             receiver=Where(module="blocks.1.attn", side="before")),
    ]


def _tokens(seed: int) -> pzb.nx.NamedArray:
    return pzb.nx.wrap(jax.random.randint(jax.random.key(seed), (BATCH, SEQ), 0, VOCAB), "batch", "seq")


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


def rows(reps: int = 11, inner: int = 3) -> list[dict[str, Any]]:
    """Measures every row (see the module docstring); times in seconds."""
    results = []
    for spec in _models():
        model = pzb.freeze_params(spec["model"])
        x = _tokens(0)
        two = stack_worlds([_tokens(0), _tokens(1)])
        worlds = patch_worlds(model, spec["head"], (0, 0))
        paths = patch_paths(model, spec["sender"], spec["receiver"], (1, 1))
        calls = [(_RUN, model, x), (_CAPTURE_ALL, model, x), (_CAPTURE_STREAM, model, x), (_RUN, model, two),
                 (_RUN, worlds, two), (_RUN, paths, two)]
        plain, captured, stream, plain2, patched, pathed = interleaved_medians(
            [lambda f=f, m=m, v=v: f(m, v) for f, m, v in calls], reps, inner)
        results += [
            dict(model=spec["name"], metric="capture everything", base=plain, new=captured, target="<=1.05"),
            dict(model=spec["name"], metric="capture the residual stream", base=plain, new=stream, target="<=1.05"),
            dict(model=spec["name"], metric="patch_worlds, 2 worlds", base=plain2, new=patched, target="<=1.05"),
            dict(model=spec["name"], metric="patch_paths, 2 worlds", base=plain2, new=pathed, target="report"),
        ]
        for n in WORLD_COUNTS:
            inputs = [_tokens(w) for w in range(n)]
            stacked = stack_worlds(inputs)
            one_pass = patch_worlds(model, spec["head"], (0,) * n)
            separate, single, plain_n = interleaved_medians([_separate_passes(model, spec["head"], inputs[0], inputs[1:]),
                                                  lambda m=one_pass, s=stacked: _RUN(m, s),
                                                  lambda m=model, s=stacked: _RUN(m, s)], reps, inner)
            results += [
                dict(model=spec["name"], metric=f"{n} worlds: one pass vs {n} passes", base=separate, new=single,
                     target="report"),
                dict(model=spec["name"], metric=f"{n} worlds: one pass vs plain", base=plain_n, new=single,
                     target="<=1.05"),
            ]
    return results


def main() -> None:
    """Prints the table."""
    print(f"{'model':<16} {'metric':<30} {'baseline':>10} {'pzbridge':>10} {'ratio':>7} {'target':>7}")
    for row in rows():
        print(f"{row['model']:<16} {row['metric']:<30} {row['base'] * 1e3:>8.2f}ms {row['new'] * 1e3:>8.2f}ms "
              f"{row['new'] / row['base']:>7.3f} {row['target']:>7}")


if __name__ == "__main__":
    main()
