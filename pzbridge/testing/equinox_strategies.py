"""Hypothesis strategy for random Equinox models with matching inputs: :func:`equinox_models`.

A transform of lifted models (lifting itself, LoRA, rewiring) must hold for
architectures its author did not write down. ``equinox_models()`` draws small
random models mixing every ``eqx.nn`` layer that pzbridge lifts natively
(``Linear``, ``MLP`` incl. ``scan=True``, norms, ``PReLU``, ``Dropout``,
``Embedding``, ``MultiheadAttention``, ``RotaryPositionalEmbedding``,
convolutions, pools, ``Shared``) with user-style composite modules that pzbridge
keeps as ``Foreign`` (residual blocks, attention blocks, modules reading a
weight directly, modules with extra call arguments), together with inputs the
model accepts. The composite classes are module-level, so examples are
ordinary picklable data, and all shapes are tiny so each example is cheap.

Example:
    >>> from hypothesis import given, settings
    >>> @settings(max_examples=3, database=None, derandomize=True)
    ... @given(equinox_models())
    ... def check(example):
    ...     out = example.model(*example.args, **example.kwargs)
    ...     assert jax.numpy.all(jax.numpy.isfinite(out))
    >>> check()
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from hypothesis import strategies as st

__all__ = [
    "AttentionBlock",
    "EquinoxExample",
    "PerToken",
    "Residual",
    "ScaledByWeight",
    "SelfAttention",
    "SequenceModel",
    "TiedLanguageModel",
    "TokenModel",
    "WithExtraArgument",
    "equinox_models",
]

_ACTIVATIONS: tuple[Callable[[jax.Array], jax.Array], ...] = (jax.nn.relu, jax.nn.gelu, jnp.tanh, jax.nn.silu)


@dataclasses.dataclass(frozen=True)
class EquinoxExample:
    """A random model and inputs it accepts: ``model(*args, **kwargs)``.

    Attributes:
      model: The ``eqx.Module``.
      args: Positional inputs (unbatched, as Equinox takes them).
      kwargs: Keyword inputs (extra call arguments).
      description: A short readable summary of the architecture.

    Example:
        >>> EquinoxExample(eqx.nn.Identity(), (jnp.ones(2),), {}, "identity").model(jnp.ones(2)).shape
        (2,)
    """

    model: eqx.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    description: str


class Residual(eqx.Module):
    """A user residual block: ``x + inner(x)`` (lifted as ``Foreign``).

    Example:
        >>> Residual(eqx.nn.Identity())(jnp.ones(2)).tolist()
        [2.0, 2.0]
    """

    inner: eqx.Module

    def __call__(self, x: jax.Array, *, key: Any = None) -> jax.Array:
        return x + self.inner(x)


class ScaledByWeight(eqx.Module):
    """Reads its ``weight`` directly instead of calling a layer: ``inner(x) * weight``.

    Example:
        >>> ScaledByWeight(eqx.nn.Identity(), jnp.full(2, 3.0))(jnp.ones(2)).tolist()
        [3.0, 3.0]
    """

    inner: eqx.Module
    weight: jax.Array

    def __call__(self, x: jax.Array, *, key: Any = None) -> jax.Array:
        return self.inner(x) * self.weight


class WithExtraArgument(eqx.Module):
    """Takes an extra keyword argument: ``inner(x) * scale + shift``.

    Example:
        >>> WithExtraArgument(eqx.nn.Identity())(jnp.ones(2), scale=2.0).tolist()
        [2.5, 2.5]
    """

    inner: eqx.Module
    shift: float = 0.5

    def __call__(self, x: jax.Array, *, scale: float = 1.0, key: Any = None) -> jax.Array:
        return self.inner(x) * scale + self.shift


class PerToken(eqx.Module):
    """Applies a vector layer to every token of a ``(seq, features)`` input.

    Example:
        >>> PerToken(eqx.nn.Identity())(jnp.ones((3, 2))).shape
        (3, 2)
    """

    inner: eqx.Module

    def __call__(self, x: jax.Array, *, key: Any = None) -> jax.Array:
        return jax.vmap(self.inner)(x)


class SelfAttention(eqx.Module):
    """Self-attention with an optional causal mask built in ``__call__``.

    Example:
        >>> attn = SelfAttention(eqx.nn.MultiheadAttention(1, 2, key=jax.random.key(0)), True)
        >>> attn(jnp.ones((3, 2))).shape
        (3, 2)
    """

    attn: eqx.nn.MultiheadAttention
    causal: bool = eqx.field(static=True, default=False)

    def __call__(self, x: jax.Array, *, key: Any = None) -> jax.Array:
        mask = jnp.tril(jnp.ones((x.shape[0], x.shape[0]), bool)) if self.causal else None
        return self.attn(x, x, x, mask)


class AttentionBlock(eqx.Module):
    """A pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))`` per token.

    Example:
        >>> k = jax.random.key(0)
        >>> block = AttentionBlock(eqx.nn.LayerNorm(4), eqx.nn.MultiheadAttention(2, 4, key=k), eqx.nn.LayerNorm(4),
        ...                        eqx.nn.MLP(4, 4, 8, 1, key=k))
        >>> block(jnp.ones((3, 4))).shape
        (3, 4)
    """

    ln1: eqx.Module
    attn: eqx.nn.MultiheadAttention
    ln2: eqx.Module
    mlp: eqx.Module

    def __call__(self, x: jax.Array, mask: jax.Array | None = None, *, key: Any = None) -> jax.Array:
        h = jax.vmap(self.ln1)(x)
        x = x + self.attn(h, h, h, mask)
        return x + jax.vmap(self.mlp)(jax.vmap(self.ln2)(x))


class SequenceModel(eqx.Module):
    """Runs ``(seq, features)`` blocks in order, passing an optional mask to attention blocks.

    Example:
        >>> SequenceModel([PerToken(eqx.nn.Identity())])(jnp.ones((2, 3))).shape
        (2, 3)
    """

    blocks: list[eqx.Module]

    def __call__(self, x: jax.Array, mask: jax.Array | None = None, *, key: Any = None) -> jax.Array:
        for block in self.blocks:
            x = block(x, mask) if isinstance(block, AttentionBlock) else block(x)
        return x


class TokenModel(eqx.Module):
    """Embeds integer tokens and runs a sequence body: ``body(vmap(embedding)(tokens))``.

    Example:
        >>> TokenModel(eqx.nn.Embedding(5, 2, key=jax.random.key(0)), PerToken(eqx.nn.Identity()))(
        ...     jnp.arange(3)).shape
        (3, 2)
    """

    embedding: eqx.nn.Embedding
    body: eqx.Module

    def __call__(self, tokens: jax.Array, *, key: Any = None) -> jax.Array:
        return self.body(jax.vmap(self.embedding)(tokens))


class TiedLanguageModel(eqx.Module):
    """Embedding and output layer tied with ``eqx.nn.Shared``; a sequence body between them.

    Example:
        >>> TiedLanguageModel.build(5, 2, PerToken(eqx.nn.Identity()), jax.random.key(0))(jnp.arange(3)).shape
        (3, 5)
    """

    shared: eqx.nn.Shared
    body: eqx.Module

    @classmethod
    def build(cls, vocab: int, d: int, body: eqx.Module, key: jax.Array) -> TiedLanguageModel:
        """Builds the tied pair from a key (the output weight is the embedding)."""
        k1, k2 = jax.random.split(key)
        pair = (eqx.nn.Embedding(vocab, d, key=k1), eqx.nn.Linear(d, vocab, key=k2))
        return cls(eqx.nn.Shared(pair, lambda p: p[1].weight, lambda p: p[0].weight), body)

    def __call__(self, tokens: jax.Array, *, key: Any = None) -> jax.Array:
        embedding, output = self.shared()
        return jax.vmap(output)(self.body(jax.vmap(embedding)(tokens)))


@st.composite
def _vector_layers(draw: st.DrawFn, d: int, key: jax.Array, depth: int) -> tuple[eqx.Module, str]:
    """A random layer mapping ``(d,)`` to ``(d,)``."""
    keys = iter(jax.random.split(key, 4))
    kinds = ["linear", "mlp", "layernorm", "rmsnorm", "prelu", "lambda", "identity", "dropout"]
    if depth > 0:
        kinds += ["sequential", "residual", "scaled"]
    kind = draw(st.sampled_from(kinds))
    if kind == "linear":
        return eqx.nn.Linear(d, d, use_bias=draw(st.booleans()), key=next(keys)), "Linear"
    if kind == "mlp":
        depth_ = draw(st.integers(0, 3))
        scan = depth_ >= 1 and draw(st.booleans())
        act = draw(st.sampled_from(_ACTIVATIONS))
        mlp = eqx.nn.MLP(d, d, draw(st.sampled_from([1, 3])), depth_, activation=act, use_final_bias=draw(st.booleans()),
                         scan=scan, key=next(keys))
        return mlp, f"MLP(depth={depth_}, scan={scan})"
    if kind == "layernorm":
        return eqx.nn.LayerNorm(d, use_weight=draw(st.booleans()), use_bias=draw(st.booleans())), "LayerNorm"
    if kind == "rmsnorm":
        return eqx.nn.RMSNorm(d, use_bias=draw(st.booleans())), "RMSNorm"
    if kind == "prelu":
        vector = draw(st.booleans())
        return eqx.nn.PReLU(jnp.full((d,), 0.1) if vector else 0.2), "PReLU"
    if kind == "lambda":
        return eqx.nn.Lambda(draw(st.sampled_from(_ACTIVATIONS))), "Lambda"
    if kind == "identity":
        return eqx.nn.Identity(), "Identity"
    if kind == "dropout":
        return eqx.nn.Dropout(draw(st.sampled_from([0.0, 0.5])), inference=True), "Dropout"
    if kind == "sequential":
        parts = [draw(_vector_layers(d, k, depth - 1)) for k in jax.random.split(next(keys), draw(st.integers(1, 3)))]
        # PReLU takes no `key`, which eqx.nn.Sequential always passes.
        parts = [(eqx.nn.Lambda(jax.nn.relu), "Lambda") if isinstance(p, eqx.nn.PReLU) else (p, n) for p, n in parts]
        return eqx.nn.Sequential([p for p, _ in parts]), "Sequential[" + ", ".join(n for _, n in parts) + "]"
    inner, name = draw(_vector_layers(d, next(keys), depth - 1))
    if kind == "residual":
        return Residual(inner), f"Residual({name})"
    return ScaledByWeight(inner, jnp.linspace(0.5, 1.5, d)), f"ScaledByWeight({name})"


@st.composite
def _sequence_blocks(draw: st.DrawFn, d: int, key: jax.Array) -> tuple[eqx.Module, str]:
    """A random block mapping ``(seq, d)`` to ``(seq, d)``."""
    k1, k2, k3 = jax.random.split(key, 3)
    heads = draw(st.sampled_from([h for h in (1, 2) if d % h == 0]))
    kind = draw(st.sampled_from(["per_token", "attention", "block"] + (["rope"] if d % 2 == 0 else [])))
    if kind == "per_token":
        inner, name = draw(_vector_layers(d, k1, 1))
        return PerToken(inner), f"PerToken({name})"
    if kind == "rope":
        return eqx.nn.RotaryPositionalEmbedding(d), "RoPE"
    mha = eqx.nn.MultiheadAttention(heads, d, use_query_bias=draw(st.booleans()),
                                    use_output_bias=draw(st.booleans()), key=k2)
    if kind == "attention":
        causal = draw(st.booleans())
        return SelfAttention(mha, causal), f"SelfAttention(heads={heads}, causal={causal})"
    mlp = eqx.nn.MLP(d, d, 2 * d, 1, activation=jax.nn.gelu, key=k3)
    return AttentionBlock(eqx.nn.LayerNorm(d), mha, eqx.nn.RMSNorm(d), mlp), f"AttentionBlock(heads={heads})"


@st.composite
def _conv_models(draw: st.DrawFn, key: jax.Array) -> EquinoxExample:
    n = draw(st.integers(1, 2))
    channels = draw(st.sampled_from([2, 4]))
    size = draw(st.sampled_from([4, 5]))
    keys = iter(jax.random.split(key, 4))
    layers = []
    names = []
    for _ in range(draw(st.integers(1, 2))):
        transpose = draw(st.booleans())
        cls = (eqx.nn.ConvTranspose if transpose else eqx.nn.Conv)
        kernel = draw(st.integers(1, 3))
        padding = draw(st.sampled_from(["SAME", 0, 1])) if not transpose else draw(st.sampled_from(["SAME", 1]))
        groups = draw(st.sampled_from([1, 2]))
        mode = "ZEROS" if transpose or padding == 0 else draw(st.sampled_from(["ZEROS", "REFLECT", "CIRCULAR"]))
        if mode != "ZEROS" and kernel == 1:
            mode = "ZEROS"
        layers.append(cls(n, channels, channels, kernel, padding=padding, groups=groups, padding_mode=mode,
                          use_bias=draw(st.booleans()), key=next(keys)))
        names.append(f"{cls.__name__}{n}d(k={kernel}, pad={padding}, mode={mode})")
        layers.append(eqx.nn.Lambda(jax.nn.relu))
    pool = draw(st.sampled_from(["none", "max", "avg", "adaptive_max", "adaptive_avg"]))
    if pool in ("max", "avg"):
        cls = {("max", 1): eqx.nn.MaxPool1d, ("max", 2): eqx.nn.MaxPool2d,
               ("avg", 1): eqx.nn.AvgPool1d, ("avg", 2): eqx.nn.AvgPool2d}[(pool, n)]
        ceil = draw(st.booleans())  # Equinox rejects ceil-mode padding beyond the window: no extra padding then.
        padding = 0 if ceil else draw(st.sampled_from([0, 1]))
        layers.append(cls(2, stride=draw(st.sampled_from([1, 2])), padding=padding, use_ceil=ceil))
        names.append(f"{cls.__name__}")
    elif pool != "none":
        cls = {("adaptive_max", 1): eqx.nn.AdaptiveMaxPool1d, ("adaptive_max", 2): eqx.nn.AdaptiveMaxPool2d,
               ("adaptive_avg", 1): eqx.nn.AdaptiveAvgPool1d, ("adaptive_avg", 2): eqx.nn.AdaptiveAvgPool2d}[(pool, n)]
        layers.append(cls(draw(st.sampled_from([1, 2]))))
        names.append(f"{cls.__name__}")
    model = eqx.nn.Sequential(layers) if len(layers) > 2 else layers[0]
    x = jnp.sin(jnp.arange(channels * size**n, dtype=jnp.float32)).reshape((channels,) + (size,) * n)
    return EquinoxExample(model, (x,), {}, " -> ".join(names))


def equinox_models() -> st.SearchStrategy[EquinoxExample]:
    """Random small Equinox models with matching inputs (see the module docstring).

    Roots drawn: a vector layer on ``(d,)``; ``WithExtraArgument`` called
    with ``scale=``; a ``SequenceModel`` of sequence blocks on ``(seq, d)``
    (with an optional causal mask argument); ``MultiheadAttention`` called on
    ``(q, k, v[, mask])``; a ``TokenModel`` or tied ``TiedLanguageModel`` on
    integer tokens; a convolution stack (optionally ending in a pool) on
    ``(channels, *spatial)``. Dropout
    is in inference mode, so outputs are deterministic.

    Returns:
      A strategy of :class:`EquinoxExample`.

    Example:
        >>> from hypothesis import find
        >>> example = find(equinox_models(), lambda e: e.description.startswith("TokenModel"))
        >>> example.args[0].dtype
        dtype('int32')
    """
    return _examples()


@st.composite
def _examples(draw: st.DrawFn) -> EquinoxExample:
    key = jax.random.key(draw(st.integers(0, 2**16)))
    k1, k2, k3 = jax.random.split(key, 3)
    # Few distinct shapes: JAX compiles each primitive once per shape, so reuse keeps examples cheap.
    d = draw(st.sampled_from([2, 4]))
    seq = draw(st.sampled_from([1, 3]))
    x_vec = jnp.cos(jnp.arange(d, dtype=jnp.float32) * 1.3)
    x_seq = jnp.sin(jnp.arange(seq * d, dtype=jnp.float32) * 0.7).reshape(seq, d)
    root = draw(st.sampled_from(["vector", "extra", "sequence", "mha", "tokens", "tied", "conv"]))
    if root == "vector":
        layer, name = draw(_vector_layers(d, k1, 2))
        return EquinoxExample(layer, (x_vec,), {}, name)
    if root == "extra":
        layer, name = draw(_vector_layers(d, k1, 1))
        return EquinoxExample(WithExtraArgument(layer), (x_vec,), {"scale": 2.0}, f"WithExtraArgument({name})")
    if root == "conv":
        return draw(_conv_models(k1))
    blocks = [draw(_sequence_blocks(d, k)) for k in jax.random.split(k2, draw(st.integers(1, 2)))]
    body = SequenceModel([b for b, _ in blocks])
    description = "[" + ", ".join(n for _, n in blocks) + "]"
    if root == "sequence":
        mask = jnp.tril(jnp.ones((seq, seq), bool)) if draw(st.booleans()) else None
        args = (x_seq,) if mask is None else (x_seq, mask)
        return EquinoxExample(body, args, {}, f"SequenceModel{description}")
    if root == "mha":
        heads = draw(st.sampled_from([h for h in (1, 2) if d % h == 0]))
        mha = eqx.nn.MultiheadAttention(heads, d, qk_size=draw(st.integers(1, 3)), vo_size=draw(st.integers(1, 3)),
                                        use_key_bias=draw(st.booleans()), use_value_bias=draw(st.booleans()),
                                        key=k3)
        kv = jnp.cos(jnp.arange((seq + 1) * d, dtype=jnp.float32)).reshape(seq + 1, d)
        args: tuple[Any, ...] = (x_seq, kv, kv)
        if draw(st.booleans()):
            shape = (heads, seq, seq + 1) if draw(st.booleans()) else (seq, seq + 1)
            args += (jnp.arange(jnp.prod(jnp.array(shape))).reshape(shape) % 3 != 1,)
        return EquinoxExample(mha, args, {}, f"MultiheadAttention(heads={heads}, mask={len(args) == 4})")
    vocab = draw(st.integers(3, 9))
    tokens = jnp.arange(seq, dtype=jnp.int32) % vocab
    if root == "tokens":
        model = TokenModel(eqx.nn.Embedding(vocab, d, key=k3), body)
        return EquinoxExample(model, (tokens,), {}, f"TokenModel{description}")
    return EquinoxExample(TiedLanguageModel.build(vocab, d, body, k3), (tokens,), {}, f"TiedLanguageModel{description}")


def assert_round_trip(model: eqx.Module, lowered: eqx.Module) -> None:
    """Asserts ``lowered`` is ``model`` again: same tree structure, the very same arrays, equal other leaves.

    Raises:
      AssertionError: Naming the first differing leaf path.

    Example:
        >>> lin = eqx.nn.Linear(2, 2, key=jax.random.key(0))
        >>> assert_round_trip(lin, lin)
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(model)
    got_leaves, got_treedef = jax.tree_util.tree_flatten_with_path(lowered)
    assert treedef == got_treedef, f"tree structure differs:\n{treedef}\nvs\n{got_treedef}"
    for (path, want), (_, got) in zip(leaves, got_leaves):
        where = jax.tree_util.keystr(path)
        if eqx.is_array(want):
            assert got is want, f"{where}: array is not the original buffer ({type(got).__name__})"
        else:
            assert got is want or got == want, f"{where}: non-array leaf {got!r} != {want!r}"


def assert_same_buffers(model: eqx.Module, lifted: Any) -> None:
    """Asserts every lifted variable holds one of ``model``'s own arrays (no copies).

    Example:
        >>> import pzbridge as pzb
        >>> lin = eqx.nn.Linear(2, 2, key=jax.random.key(0))
        >>> assert_same_buffers(lin, pzb.lift(lin))
    """
    from pzbridge.core import named_axes as nx
    from pzbridge.core.variables import unbind_variables

    originals = {id(leaf) for leaf in jax.tree_util.tree_leaves(model) if eqx.is_array(leaf)}
    _, variables = unbind_variables(lifted)
    for variable in variables:
        value = variable.value
        data = value.data_array if nx.is_namedarray(value) else value
        assert id(data) in originals, f"variable {variable.label!r} holds a copy, not an original buffer"


def assert_outputs_close(want: Any, got: Any, rtol: float = 1e-6) -> None:
    """Asserts two output pytrees are equal within ``rtol`` of the largest magnitude (bitwise when rtol=0).

    Example:
        >>> assert_outputs_close(jnp.ones(2), jnp.ones(2), rtol=0.0)
    """
    import numpy as np

    for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape and a.dtype == b.dtype, f"{a.shape} {a.dtype} vs {b.shape} {b.dtype}"
        scale = float(np.max(np.abs(a))) if a.size else 0.0
        err = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
        assert err <= rtol * max(scale, 1e-30), f"max abs difference {err} > {rtol} * {scale}"
