"""Flax NNX normalisation rules: ``LayerNorm``, ``RMSNorm``, ``BatchNorm``.

Each NNX norm lifts to the shared pzbridge kernel
(:mod:`pzbridge.nn.normalization`) with the knobs that reproduce NNX bit for
bit: ``use_fast_variance`` as configured (NNX's default is the fast
``E[x^2] - E[x]^2`` variance), ``scale_into_inverse=True`` (NNX multiplies the
scale into ``rsqrt(var + eps)`` first) and ``dtype_policy="promote"``. The
lifted classes are thin subclasses that also carry the module's NNX statics,
so lowering rebuilds the very same configuration (``nnx.graphdef`` equal).

Axis names: the normalised (and scale / bias) axis is ``features``; every
other axis, named or positional, is kept. ``BatchNorm`` reduces over every
axis but ``features`` (NNX's ``reduction_axes`` are "all but ``axis``"), so
its lifted form reduces over whatever batch axes the input has, named or
positional. ``BatchStat`` variables become ``StateVariable``s; training calls
(``stateless_call``, ``variable_jit``, or a plain call) update them and
lowering carries the new values back.

Configurations kept ``Foreign`` (exact, but not editable as pzbridge layers):
non-default ``dtype`` / ``promote_dtype``, ``axis_name`` (cross-device
statistics), non-trailing ``reduction_axes`` / ``feature_axes`` / ``axis``,
and any module with extra data attributes.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import pzbridge as pzb
    >>> norm = nnx.RMSNorm(4, rngs=nnx.Rngs(0))
    >>> lifted = pzb.lift(norm)
    >>> type(lifted.body).__name__, lifted.body.across_axes
    ('NnxRMSNorm', ('features',))
    >>> x = jax.random.normal(jax.random.key(0), (2, 4))
    >>> bool(jnp.allclose(lifted.positional(x), norm(x), atol=1e-6))
    True
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from flax import nnx

from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.lifted import CallingConvention
from pzbridge.bridge.naming import AxisNaming
from pzbridge.bridge.nnx.adapter import NnxAdapter
from pzbridge.bridge.nnx.statics import (
    NnxStatics,
    build_module,
    fresh_statics,
    has_data,
    statics_match,
)
from pzbridge.bridge.nnx.traversal import lift_foreign, nnx_rule
from pzbridge.bridge.nnx.variables import lift_variable, nnx_variable, storage_names
from pzbridge.core import named_axes as nx
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.normalization import BatchNorm, LayerNorm, RMSNorm


def _trailing(axes: Any) -> bool:
    return axes in (-1, (-1,), [-1])


@functools.lru_cache(maxsize=None)
def _defaults(kind: str) -> NnxStatics:
    make: dict[str, Callable[[], Any]] = {
        "layer": lambda: nnx.LayerNorm(1, rngs=nnx.Rngs(0)),
        "rms": lambda: nnx.RMSNorm(1, rngs=nnx.Rngs(0)),
        "batch": lambda: nnx.BatchNorm(1, rngs=nnx.Rngs(0)),
    }
    return fresh_statics(make[kind])


_STAT_KNOBS = ("dtype", "axis_name", "axis_index_groups", "promote_dtype")


@pytree_dataclass
class NnxLayerNorm(LayerNorm):
    """``nnx.LayerNorm`` lifted: a pzbridge ``LayerNorm`` plus the NNX statics.

    Attributes:
      config: The original module's statics (static; None if built in pzbridge).

    Example:
        >>> NnxLayerNorm(None, None, ("features",), 1e-6).config is None
        True
    """

    config: Any = static_field(default=None)


@pytree_dataclass
class NnxRMSNorm(RMSNorm):
    """``nnx.RMSNorm`` lifted: a pzbridge ``RMSNorm`` plus the NNX statics.

    Attributes:
      config: The original module's statics (static).

    Example:
        >>> NnxRMSNorm(None, None, ("features",), 1e-6).config is None
        True
    """

    config: Any = static_field(default=None)


@pytree_dataclass
class NnxBatchNorm(BatchNorm):
    """``nnx.BatchNorm`` lifted: statistics over every axis except the feature axes.

    NNX reduces over all input axes but ``axis``; the lifted layer does the
    same for any input, naming positional (batch) axes temporarily, so a
    lifted root called positionally behaves exactly like NNX. The NNX call
    argument ``use_running_average`` is accepted as a side input (as is the
    pzbridge ``train`` switch, which wins).

    Attributes:
      config: The original module's statics (static).

    Example:
        >>> import jax.numpy as jnp
        >>> lifted = pzb.lift(nnx.BatchNorm(2, momentum=0.5, rngs=nnx.Rngs(0)))
        >>> y = lifted.positional(jnp.array([[1.0, 2.0], [3.0, 6.0]]))  # batch axis positional
        >>> lifted.body.running_mean.value.unwrap("features").tolist()
        [1.0, 2.0]
    """

    config: Any = static_field(default=None)

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        flag = side_inputs.get("use_running_average")
        if flag is not None and side_inputs.get("train") is None:
            side_inputs = {**side_inputs, "train": not flag}
        features = set(self.running_mean.value.named_shape)
        temps = [f"__batchnorm_axis{i}" for i in range(len(x.positional_shape))]
        named = x.tag(*temps) if temps else x
        across = (*temps, *(n for n in x.named_shape if n not in features))
        out = BatchNorm.__call__(dataclasses.replace(self, across_axes=across), named, **side_inputs)
        return out.untag(*temps) if temps else out


def _feature_convention(naming: AxisNaming) -> CallingConvention:
    return CallingConvention(((naming.features,),), (naming.features,))


def _nnx_native(layer: Any) -> bool:
    """The lifted norm still computes exactly what an NNX norm with its statics computes."""
    param = layer.scale if layer.scale is not None else layer.bias
    names = storage_names(param) if param is not None else tuple(layer.across_axes)
    return (layer.config is not None and layer.scale_into_inverse and layer.dtype_policy == "promote"
            and layer.dtype is None and len(names) == 1 and tuple(layer.across_axes) == names)


@nnx_rule(source=nnx.LayerNorm, lifted=(NnxLayerNorm,))
class LayerNormRule:
    """``nnx.LayerNorm`` <-> ``NnxLayerNorm``; ``scale`` / ``bias (F,)`` -> ``{features}``.

    Statistics over ``features`` with NNX's op order and variance formula.
    Non-trailing axes, ``dtype``, ``axis_name`` or a custom ``promote_dtype``
    stay ``Foreign``. An edited layer NNX cannot express lowers to an adapter.
    """

    def _supported(self, module: nnx.LayerNorm) -> bool:
        return (has_data(module, ("scale", "bias")) and statics_match(module, _defaults("layer"), _STAT_KNOBS)
                and _trailing(module.reduction_axes) and _trailing(module.feature_axes))

    def lift(self, module: nnx.LayerNorm, ctx: LiftContext) -> Any:
        if not self._supported(module):
            return lift_foreign(module, ctx)
        f = ctx.naming.features
        scale = None if module.scale is None else lift_variable(module.scale, ctx.child("scale"), (f,))
        bias = None if module.bias is None else lift_variable(module.bias, ctx.child("bias"), (f,))
        return NnxLayerNorm(scale, bias, (f,), module.epsilon, use_fast_variance=module.use_fast_variance,
                            scale_into_inverse=True, dtype_policy="promote", config=NnxStatics.of(module))

    def convention(self, module: nnx.LayerNorm, naming: AxisNaming) -> CallingConvention | None:
        return _feature_convention(naming) if self._supported(module) else None

    def lower(self, layer: NnxLayerNorm, ctx: LowerContext) -> Any:
        if not _nnx_native(layer):
            return NnxAdapter.wrap(layer, ctx)
        names = tuple(layer.across_axes)
        config = layer.config.replace(epsilon=layer.epsilon, use_fast_variance=layer.use_fast_variance)
        return build_module(nnx.LayerNorm, config, {
            "scale": None if layer.scale is None else nnx_variable(layer.scale, ctx.child("scale"), names),
            "bias": None if layer.bias is None else nnx_variable(layer.bias, ctx.child("bias"), names),
        })


@nnx_rule(source=nnx.RMSNorm, lifted=(NnxRMSNorm,))
class RMSNormRule:
    """``nnx.RMSNorm`` <-> ``NnxRMSNorm`` (scale only); ``scale (F,)`` -> ``{features}``.

    Mean of squares over ``features``; unsupported configurations as for
    :class:`LayerNormRule`.
    """

    def _supported(self, module: nnx.RMSNorm) -> bool:
        return (has_data(module, ("scale",)) and statics_match(module, _defaults("rms"), _STAT_KNOBS)
                and _trailing(module.reduction_axes) and _trailing(module.feature_axes))

    def lift(self, module: nnx.RMSNorm, ctx: LiftContext) -> Any:
        if not self._supported(module):
            return lift_foreign(module, ctx)
        f = ctx.naming.features
        scale = None if module.scale is None else lift_variable(module.scale, ctx.child("scale"), (f,))
        return NnxRMSNorm(scale, None, (f,), module.epsilon, use_fast_variance=module.use_fast_variance,
                          scale_into_inverse=True, dtype_policy="promote", config=NnxStatics.of(module))

    def convention(self, module: nnx.RMSNorm, naming: AxisNaming) -> CallingConvention | None:
        return _feature_convention(naming) if self._supported(module) else None

    def lower(self, layer: NnxRMSNorm, ctx: LowerContext) -> Any:
        if not _nnx_native(layer) or layer.bias is not None:
            return NnxAdapter.wrap(layer, ctx)
        config = layer.config.replace(epsilon=layer.epsilon, use_fast_variance=layer.use_fast_variance)
        scale = None if layer.scale is None else nnx_variable(layer.scale, ctx.child("scale"), tuple(layer.across_axes))
        return build_module(nnx.RMSNorm, config, {"scale": scale})


@nnx_rule(source=nnx.BatchNorm, lifted=(NnxBatchNorm,))
class BatchNormRule:
    """``nnx.BatchNorm`` <-> ``NnxBatchNorm``; ``mean`` / ``var`` (``BatchStat``) -> ``StateVariable``.

    ``scale``, ``bias``, ``mean``, ``var`` ``(F,)`` -> ``{features}``; the
    statistics reduce over every other axis. ``momentum``, ``epsilon`` and
    ``use_running_average`` (``model.eval()``) round-trip through the lifted
    fields. ``axis != -1``, ``axis_name``, ``dtype`` or custom promotion stay
    ``Foreign``.
    """

    def _supported(self, module: nnx.BatchNorm) -> bool:
        return (has_data(module, ("mean", "var", "scale", "bias"))
                and statics_match(module, _defaults("batch"), _STAT_KNOBS) and module.axis in (-1, (-1,))
                and module.use_running_average is not None)

    def lift(self, module: nnx.BatchNorm, ctx: LiftContext) -> Any:
        if not self._supported(module):
            return lift_foreign(module, ctx)
        f = ctx.naming.features
        return NnxBatchNorm(
            None if module.scale is None else lift_variable(module.scale, ctx.child("scale"), (f,)),
            None if module.bias is None else lift_variable(module.bias, ctx.child("bias"), (f,)),
            lift_variable(module.mean, ctx.child("mean"), (f,)),
            lift_variable(module.var, ctx.child("var"), (f,)),
            across_axes=(), epsilon=module.epsilon, momentum=module.momentum, mode="batch",
            use_running_average=bool(module.use_running_average), use_fast_variance=module.use_fast_variance,
            scale_into_inverse=True, dtype_policy="promote", config=NnxStatics.of(module),
        )

    def convention(self, module: nnx.BatchNorm, naming: AxisNaming) -> CallingConvention | None:
        return _feature_convention(naming) if self._supported(module) else None

    def lower(self, layer: NnxBatchNorm, ctx: LowerContext) -> Any:
        names = storage_names(layer.running_mean)
        if (layer.config is None or layer.mode != "batch" or layer.debias or layer.divide_by_sqrt
                or not layer.scale_into_inverse or layer.dtype_policy != "promote" or layer.dtype is not None
                or len(names) != 1):
            return NnxAdapter.wrap(layer, ctx)
        config = layer.config.replace(epsilon=layer.epsilon, momentum=layer.momentum,
                                      use_running_average=layer.use_running_average,
                                      use_fast_variance=layer.use_fast_variance)
        return build_module(nnx.BatchNorm, config, {
            "mean": nnx_variable(layer.running_mean, ctx.child("mean"), names),
            "var": nnx_variable(layer.running_var, ctx.child("var"), names),
            "scale": None if layer.scale is None else nnx_variable(layer.scale, ctx.child("scale"), names),
            "bias": None if layer.bias is None else nnx_variable(layer.bias, ctx.child("bias"), names),
        })
