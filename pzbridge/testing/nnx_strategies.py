"""Hypothesis strategies for random Flax NNX models (for bridge round-trip properties).

``nnx_models()`` draws a small NNX architecture mixing layers pzbridge has
rules for (``Linear``, ``LinearGeneral``, ``Einsum``, ``Sequential`` with
activations, ``nnx.List`` / ``nnx.Dict``, ``LayerNorm``, ``RMSNorm``,
``BatchNorm``, ``Dropout``, ``MultiHeadAttention`` with GQA and
``normalize_qk``, ``Embed`` used for lookup and tied ``attend``) with layers that stay ``Foreign``
and custom composite modules exercising what the NNX bridge must preserve:
shared submodules (``self.b = self.a``), shared Variables, plain array
attributes, ``nnx.data`` lists, Variables of every kind (``Param``,
``BatchStat``, RNG state, a custom ``Variable`` subclass). Every drawn model
maps a batched input ``(batch, width)`` to the same shape, and comes with a
matching input.

Example:
    >>> from hypothesis import given, settings
    >>> @settings(max_examples=3, derandomize=True, deadline=None)
    ... @given(nnx_models())
    ... def check(pair):
    ...     model, x = pair
    ...     assert model(x).shape == x.shape
    >>> check()
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from hypothesis import strategies as st


class Counter(nnx.Variable):
    """A custom non-Param Variable type (lifts to a ``StateVariable``).

    Example:
        >>> Counter(jnp.zeros(())).get_raw_value().shape
        ()
    """


class Residual(nnx.Module):
    """``x + inner(x)``: a custom composite (stays ``Foreign``).

    Example:
        >>> Residual(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))(jnp.zeros((1, 2))).shape
        (1, 2)
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.inner(x)


class Twice(nnx.Module):
    """Calls one shared submodule twice through two attributes (``self.second = self.first``).

    Example:
        >>> t = Twice(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
        >>> t.second is t.first
        True
    """

    def __init__(self, inner: Any) -> None:
        self.first = inner
        self.second = inner

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.second(self.first(x))


class ScaleShift(nnx.Module):
    """Reads its Variables directly: a Param, the same Param again, a plain array and a counter.

    Example:
        >>> m = ScaleShift(3, 0)
        >>> m.tied is m.scale, m(jnp.ones((1, 3))).shape
        (True, (1, 3))
    """

    def __init__(self, width: int, seed: int) -> None:
        key = jax.random.key(seed)
        self.scale = nnx.Param(1.0 + 0.1 * jax.random.normal(key, (width,)))
        self.tied = self.scale
        self.offset = jnp.linspace(-0.5, 0.5, width)
        self.calls = Counter(jnp.zeros((), jnp.int32))
        self.width = width

    def __call__(self, x: jax.Array) -> jax.Array:
        self.calls.set_value(self.calls.get_value() + 1)
        return x * self.scale[...] + self.offset * self.tied[...]


class Stack(nnx.Module):
    """Runs an ``nnx.List`` of layers, then an ``nnx.Dict`` of layers, plus an ``nnx.data`` list.

    Example:
        >>> s = Stack([nnx.Linear(2, 2, rngs=nnx.Rngs(0))], {"a": nnx.Linear(2, 2, rngs=nnx.Rngs(1))})
        >>> s(jnp.ones((1, 2))).shape
        (1, 2)
    """

    def __init__(self, layers: list[Any], named: dict[str, Any]) -> None:
        self.layers = nnx.List(layers)
        self.named = nnx.Dict(named)
        self.extras = nnx.data([None, 2.0])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)
        for name in sorted(self.named):
            x = self.named[name](x)
        return x * self.extras[1] / 2.0


class TiedEmbed(nnx.Module):
    """Uses one ``nnx.Embed`` both ways: ``attend`` (tied output) and a lookup of the argmax token.

    Example:
        >>> TiedEmbed(3, 0)(jnp.ones((2, 3))).shape
        (2, 3)
    """

    def __init__(self, width: int, seed: int) -> None:
        self.embed = nnx.Embed(width, width, rngs=nnx.Rngs(seed))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.embed.attend(x) + self.embed(jnp.argmax(x, axis=-1))


def _halve(x: jax.Array) -> jax.Array:
    return x / 2.0


def _leaf(width: int, draw: Callable[[Any], Any]) -> Any:
    seed = draw(st.integers(0, 2**16))
    rngs = nnx.Rngs(seed)
    kind = draw(st.sampled_from([
        "linear", "linear", "linear_general", "einsum", "sequential", "batchnorm", "layernorm", "dropout",
        "scale_shift", "rmsnorm", "attention", "tied_embed",
    ]))
    if kind == "linear":
        return nnx.Linear(width, width, use_bias=draw(st.booleans()), rngs=rngs)
    if kind == "linear_general":
        return nnx.LinearGeneral(width, width, use_bias=draw(st.booleans()), rngs=rngs)
    if kind == "einsum":
        return nnx.Einsum("ba,ac->bc", (width, width), (width,) if draw(st.booleans()) else None, rngs=rngs)
    if kind == "sequential":
        hidden = draw(st.sampled_from([2, 4]))
        act = draw(st.sampled_from([jax.nn.relu, jnp.tanh, _halve]))
        return nnx.Sequential(nnx.Linear(width, hidden, rngs=rngs), act, nnx.Linear(hidden, width, rngs=rngs))
    if kind == "batchnorm":
        return nnx.BatchNorm(width, use_running_average=draw(st.booleans()), rngs=rngs)
    if kind == "layernorm":
        return nnx.LayerNorm(width, use_bias=draw(st.booleans()), use_fast_variance=draw(st.booleans()), rngs=rngs)
    if kind == "rmsnorm":
        return nnx.RMSNorm(width, epsilon=draw(st.sampled_from([1e-6, 1e-3])), rngs=rngs)
    if kind == "dropout":
        return nnx.Dropout(0.5, deterministic=draw(st.booleans()), rngs=rngs)
    if kind == "attention":
        # The batch axis doubles as the sequence: (batch, width) is (length, features) to NNX.
        heads = draw(st.sampled_from([1, width]))
        kv_heads = draw(st.sampled_from([1, heads]))
        return nnx.MultiHeadAttention(heads, width, qkv_features=width, num_kv_heads=kv_heads,
                                      normalize_qk=draw(st.booleans()), use_bias=draw(st.booleans()),
                                      decode=False, rngs=rngs)
    if kind == "tied_embed":
        return TiedEmbed(width, seed)
    return ScaleShift(width, seed)


def _module(width: int, depth: int, draw: Callable[[Any], Any]) -> Any:
    if depth <= 0:
        return _leaf(width, draw)
    kind = draw(st.sampled_from(["leaf", "residual", "twice", "stack", "sequential"]))
    child = lambda: _module(width, depth - 1, draw)  # noqa: E731
    if kind == "leaf":
        return _leaf(width, draw)
    if kind == "residual":
        return Residual(child())
    if kind == "twice":
        return Twice(child())
    if kind == "stack":
        count = draw(st.integers(0, 2))
        return Stack([child() for _ in range(count)], {"b": child()} if draw(st.booleans()) else {})
    return nnx.Sequential(*(child() for _ in range(draw(st.integers(1, 3)))))


@st.composite
def nnx_models(draw: Callable[[Any], Any], max_depth: int = 2, max_width: int = 3) -> tuple[Any, jax.Array]:
    """Draws ``(model, x)``: a random NNX model and a batched input ``(batch, width)``.

    Args:
      draw: Supplied by hypothesis.
      max_depth: Maximum nesting of composite modules.
      max_width: Maximum feature width.

    Returns:
      The model (input and output shape ``(batch, width)``) and an input.

    Example:
        >>> isinstance(nnx_models(max_depth=1), st.SearchStrategy)
        True
    """
    width = draw(st.integers(2, max(2, max_width)))
    batch = draw(st.integers(1, 2))
    depth = draw(st.integers(0, max_depth))
    model = _module(width, depth, draw)
    x = jax.random.normal(jax.random.key(draw(st.integers(0, 2**16))), (batch, width))
    return model, x
