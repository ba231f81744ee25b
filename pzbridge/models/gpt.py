"""A small GPT-style language model built only from ``pzbridge.nn`` layers.

The model is plain data: a :class:`GPT` (a named ``Sequential``) of a token
``EmbeddingLookup``, ``num_layers`` :class:`TransformerBlock` s, a final
norm and a tied ``EmbeddingDecode``. Each block is::

    Residual(AttentionBlock[norm, Attention(RoPE, causal mask)])
    Residual(MLP[norm, Affine(features -> neurons), Elementwise(gelu), Affine(neurons -> features)])

so selectors reach every piece (``select(model).at_instances_of(MLP)``).
It is the reference model of the ``nn`` layer: tests compare it with the
hand-written pure-jax :func:`pzbridge.models.gpt_reference.gpt_forward`, and
``benchmarks/nn_bench.py`` times both. Decoding goes through the key/value
cache: :func:`make_kv_cached` swaps every ``Attention`` for a
:class:`~pzbridge.nn.kv_cache.KVCachingAttention`, and :func:`greedy_decode`
prefills the prompt in one call and then feeds one token per step, each step
one jitted pure function of the variable values.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> model = build_gpt("gpt", jax.random.key(0), vocab_size=11, num_layers=1, num_heads=2,
    ...                   d_model=8, d_mlp=16, max_seq_len=8)
    >>> logits = model(pzb.nx.wrap(jnp.array([[1, 2, 3]]), "batch", "seq"))
    >>> sorted(logits.named_shape.items())
    [('batch', 1), ('seq', 3), ('vocabulary', 11)]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError
from pzbridge.core.selectors import select
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.core.variables import StateVariableValue, unbind_variables
from pzbridge.nn.attention import Attention
from pzbridge.nn.basic import Elementwise
from pzbridge.nn.combinators import Residual, Sequential
from pzbridge.nn.embeddings import EmbeddingDecode, EmbeddingLookup, EmbeddingTable
from pzbridge.nn.kv_cache import KVCachingAttention
from pzbridge.nn.layer import Layer
from pzbridge.nn.linear import Affine
from pzbridge.nn.masks import ApplyCausalMask
from pzbridge.nn.normalization import LayerNorm, RMSNorm
from pzbridge.nn.rope import ApplyRoPE


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Hyperparameters of :func:`build_gpt` (hashable: stored as a static field).

    Example:
        >>> GPTConfig("gpt", 10, 1, 2, 8, 16, 32).head_dim
        4
    """

    name: str
    vocab_size: int
    num_layers: int
    num_heads: int
    d_model: int
    d_mlp: int
    max_seq_len: int
    num_kv_heads: int | None = None
    norm: str = "layer"
    epsilon: float = 1e-5
    attention_bias: bool = False
    rope_max_wavelength: float = 10_000.0

    @property
    def head_dim(self) -> int:
        """Per-head size ``d_model // num_heads``."""
        return self.d_model // self.num_heads

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (``num_heads`` unless grouped)."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads


@pytree_dataclass
class AttentionBlock(Sequential):
    """``[norm, Attention]``: the residual branch of self-attention.

    Example:
        >>> m = build_gpt("g", None, 5, 1, 1, 4, 8, 4)
        >>> [type(l).__name__ for l in m.sublayers[1].sublayers[0].delta.sublayers]
        ['LayerNorm', 'Attention']
    """


@pytree_dataclass
class MLP(Sequential):
    """``[norm, Affine, Elementwise(gelu), Affine]``: the residual MLP branch.

    Example:
        >>> m = build_gpt("g", None, 5, 1, 1, 4, 8, 4)
        >>> [type(l).__name__ for l in m.sublayers[1].sublayers[1].delta.sublayers]
        ['LayerNorm', 'Affine', 'Elementwise', 'Affine']
    """


@pytree_dataclass
class TransformerBlock(Sequential):
    """``[Residual(AttentionBlock), Residual(MLP)]``.

    Example:
        >>> m = build_gpt("g", None, 5, 2, 1, 4, 8, 4)
        >>> sum(isinstance(l, TransformerBlock) for l in m.sublayers)
        2
    """


@pytree_dataclass
class GPT(Sequential):
    """The language model: ``[EmbeddingLookup, *TransformerBlock, norm, EmbeddingDecode]``.

    Takes integer token ids with a ``seq`` axis (and any batch axes) and
    returns logits with a ``vocabulary`` axis.

    Attributes:
      sublayers: The layers, in order.
      config: The :class:`GPTConfig` it was built from (static).

    Example:
        >>> build_gpt("g", None, 5, 1, 1, 4, 8, 4).config.vocab_size
        5
    """

    config: GPTConfig = static_field(default=None)


def _norm(config: GPTConfig, name: str, init_base_rng: jax.Array | None, dtype: Any) -> Layer:
    across = {"features": config.d_model}
    if config.norm == "layer":
        return LayerNorm.from_config(name, init_base_rng, across, epsilon=config.epsilon, dtype=dtype)
    return RMSNorm.from_config(name, init_base_rng, across, epsilon=config.epsilon, dtype=dtype)


def build_gpt(
    name: str = "gpt",
    init_base_rng: PRNGKeyArray | None = None,
    vocab_size: int = 256,
    num_layers: int = 2,
    num_heads: int = 4,
    d_model: int = 64,
    d_mlp: int = 256,
    max_seq_len: int = 128,
    num_kv_heads: int | None = None,
    norm: str = "layer",
    epsilon: float = 1e-5,
    attention_bias: bool = False,
    rope_max_wavelength: float = 10_000.0,
    dtype: Any = jnp.float32,
) -> GPT:
    """Builds the GPT model with deterministic weights (or slots when ``init_base_rng`` is None).

    Parameter labels: ``f"{name}.embed.embeddings"``,
    ``f"{name}.blocks.{i}.attn_norm.scale"``, ``f"{name}.blocks.{i}.attn.query.weights"``
    (``key``, ``value``, ``output``), ``f"{name}.blocks.{i}.mlp_norm.scale"``,
    ``f"{name}.blocks.{i}.mlp.in.weights"`` / ``.bias``, ``mlp.out``,
    ``f"{name}.final_norm.scale"`` (and ``.bias`` for layer norms).

    Args:
      name: Model name (label prefix).
      init_base_rng: Base key, or None for parameter slots.
      vocab_size: Number of tokens.
      num_layers: Number of transformer blocks.
      num_heads: Query heads; ``d_model`` must be a multiple.
      d_model: Residual width (axis ``features``).
      d_mlp: MLP hidden width (axis ``neurons``).
      max_seq_len: Longest sequence; default cache length for decoding.
      num_kv_heads: Key/value heads for grouped-query attention.
      norm: ``"layer"`` (LayerNorm) or ``"rms"`` (RMSNorm).
      epsilon: Norm epsilon.
      attention_bias: Biases on the q/k/v/output projections.
      rope_max_wavelength: RoPE base.
      dtype: Parameter dtype.

    Returns:
      A :class:`GPT`.

    Raises:
      NamedAxisError: On inconsistent sizes or an unknown norm.

    Example:
        >>> build_gpt("g", None, 5, 1, 1, 4, 8, 4).sublayers[0].table.embeddings
        ParameterSlot(label='g.embed.embeddings')
    """
    if d_model % num_heads or norm not in ("layer", "rms"):
        raise NamedAxisError(
            f"build_gpt {name!r}: d_model={d_model} must be a multiple of num_heads={num_heads} and norm must be "
            f"'layer' or 'rms' (found {norm!r}). Fix: adjust the configuration."
        )
    config = GPTConfig(name, vocab_size, num_layers, num_heads, d_model, d_mlp, max_seq_len, num_kv_heads, norm,
                       epsilon, attention_bias, rope_max_wavelength)
    table = EmbeddingTable.from_config(f"{name}.embed", init_base_rng, vocab_size, {"features": d_model},
                                       dtype=dtype)
    rope = ApplyRoPE(max_wavelength=rope_max_wavelength)
    layers: list[Layer] = [EmbeddingLookup(table)]
    for i in range(num_layers):
        prefix = f"{name}.blocks.{i}"
        attn = Attention.from_config(
            f"{prefix}.attn", init_base_rng, d_model=d_model, num_heads=num_heads, qk_size=config.head_dim,
            num_kv_heads=num_kv_heads, use_qkv_bias=attention_bias, use_output_bias=attention_bias,
            mask=ApplyCausalMask(), rope=rope, dtype=dtype,
        )
        mlp = MLP([
            _norm(config, f"{prefix}.mlp_norm", init_base_rng, dtype),
            Affine.from_config(f"{prefix}.mlp.in", init_base_rng, {"features": d_model}, {"neurons": d_mlp},
                               dtype=dtype),
            Elementwise(jax.nn.gelu),
            Affine.from_config(f"{prefix}.mlp.out", init_base_rng, {"neurons": d_mlp}, {"features": d_model},
                               dtype=dtype),
        ])
        block_attn = AttentionBlock([_norm(config, f"{prefix}.attn_norm", init_base_rng, dtype), attn])
        layers.append(TransformerBlock([Residual(block_attn), Residual(mlp)]))
    layers += [_norm(config, f"{name}.final_norm", init_base_rng, dtype), EmbeddingDecode(table)]
    return GPT(layers, config)


def make_kv_cached(
    model: GPT, batch_axes: Mapping[str, int], cache_len: int | None = None, dtype: Any = jnp.float32
) -> GPT:
    """Replaces every ``Attention`` of ``model`` by a ``KVCachingAttention`` with an empty cache.

    Parameters stay shared with ``model``; cache state variables are labelled
    ``f"{name}.blocks.{i}.attn.cached_keys"`` (``cached_values``, ``cache_index``).

    Args:
      model: A :class:`GPT`.
      batch_axes: The batch axes of the token ids to decode, e.g. ``{"batch": 2}``.
      cache_len: Cache length (default ``config.max_seq_len``).
      dtype: Cache dtype.

    Returns:
      The caching model.

    Example:
        >>> m = make_kv_cached(build_gpt("g", jax.random.key(0), 5, 1, 1, 4, 8, 4), {"batch": 1})
        >>> int(m.sublayers[1].sublayers[0].delta.sublayers[1].cache_index.value)
        0
    """
    config = model.config
    length = config.max_seq_len if cache_len is None else cache_len
    heads_axis = "heads" if config.num_kv_heads in (None, config.num_heads) else "kv_heads"
    axes = {**dict(batch_axes), heads_axis: config.kv_heads, "projection": config.head_dim}
    return select(model).at_instances_of(Attention).apply_with_selected_index(
        lambda i, attn: KVCachingAttention.from_uncached(attn, length, axes, f"{config.name}.blocks.{i}.attn", dtype)
    )


def greedy_decode(model: GPT, prompt_tokens: nx.NamedArrayBase, num_steps: int) -> nx.NamedArray:
    """Greedily generates ``num_steps`` tokens after a prompt, through the key/value cache.

    The prompt (integer ids with a ``seq`` axis and any batch axes) is
    prefilled in one call; then each new token is fed alone. Every call is a
    jitted pure function of the frozen variable values, so ``model`` (and its
    variables) is left untouched.

    Args:
      model: A :class:`GPT` (without caches).
      prompt_tokens: Token ids, e.g. ``pzb.nx.wrap(ids, "batch", "seq")``.
      num_steps: Number of tokens to generate (at least 1).

    Returns:
      The generated ids, named like the prompt with ``seq`` of size ``num_steps``.

    Raises:
      NamedAxisError: If the prompt lacks ``seq`` or ``num_steps < 1``.

    Example:
        >>> m = build_gpt("g", jax.random.key(0), 7, 1, 1, 4, 8, 8)
        >>> out = greedy_decode(m, pzb.nx.wrap(jnp.array([[1, 2]]), "batch", "seq"), 3)
        >>> dict(out.named_shape)
        {'batch': 1, 'seq': 3}
    """
    if "seq" not in prompt_tokens.named_shape or num_steps < 1:
        raise NamedAxisError(
            f"greedy_decode: needs prompt ids with a 'seq' axis and num_steps >= 1 (found named shape "
            f"{dict(prompt_tokens.named_shape)}, num_steps={num_steps}). Fix: pzb.nx.wrap(ids, 'batch', 'seq')."
        )
    batch_axes = {n: s for n, s in prompt_tokens.named_shape.items() if n != "seq"}
    cache_len = prompt_tokens.named_shape["seq"] + num_steps
    slots, values = unbind_variables(make_kv_cached(model, batch_axes, cache_len), freeze=True)
    step = jax.jit(lambda vals, tokens: slots.stateless_call(vals, tokens))

    def advance(vals: tuple[Any, ...], tokens: nx.NamedArrayBase) -> tuple[tuple[Any, ...], nx.NamedArrayBase]:
        logits, new_state = step(vals, tokens)
        updated = {value.label: value for value in new_state}
        vals = tuple(updated.get(v.label, v) if isinstance(v, StateVariableValue) else v for v in vals)
        return vals, logits[{"seq": -1}].argmax("vocabulary").astype(prompt_tokens.dtype)

    values, token = advance(values, prompt_tokens)
    generated = [token]
    for _ in range(num_steps - 1):
        values, token = advance(values, token[{"seq": None}])
        generated.append(token)
    return nx.stack(generated, "seq")
