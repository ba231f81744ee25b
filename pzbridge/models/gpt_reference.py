"""The GPT architecture of :mod:`pzbridge.models.gpt`, hand-written in pure jax.

An independent reference: plain arrays in a fixed layout, ``jnp.einsum`` and
explicit loops over layers, no pzbridge layer code. Tests check that the
combinator-built model computes the same logits; ``benchmarks/nn_bench.py``
times both. Grouped-query attention repeats key/value heads with
``jnp.repeat`` (the textbook formulation), RoPE uses the rotate-half pairing.

Parameter layout (``params``): ``embed [V, D]``; ``final_norm`` dict; and
``blocks``, a list of dicts with ``attn_norm`` / ``mlp_norm`` (``{"scale",
"bias"?}``), ``wq [D, H, hd]``, ``wk``/``wv [D, Hkv, hd]``, ``wo [H, hd, D]``,
optional ``bq [H, hd]``, ``bk``/``bv [Hkv, hd]``, ``bo [D]``, and
``w_in [D, F]``, ``b_in [F]``, ``w_out [F, D]``, ``b_out [D]``.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from pzbridge.models.gpt import build_gpt
    >>> model = build_gpt("g", jax.random.key(0), 7, 1, 2, 8, 16, 8)
    >>> params = params_from_model(model)
    >>> gpt_forward(params, jnp.array([[1, 2, 3]]), model.config).shape
    (1, 3, 7)
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def _norm(x: jax.Array, p: dict[str, jax.Array], kind: str, epsilon: float) -> jax.Array:
    if kind == "layer":
        centred = x - x.mean(-1, keepdims=True)
        y = centred * jax.lax.rsqrt(x.var(-1, keepdims=True) + epsilon)
    else:
        y = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + epsilon)
    y = y * p["scale"]
    return y + p["bias"] if "bias" in p else y


def _rope(x: jax.Array, positions: jax.Array, max_wavelength: float) -> jax.Array:
    """x: [B, T, H, d]; positions: [B, T]."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (max_wavelength ** (jnp.arange(0, 2 * half, 2, dtype=jnp.float32) / (2 * half)))
    angle = positions[..., None, None].astype(jnp.float32) * inv_freq  # [B, T, 1, half]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _attention(x: jax.Array, b: dict[str, jax.Array], positions: jax.Array, config: Any) -> jax.Array:
    q = jnp.einsum("btd,dhk->bthk", x, b["wq"])
    k = jnp.einsum("btd,dhk->bthk", x, b["wk"])
    v = jnp.einsum("btd,dhk->bthk", x, b["wv"])
    if "bq" in b:
        q, k, v = q + b["bq"], k + b["bk"], v + b["bv"]
    q = _rope(q, positions, config.rope_max_wavelength) / math.sqrt(q.shape[-1])
    k = _rope(k, positions, config.rope_max_wavelength)
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    logits = jnp.einsum("bthk,bshk->bhts", q, k)
    causal = positions[:, None, :, None] >= positions[:, None, None, :]
    logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhts,bshk,hkd->btd", weights, v, b["wo"])
    return out + b["bo"] if "bo" in b else out


def gpt_forward(params: dict[str, Any], tokens: Int[Array, "batch seq"], config: Any
                ) -> Float[Array, "batch seq vocab"]:
    """Logits ``[B, T, V]`` of the GPT model for token ids ``[B, T]``.

    Args:
      params: The parameters in the layout described in the module docstring.
      tokens: Integer ids ``[B, T]``.
      config: An object with ``norm``, ``epsilon`` and ``rope_max_wavelength``
        (e.g. :class:`pzbridge.models.gpt.GPTConfig`).

    Returns:
      The logits.

    Example:
        >>> from types import SimpleNamespace
        >>> p = {"embed": jnp.eye(3), "blocks": [], "final_norm": {"scale": jnp.ones(3)}}
        >>> cfg = SimpleNamespace(norm="rms", epsilon=0.0, rope_max_wavelength=1e4)
        >>> gpt_forward(p, jnp.array([[0]]), cfg).shape
        (1, 1, 3)
    """
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    h = params["embed"][tokens]
    for b in params["blocks"]:
        h = h + _attention(_norm(h, b["attn_norm"], config.norm, config.epsilon), b, positions, config)
        m = _norm(h, b["mlp_norm"], config.norm, config.epsilon)
        m = jax.nn.gelu(m @ b["w_in"] + b["b_in"])
        h = h + (m @ b["w_out"] + b["b_out"])
    h = _norm(h, params["final_norm"], config.norm, config.epsilon)
    return h @ params["embed"].T


def params_from_model(model: Any) -> dict[str, Any]:
    """Reads a :class:`~pzbridge.models.gpt.GPT`'s parameters into the reference layout.

    Weights are read by label and axis *name*, so any storage order works.

    Args:
      model: A GPT built by :func:`~pzbridge.models.gpt.build_gpt` (bound parameters).

    Returns:
      The ``params`` pytree of plain arrays.

    Example:
        >>> from pzbridge.models.gpt import build_gpt
        >>> params_from_model(build_gpt("g", jax.random.key(0), 5, 1, 1, 4, 8, 4))["embed"].shape
        (5, 4)
    """
    from pzbridge.core.variables import unbind_params  # Only for reading labels; the math above is pure jax.

    config = model.config
    _, variables = unbind_params(model, freeze=True)
    by_label = {v.label: v.value for v in variables}
    heads = "heads" if config.num_kv_heads in (None, config.num_heads) else "kv_heads"

    def get(label: str, *names: str) -> jax.Array:
        return by_label[f"{config.name}.{label}"].unwrap(*names)

    def norm(label: str) -> dict[str, jax.Array]:
        out = {"scale": get(f"{label}.scale", "features")}
        if f"{config.name}.{label}.bias" in by_label:
            out["bias"] = get(f"{label}.bias", "features")
        return out

    blocks = []
    for i in range(config.num_layers):
        p = f"blocks.{i}"
        b = {
            "attn_norm": norm(f"{p}.attn_norm"),
            "mlp_norm": norm(f"{p}.mlp_norm"),
            "wq": get(f"{p}.attn.query.weights", "features", "heads", "projection"),
            "wk": get(f"{p}.attn.key.weights", "features", heads, "projection"),
            "wv": get(f"{p}.attn.value.weights", "features", heads, "projection"),
            "wo": get(f"{p}.attn.output.weights", "heads", "projection", "features"),
            "w_in": get(f"{p}.mlp.in.weights", "features", "neurons"),
            "b_in": get(f"{p}.mlp.in.bias", "neurons"),
            "w_out": get(f"{p}.mlp.out.weights", "neurons", "features"),
            "b_out": get(f"{p}.mlp.out.bias", "features"),
        }
        if config.attention_bias:
            b.update(
                bq=get(f"{p}.attn.query.bias", "heads", "projection"),
                bk=get(f"{p}.attn.key.bias", heads, "projection"),
                bv=get(f"{p}.attn.value.bias", heads, "projection"),
                bo=get(f"{p}.attn.output.bias", "features"),
            )
        blocks.append(b)
    return {
        "embed": get("embed.embeddings", "vocabulary", "features"),
        "blocks": blocks,
        "final_norm": norm("final_norm"),
    }
