"""Hypothesis strategy for random stateful Equinox models: :func:`stateful_equinox_models`.

Equinox models with ``BatchNorm`` are written ``y, state = model(x, state)``:
the running statistics live in an ``eqx.nn.State`` that custom code threads
through its blocks by hand, and a batch is run under
``jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))``
(:func:`run_batch`). The strategy draws such models the way real code is
written: residual convolution blocks (:class:`ConvBlock` in a
:class:`ResNet`), residual MLP blocks (:class:`NormedMLPBlock`), a BatchNorm
inside an ``eqx.nn.Sequential`` child, both BatchNorm modes, momenta,
affine or not, and whole models in ``eqx.nn.inference_mode``.

Example:
    >>> from hypothesis import given, settings
    >>> @settings(max_examples=2, database=None, derandomize=True, deadline=None)
    ... @given(stateful_equinox_models())
    ... def check(example):
    ...     out, state = run_batch(example.model, example.batch, example.state)
    ...     assert out.shape[0] == example.batch.shape[0]
    >>> check()
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from hypothesis import strategies as st

__all__ = ["ConvBlock", "NormedMLPBlock", "ResNet", "StatefulEquinoxExample", "StatefulStack", "WarmupBlock",
           "run_batch", "stateful_equinox_models"]


@dataclasses.dataclass(frozen=True)
class StatefulEquinoxExample:
    """A random stateful model, its State, one example and a batch: ``y, state = model(x, state)``.

    Attributes:
      model: The ``eqx.Module``.
      state: Its ``eqx.nn.State`` (from ``eqx.nn.make_with_state``).
      args: One example's inputs (without the State), as Equinox takes them.
      batch: A batch of examples (leading axis), for :func:`run_batch`.
      description: A short readable summary of the architecture.

    Example:
        >>> from hypothesis import find
        >>> example = find(stateful_equinox_models(), lambda e: e.description.startswith("ResNet"))
        >>> example.args[0].ndim, example.batch.ndim
        (3, 4)
    """

    model: eqx.Module
    state: eqx.nn.State
    args: tuple[Any, ...]
    batch: jax.Array
    description: str


def run_batch(model: Any, xs: jax.Array, state: eqx.nn.State, axis_name: str = "batch") -> tuple[Any, eqx.nn.State]:
    """Equinox's way of running a BatchNorm model on a batch: a named ``vmap``, the State shared.

    Example:
        >>> bn, st = eqx.nn.make_with_state(eqx.nn.BatchNorm)(2, "batch", mode="batch")
        >>> y, st = run_batch(bn, jnp.array([[0.0, 1.0], [2.0, 3.0]]), st)
        >>> [round(v, 3) for v in y[:, 0].tolist()]  # normalised across the batch
        [-1.0, 1.0]
    """
    return jax.vmap(model, axis_name=axis_name, in_axes=(0, None), out_axes=(0, None))(xs, state)


class ConvBlock(eqx.Module):
    """``relu(x + norm2(conv2(relu(norm1(conv1(x))))))`` with the State threaded through both norms.

    Example:
        >>> block, st = eqx.nn.make_with_state(ConvBlock)(2, jax.random.key(0), mode="batch")
        >>> run_batch(block, jnp.ones((3, 2, 4, 4)), st)[0].shape
        (3, 2, 4, 4)
    """

    conv1: eqx.nn.Conv2d
    norm1: eqx.nn.BatchNorm
    conv2: eqx.nn.Conv2d
    norm2: eqx.nn.BatchNorm

    def __init__(self, channels: int, key: jax.Array, **norm: Any) -> None:
        k1, k2 = jax.random.split(key)
        self.conv1 = eqx.nn.Conv2d(channels, channels, 3, padding=1, key=k1)
        self.norm1 = eqx.nn.BatchNorm(channels, "batch", **norm)
        self.conv2 = eqx.nn.Conv2d(channels, channels, 3, padding=1, use_bias=False, key=k2)
        self.norm2 = eqx.nn.BatchNorm(channels, "batch", **norm)

    def __call__(self, x: jax.Array, state: eqx.nn.State) -> tuple[jax.Array, eqx.nn.State]:
        y, state = self.norm1(self.conv1(x), state)
        y, state = self.norm2(self.conv2(jax.nn.relu(y)), state)
        return jax.nn.relu(x + y), state


class ResNet(eqx.Module):
    """A convolution stem, residual blocks in a list, global average pooling and a linear head.

    Example:
        >>> net, st = eqx.nn.make_with_state(ResNet)(3, 2, 1, 4, jax.random.key(0), mode="batch")
        >>> run_batch(net, jnp.ones((2, 3, 5, 5)), st)[0].shape
        (2, 4)
    """

    stem: eqx.nn.Conv2d
    blocks: list[ConvBlock]
    head: eqx.nn.Linear

    def __init__(self, in_channels: int, channels: int, depth: int, classes: int, key: jax.Array,
                 **norm: Any) -> None:
        keys = jax.random.split(key, depth + 2)
        self.stem = eqx.nn.Conv2d(in_channels, channels, 3, padding=1, key=keys[0])
        self.blocks = [ConvBlock(channels, k, **norm) for k in keys[1:-1]]
        self.head = eqx.nn.Linear(channels, classes, key=keys[-1])

    def __call__(self, x: jax.Array, state: eqx.nn.State) -> tuple[jax.Array, eqx.nn.State]:
        x = self.stem(x)
        for block in self.blocks:
            x, state = block(x, state)
        return self.head(jnp.mean(x, axis=(1, 2))), state


class NormedMLPBlock(eqx.Module):
    """``x + down(act(norm(up(x))))`` on one vector; the norm either direct or inside an ``eqx.nn.Sequential``.

    Example:
        >>> block, st = eqx.nn.make_with_state(NormedMLPBlock)(3, 5, jax.random.key(0), mode="ema")
        >>> run_batch(block, jnp.ones((2, 3)), st)[0].shape
        (2, 3)
    """

    up: eqx.Module
    norm: eqx.nn.BatchNorm | None
    down: eqx.nn.Linear
    activation: Any = eqx.field(static=True)

    def __init__(self, width: int, hidden: int, key: jax.Array, in_sequential: bool = False,
                 activation: Any = jax.nn.relu, **norm: Any) -> None:
        k1, k2 = jax.random.split(key)
        up = eqx.nn.Linear(width, hidden, key=k1)
        batch_norm = eqx.nn.BatchNorm(hidden, "batch", **norm)
        self.up = eqx.nn.Sequential([up, batch_norm]) if in_sequential else up
        self.norm = None if in_sequential else batch_norm
        self.down = eqx.nn.Linear(hidden, width, key=k2)
        self.activation = activation

    def __call__(self, x: jax.Array, state: eqx.nn.State) -> tuple[jax.Array, eqx.nn.State]:
        if self.norm is None:
            h, state = self.up(x, state)
        else:
            h, state = self.norm(self.up(x), state)
        return x + self.down(self.activation(h)), state


class WarmupBlock(eqx.Module):
    """``x + min(1, (n + 1) / warmup) * linear(x)``, ``n`` a call counter in the block's own State entry.

    Custom code opening the State itself (``state.get`` / ``state.set`` on
    its own ``eqx.nn.StateIndex``); under :func:`run_batch` the counter
    advances once per batch.

    Example:
        >>> block, st = eqx.nn.make_with_state(WarmupBlock)(3, jax.random.key(0))
        >>> _, st = run_batch(block, jnp.ones((2, 3)), st)
        >>> float(st.get(block.step))
        1.0
    """

    linear: eqx.nn.Linear
    step: eqx.nn.StateIndex
    warmup: float = eqx.field(static=True)

    def __init__(self, width: int, key: jax.Array, warmup: float = 4.0) -> None:
        self.linear = eqx.nn.Linear(width, width, key=key)
        self.step = eqx.nn.StateIndex(jnp.array(0.0))
        self.warmup = warmup

    def __call__(self, x: jax.Array, state: eqx.nn.State) -> tuple[jax.Array, eqx.nn.State]:
        n = state.get(self.step)
        scale = jnp.minimum(1.0, (n + 1) / self.warmup)
        return x + scale * self.linear(x), state.set(self.step, n + 1)


class StatefulStack(eqx.Module):
    """Blocks called in turn, the State passed from one to the next, then a linear readout.

    Example:
        >>> blocks = [NormedMLPBlock(2, 3, jax.random.key(0), mode="batch")]
        >>> stack, st = eqx.nn.make_with_state(StatefulStack)(blocks, eqx.nn.Linear(2, 1, key=jax.random.key(1)))
        >>> run_batch(stack, jnp.ones((4, 2)), st)[0].shape
        (4, 1)
    """

    blocks: tuple[NormedMLPBlock | WarmupBlock, ...]
    readout: eqx.nn.Linear

    def __init__(self, blocks: Any, readout: eqx.nn.Linear) -> None:
        self.blocks = tuple(blocks)
        self.readout = readout

    def __call__(self, x: jax.Array, state: eqx.nn.State) -> tuple[jax.Array, eqx.nn.State]:
        for block in self.blocks:
            x, state = block(x, state)
        return self.readout(x), state


def stateful_equinox_models() -> st.SearchStrategy[StatefulEquinoxExample]:
    """Random small stateful Equinox models with their State, one example and a batch.

    Roots drawn: a :class:`ResNet` on ``(3, size, size)`` images, or a
    :class:`StatefulStack` of :class:`NormedMLPBlock` s on ``(width,)``
    vectors (some with the norm in an ``eqx.nn.Sequential``), one in three
    followed by a :class:`WarmupBlock` (a counter in its own State entry). BatchNorms in
    mode ``"batch"`` or ``"ema"``, momentum 0.5 or 0.9, with or without the
    affine parameters; one model in four is in ``eqx.nn.inference_mode``
    (running statistics: the examples do not interact).

    Returns:
      A strategy of :class:`StatefulEquinoxExample`.

    Example:
        >>> from hypothesis import find
        >>> example = find(stateful_equinox_models(), lambda e: "inference" in e.description)
        >>> all(n.inference for n in jax.tree_util.tree_leaves(
        ...     example.model, is_leaf=lambda v: isinstance(v, eqx.nn.BatchNorm)) if isinstance(n, eqx.nn.BatchNorm))
        True
    """
    return _stateful_examples()


@st.composite
def _stateful_examples(draw: st.DrawFn) -> StatefulEquinoxExample:
    key = jax.random.key(draw(st.integers(0, 2**16)))
    k_model, k_data = jax.random.split(key)
    norm = {"mode": draw(st.sampled_from(["batch", "ema"])), "momentum": draw(st.sampled_from([0.5, 0.9])),
            "channelwise_affine": draw(st.booleans())}
    batch_size = draw(st.sampled_from([2, 3]))
    root = draw(st.sampled_from(["resnet", "mlp"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Equinox's notes on BatchNorm defaults
        if root == "resnet":
            channels, depth = draw(st.sampled_from([2, 4])), draw(st.integers(1, 2))
            size = draw(st.sampled_from([4, 5]))
            model, state = eqx.nn.make_with_state(ResNet)(3, channels, depth, 3, k_model, **norm)
            xs = jax.random.normal(k_data, (batch_size, 3, size, size))
            description = f"ResNet(channels={channels}, depth={depth})"
        else:
            width, depth = draw(st.sampled_from([2, 3])), draw(st.integers(1, 2))
            placements = [draw(st.booleans()) for _ in range(depth)]
            keys = jax.random.split(k_model, depth + 1)
            blocks: list[Any] = [NormedMLPBlock(width, 2 * width, k, in_sequential=p, **norm)
                                 for k, p in zip(keys, placements)]
            warmup = draw(st.integers(0, 2)) == 0
            if warmup:
                steps = draw(st.sampled_from([2.0, 3.0]))
                blocks.append(WarmupBlock(width, jax.random.fold_in(keys[-1], 1), warmup=steps))
            model, state = eqx.nn.make_with_state(StatefulStack)(blocks, eqx.nn.Linear(width, 2, key=keys[-1]))
            xs = jax.random.normal(k_data, (batch_size, width))
            description = f"StatefulStack(width={width}, in_sequential={placements}{', warmup' if warmup else ''})"
    if draw(st.integers(0, 3)) == 0:
        model = eqx.nn.inference_mode(model)
        description += " inference"
    return StatefulEquinoxExample(model, state, (xs[0],), xs, f"{description} {norm}")
