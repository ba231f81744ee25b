"""What the native Equinox modules built by lowering need: their arrays' shapes (see :mod:`~pzbridge.bridge.lower_checks`).

Sizes come from the configuration the layer was lifted with: its
``EqxOrigin`` static fields where it has one (rules that re-derive sizes from
the arrays, such as ``eqx.nn.Conv``, would otherwise agree with any array),
else the lowered module's own fields (``EqxLinear`` keeps Equinox's sizes
itself; a layer made in pzbridge has no lifted sizes, so only its arrays'
agreement with each other is checked). Flags such as ``groups`` are the
lowered module's: an edit of them is honoured. Every array of these modules
is trained by ``eqx.filter_grad``.

Example:
    >>> import jax, jax.numpy as jnp, equinox as eqx
    >>> import pzbridge as pzb
    >>> from pzbridge.core.errors import LowerError
    >>> lifted = pzb.lift(eqx.nn.Linear(4, 8, key=jax.random.key(0)))
    >>> lifted.body.sublayers[1].bias.value = pzb.nx.wrap(jnp.zeros(5), "features")
    >>> try:
    ...     pzb.lower(lifted)
    ... except LowerError as e:
    ...     print(str(e).split(". Fix")[0])
    bias: eqx.nn.Linear(in_features=4, out_features=8) needs an array of shape (8,) here; expected shape (8,), found (5,) (parameter 'bias')
"""

from __future__ import annotations

from typing import Any

import equinox as eqx

from pzbridge.bridge.equinox.lora import LoRALinear
from pzbridge.bridge.equinox.traversal import EqxOrigin
from pzbridge.bridge.lower_checks import Need, native_spec, nested

_FRAMEWORK = "equinox"


def lifted_config(module: Any, layer: Any, name: str) -> Any:
    """The static field ``name`` the layer was lifted with (its origin's), else the lowered module's.

    Example:
        >>> import jax
        >>> lin = eqx.nn.Linear(2, 3, key=jax.random.key(0))
        >>> lifted_config(lin, None, "out_features")
        3
    """
    origin = getattr(layer, "origin", None)
    if isinstance(origin, EqxOrigin) and origin.cls is type(module):
        return origin.get(name, getattr(module, name))
    return getattr(module, name)


def _size(features: Any) -> int:
    # Equinox stores a "scalar" side with size 1.
    return 1 if features == "scalar" else int(features)


def linear_needs(module: eqx.nn.Linear, layer: Any = None) -> list[Need]:
    """``weight (out, in)`` and ``bias (out,)`` of an ``eqx.nn.Linear``.

    Example:
        >>> import jax
        >>> [n.shape for n in linear_needs(eqx.nn.Linear(2, 3, key=jax.random.key(0)))]
        [(3, 2), (3,)]
    """
    n_in, n_out = lifted_config(module, layer, "in_features"), lifted_config(module, layer, "out_features")
    what = f"eqx.nn.Linear(in_features={n_in!r}, out_features={n_out!r})"
    return [Need("weight", (_size(n_out), _size(n_in)), what), Need("bias", (_size(n_out),), what)]


native_spec(_FRAMEWORK, eqx.nn.Linear)(linear_needs)


@native_spec(_FRAMEWORK, eqx.nn.MLP)
def _mlp(module: eqx.nn.MLP, layer: Any) -> list[Need]:
    # The scanned hidden layers are built by the MLP rule itself, stacked: (depth - 1, width, width).
    if not module.scan or module.depth < 2:
        return []
    depth, width = module.depth, module.width_size
    what = f"eqx.nn.MLP(width_size={width}, depth={depth}, scan=True)"
    return [Need("layers.1.weight", (depth - 1, width, width), what), Need("layers.1.bias", (depth - 1, width), what)]


@native_spec(_FRAMEWORK, eqx.nn.Conv, eqx.nn.Conv1d, eqx.nn.Conv2d, eqx.nn.Conv3d, eqx.nn.ConvTranspose,
             eqx.nn.ConvTranspose1d, eqx.nn.ConvTranspose2d, eqx.nn.ConvTranspose3d)
def _conv(module: Any, layer: Any) -> list[Need]:
    n_in, n_out = lifted_config(module, layer, "in_channels"), lifted_config(module, layer, "out_channels")
    kernel = tuple(lifted_config(module, layer, "kernel_size"))
    what = (f"eqx.nn.{type(module).__name__}(in_channels={n_in}, out_channels={n_out}, kernel_size={kernel}, "
            f"groups={module.groups})")
    return [Need("weight", (n_out, n_in // module.groups, *kernel), what),
            Need("bias", (n_out, *(1,) * module.num_spatial_dims), what)]


@native_spec(_FRAMEWORK, eqx.nn.Embedding)
def _embedding(module: eqx.nn.Embedding, layer: Any) -> list[Need]:
    num, size = lifted_config(module, layer, "num_embeddings"), lifted_config(module, layer, "embedding_size")
    return [Need("weight", (num, size), f"eqx.nn.Embedding(num_embeddings={num}, embedding_size={size})")]


@native_spec(_FRAMEWORK, eqx.nn.LayerNorm, eqx.nn.RMSNorm)
def _norm(module: Any, layer: Any) -> list[Need]:
    shape = lifted_config(module, layer, "shape")
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    what = f"eqx.nn.{type(module).__name__}(shape={shape})"
    return [Need("weight", shape, what), Need("bias", shape, what)]


@native_spec(_FRAMEWORK, eqx.nn.GroupNorm)
def _group_norm(module: eqx.nn.GroupNorm, layer: Any) -> list[Need]:
    channels = lifted_config(module, layer, "channels")
    if channels is None:
        return []
    what = f"eqx.nn.GroupNorm(groups={module.groups}, channels={channels})"
    return [Need("weight", (channels,), what), Need("bias", (channels,), what)]


@native_spec(_FRAMEWORK, eqx.nn.BatchNorm)
def _batch_norm(module: eqx.nn.BatchNorm, layer: Any) -> list[Need]:
    size = lifted_config(module, layer, "input_size")
    what = f"eqx.nn.BatchNorm(input_size={size})"
    return [Need("weight", (size,), what), Need("bias", (size,), what)]


@native_spec(_FRAMEWORK, eqx.nn.MultiheadAttention)
def _attention(module: eqx.nn.MultiheadAttention, layer: Any) -> list[Need]:
    # Each projection is an eqx.nn.Linear checked on its own; here: do they fit the attention's sizes?
    qk, vo = module.num_heads * module.qk_size, module.num_heads * module.vo_size
    what = (f"eqx.nn.MultiheadAttention(num_heads={module.num_heads}, query_size={module.query_size}, "
            f"key_size={module.key_size}, value_size={module.value_size}, output_size={module.output_size}, "
            f"qk_size={module.qk_size}, vo_size={module.vo_size})")
    shapes = {"query_proj": (qk, module.query_size), "key_proj": (qk, module.key_size),
              "value_proj": (vo, module.value_size), "output_proj": (module.output_size, vo)}
    needs = []
    for name, (n_out, n_in) in shapes.items():
        needs += [Need(f"{name}.weight", (n_out, n_in), what), Need(f"{name}.bias", (n_out,), what)]
    return needs


@native_spec(_FRAMEWORK, eqx.nn.GRUCell, eqx.nn.LSTMCell)
def _cell(module: Any, layer: Any) -> list[Need]:
    n_in, hidden = lifted_config(module, layer, "input_size"), lifted_config(module, layer, "hidden_size")
    gates = 3 if isinstance(module, eqx.nn.GRUCell) else 4
    what = f"eqx.nn.{type(module).__name__}(input_size={n_in}, hidden_size={hidden})"
    needs = [Need("weight_ih", (gates * hidden, n_in), what), Need("weight_hh", (gates * hidden, hidden), what),
             Need("bias", (gates * hidden,), what)]
    return needs + ([Need("bias_n", (hidden,), what)] if gates == 3 else [])


@native_spec(_FRAMEWORK, LoRALinear)
def _lora_linear(module: LoRALinear, layer: Any) -> list[Need]:
    # The base eqx.nn.Linear is built by the LoRA rule directly, so it is checked here.
    base = module.linear
    n_in, n_out = _size(base.in_features), _size(base.out_features)
    what = f"LoRALinear(in_features={n_in}, out_features={n_out}, rank={module.rank})"
    return [*nested("linear", linear_needs(base)), Need("lora_a", (n_in, module.rank), what),
            Need("lora_b", (module.rank, n_out), what)]
