"""Benchmark: the combinator-built GPT vs the same model in pure jax vs penzai.

Measures, in one process with interleaved repetitions and medians:

- jitted run time of one forward pass (logits for a batch of token ids);
- trace + compile time (a fresh ``jax.jit(...).lower(...).compile()``).

Three implementations of a same-size model:

- ``pure_jax``: :func:`pzbridge.models.gpt_reference.gpt_forward` (the baseline);
- ``pzbridge``: :func:`pzbridge.models.gpt.build_gpt`, called through
  ``stateless_call`` on frozen parameter values (the same weights as
  ``pure_jax``);
- ``penzai``: penzai 0.2.5's llama-like transformer with the same width,
  depth, heads and vocabulary (RMSNorm, GeGLU MLP with the same hidden size:
  one more input projection, so slightly more work than GPT's MLP).

Targets (issue 3): pzbridge run <= 1.02x pure jax, trace+compile <= 1.2x.

Run: ``python benchmarks/nn_bench.py``; ``nn_rows()`` returns the table rows.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from pzbridge.core import named_axes as nx
from pzbridge.core.variables import unbind_params
from pzbridge.models.gpt import build_gpt
from pzbridge.models.gpt_reference import gpt_forward, params_from_model

SIZE = dict(vocab_size=512, num_layers=4, num_heads=4, d_model=128, d_mlp=512, max_seq_len=64)
BATCH, SEQ = 4, 64


def _pzbridge_fn() -> tuple[Callable[..., Any], tuple[Any, ...], Any]:
    model = build_gpt("gpt", jax.random.key(0), **SIZE)
    slots, values = unbind_params(model, freeze=True)

    def forward(values: Any, tokens: jax.Array) -> jax.Array:
        logits = slots.stateless_call(values, nx.wrap(tokens, "batch", "seq"))[0]
        return logits.unwrap("batch", "seq", "vocabulary")

    return forward, (values,), model


def _pure_jax_fn(model: Any) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    params = params_from_model(model)
    config = model.config
    return (lambda params, tokens: gpt_forward(params, tokens, config)), (params,)


def _penzai_fn() -> tuple[Callable[..., Any], tuple[Any, ...]] | None:
    try:
        from penzai import pz
        from penzai.models.transformer.variants import llamalike_common as ll
    except ImportError:  # penzai is optional: the row is skipped.
        return None
    config = ll.LlamalikeTransformerConfig(
        num_kv_heads=SIZE["num_heads"], query_head_multiplier=1, embedding_dim=SIZE["d_model"],
        projection_dim=SIZE["d_model"] // SIZE["num_heads"], mlp_hidden_dim=SIZE["d_mlp"],
        num_decoder_blocks=SIZE["num_layers"], vocab_size=SIZE["vocab_size"], mlp_variant="geglu_approx",
        tie_embedder_and_logits=True, parameter_dtype=jnp.float32, activation_dtype=jnp.float32,
    )
    model = ll.build_llamalike_transformer(config, init_base_rng=jax.random.key(0))
    slots, values = pz.unbind_params(model, freeze=True)

    def forward(values: Any, tokens: jax.Array) -> jax.Array:
        logits = slots.stateless_call(values, pz.nx.wrap(tokens).tag("batch", "seq"))[0]
        return logits.unwrap("batch", "seq", "vocabulary")

    return forward, (values,)


def _compile_time(fn: Callable[..., Any], args: tuple[Any, ...]) -> float:
    # A new function object each time, so nothing is reused from earlier traces.
    fresh = lambda *a: fn(*a)  # noqa: E731
    start = time.perf_counter()
    jax.jit(fresh).lower(*args).compile()
    return time.perf_counter() - start


def _run_time(compiled: Callable[..., Any], args: tuple[Any, ...], calls: int) -> float:
    jax.block_until_ready(compiled(*args))
    start = time.perf_counter()
    for _ in range(calls):
        out = compiled(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls


def nn_rows(repetitions: int = 7, calls: int = 20) -> list[dict[str, Any]]:
    """Times the three implementations; returns one row per implementation.

    Each row has ``impl``, ``run_ms`` and ``compile_s`` (medians), and
    ``run_vs_pure_jax`` / ``compile_vs_pure_jax`` ratios.
    """
    tokens = jax.random.randint(jax.random.key(1), (BATCH, SEQ), 0, SIZE["vocab_size"])
    pzb_fn, pzb_args, model = _pzbridge_fn()
    impls: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {
        "pure_jax": _pure_jax_fn(model),
        "pzbridge": (pzb_fn, pzb_args),
    }
    penzai = _penzai_fn()
    if penzai is not None:
        impls["penzai"] = penzai
    args = {name: (*extra, tokens) for name, (_, extra) in impls.items()}
    compiled = {name: jax.jit(fn) for name, (fn, _) in impls.items()}
    for name in impls:  # Warm up (first-use costs outside the measurement).
        _compile_time(impls[name][0], args[name])
        jax.block_until_ready(compiled[name](*args[name]))
    runs: dict[str, list[float]] = {name: [] for name in impls}
    compiles: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(repetitions):
        for name, (fn, _) in impls.items():  # Interleaved: drift hits every implementation alike.
            compiles[name].append(_compile_time(fn, args[name]))
            runs[name].append(_run_time(compiled[name], args[name], calls))
    base_run, base_compile = statistics.median(runs["pure_jax"]), statistics.median(compiles["pure_jax"])
    rows = []
    for name in impls:
        run, comp = statistics.median(runs[name]), statistics.median(compiles[name])
        rows.append({
            "impl": name, "run_ms": run * 1e3, "compile_s": comp,
            "run_vs_pure_jax": run / base_run, "compile_vs_pure_jax": comp / base_compile,
        })
    return rows


def main() -> None:
    """Prints the table of medians and ratios."""
    rows = nn_rows()
    print(f"GPT {SIZE}, batch {BATCH} x seq {SEQ}, device {jax.devices()[0].platform}")
    print(f"{'impl':<10} {'run ms':>9} {'compile s':>10} {'run/jax':>8} {'compile/jax':>12}")
    for r in rows:
        print(f"{r['impl']:<10} {r['run_ms']:>9.3f} {r['compile_s']:>10.3f} {r['run_vs_pure_jax']:>8.3f} "
              f"{r['compile_vs_pure_jax']:>12.3f}")


if __name__ == "__main__":
    main()
