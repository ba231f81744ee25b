"""Greedy decoding of any model holding key/value caches, and the recomputation it must agree with.

pzbridge's GPT has its own loop (``pzbridge.models.gpt.greedy_decode``).
Lifted models decode the same way once they hold caches: a lifted NNX model
whose ``nnx.MultiHeadAttention`` had ``init_cache`` called (``decode=True``),
or a lifted Equinox model whose attention layers :func:`add_kv_caches`
swapped for :class:`~pzbridge.nn.kv_cache.KVCachingAttention`. The loop
here is framework-neutral: every call is one jitted pure function of the
model's frozen variable values (``stateless_call``), and the new state
values (caches, a steering layer's position counter) are threaded to the
next call, so the model itself is never changed.

:func:`recompute_greedy_decode` is the reference: the whole growing
sequence is run from scratch at every step (a model with caches restarts
from its initial, empty caches each time). A cached decode must give the same
tokens and (to a few ulp) the same logits; steering
(:mod:`pzbridge.toolshed.steering`) keeps that law by steering absolute
positions.

The caches only make attention incremental: positions computed *inside*
the model from the input's length (learned position tables sliced with
``[:T]``, RoPE in the model's own code) restart at 0 on every call, so such
models do not decode correctly through a cache; models whose only position
information is the causal mask (or ``KVCachingAttention``'s RoPE) do. Only
core and nn (and the toolshed) are imported (docs/architecture.md).

Example:
    >>> import jax, jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> from pzbridge.models.gpt import build_gpt, make_kv_cached
    >>> gpt = build_gpt("g", jax.random.key(0), 7, 1, 1, 4, 8, 8)
    >>> prompt = pzb.nx.wrap(jnp.array([[1, 2]]), "batch", "seq")
    >>> cached = cached_greedy_decode(make_kv_cached(gpt, {"batch": 1}, 6), prompt, 3)
    >>> bool((cached.tokens.unwrap("batch", "seq") == recompute_greedy_decode(gpt, prompt, 3).tokens.unwrap("batch", "seq")).all())
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError, PzbridgeError, format_path
from pzbridge.core.selectors import select
from pzbridge.core.struct import pytree_dataclass
from pzbridge.core.variables import StateVariableValue, unbind_variables
from pzbridge.nn.attention import Attention
from pzbridge.nn.kv_cache import KVCachingAttention
from pzbridge.nn.layer import Layer
from pzbridge.nn.linear import Linear
from pzbridge.nn.masks import ApplyCausalMask
from pzbridge.toolshed.steering import cache_start

__all__ = ["CachedSelfAttention", "Decoded", "add_kv_caches", "cached_greedy_decode", "recompute_greedy_decode"]


@dataclasses.dataclass(frozen=True)
class Decoded:
    """The result of a greedy decode.

    Attributes:
      tokens: The generated ids, named like the prompt with ``seq`` of size ``num_steps``.
      logits: The logits each generated token was chosen from (``seq`` of size ``num_steps``).

    Example:
        >>> Decoded(pzb.nx.zeros({"seq": 2}), pzb.nx.zeros({"seq": 2, "vocabulary": 3})).tokens.named_shape["seq"]
        2
    """

    tokens: nx.NamedArrayBase
    logits: nx.NamedArrayBase


def _check_prompt(prompt: Any, num_steps: int, seq_axis: str, where: str) -> None:
    if not nx.is_namedarray(prompt) or seq_axis not in prompt.named_shape or num_steps < 1:
        raise NamedAxisError(
            f"{where}: needs prompt ids with a {seq_axis!r} axis and num_steps >= 1 (found named shape "
            f"{dict(getattr(prompt, 'named_shape', {}))}, num_steps={num_steps}). Fix: pzb.nx.wrap(ids, 'batch', "
            f"'{seq_axis}') and num_steps=1 or more."
        )


def _next_token(logits: Any, prompt: nx.NamedArrayBase, seq_axis: str, where: str) -> tuple[Any, Any]:
    """``(ids, logits)`` of the last position: the greedy choice over the one axis the prompt lacks."""
    if not nx.is_namedarray(logits):
        raise PzbridgeError(
            f"{where}: the model returned {type(logits).__name__}, expected named logits. Fix: decode the lifted "
            "model itself (lifted(tokens)), not its positional form."
        )
    vocab = [n for n in logits.named_axes if n not in prompt.named_shape]
    if len(vocab) != 1 or logits.positional_shape or seq_axis not in logits.named_shape:
        raise NamedAxisError(
            f"{where}: expected logits with the prompt's axes {dict(prompt.named_shape)} plus one vocabulary axis, "
            f"found named shape {dict(logits.named_shape)} (positional {logits.positional_shape}). Fix: decode a "
            "language model whose output names its vocabulary axis."
        )
    last = logits[{seq_axis: -1}]
    return last.argmax(vocab[0]).astype(prompt.dtype), last


class _Stepper:
    """One jitted pure call per chunk of tokens; state values (caches, counters) threaded by label."""

    def __init__(self, model: Any, prompt: nx.NamedArrayBase, seq_axis: str, where: str) -> None:
        slots, self.initial = unbind_variables(model, freeze=True)
        self._call = jax.jit(lambda vals, tokens: slots.stateless_call(vals, tokens))
        self._prompt, self._seq, self._where = prompt, seq_axis, where

    def advance(self, vals: tuple[Any, ...], tokens: Any) -> tuple[tuple[Any, ...], Any, Any]:
        logits, new_state = self._call(vals, tokens)
        updated = {value.label: value for value in new_state}
        vals = tuple(updated.get(v.label, v) if isinstance(v, StateVariableValue) else v for v in vals)
        token, last = _next_token(logits, self._prompt, self._seq, self._where)
        return vals, token, last

    def feed(self, vals: tuple[Any, ...], sequence: Any, prefill: bool) -> tuple[tuple[Any, ...], Any, Any]:
        """Feeds ``sequence`` in one call, or one token per call; returns the state and the last token's choice."""
        length = sequence.named_shape[self._seq]
        chunks = [sequence] if prefill else [sequence[{self._seq: nx.wrap(jnp.array([t]), self._seq)}]
                                             for t in range(length)]
        for chunk in chunks:
            vals, token, last = self.advance(vals, chunk)
        return vals, token, last


def cached_greedy_decode(
    model: Any, prompt: nx.NamedArrayBase, num_steps: int, *, prefill: bool = True, seq_axis: str = "seq"
) -> Decoded:
    """Greedily decodes ``num_steps`` tokens through the caches ``model`` holds.

    The prompt is fed in one call (``prefill=True``) or one token per call
    (``prefill=False``: NNX's decode cache takes one token at a time), then
    each generated token alone. ``model`` is left as it was.

    Args:
      model: A model holding KV caches in ``StateVariable``s, called on
        named token ids (a lifted model's named form).
      prompt: Token ids, e.g. ``pzb.nx.wrap(ids, "batch", "seq")``.
      num_steps: Tokens to generate.
      prefill: Feed the prompt in one call.
      seq_axis: The sequence axis.

    Returns:
      A :class:`Decoded`.

    Raises:
      NamedAxisError: For a prompt without ``seq``, ``num_steps < 1`` or logits without one vocabulary axis.

    Example:
        >>> import jax, jax.numpy as jnp, pzbridge as pzb
        >>> from pzbridge.models.gpt import build_gpt, make_kv_cached
        >>> gpt = make_kv_cached(build_gpt("g", jax.random.key(0), 7, 1, 1, 4, 8, 8), {"batch": 1}, 5)
        >>> dict(cached_greedy_decode(gpt, pzb.nx.wrap(jnp.array([[1, 2]]), "batch", "seq"), 3).tokens.named_shape)
        {'batch': 1, 'seq': 3}
    """
    _check_prompt(prompt, num_steps, seq_axis, "cached_greedy_decode")
    stepper = _Stepper(model, prompt, seq_axis, "cached_greedy_decode")
    values, token, last = stepper.feed(stepper.initial, prompt, prefill)
    tokens, logits = [token], [last]
    for _ in range(num_steps - 1):
        values, token, last = stepper.advance(values, token[{seq_axis: None}])
        tokens.append(token)
        logits.append(last)
    return Decoded(nx.stack(tokens, seq_axis), nx.stack(logits, seq_axis))


def recompute_greedy_decode(
    model: Any, prompt: nx.NamedArrayBase, num_steps: int, *, prefill: bool = True, seq_axis: str = "seq"
) -> Decoded:
    """Greedy decoding by recomputation: the whole growing sequence is run from scratch at every step.

    The reference a cached decode must agree with. A model without caches
    runs the sequence in one call. A model holding caches starts every step
    from its *initial* state (empty caches, counters at their start) and is
    fed the whole sequence again (in one call, or one token per call with
    ``prefill=False``), so nothing computed at an earlier step is reused.

    Args:
      model: A model called on named token ids.
      prompt: Token ids with a ``seq`` axis.
      num_steps: Tokens to generate.
      prefill: For a model with caches: feed the sequence in one call.
      seq_axis: The sequence axis.

    Returns:
      A :class:`Decoded`.

    Raises:
      NamedAxisError: As :func:`cached_greedy_decode`.

    Example:
        >>> import jax, jax.numpy as jnp, pzbridge as pzb
        >>> from pzbridge.models.gpt import build_gpt
        >>> gpt = build_gpt("g", jax.random.key(0), 7, 1, 1, 4, 8, 8)
        >>> recompute_greedy_decode(gpt, pzb.nx.wrap(jnp.array([[1, 2]]), "batch", "seq"), 2).logits.named_shape["seq"]
        2
    """
    _check_prompt(prompt, num_steps, seq_axis, "recompute_greedy_decode")
    stepper = _Stepper(model, prompt, seq_axis, "recompute_greedy_decode")
    prefill = prefill or cache_start(model) is None  # without a cache, one token per call would see no context
    sequence = prompt
    tokens, logits = [], []
    for _ in range(num_steps):
        _, token, last = stepper.feed(stepper.initial, sequence, prefill)
        tokens.append(token)
        logits.append(last)
        sequence = nx.concatenate([sequence, token[{seq_axis: None}]], seq_axis)
    return Decoded(nx.stack(tokens, seq_axis), nx.stack(logits, seq_axis))


@pytree_dataclass
class CachedSelfAttention(Layer):
    """Self-attention through a :class:`KVCachingAttention`, called the way the original attention was.

    Lifted Equinox code calls its attention as ``attn(x, x, x, mask=m)``: a
    tuple input and a mask over the call's own length. Through a cache the
    keys are the cached ones, so the query input stands for all three and
    the caller's mask is replaced by the causal mask over absolute
    positions that the caching layer applies.

    Attributes:
      cached: The caching attention.

    Example:
        >>> import jax
        >>> attn = Attention.from_config("a", jax.random.key(0), d_model=4, num_heads=2, qk_size=2)
        >>> c = CachedSelfAttention(KVCachingAttention.from_uncached(attn, 4, {"heads": 2, "projection": 2}, "a"))
        >>> x = pzb.nx.ones({"seq": 2, "features": 4})
        >>> dict(c((x, x, x), mask=None).named_shape)
        {'seq': 2, 'features': 4}
    """

    cached: KVCachingAttention

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        query = x[0] if isinstance(x, tuple) else x
        side = {k: v for k, v in side_inputs.items() if k not in ("mask", "attn_mask")}
        return self.cached(query, **side)


def _is_uncached_attention(node: Any) -> bool:
    return isinstance(node, Attention)


def _input_sizes(attn: Attention, path: str) -> dict[str, int]:
    """The axes (and sizes) the attention's key projection contracts: its input's feature axes."""
    linears = select(attn.input_to_key).at_instances_of(Linear).get_sequence()
    weights = getattr(linears[0], "weights", None) if linears else None
    value: Any = getattr(weights, "value", None)
    if not nx.is_namedarray(value):
        raise PzbridgeError(
            f"add_kv_caches: the attention at {path} has no key projection with bound weights (found "
            f"{type(attn.input_to_key).__name__}); expected a pzb.nn.Linear. Fix: bind the model's variables "
            "before adding caches, or build the KVCachingAttention by hand."
        )
    return {name: value.named_shape[name] for name in linears[0].in_axis_names}


def add_kv_caches(model: Any, batch_axes: Mapping[str, int], cache_len: int, *, dtype: Any = jnp.float32,
                  seq_axis: str = "seq") -> Any:
    """Swaps every ``pzb.nn.Attention`` of ``model`` (a lifted Equinox ``MultiheadAttention`` too) for a cached one.

    Each becomes a :class:`CachedSelfAttention` around a
    ``KVCachingAttention`` with an empty cache of ``cache_len`` positions
    and a causal mask over absolute positions (an Equinox attention's own
    optional mask is dropped: the caller's mask covers one call only). The
    cached axes (heads, projection) are those of the keys and values each
    attention computes (shapes only, nothing runs). Parameters stay shared
    with ``model``.

    Args:
      model: A model whose ``Attention`` layers are causal self-attention.
      batch_axes: The batch axes of the token ids to decode, e.g. ``{"batch": 2}``.
      cache_len: Cache length (prompt + generated tokens).
      dtype: Cache dtype.
      seq_axis: The sequence axis.

    Returns:
      The caching copy (``model`` is not changed).

    Raises:
      PzbridgeError: If ``model`` has no ``Attention`` layer.

    Example:
        >>> import jax, jax.numpy as jnp, pzbridge as pzb
        >>> from pzbridge.models.gpt import build_gpt
        >>> gpt = build_gpt("g", jax.random.key(0), 7, 1, 1, 4, 8, 8)
        >>> pzb.select(add_kv_caches(gpt, {"batch": 1}, 6)).at_instances_of(KVCachingAttention).count()
        1
    """
    selection = select(model).at_subtrees_where(_is_uncached_attention)
    if selection.is_empty():
        raise PzbridgeError(
            f"add_kv_caches: expected pzb.nn.Attention layers (a lifted eqx.nn.MultiheadAttention is one), found "
            f"none in {type(model).__name__}. Fix: for NNX call init_cache on each nnx.MultiHeadAttention before "
            "lifting; other attention code needs a KVCachingAttention built by hand."
        )

    def cached(path: Any, attn: Attention) -> CachedSelfAttention:
        where = format_path(path)
        dummy = nx.zeros({**dict(batch_axes), seq_axis: 1, **_input_sizes(attn, where)})
        key, value = jax.eval_shape(lambda q: (attn.input_to_key(q), attn.input_to_value(q)), dummy)
        kv_seq = getattr(attn, "kv_seq_axis", "kv_seq")
        axes = {n: s for n, s in key.named_shape.items() if n != kv_seq}
        value_axes = {n: s for n, s in value.named_shape.items() if n != kv_seq}
        mask = attn.mask if type(attn) is Attention else ApplyCausalMask()
        plain = Attention(attn.input_to_query, attn.input_to_key, attn.input_to_value, attn.query_key_to_logits,
                          mask, attn.logits_to_weights, attn.attn_value_to_output)
        caching = KVCachingAttention.from_uncached(plain, cache_len, axes, f"kv_cache.{where}", dtype,
                                                   value_axes=value_axes, seq_axis=seq_axis, kv_seq_axis=kv_seq)
        return CachedSelfAttention(caching)

    return selection.apply(cached, with_keypath=True)
