"""Cost of steering during cached decoding, relative to the same cached model unsteered.

Model: the reference GPT (:func:`pzbridge.models.gpt.build_gpt`, 4 blocks,
d_model 128, 4 heads, MLP 512, vocabulary 512) with KV caches of 128
positions (``make_kv_cached``), batch 8. Steering adds a vector to the
residual stream after every block at absolute positions from 32 on, so each
``Steer`` layer carries a position counter (``positions=slice(32, None)``).
Every call is one compiled ``stateless_call`` of the frozen variable values,
as ``cached_greedy_decode`` runs it.

Rows (interleaved repetitions, medians): a prefill of 64 tokens, and one
decode step (one token) from a cache holding 64, steered / unsteered.

Run: ``python benchmarks/steering_bench.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import pzbridge as pzb
from interleaved import interleaved_medians
from pzbridge.models.gpt import build_gpt, make_kv_cached
from pzbridge.toolshed.steering import steer
from pzbridge.toolshed.where import Where

VOCAB, D, HEADS, MLP, DEPTH, BATCH, PREFILL, CACHE = 512, 128, 4, 512, 4, 8, 64, 128




def _step(model: Any) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    slots, values = pzb.unbind_variables(model, freeze=True)
    return jax.jit(lambda vals, tokens: slots.stateless_call(vals, tokens)), values


def _after_prefill(call: Callable[..., Any], values: tuple[Any, ...], tokens: Any) -> tuple[Any, ...]:
    _, state = call(values, tokens)
    updated = {value.label: value for value in state}
    return tuple(updated.get(v.label, v) if isinstance(v, pzb.StateVariableValue) else v for v in values)


def main(reps: int = 7, inner: int = 5) -> None:
    """Prints the table of steered / unsteered times."""
    gpt = build_gpt("g", jax.random.key(0), VOCAB, DEPTH, HEADS, D, MLP, CACHE)
    cached = make_kv_cached(gpt, {"batch": BATCH}, CACHE)
    vector = pzb.nx.wrap(jax.random.normal(jax.random.key(1), (D,)), "features")
    steered = steer(cached, Where(layer="TransformerBlock"), vector, positions=slice(32, None))
    prompt = pzb.nx.wrap(jax.random.randint(jax.random.key(2), (BATCH, PREFILL), 0, VOCAB), "batch", "seq")
    token = prompt[{"seq": pzb.nx.wrap(jnp.array([0]), "seq")}]
    plain_call, plain_values = _step(cached)
    steer_call, steer_values = _step(steered)
    plain_filled = _after_prefill(plain_call, plain_values, prompt)
    steer_filled = _after_prefill(steer_call, steer_values, prompt)
    prefill = interleaved_medians([lambda: plain_call(plain_values, prompt), lambda: steer_call(steer_values, prompt)],
                       reps, inner)
    decode = interleaved_medians([lambda: plain_call(plain_filled, token), lambda: steer_call(steer_filled, token)],
                      reps, inner * 4)
    print("| row | unsteered | steered | steered / unsteered |")
    print("|---|---|---|---|")
    for name, (plain, steered_time) in (("prefill 64 tokens", prefill), ("decode step (1 token)", decode)):
        print(f"| {name} | {plain * 1e3:.2f} ms | {steered_time * 1e3:.2f} ms | {steered_time / plain:.2f}x |")


if __name__ == "__main__":
    main()
