"""Traced lifting of convolutional models written the way real code is written.

Three models, each checked against the original module itself:

* an Equinox UNet (unbatched ``(channels, height, width)`` images): residual
  conv blocks, max-pool downsampling, a transposed-convolution up path, a
  skip connection concatenated over channels and a sinusoidal time
  embedding through an ``eqx.nn.Linear`` added to the features;
* a Flax NNX ResNet (``(batch, height, width, channels)``): ``nnx.Conv`` +
  ``nnx.BatchNorm`` + relu blocks with identity and projection shortcuts, a
  global average pool and an ``nnx.Linear`` head, in training and in
  evaluation mode;
* an Equinox residual MLP whose blocks run under ``jax.checkpoint`` /
  ``eqx.filter_checkpoint``.

For each: no ``Foreign`` left, outputs at two sizes eager and under jit, the
residual structure, captured residual streams against hand-written
references, activation patching, LoRA on every ``Linear`` weight contraction
(the toolshed adapts ``Linear`` layers only, not convolutions) trained with
the framework's own APIs and merged back, and ``lower(lift(m, x))`` giving
``m`` back. Outputs of the lifted graph are compared within a few ulps (it is
another program than the original's); ``lower(lift(m))`` is the original
program, so it is compared bitwise.

The checkpointed blocks are inlined by traced lifting: the lifted graph
computes the same values and gradients without rematerialising, and the
``jax.checkpoint`` comes back with the original class when it is rebuilt.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from lora_helpers import lora_trainable, train_adapters

import pzbridge as pzb
from pzbridge.bridge.equinox import EquinoxAdapter, LoRALinear
from pzbridge.nn.dataflow import BindSideInputs, CallChild, SideInput, Traced
from pzbridge.nn.named_mean import MeanAxes
from pzbridge.nn.named_ops import Concatenate, Constant
from pzbridge.testing.numerics import assert_outputs_match, assert_same_outputs
from pzbridge.toolshed.intermediates import capture_intermediates
from pzbridge.toolshed.interventions import patch_activations
from pzbridge.toolshed.lora import loraify_linears_in_selection, merge_lora

IMAGE = ("channels", "height", "width")
NNX_IMAGE = ("batch", "height", "width", "channels")


def _key(seed: int) -> jax.Array:
    """A PRNG key for the models' initialisation.

    ``rbg`` keys: initialising the layers compiles a random-bits program per
    weight shape, which is several times faster for ``rbg`` than for the
    default threefry on CPU; the checks compare lifted and original models on
    the same arrays, so which values the weights get does not matter.
    """
    return jax.random.key(seed, impl="rbg")


def _normal(seed: int, shape: tuple[int, ...]) -> jax.Array:
    """Standard-normal float32 inputs (from numpy: no random-bits program to compile)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _jit_positional(lifted: Any, *args: Any) -> Any:
    return jax.jit(lambda m, *a: m.positional(*a))(pzb.freeze_variables(lifted), *args)


def _count(tree: Any, cls: type | tuple[type, ...]) -> int:
    return pzb.select(tree).at_instances_of(cls).count()


def _same_leaves(a: Any, b: Any) -> bool:
    """Same Equinox pytree: equal structure (classes and static fields) and the very same arrays."""
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return (jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b) and len(la) == len(lb)
            and all(x is y for x, y in zip(la, lb)))


# ====================================================================================================
# 1. An Equinox UNet.


class ResBlock(eqx.Module):
    """Two 3x3 convolutions on a residual stream: ``x + conv2(relu(conv1(relu(x))))``."""

    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d

    def __init__(self, channels: int, *, key: jax.Array):
        k1, k2 = jax.random.split(key)
        self.conv1 = eqx.nn.Conv2d(channels, channels, 3, padding=1, key=k1)
        self.conv2 = eqx.nn.Conv2d(channels, channels, 3, padding=1, key=k2)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.conv2(jax.nn.relu(self.conv1(jax.nn.relu(x))))


class TimeEmbedding(eqx.Module):
    """Sinusoidal features of a scalar time step, projected by a ``Linear`` (the diffusion-model way)."""

    linear: eqx.nn.Linear
    dim: int = eqx.field(static=True)

    def __init__(self, dim: int, out: int, *, key: jax.Array):
        self.linear = eqx.nn.Linear(dim, out, key=key)
        self.dim = dim

    def __call__(self, t: jax.Array) -> jax.Array:
        half = self.dim // 2
        freqs = jnp.exp(-jnp.log(10_000.0) * jnp.arange(half) / half)
        angles = t * freqs
        return jax.nn.silu(self.linear(jnp.concatenate([jnp.sin(angles), jnp.cos(angles)])))


class UNet(eqx.Module):
    """A one-level UNet: stem, down block, pool, middle block, transposed-conv up path, skip, decoder."""

    stem: eqx.nn.Conv2d
    time: TimeEmbedding
    down: ResBlock
    pool: eqx.nn.MaxPool2d
    widen: eqx.nn.Conv2d
    mid: ResBlock
    up: eqx.nn.ConvTranspose2d
    fuse: eqx.nn.Conv2d
    dec: ResBlock
    head: eqx.nn.Conv2d

    def __init__(self, in_channels: int = 3, channels: int = 4, time_dim: int = 8, *, key: jax.Array):
        ks = jax.random.split(key, 9)
        c = channels
        self.stem = eqx.nn.Conv2d(in_channels, c, 3, padding=1, key=ks[0])
        self.time = TimeEmbedding(time_dim, c, key=ks[1])
        self.down = ResBlock(c, key=ks[2])
        self.pool = eqx.nn.MaxPool2d(2, 2)
        self.widen = eqx.nn.Conv2d(c, 2 * c, 3, padding=1, key=ks[3])
        self.mid = ResBlock(2 * c, key=ks[4])
        self.up = eqx.nn.ConvTranspose2d(2 * c, c, 2, stride=2, key=ks[5])
        self.fuse = eqx.nn.Conv2d(2 * c, c, 3, padding=1, key=ks[6])
        self.dec = ResBlock(c, key=ks[7])
        self.head = eqx.nn.Conv2d(c, in_channels, 1, key=ks[8])

    def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
        h = self.stem(x) + self.time(t)[:, None, None]
        skip = self.down(h)
        h = self.mid(jax.nn.relu(self.widen(self.pool(skip))))
        h = jnp.concatenate([self.up(h), skip], axis=0)  # channels first: the skip joins over channels
        return self.head(self.dec(jax.nn.relu(self.fuse(h))))


UNET_RESIDUALS = 3  # down, mid, dec (adding the embedding, a function of t alone, is no residual)


def _unet_inputs(size: int, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((3, size, size), np.float32)), jnp.float32(10.0 * rng.uniform())


def _lift_unet(seed: int = 0) -> tuple[UNet, Any]:
    model = UNet(key=_key(seed))
    return model, pzb.lift(model, *_unet_inputs(8), strict=True)


def test_unet_traces_without_foreign_with_conv_axis_names():
    _, lifted = _lift_unet()
    assert _count(lifted, pzb.nn.Foreign) == 0
    assert isinstance(lifted.body, Traced) and lifted.body.template.class_name == "UNet"
    # The conv rules name an unbatched Equinox image (channels, height, width); t is a scalar side input.
    assert lifted.convention.inputs == (IMAGE, ())
    assert lifted.convention.side_names == ("t",)
    assert lifted.convention.output == IMAGE
    assert [c.name for c in pzb.select(lifted.body.body).at_instances_of(CallChild).get_sequence()
            if c.name in ("stem", "down", "pool", "up", "head")] == ["stem", "down", "pool", "up", "head"]
    # The skip connection is a concatenation over the channels axis.
    concats = pzb.select(lifted).at_instances_of(Concatenate).get_sequence()
    assert len(concats) == 2 and concats[-1].axis == "channels"  # sin / cos of the time embedding; the skip


@pytest.mark.parametrize("size", [8, 16])
def test_unet_matches_the_original_at_two_image_sizes_eager_and_jit(size: int):
    model, lifted = _lift_unet(1)
    x, t = _unet_inputs(size, seed=size)
    expected = model(x, t)
    assert_outputs_match(lifted.positional(x, t), expected, same_computation=False)
    assert_outputs_match(_jit_positional(lifted, x, t), expected, same_computation=False)


def test_unet_batch_is_one_more_named_axis():
    model, lifted = _lift_unet(2)
    xs = _normal(3, (2, 3, 8, 8))
    ts = jnp.array([1.0, 7.5])
    expected = jax.vmap(model)(xs, ts)
    out = lifted(pzb.nx.wrap(xs, "batch", *IMAGE), t=pzb.nx.wrap(ts, "batch"))
    assert set(out.named_shape) == {"batch", *IMAGE}
    assert_outputs_match(out.unwrap("batch", *IMAGE), expected, same_computation=False)
    # jax.vmap of the lifted model's positional call is the same function.
    assert_outputs_match(jax.vmap(lifted.positional)(xs, ts), expected, same_computation=False)


def _resblock_by_hand(block: ResBlock, x: jax.Array) -> jax.Array:
    def conv(c: eqx.nn.Conv2d, a: jax.Array) -> jax.Array:
        out = jax.lax.conv_general_dilated(a[None], c.weight, (1, 1), ((1, 1), (1, 1)),
                                           dimension_numbers=("NCHW", "OIHW", "NCHW"))[0]
        return out + c.bias

    return x + conv(block.conv2, jax.nn.relu(conv(block.conv1, jax.nn.relu(x))))


def test_unet_residual_streams_are_captured_and_equal_a_hand_written_reference():
    model, lifted = _lift_unet(4)
    assert _count(lifted, pzb.nn.Residual) == UNET_RESIDUALS
    x, t = _unet_inputs(8, seed=5)
    _, streams = capture_intermediates(lifted, pzb.nn.Residual, pzb.nx.wrap(x, *IMAGE), t=pzb.nx.wrap(t))
    assert len(streams) == UNET_RESIDUALS
    assert all(set(s.named_shape) == set(IMAGE) for s in streams.values())

    # The forward pass written out by hand (the convolutions of the residual blocks by lax directly).
    half = model.time.dim // 2
    angles = t * jnp.exp(-jnp.log(10_000.0) * jnp.arange(half) / half)
    emb = jax.nn.silu(model.time.linear.weight @ jnp.concatenate([jnp.sin(angles), jnp.cos(angles)])
                      + model.time.linear.bias)
    h = model.stem(x) + emb[:, None, None]
    after_down = _resblock_by_hand(model.down, h)
    pooled = jax.lax.reduce_window(after_down, -jnp.inf, jax.lax.max, (1, 2, 2), (1, 2, 2), "VALID")
    after_mid = _resblock_by_hand(model.mid, jax.nn.relu(model.widen(pooled)))
    fused = jax.nn.relu(model.fuse(jnp.concatenate([model.up(after_mid), after_down], axis=0)))
    after_dec = _resblock_by_hand(model.dec, fused)
    for got, want in zip(streams.values(), (after_down, after_mid, after_dec)):
        assert_outputs_match(got.unwrap(*IMAGE), want, same_computation=False, ulps=16)


def test_unet_patching_the_stream_reproduces_the_clean_run_downstream():
    _, lifted = _lift_unet(6)
    (clean, t), (corrupt, _) = _unet_inputs(8, seed=7), _unet_inputs(8, seed=8)

    def named(a: jax.Array) -> Any:
        return pzb.nx.wrap(a, *IMAGE)

    side = {"t": pzb.nx.wrap(t)}
    expected = lifted(named(clean), **side).unwrap(*IMAGE)
    assert not np.allclose(lifted(named(corrupt), **side).unwrap(*IMAGE), expected)
    residuals = pzb.select(lifted).at_instances_of(pzb.nn.Residual)
    down, mid, dec = (residuals.pick_nth_selected(i) for i in range(3))
    # Everything downstream of the first block reads only its stream (the main path and the skip).
    for at in (down, dec):
        got = patch_activations(lifted, named(clean), named(corrupt), at=at, **side)
        assert_outputs_match(got.unwrap(*IMAGE), expected, same_computation=False)
    # Patching only the bottleneck does not: the skip connection still carries the corrupt image.
    partly = patch_activations(lifted, named(clean), named(corrupt), at=mid, **side)
    assert not np.allclose(partly.unwrap(*IMAGE), expected)
    # The same by hand: a Constant in place of the first block gives the clean output too.
    _, captured = capture_intermediates(lifted, down, named(clean), **side)
    (stream,) = captured.values()
    replaced = down.apply(lambda _: Constant(stream))
    assert_outputs_match(replaced(named(corrupt), **side).unwrap(*IMAGE), expected, same_computation=False)


def test_unet_lora_on_the_time_linear_trains_and_merges_back_to_the_original_classes():
    model, lifted = _lift_unet(9)
    linears = pzb.select(lifted).at_instances_of(pzb.nn.Linear)
    # The only Linear weight contraction is the time embedding's; the convolutions are pzb.nn.Conv /
    # ConvTranspose layers, which the toolshed's LoRA does not adapt.
    assert linears.count() == 1
    assert _count(lifted, (pzb.nn.conv.Conv, pzb.nn.conv_transpose.ConvTranspose)) == 11
    adapted = pzb.lower(loraify_linears_in_selection(linears, 2, _key(10)))
    # Only a child changed, the glue is as traced: the original classes are rebuilt around a LoRALinear.
    assert type(adapted) is UNet and type(adapted.time) is TimeEmbedding and type(adapted.time.linear) is LoRALinear
    xs = _normal(11, (4, 3, 8, 8))
    ts = jnp.array([0.5, 2.0, 4.0, 8.0])
    assert_outputs_match(jax.vmap(adapted)(xs, ts), jax.vmap(model)(xs, ts), same_computation=False)
    target = _normal(12, (4, 3, 8, 8))
    trained, losses = train_adapters(adapted, lambda m: jnp.mean((jax.vmap(m)(xs, ts) - target) ** 2))
    assert losses[-1] < losses[0]
    # Only the adapters trained: every other array is the original one, bit for bit.
    assert np.array_equal(np.asarray(trained.time.linear.linear.weight), np.asarray(model.time.linear.weight))
    base = eqx.filter(trained, jax.tree_util.tree_map(lambda f: not f, lora_trainable(trained)))
    unlora = eqx.tree_at(lambda m: m.time.linear, base, base.time.linear.linear)
    assert jax.tree_util.tree_structure(unlora) == jax.tree_util.tree_structure(model)
    assert all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree_util.tree_leaves(unlora), jax.tree_util.tree_leaves(model)))
    merged = pzb.lower(merge_lora(pzb.lift(trained, xs[0], ts[0])))
    assert type(merged) is UNet and type(merged.time.linear) is eqx.nn.Linear
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(model)
    assert_outputs_match(jax.vmap(merged)(xs, ts), jax.vmap(trained)(xs, ts), same_computation=False, ulps=64)


def test_unet_lower_of_lift_is_the_original_module():
    model, lifted = _lift_unet(13)
    lowered = pzb.lower(lifted)
    assert type(lowered) is UNet and type(lowered.time) is TimeEmbedding and type(lowered.pool) is eqx.nn.MaxPool2d
    assert _same_leaves(lowered, model)
    x, t = _unet_inputs(16, seed=14)
    assert_same_outputs(lowered, model, x, t, bitwise=True)  # the same classes: the same program


class SqueezeExcite(eqx.Module):
    """Squeeze-and-excitation: channel gates from globally pooled features (``jnp.mean`` over the image)."""

    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear

    def __init__(self, channels: int = 4, *, key: jax.Array):
        k1, k2 = jax.random.split(key)
        self.fc1 = eqx.nn.Linear(channels, 2, key=k1)
        self.fc2 = eqx.nn.Linear(2, channels, key=k2)

    def __call__(self, x: jax.Array) -> jax.Array:
        centred = x - jnp.mean(x, axis=(1, 2), keepdims=True)
        gate = jax.nn.sigmoid(self.fc2(jax.nn.relu(self.fc1(jnp.mean(x, axis=(1, 2))))))
        return centred * gate[:, None, None]


def test_means_over_the_image_follow_the_image_size():
    block = SqueezeExcite(key=_key(17))
    lifted = pzb.lift(block, jnp.ones((4, 8, 8)), input_names=(IMAGE,), strict=True)  # no conv to name them
    means = pzb.select(lifted).at_instances_of(MeanAxes).get_sequence()
    assert len(means) == 2 and all(set(m.axes) == {"height", "width"} for m in means)
    for size in (8, 16):
        x = 2.0 * _normal(size + 1, (4, size, size)) + 1.0
        assert_outputs_match(lifted.positional(x), block(x), same_computation=False)
        assert_outputs_match(_jit_positional(lifted, x), block(x), same_computation=False)

class TwoLevelConditioning(eqx.Module):
    """The time embedding computed once and added at two resolutions (UNets feed it to every block)."""

    time: TimeEmbedding
    down: ResBlock
    pool: eqx.nn.MaxPool2d
    mid: ResBlock

    def __init__(self, channels: int = 4, *, key: jax.Array):
        ks = jax.random.split(key, 3)
        self.time = TimeEmbedding(8, channels, key=ks[0])
        self.down = ResBlock(channels, key=ks[1])
        self.pool = eqx.nn.MaxPool2d(2, 2)
        self.mid = ResBlock(channels, key=ks[2])

    def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
        emb = self.time(t)[:, None, None]
        return self.mid(self.pool(self.down(x + emb)) + emb)


def _lift_two_level() -> tuple[TwoLevelConditioning, Any]:
    model = TwoLevelConditioning(key=_key(15))
    return model, pzb.lift(model, _normal(16, (4, 8, 8)), jnp.float32(3.0), strict=True)


def test_unet_embedding_used_at_two_levels_matches_the_original():
    model, lifted = _lift_two_level()
    for size in (8, 16):
        x = _normal(size, (4, size, size))
        assert_outputs_match(lifted.positional(x, jnp.float32(2.5)), model(x, jnp.float32(2.5)),
                             same_computation=False)


def test_unet_embedding_used_at_two_levels_is_computed_once():
    # emb = self.time(t) depends on the side input t only and is used twice: it is computed once, before the
    # blocks, and both uses read it as a side input (not a CallChild 'time' per use).
    _, lifted = _lift_two_level()
    calls = [c.name for c in pzb.select(lifted).at_instances_of(CallChild).get_sequence()]
    assert calls.count("time") == 1
    assert pzb.select(lifted).at_instances_of(pzb.nn.Linear).count() == 1
    body = lifted.body.body
    assert type(body) is BindSideInputs and len(body.values) == 1
    assert [c.name for c in pzb.select(body.values).at_instances_of(CallChild).get_sequence()] == ["time"]
    reads = pzb.select(body.body).at_instances_of(SideInput).get_sequence()
    assert [r.name for r in reads] == [body.names[0]] * 2


def test_unet_embedding_used_at_two_levels_runs_the_child_once_and_lowers_back():
    model, lifted = _lift_two_level()
    x, t = _normal(17, (4, 8, 8)), jnp.float32(2.5)
    # A capture saver after the time child runs once, and saves the embedding the original computes.
    time = pzb.select(lifted).at_instances_of(CallChild).where(lambda c: c.name == "time")
    named_x = pzb.nx.wrap(x, *lifted.convention.inputs[0])
    out, captured = capture_intermediates(lifted, time, named_x, t=pzb.nx.wrap(t))
    (emb,) = captured.values()
    assert_outputs_match(emb.unwrap(*emb.named_shape), model.time(t), same_computation=False)
    assert_outputs_match(out.unwrap(*lifted.convention.output), model(x, t), same_computation=False)
    # The glue is the traced one: lowering gives the original classes and arrays back.
    lowered = pzb.lower(lifted)
    assert type(lowered) is TwoLevelConditioning and _same_leaves(lowered, model)
    assert_same_outputs(lowered, model, x, t, bitwise=True)
    # LoRA adapts the one Linear, and the edited child still lowers into the original classes.
    adapted = pzb.lower(loraify_linears_in_selection(pzb.select(lifted).at_instances_of(pzb.nn.Linear), 2, _key(18)))
    assert type(adapted) is TwoLevelConditioning and type(adapted.time.linear) is LoRALinear
    assert_outputs_match(adapted(x, t), model(x, t), same_computation=False)


# ====================================================================================================
# 2. An NNX ResNet.


class BasicBlock(nnx.Module):
    """conv-bn-relu-conv-bn, plus an identity shortcut or a 1x1 strided projection (conv + bn)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=stride, padding=1, use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(cout, rngs=rngs)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), padding=1, use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(cout, rngs=rngs)
        self.projection = stride != 1 or cin != cout
        if self.projection:
            self.proj_conv = nnx.Conv(cin, cout, (1, 1), strides=stride, use_bias=False, rngs=rngs)
            self.proj_bn = nnx.BatchNorm(cout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = nnx.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        if self.projection:
            return nnx.relu(self.proj_bn(self.proj_conv(x)) + h)
        return nnx.relu(x + h)


class ResNet(nnx.Module):
    """Stem, an identity block, a downsampling block, global average pooling and a linear head."""

    def __init__(self, classes: int = 5, *, rngs: nnx.Rngs):
        self.stem = nnx.Conv(3, 4, (3, 3), padding=1, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(4, rngs=rngs)
        self.blocks = nnx.List([BasicBlock(4, 4, rngs=rngs), BasicBlock(4, 8, stride=2, rngs=rngs)])
        self.head = nnx.Linear(8, classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.stem_bn(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(axis=(1, 2)))


def _resnet(seed: int, mode: str) -> ResNet:
    """A ResNet with non-trivial running statistics, in ``mode`` (``"train"`` or ``"eval"``)."""
    model = ResNet(rngs=nnx.Rngs(_key(seed)))
    warmup = 2.0 * _normal(seed + 100, (4, 8, 8, 3)) + 0.5
    model(warmup)
    model(warmup[::-1] * 0.5)
    if mode == "eval":
        model.eval()
    return model


def _variables(module: nnx.Module, *filters: Any) -> list[nnx.Variable]:
    return jax.tree_util.tree_leaves(nnx.state(module, *filters), is_leaf=lambda v: isinstance(v, nnx.Variable))


def _snapshot(module: nnx.Module) -> tuple[Any, list[tuple[nnx.Variable, Any]]]:
    return nnx.graphdef(module), [(v, v.get_raw_value()) for v in _variables(module)]


def _assert_untouched(module: nnx.Module, snapshot: tuple[Any, list[tuple[nnx.Variable, Any]]]) -> None:
    graphdef, pairs = snapshot
    assert nnx.graphdef(module) == graphdef
    now = _variables(module)
    assert len(now) == len(pairs)
    assert all(v is old and v.get_raw_value() is raw for v, (old, raw) in zip(now, pairs))


def _assert_same_module(lowered: nnx.Module, original: nnx.Module) -> None:
    assert type(lowered) is type(original)
    assert nnx.graphdef(lowered) == nnx.graphdef(original)
    mine, theirs = _variables(lowered), _variables(original)
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs):
        assert type(a) is type(b) and a is not b
        assert np.array_equal(np.asarray(a.get_raw_value()), np.asarray(b.get_raw_value()))


def _batch_stats(module: nnx.Module) -> dict[str, jax.Array]:
    """``{label: array}`` of the BatchStats, labelled by path as the lifted StateVariables are."""
    flat = nnx.to_flat_state(nnx.state(module, nnx.BatchStat))
    return {".".join(str(k) for k in path): v.get_value() for path, v in flat}


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_resnet_traces_without_foreign_with_shortcuts_as_combinators(mode: str):
    model = _resnet(0, mode)
    lifted = pzb.lift(model, jnp.ones((2, 8, 8, 3)), strict=True)
    assert _count(lifted, pzb.nn.Foreign) == 0
    assert lifted.convention.inputs == (NNX_IMAGE,)
    assert lifted.convention.output == ("batch", "features")
    # `x + h` is a Residual; `proj(x) + h` adds two functions of x: a BranchAndAddTogether.
    assert _count(lifted, pzb.nn.Residual) == 1
    assert _count(lifted, pzb.nn.BranchAndAddTogether) == 1
    norms = pzb.select(lifted).at_instances_of(pzb.bridge.nnx.norm.NnxBatchNorm).get_sequence()
    assert len(norms) == 6 and all(n.use_running_average == (mode == "eval") for n in norms)
    # The global average pool is a mean over the spatial axes, counted at each call's image size.
    (pool,) = pzb.select(lifted).at_instances_of(MeanAxes).get_sequence()
    assert set(pool.axes) == {"height", "width"}


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (3, 16, 16, 3)])
def test_resnet_eval_matches_at_two_sizes_eager_and_jit(shape: tuple[int, ...]):
    model = _resnet(1, "eval")
    before = _snapshot(model)
    lifted = pzb.lift(model, jnp.ones((2, 8, 8, 3)), strict=True)
    x = _normal(shape[1], shape)
    expected = model(x)
    assert_outputs_match(lifted.positional(x), expected, same_computation=False)
    assert_outputs_match(_jit_positional(lifted, x), expected, same_computation=False)
    _assert_untouched(model, before)


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (3, 16, 16, 3)])
def test_resnet_train_outputs_and_batch_statistics_equal_the_original_call(shape: tuple[int, ...]):
    model = _resnet(2, "train")
    before = _snapshot(model)
    lifted = pzb.lift(model, jnp.ones((2, 8, 8, 3)), strict=True)
    x = 1.5 * _normal(shape[1], shape) + 0.25

    # Under jit: a stateless call returns the new statistics.
    reference = nnx.clone(model)
    expected = nnx.jit(lambda m, a: m(a))(reference, x)  # updates reference's BatchStats in place
    slots, values = pzb.unbind_variables(lifted, freeze=True)
    out, state = jax.jit(lambda v, a: pzb.stateless_call(slots, v, a))(values, pzb.nx.wrap(x, *NNX_IMAGE))
    assert_outputs_match(out.unwrap("batch", "features"), expected, same_computation=False)
    new = {v.label: v.value for v in state}
    want = _batch_stats(reference)
    assert set(new) == set(want) and len(want) == 12
    for label, value in want.items():
        assert_outputs_match(new[label].unwrap("features"), value, same_computation=False, ulps=16)

    # Eagerly, twice: the lifted StateVariables move as the module's BatchStats do.
    eager = nnx.clone(model)
    for _ in range(2):
        assert_outputs_match(lifted.positional(x), eager(x), same_computation=False, ulps=16)
    lifted_state = {v.label: v.value for v in pzb.select(lifted).at_instances_of(pzb.StateVariable).get_sequence()}
    for label, value in _batch_stats(eager).items():
        assert_outputs_match(lifted_state[label].unwrap("features"), value, same_computation=False, ulps=16)
    lowered = pzb.lower(lifted)  # carries the updated statistics back
    for label, value in _batch_stats(lowered).items():
        assert_outputs_match(value, _batch_stats(eager)[label], same_computation=False, ulps=16)
    _assert_untouched(model, before)  # the user's module never moved


def _resnet_streams_by_hand(model: ResNet, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The two shortcut sums (before their relu), in eval mode, from the running statistics."""

    def bn(norm: nnx.BatchNorm, a: jax.Array) -> jax.Array:
        inv = jax.lax.rsqrt(norm.var[...] + norm.epsilon)
        return (a - norm.mean[...]) * inv * norm.scale[...] + norm.bias[...]

    h = jax.nn.relu(bn(model.stem_bn, model.stem(x)))
    b0, b1 = model.blocks
    first = h + bn(b0.bn2, b0.conv2(jax.nn.relu(bn(b0.bn1, b0.conv1(h)))))
    h = jax.nn.relu(first)
    second = bn(b1.proj_bn, b1.proj_conv(h)) + bn(b1.bn2, b1.conv2(jax.nn.relu(bn(b1.bn1, b1.conv1(h)))))
    return first, second


def test_resnet_residual_streams_equal_a_hand_written_reference():
    model = _resnet(3, "eval")
    lifted = pzb.lift(model, jnp.ones((2, 8, 8, 3)))
    x = _normal(4, (2, 8, 8, 3))
    shortcuts = (pzb.nn.Residual, pzb.nn.BranchAndAddTogether)
    _, streams = capture_intermediates(lifted, shortcuts, pzb.nx.wrap(x, *NNX_IMAGE))
    assert len(streams) == 2
    for got, want in zip(streams.values(), _resnet_streams_by_hand(model, x)):
        # nnx.BatchNorm's calling convention names the normalised last axis `features`, so after each
        # BatchNorm the channel axis of the stream is `features` (the convolutions rename it back).
        assert set(got.named_shape) == {"batch", "height", "width", "features"}
        assert_outputs_match(got.unwrap("batch", "height", "width", "features"), want, same_computation=False, ulps=16)


def test_resnet_patching_the_first_block_reproduces_the_clean_run():
    model = _resnet(5, "eval")
    lifted = pzb.lift(model, jnp.ones((2, 8, 8, 3)))
    clean = pzb.nx.wrap(_normal(6, (2, 8, 8, 3)), *NNX_IMAGE)
    corrupt = pzb.nx.wrap(_normal(7, (2, 8, 8, 3)), *NNX_IMAGE)
    expected = lifted(clean).unwrap("batch", "features")
    assert not np.allclose(lifted(corrupt).unwrap("batch", "features"), expected)
    got = patch_activations(lifted, clean, corrupt, at=pzb.nn.Residual)
    assert_outputs_match(got.unwrap("batch", "features"), expected, same_computation=False)


def test_resnet_lora_on_the_head_trains_with_wrt_lora_param_and_merges_back():
    model = _resnet(8, "train")
    x = _normal(9, (4, 8, 8, 3))
    lifted = pzb.lift(model, x)
    linears = pzb.select(lifted).at_instances_of(pzb.nn.Linear)
    assert linears.count() == 1  # the head; convolutions are not adapted by the toolshed's LoRA
    adapted = pzb.lower(loraify_linears_in_selection(linears, 2, _key(10)))
    assert type(adapted) is ResNet and type(adapted.head) is nnx.LoRALinear
    assert type(adapted.blocks[1]) is BasicBlock and type(adapted.blocks[1].conv1) is nnx.Conv
    assert_outputs_match(nnx.clone(adapted)(x), nnx.clone(model)(x), same_computation=False)

    labels = jax.nn.one_hot(jnp.arange(4) % 5, 5)
    base_before = [np.asarray(v.get_raw_value()) for v in _variables(adapted, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))]
    optimizer = nnx.Optimizer(adapted, optax.adam(3e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(m: ResNet, optimizer: nnx.Optimizer) -> jax.Array:
        loss, grads = nnx.value_and_grad(lambda m: optax.softmax_cross_entropy(m(x), labels).mean(),
                                         argnums=nnx.DiffState(0, nnx.LoRAParam))(m)
        optimizer.update(m, grads)
        return loss

    losses = [float(step(adapted, optimizer)) for _ in range(20)]
    assert losses[-1] < losses[0]
    base_after = [np.asarray(v.get_raw_value()) for v in _variables(adapted, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))]
    assert len(base_after) == len(base_before) and all(np.array_equal(a, b) for a, b in zip(base_before, base_after))
    assert np.array_equal(np.asarray(adapted.head.kernel[...]), np.asarray(model.head.kernel[...]))

    merged = pzb.lower(merge_lora(pzb.lift(adapted, x)))
    assert type(merged) is ResNet and type(merged.head) is nnx.Linear
    assert nnx.graphdef(merged) == nnx.graphdef(model)
    assert_outputs_match(nnx.clone(merged)(x), nnx.clone(adapted)(x), same_computation=False, ulps=64)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_resnet_lower_of_lift_is_the_original_module_and_never_touches_it(mode: str):
    model = _resnet(11, mode)
    before = _snapshot(model)
    x = _normal(12, (2, 8, 8, 3))
    lifted = pzb.lift(model, x)
    lowered = pzb.lower(lifted)
    _assert_untouched(model, before)
    _assert_same_module(lowered, model)
    raw = {id(r) for _, r in before[1]}
    assert all(id(v.get_raw_value()) in raw for v in _variables(lowered))  # no array was copied
    # The same classes: the same program (fresh clones, since a training-mode call writes the statistics).
    assert_same_outputs(lambda a: nnx.clone(lowered)(a), lambda a: nnx.clone(model)(a), x, bitwise=True)


# ====================================================================================================
# 3. A residual MLP under jax.checkpoint.


class CheckpointedMLP(eqx.Module):
    """Pre-norm MLP block whose body is rematerialised in the backward pass (``jax.checkpoint``)."""

    norm: eqx.nn.LayerNorm
    up: eqx.nn.Linear
    down: eqx.nn.Linear

    def __init__(self, dim: int, hidden: int, *, key: jax.Array):
        k1, k2 = jax.random.split(key)
        self.norm = eqx.nn.LayerNorm(dim)
        self.up = eqx.nn.Linear(dim, hidden, key=k1)
        self.down = eqx.nn.Linear(hidden, dim, key=k2)

    def __call__(self, x: jax.Array) -> jax.Array:
        def mlp(x: jax.Array) -> jax.Array:
            return jax.vmap(self.down)(jax.nn.gelu(jax.vmap(self.up)(jax.vmap(self.norm)(x))))

        return x + jax.checkpoint(mlp, policy=jax.checkpoint_policies.nothing_saveable)(x)


class FilterCheckpointedMLP(eqx.Module):
    """An MLP on raw weights inside ``eqx.filter_checkpoint`` (the module itself passed through it)."""

    w_in: jax.Array
    w_out: jax.Array

    def __init__(self, dim: int, hidden: int, *, key: jax.Array):
        k1, k2 = jax.random.split(key)
        self.w_in = jax.random.normal(k1, (dim, hidden)) / jnp.sqrt(dim)
        self.w_out = jax.random.normal(k2, (hidden, dim)) / jnp.sqrt(hidden)

    def __call__(self, x: jax.Array) -> jax.Array:
        @eqx.filter_checkpoint
        def mlp(block: FilterCheckpointedMLP, x: jax.Array) -> jax.Array:
            return jax.nn.relu(x @ block.w_in) @ block.w_out

        return x + mlp(self, x)


class CheckpointedModel(eqx.Module):
    blocks: list

    def __init__(self, dim: int = 8, hidden: int = 16, *, key: jax.Array):
        ks = jax.random.split(key, 3)
        self.blocks = [CheckpointedMLP(dim, hidden, key=ks[0]), FilterCheckpointedMLP(dim, hidden, key=ks[1]),
                       CheckpointedMLP(dim, hidden, key=ks[2])]

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return x


SEQ = ("seq", "features")


def _lift_checkpointed(seed: int) -> tuple[CheckpointedModel, Any]:
    model = CheckpointedModel(key=_key(seed))
    return model, pzb.lift(model, jnp.ones((5, 8)), strict=True)


def test_checkpointed_model_traces_without_foreign_and_matches_eager_jit_and_gradients():
    model, lifted = _lift_checkpointed(0)
    assert _count(lifted, pzb.nn.Foreign) == 0
    assert _count(lifted, pzb.nn.Residual) == 3
    assert lifted.convention.inputs == (SEQ,) and lifted.convention.output == SEQ
    for length in (5, 9):
        x = _normal(length, (length, 8))
        expected = eqx.filter_jit(model)(x)  # the reference compiled once (eager remat compiles op by op)
        assert_outputs_match(lifted.positional(x), expected, same_computation=False)
        assert_outputs_match(_jit_positional(lifted, x), expected, same_computation=False)
    # Gradients (the original rematerialises, the lifted graph does not): the same values.
    x = _normal(1, (5, 8))
    frozen = pzb.freeze_variables(lifted)
    got = jax.jit(jax.grad(lambda a: jnp.sum(jnp.sin(frozen.positional(a)))))(x)
    want = jax.jit(jax.grad(lambda a: jnp.sum(jnp.sin(model(a)))))(x)
    assert_outputs_match(got, want, same_computation=False, ulps=16)


def test_checkpointed_residual_streams_and_patching():
    model, lifted = _lift_checkpointed(2)
    x = _normal(3, (5, 8))
    _, streams = capture_intermediates(lifted, pzb.nn.Residual, pzb.nx.wrap(x, *SEQ))
    b0, b1, b2 = model.blocks

    def mlp_by_hand(block: CheckpointedMLP, a: jax.Array) -> jax.Array:
        mean = a.mean(-1, keepdims=True)
        normed = (a - mean) * jax.lax.rsqrt(((a - mean) ** 2).mean(-1, keepdims=True) + block.norm.eps)
        normed = normed * block.norm.weight + block.norm.bias
        return a + jax.nn.gelu(normed @ block.up.weight.T + block.up.bias) @ block.down.weight.T + block.down.bias

    first = mlp_by_hand(b0, x)
    second = first + jax.nn.relu(first @ b1.w_in) @ b1.w_out
    third = mlp_by_hand(b2, second)
    assert len(streams) == 3
    for got, want in zip(streams.values(), (first, second, third)):
        assert_outputs_match(got.unwrap(*SEQ), want, same_computation=False, ulps=16)

    clean = pzb.nx.wrap(x, *SEQ)
    corrupt = pzb.nx.wrap(_normal(4, (5, 8)), *SEQ)
    expected = lifted(clean).unwrap(*SEQ)
    assert not np.allclose(lifted(corrupt).unwrap(*SEQ), expected)
    at = pzb.select(lifted).at_instances_of(pzb.nn.Residual).pick_nth_selected(1)
    got = patch_activations(lifted, clean, corrupt, at=at)
    assert_outputs_match(got.unwrap(*SEQ), expected, same_computation=False)


def test_checkpointed_lora_on_every_weight_contraction_trains_and_merges_back():
    model, lifted = _lift_checkpointed(5)
    linears = pzb.select(lifted).at_instances_of(pzb.nn.Linear)
    assert linears.count() == 6  # up, down of both CheckpointedMLPs; w_in, w_out of the raw block
    adapted = pzb.lower(loraify_linears_in_selection(linears, 2, _key(6)))
    # Edited children: the original class (and its jax.checkpoint) is rebuilt around LoRALinears; an edited
    # raw-weight contraction is glue, so that block runs its edited graph in an adapter.
    assert type(adapted) is CheckpointedModel and type(adapted.blocks[0]) is CheckpointedMLP
    assert type(adapted.blocks[0].up) is LoRALinear and isinstance(adapted.blocks[1], EquinoxAdapter)
    x = _normal(7, (5, 8))
    assert_outputs_match(adapted(x), model(x), same_computation=False)
    backward = str(jax.make_jaxpr(jax.grad(lambda a: adapted(a).sum()))(x))
    assert "remat" in backward or "checkpoint" in backward

    target = _normal(8, (5, 8))
    trained, losses = train_adapters(adapted, lambda m: jnp.mean((m(x) - target) ** 2))
    assert losses[-1] < losses[0]
    # Only the adapters trained: the base weights are the original arrays, bit for bit.
    for i in (0, 2):
        for name in ("up", "down"):
            got, want = getattr(trained.blocks[i], name).linear, getattr(model.blocks[i], name)
            assert np.array_equal(np.asarray(got.weight), np.asarray(want.weight))
            assert np.array_equal(np.asarray(got.bias), np.asarray(want.bias))
    base = {v.label: v.value for v in trained.blocks[1].values}
    for name in ("w_in", "w_out"):
        value = base[f"blocks.1.{name}"]
        assert np.array_equal(np.asarray(value.unwrap(*value.named_shape)), np.asarray(getattr(model.blocks[1], name)))

    merged = pzb.lower(merge_lora(pzb.lift(trained, x)))
    assert type(merged) is CheckpointedModel
    assert [type(b) for b in merged.blocks] == [CheckpointedMLP, FilterCheckpointedMLP, CheckpointedMLP]
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(model)
    assert_outputs_match(merged(x), trained(x), same_computation=False, ulps=64)


def test_checkpointed_lower_of_lift_is_the_original_module():
    model, lifted = _lift_checkpointed(9)
    lowered = pzb.lower(lifted)
    assert [type(b) for b in lowered.blocks] == [CheckpointedMLP, FilterCheckpointedMLP, CheckpointedMLP]
    assert _same_leaves(lowered, model)
    assert_same_outputs(lowered, model, _normal(10, (7, 8)), bitwise=True)
