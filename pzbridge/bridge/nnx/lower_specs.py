"""What the native NNX modules built by lowering need: their Variables' shapes (see :mod:`~pzbridge.bridge.lower_checks`).

NNX modules keep their configuration as attributes (``in_features``,
``kernel_shape``, ``num_features`` ...) and lowering rebuilds them with the
configuration they were lifted with, so the shapes come from the lowered
module itself. ``nnx.Param`` Variables are trained (they need a floating
dtype unless the module's ``param_dtype`` says otherwise); batch statistics
are only shape-checked.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import pzbridge as pzb
    >>> from pzbridge.core.errors import LowerError
    >>> lifted = pzb.lift(nnx.Linear(4, 8, rngs=nnx.Rngs(0)))
    >>> kernel = lifted.body.sublayers[0].weights
    >>> kernel.value = kernel.value.astype(jnp.int8)  # An int kernel lowers as nnx.Sequential([Linear, bias]).
    >>> try:
    ...     pzb.lower(lifted)
    ... except LowerError as e:
    ...     print(str(e).split(". Fix")[0])
    layers[0].kernel: nnx.Linear(in_features=4, out_features=8) trains this array, so it needs a floating dtype; expected float32, found int8 (parameter 'kernel')
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from pzbridge.bridge.lower_checks import Need, checks_for, native_spec, nested
from pzbridge.bridge.nnx.lora_general import LoRAEinsum, LoRALinearGeneral

_FRAMEWORK = "nnx"


def _raw(value: Any) -> Any:
    return value.get_raw_value() if isinstance(value, nnx.Variable) else value


_CHECKS = checks_for(_FRAMEWORK)
_CHECKS.raw = _raw
_CHECKS.param_dtype = lambda module: getattr(module, "param_dtype", None)


def linear_needs(module: nnx.Linear, layer: Any = None) -> list[Need]:
    """``kernel (in, out)`` and ``bias (out,)`` of an ``nnx.Linear`` (or ``nnx.LoRALinear``).

    Example:
        >>> [n.shape for n in linear_needs(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))]
        [(2, 3), (3,)]
    """
    what = f"nnx.{type(module).__name__}(in_features={module.in_features}, out_features={module.out_features})"
    return [Need("kernel", (module.in_features, module.out_features), what),
            Need("bias", (module.out_features,), what)]


def lora_needs(module: nnx.LoRA, layer: Any = None) -> list[Need]:
    """``lora_a (in, rank)`` and ``lora_b (rank, out)`` of an ``nnx.LoRA`` (the rank is ``lora_a``'s).

    Example:
        >>> [n.shape for n in lora_needs(nnx.LoRA(2, 1, 3, rngs=nnx.Rngs(0)))]
        [(2, 1), (1, 3)]
    """
    a = getattr(_raw(module.lora_a), "shape", ())
    rank = a[-1] if a else 0
    what = f"nnx.LoRA(in_features={module.in_features}, lora_rank={rank}, out_features={module.out_features})"
    return [Need("lora_a", (module.in_features, rank), what), Need("lora_b", (rank, module.out_features), what)]


native_spec(_FRAMEWORK, nnx.Linear)(linear_needs)
native_spec(_FRAMEWORK, nnx.LoRA)(lora_needs)


@native_spec(_FRAMEWORK, nnx.LoRALinear)
def _lora_linear(module: nnx.LoRALinear, layer: Any) -> list[Need]:
    return [*linear_needs(module), *nested("lora", lora_needs(module.lora))]


def linear_general_needs(module: nnx.LinearGeneral, layer: Any = None) -> list[Need]:
    """``kernel (*batch, *in, *out)`` and ``bias (*batch, *out)`` of an ``nnx.LinearGeneral``.

    Example:
        >>> [n.shape for n in linear_general_needs(nnx.LinearGeneral(2, (3, 4), rngs=nnx.Rngs(0)))]
        [(2, 3, 4), (3, 4)]
    """
    batch = tuple(module.batch_axis.values())
    what = f"nnx.LinearGeneral(in_features={module.in_features}, out_features={module.out_features})"
    return [Need("kernel", (*batch, *module.in_features, *module.out_features), what),
            Need("bias", (*batch, *module.out_features), what)]


def einsum_needs(module: nnx.Einsum, layer: Any = None) -> list[Need]:
    """``kernel`` and ``bias`` of an ``nnx.Einsum``: its ``kernel_shape`` and ``bias_shape``.

    Example:
        >>> [n.shape for n in einsum_needs(nnx.Einsum("ab,bc->ac", (2, 3), (3,), rngs=nnx.Rngs(0)))]
        [(2, 3), (3,)]
    """
    what = f"nnx.Einsum({module.einsum_str!r}, kernel_shape={module.kernel_shape}, bias_shape={module.bias_shape})"
    needs = [Need("kernel", tuple(module.kernel_shape), what)]
    return needs + ([Need("bias", tuple(module.bias_shape), what)] if module.bias_shape is not None else [])


native_spec(_FRAMEWORK, nnx.LinearGeneral)(linear_general_needs)
native_spec(_FRAMEWORK, nnx.Einsum)(einsum_needs)


@native_spec(_FRAMEWORK, LoRALinearGeneral, LoRAEinsum)
def _lora_general(module: Any, layer: Any) -> list[Need]:
    # The base is built by the LoRA rule directly, so it is checked here.
    base = module.base
    return nested("base", (linear_general_needs if isinstance(base, nnx.LinearGeneral) else einsum_needs)(base))


@native_spec(_FRAMEWORK, nnx.Conv, nnx.ConvTranspose)
def _conv(module: Any, layer: Any) -> list[Need]:
    what = (f"nnx.{type(module).__name__}(in_features={module.in_features}, out_features={module.out_features}, "
            f"kernel_size={tuple(module.kernel_size)})")
    return [Need("kernel", tuple(module.kernel_shape), what), Need("bias", (module.out_features,), what)]


@native_spec(_FRAMEWORK, nnx.Embed)
def _embed(module: nnx.Embed, layer: Any) -> list[Need]:
    what = f"nnx.Embed(num_embeddings={module.num_embeddings}, features={module.features})"
    return [Need("embedding", (module.num_embeddings, module.features), what)]


@native_spec(_FRAMEWORK, nnx.LayerNorm, nnx.RMSNorm, nnx.InstanceNorm, nnx.BatchNorm, nnx.GroupNorm)
def _norm(module: Any, layer: Any) -> list[Need]:
    size = getattr(module, "num_features", None)
    if size is None:  # GroupNorm keeps its groups, not the feature count.
        size = module.num_groups * module.group_size
    what = f"nnx.{type(module).__name__}(num_features={size})"
    needs = [Need("scale", (size,), what), Need("bias", (size,), what)]
    return needs + [Need(name, (size,), what, trained=False) for name in ("mean", "var") if hasattr(module, name)]


_CELLS = (nnx.SimpleCell, nnx.GRUCell, nnx.OptimizedLSTMCell, nnx.LSTMCell)


@native_spec(_FRAMEWORK, *_CELLS)
def _cell(module: Any, layer: Any) -> list[Need]:
    # The cell rule builds its sub-Linears (dense_i, ii, hf ...) itself, so they are checked here.
    cell = (f"nnx.{type(module).__name__}(in_features={module.in_features}, "
            f"hidden_features={module.hidden_features})")
    needs = []
    for name, sub in vars(module).items():
        if type(sub) is nnx.Linear:
            needs += [Need(need.field, need.shape, f"{cell}.{name}: {need.what}")
                      for need in nested(name, linear_needs(sub))]
    return needs
