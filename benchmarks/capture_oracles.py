"""Oracles for capture-everything: what returning every intermediate costs without pzbridge.

Two lower bounds for ``capture_all`` under ``jax.jit``, each taking the same
``(model, tokens)`` arguments as the plain call (so flattening the inputs
costs the same):

- :func:`hand_written_gpt` / :func:`hand_written_equinox`: the benchmark
  models written again in plain jax (weights read by label from the frozen
  model at trace time), returning the logits and the output of every
  operation they compute, each once, as plain arrays;
- :func:`same_values_program`: the jaxpr that ``capture_all`` traces to,
  run by ``jax.core.eval_jaxpr`` with only the distinct values it computes
  as outputs (no named-array wrappers, no repeats, no parameters handed
  back): exactly the values pzbridge materialises, at no cost of its own.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> model = pzb.nn.Sequential([pzb.nn.Elementwise(jnp.exp), pzb.nn.Identity()])
    >>> run = same_values_program(model, pzb.nx.wrap(jnp.zeros(2), "f"))
    >>> [v.tolist() for v in run(model, pzb.nx.wrap(jnp.zeros(2), "f"))]
    [[1.0, 1.0]]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.extend
import jax.numpy as jnp

import pzbridge as pzb
from pzbridge.toolshed.capture import capture_all


def _weights(model: Any) -> dict[str, Any]:
    """``{label: NamedArray}`` of a frozen model's parameters (read inside the trace: free at run time)."""
    return {v.label: v.value for v in pzb.select(model).at_instances_of(pzb.ParameterValue).get_sequence()}


def hand_written_gpt(model: Any, tokens: Any) -> tuple[jax.Array, list[jax.Array]]:
    """The reference GPT (``pzbridge.models.gpt_reference``, LayerNorm, RoPE) with every op's output returned.

    Example:
        >>> from pzbridge.models.gpt import build_gpt
        >>> gpt = pzb.freeze_params(build_gpt("g", jax.random.key(0), 7, 1, 2, 8, 16, 8))
        >>> logits, kept = hand_written_gpt(gpt, pzb.nx.wrap(jnp.zeros((1, 3), jnp.int32), "batch", "seq"))
        >>> logits.shape, len(kept) > 20
        ((1, 3, 7), True)
    """
    config = model.config
    w = _weights(model)
    kept: list[jax.Array] = []

    def tap(value: jax.Array) -> jax.Array:
        kept.append(value)
        return value

    def get(label: str, *names: str) -> jax.Array:
        return w[f"{config.name}.{label}"].unwrap(*names)

    def norm(x: jax.Array, label: str) -> jax.Array:
        centred = tap(x - tap(x.mean(-1, keepdims=True)))
        y = tap(centred * tap(jax.lax.rsqrt(tap(tap(jnp.mean(centred * centred, -1, keepdims=True)) + config.epsilon))))
        y = tap(y * get(f"{label}.scale", "features"))
        bias = f"{config.name}.{label}.bias"
        return tap(y + w[bias].unwrap("features")) if bias in w else y

    def rope(x: jax.Array, positions: jax.Array) -> jax.Array:
        half = x.shape[-1] // 2
        inv_freq = 1.0 / (config.rope_max_wavelength ** (jnp.arange(0, 2 * half, 2, dtype=jnp.float32) / (2 * half)))
        angle = positions[..., None, None].astype(jnp.float32) * inv_freq
        cos, sin = tap(jnp.cos(angle)), tap(jnp.sin(angle))
        x1, x2 = x[..., :half], x[..., half:]
        return tap(jnp.concatenate([tap(x1 * cos - x2 * sin), tap(x2 * cos + x1 * sin)], axis=-1))

    ids = tokens.unwrap("batch", "seq")
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    embed = get("embed.embeddings", "vocabulary", "features")
    h = tap(embed[ids])
    for i in range(config.num_layers):
        p = f"blocks.{i}"
        x = norm(h, f"{p}.attn_norm")
        q, k, v = (tap(jnp.einsum("btd,dhk->bthk", x, get(f"{p}.attn.{n}.weights", "features", "heads", "projection")))
                   for n in ("query", "key", "value"))
        q = tap(rope(q, positions) / math.sqrt(q.shape[-1]))
        k = rope(k, positions)
        logits = tap(jnp.einsum("bthk,bshk->bhts", q, k))
        causal = positions[:, None, :, None] >= positions[:, None, None, :]
        logits = tap(jnp.where(causal, logits, jnp.finfo(logits.dtype).min))
        shifted = tap(logits - tap(jax.lax.stop_gradient(logits.max(-1, keepdims=True))))
        e = tap(jnp.exp(shifted))
        weights = tap(e / tap(e.sum(-1, keepdims=True)))
        mixed = tap(jnp.einsum("bhts,bshk->bthk", weights, v))
        h = tap(h + tap(jnp.einsum("bthk,hkd->btd", mixed, get(f"{p}.attn.output.weights", "heads", "projection",
                                                                 "features"))))
        m = norm(h, f"{p}.mlp_norm")
        m = tap(jax.nn.gelu(tap(tap(m @ get(f"{p}.mlp.in.weights", "features", "neurons"))
                                + get(f"{p}.mlp.in.bias", "neurons"))))
        h = tap(h + tap(tap(m @ get(f"{p}.mlp.out.weights", "neurons", "features")) + get(f"{p}.mlp.out.bias", "features")))
    return norm(h, "final_norm") @ embed.T, kept


def hand_written_equinox(model: Any, tokens: Any) -> tuple[jax.Array, list[jax.Array]]:
    """The custom Equinox transformer of ``tracing_bench.py``, batched, with every op's output returned.

    Example:
        >>> import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).parent))
        >>> from tracing_bench import Transformer
        >>> net = pzb.lift(Transformer(11, 8, 2, 16, 1, jax.random.key(0)), jnp.arange(4), strict=True)
        >>> logits, kept = hand_written_equinox(pzb.freeze_params(net),
        ...                                     pzb.nx.wrap(jnp.zeros((2, 4), jnp.int32), "batch", "seq"))
        >>> logits.shape, len(kept) > 20
        ((2, 4, 11), True)
    """
    w = _weights(model)
    kept: list[jax.Array] = []

    def tap(value: jax.Array) -> jax.Array:
        kept.append(value)
        return value

    def rms(x: jax.Array, label: str) -> jax.Array:
        scale = tap(jax.lax.rsqrt(tap(tap(jnp.mean(tap(x * x), axis=-1, keepdims=True)) + 1e-6)))
        return tap(tap(x * scale) * w[label].unwrap("features"))

    ids = tokens.unwrap("batch", "seq")
    seq = ids.shape[1]
    embed = w["embed.weight"].unwrap("vocabulary", "features")
    x = tap(embed[ids])
    depth = len({label.split(".")[1] for label in w if label.startswith("blocks.")})
    for i in range(depth):
        b = f"blocks.{i}"
        h = rms(x, f"{b}.ln1.scale")
        q, k, v = (tap(jnp.einsum("bsd,hdk->bhsk", h, w[f"{b}.attn.{n}"].unwrap("heads", "features", "projection")))
                   for n in ("W_Q", "W_K", "W_V"))
        scores = tap(tap(jnp.einsum("bhqk,bhsk->bhqs", q, k)) / tap(jnp.sqrt(jnp.float32(q.shape[-1]))))
        scores = tap(jnp.where(jnp.tril(jnp.ones((seq, seq), bool)), scores, -1e9))
        shifted = tap(scores - tap(jax.lax.stop_gradient(scores.max(-1, keepdims=True))))
        e = tap(jnp.exp(shifted))
        probs = tap(e / tap(e.sum(-1, keepdims=True)))
        mixed = tap(jnp.einsum("bhqs,bhsk->bhqk", probs, v))
        x = tap(x + tap(jnp.einsum("bhqk,hkd->bqd", mixed, w[f"{b}.attn.W_O"].unwrap("heads", "projection", "features"))))
        m = rms(x, f"{b}.ln2.scale")
        m = tap(jax.nn.gelu(tap(tap(m @ w[f"{b}.mlp.layers.0.weight"].unwrap("features", "features_out"))
                                + w[f"{b}.mlp.layers.0.bias"].unwrap("features"))))
        x = tap(x + tap(tap(m @ w[f"{b}.mlp.layers.1.weight"].unwrap("features", "features_out"))
                        + w[f"{b}.mlp.layers.1.bias"].unwrap("features")))
    return rms(x, "final.scale") @ embed.T, kept


def same_values_program(model: Any, x: Any) -> Callable[[Any, Any], list[jax.Array]]:
    """A jitted ``(model, x) -> [value, ...]``: the program ``capture_all`` traces to, each computed value once.

    The outputs are the distinct variables of that jaxpr's outputs that its
    equations compute (parameters passed through and repeats dropped).
    """
    closed = jax.make_jaxpr(lambda m, v: capture_all(m, v))(model, x)
    inputs = {id(var) for var in closed.jaxpr.invars}
    distinct: dict[int, Any] = {}
    for var in closed.jaxpr.outvars:
        if isinstance(var, jax.extend.core.Var) and id(var) not in inputs:
            distinct.setdefault(id(var), var)
    jaxpr = closed.jaxpr.replace(outvars=list(distinct.values()))
    return jax.jit(lambda m, v: jax.core.eval_jaxpr(jaxpr, closed.consts, *jax.tree_util.tree_leaves((m, v))))
