"""LoRA <-> Flax NNX: ``LowRankAdapter`` on a lifted ``nnx.Linear`` is ``nnx.LoRALinear``.

Lowering an ``NnxLinear([LowRankAdapter(Linear), AddBias])`` builds an
``nnx.LoRALinear`` whose ``kernel`` / ``bias`` are the original Variables'
arrays and whose ``lora.lora_a`` / ``lora.lora_b`` are ``nnx.LoRAParam`` s, so
``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` trains only the adapters.
The ``LoRALinear``'s static attributes are the original ``nnx.Linear``'s plus
``lora``, so after re-lifting, merging and lowering, the result has the
original ``nnx.Linear`` graphdef.

A base ``nnx.Linear`` with non-default numerics (``dtype``, ``param_dtype``,
``precision``, ``preferred_element_type``) keeps them: they are the
``LoRALinear``'s statics. The adapter path computes as ``nnx.LoRA`` does by
default (``lora_dtype=None``, no ``precision``): in the promoted dtype of the
input and ``A`` / ``B``, which have the kernel's dtype; the ``nnx.LoRA``
records that dtype as its ``param_dtype``. As with a hand-built
``nnx.LoRALinear(dtype=jnp.bfloat16)``, a bfloat16 layer with float32
adapters therefore returns float32 (``linear(x) + bias`` rounded to bfloat16,
plus the float32 update); the lifted ``NnxLinear`` computes in the same order.

``nnx.LoRA`` has no ``alpha``: it computes ``x @ A @ B``. An adapter with
``alpha != rank`` therefore lowers with ``B`` pre-multiplied by
``alpha / rank`` (same function), and re-lifts with ``alpha = rank``.

``LowRankAdapter`` s on lifted ``nnx.LinearGeneral`` / ``nnx.Einsum`` lower to the
wrappers of :mod:`pzbridge.bridge.nnx.lora_general`.

Re-lifting recognises ``nnx.LoRALinear`` (the ``NnxLinear`` form above, labels
``<path>.kernel``, ``<path>.lora_a``, ``<path>.lora_b``). A standalone
``nnx.LoRA`` module has no rule yet and stays ``Foreign`` (its ``LoRAParam`` s
are still lifted, and lower back as ``LoRAParam`` s).

The rule for ``NnxLinear`` belongs to :mod:`pzbridge.bridge.nnx.linear`; this module
wraps it (an adapter inside goes here, anything else to the original rule).

Example:
    >>> import jax
    >>> from flax import nnx
    >>> import pzbridge as pzb
    >>> from pzbridge.toolshed.lora import loraify_linears_in_selection
    >>> lifted = pzb.lift(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    >>> edited = loraify_linears_in_selection(pzb.select(lifted).at_instances_of(pzb.nn.Linear), 2, jax.random.key(1))
    >>> lowered = pzb.lower(edited)
    >>> type(lowered).__name__, type(lowered.lora.lora_a).__name__, lowered.lora.lora_b.shape
    ('LoRALinear', 'LoRAParam', (2, 2))
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax.numpy as jnp
from flax import nnx

from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.nnx.linear import NnxLinear
from pzbridge.bridge.nnx.statics import NnxStatics, build_module, fresh_statics
from pzbridge.bridge.nnx.traversal import NNX, lift_foreign
from pzbridge.bridge.nnx.variables import NNX_TYPE, lift_variable
from pzbridge.core.errors import LowerError
from pzbridge.nn.combinators import Sequential
from pzbridge.nn.linear import Affine, Linear, weight_output_name
from pzbridge.toolshed.lora import RANK_AXIS, LowRankAdapter, split_adapter

_LORA_ATTR = "lora"


_NODES_ATTR = "_pytree__nodes"  # NNX's per-module record of which attributes are graph nodes.


@functools.lru_cache(maxsize=None)
def _lora_statics(in_features: int, rank: int, out_features: int, param_dtype: Any = None) -> NnxStatics:
    # param_dtype None: nnx.LoRA's default (float32). Another one is recorded as nnx.LoRA(param_dtype=...) would.
    extra = {} if param_dtype is None else {"param_dtype": param_dtype}
    return fresh_statics(lambda: nnx.LoRA(in_features, rank, out_features, rngs=nnx.Rngs(0), **extra))


def _lora_param(param: Any, ctx: LowerContext, names: tuple[str, ...], scale: float) -> Any:
    """One ``LoRAParam`` per pzbridge parameter (so a shared adapter stays shared)."""

    def make() -> Any:
        array = ctx.array(param, names)
        if scale != 1.0:
            array = array * scale
        metadata = dict(getattr(param, "metadata", {}) or {})
        var_type = metadata.pop(NNX_TYPE, None)
        if not (isinstance(var_type, type) and issubclass(var_type, nnx.LoRAParam)):
            var_type, metadata = nnx.LoRAParam, {}
        return var_type.from_metadata(array, metadata) if "hijax" in metadata else var_type(array, **metadata)

    return ctx.cached(param, make)


def _lower_lora_module(adapter: LowRankAdapter, ctx: LowerContext) -> Any:
    base = adapter.base
    if not isinstance(base, Linear) or len(base.in_axis_names) != 1 or len(base.out_axis_names) != 1:
        raise LowerError(
            f"{ctx.where}: nnx.LoRALinear needs a LowRankAdapter on a Linear mapping one axis to one axis; found "
            f"base {type(base).__name__}. Fix: adapt only nnx.Linear-shaped layers, or wrap the adapter in "
            "pzb.nn.Sequential([...]) to lower it through an adapter module."
        )
    (f_in,), (f_out,) = base.in_axis_names, base.out_axis_names
    rank_axis = adapter.rank_axis
    a = _lora_param(adapter.lora_a, ctx.child(_LORA_ATTR, "lora_a"), (f_in, rank_axis), 1.0)
    b = _lora_param(
        adapter.lora_b, ctx.child(_LORA_ATTR, "lora_b"), (rank_axis, weight_output_name(f_out, (f_in,))), adapter.scale
    )
    in_features, rank = (int(s) for s in a.shape)
    out_features = int(b.shape[1])
    dtype = a.get_raw_value().dtype
    statics = _lora_statics(in_features, rank, out_features, None if dtype == jnp.float32 else dtype)
    return build_module(nnx.LoRA, statics, {"lora_a": a, "lora_b": b, "base_module": None})


def _with_lora_node(statics: NnxStatics, present: bool) -> NnxStatics:
    """``nnx.Linear`` statics <-> ``nnx.LoRALinear`` statics: the ``lora`` attribute and its node flag."""
    items = []
    for name, value in statics.items:
        if name == _NODES_ATTR:
            nodes = {k: v for k, v in value.items() if k != _LORA_ATTR}
            value = type(value)({**nodes, _LORA_ATTR: True} if present else nodes)
        items.append((name, value))
    order = tuple(name for name in statics.order if name != _LORA_ATTR)
    return NnxStatics(tuple(items), (*order, _LORA_ATTR) if present else order, statics.flags)


class _LoRANnxLinearRule:
    """``NnxLinear([LowRankAdapter(Linear), AddBias])`` -> ``nnx.LoRALinear``; else the original rule."""

    def __init__(self, previous: Any) -> None:
        self.previous = previous

    def lower(self, layer: Any, ctx: LowerContext) -> Any:
        split = split_adapter(layer)
        if split is None:
            return self.previous.lower(layer, ctx)
        adapter, base_layer = split
        linear = self.previous.lower(base_layer, ctx)
        if type(linear) is not nnx.Linear:
            raise LowerError(
                f"{ctx.where}: a LoRA adapter here needs its base to lower to nnx.Linear, found "
                f"{type(linear).__name__}. Fix: adapt only plain nnx.Linear layers."
            )
        statics = _with_lora_node(NnxStatics.of(linear), True)
        lora = _lower_lora_module(adapter, ctx)
        return build_module(nnx.LoRALinear, statics, {"kernel": linear.kernel, "bias": linear.bias, _LORA_ATTR: lora})


class LowRankAdapterRule:
    """A bare ``LowRankAdapter`` (e.g. from a pzbridge-built model) -> ``nnx.LoRALinear`` without bias."""

    def lower(self, layer: LowRankAdapter, ctx: LowerContext) -> Any:
        return _LoRANnxLinearRule(NNX.lower_rule_for(Linear)).lower(Sequential([layer]), ctx)


def _lift_adapter(linear_module: Any, lora: Any, ctx: LiftContext, lifted: Any) -> Any:
    sublayers = lifted.sublayers if isinstance(lifted, Sequential) else [lifted]
    linear = sublayers[0] if sublayers else None
    if not isinstance(linear, Linear) or len(linear.in_axis_names) != 1:
        return None
    (f_in,), (f_out,) = linear.in_axis_names, linear.out_axis_names
    a = lift_variable(lora.lora_a, ctx.child("lora_a"), (f_in, RANK_AXIS))
    b = lift_variable(lora.lora_b, ctx.child("lora_b"), (RANK_AXIS, weight_output_name(f_out, (f_in,))))
    adapter = LowRankAdapter(linear, a, b, alpha=float(lora.lora_a.shape[1]))
    if isinstance(lifted, Sequential):
        return dataclasses.replace(lifted, sublayers=[adapter, *sublayers[1:]])
    return adapter


class LoRALinearRule:
    """``nnx.LoRALinear`` -> ``NnxLinear([LowRankAdapter(Linear), AddBias])`` with the ``nnx.Linear`` config.

    ``kernel (in, out)`` -> ``{features, features_out}``; ``lora_a (in, rank)``
    -> ``{features, lora_rank}``; ``lora_b (rank, out)`` ->
    ``{lora_rank, features_out}``. A ``LoRALinear`` with non-default LoRA
    numerics (``lora_dtype``, custom promote) stays ``Foreign``.
    """

    def lift(self, module: nnx.LoRALinear, ctx: LiftContext) -> Any:

        lora = module.lora
        defaults = _lora_statics(1, 1, 1)
        if lora.dtype != defaults["dtype"] or lora.promote_dtype is not defaults["promote_dtype"]:
            return lift_foreign(module, ctx)
        plain = build_module(nnx.Linear, _with_lora_node(NnxStatics.of(module), False),
                             {"kernel": module.kernel, "bias": module.bias})
        lifted = NNX.lift_rule_for(nnx.Linear).lift(plain, ctx)
        adapted = _lift_adapter(plain, lora, ctx, lifted)
        return adapted if adapted is not None else lift_foreign(module, ctx)

    def convention(self, module: nnx.LoRALinear, naming: Any) -> Any:
        return NNX.lift_rule_for(nnx.Linear).convention(module, naming)


NNX.add(LoRALinearRule(), source=nnx.LoRALinear)


NNX.add(LowRankAdapterRule(), lifted=(LowRankAdapter,))


for _cls in (NnxLinear, Affine):
    NNX.add(_LoRANnxLinearRule(NNX.lower_rule_for(_cls)), lifted=(_cls,))
