"""Flax NNX ``GroupNorm`` and ``InstanceNorm`` rules.

Both NNX layers normalise over every input axis except the leading one
(assumed to be the batch) and the trailing feature axis (``GroupNorm`` also
over the channels of a group). That rule is positional, so the lifted
classes here keep it for positional axes and add names on top:

- named ``across_axes`` (empty after lifting) are reduced;
- named ``middle_axes`` are reduced: the names the axes between NNX's leading
  batch axis and the features have at the call the layer was lifted for
  (``height, width`` after a 2-D convolution in a traced parent, ``width``
  for a ``(batch, seq, channels)`` call), so a named call reduces what NNX
  reduces positionally; ``None`` when the lift saw no call;
- positional axes are reduced, except the leading positional axis when no
  named batch axis is present (NNX's own convention for a positional call);
- every other named axis (``batch``, ``worlds`` ...) is a batch axis and
  passes through.

So a lifted root called positionally behaves exactly like NNX, and a named
call ``{batch, ..., channels}`` with spatial axes left positional (or named
as ``middle_axes``) gives the same numbers. Numerics follow NNX bit for bit
(``scale_into_inverse=True``, ``dtype_policy="promote"``, the configured
``use_fast_variance``), as in :mod:`pzbridge.bridge.nnx.norm`.

Kept ``Foreign``: explicit ``GroupNorm.reduction_axes``, non-trailing
``InstanceNorm.feature_axes``, ``axis_name``, non-default ``dtype`` /
``promote_dtype``, extra data attributes. The NNX ``mask`` call argument is
not supported by the lifted layers (``NotImplementedError``).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import pzbridge as pzb
    >>> norm = nnx.GroupNorm(4, num_groups=2, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(0), (2, 3, 3, 4))
    >>> bool(jnp.allclose(pzb.lift(norm).positional(x), norm(x), atol=1e-6))
    True
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
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
from pzbridge.bridge.tracing.graph_types import Untraceable
from pzbridge.core import named_axes as nx
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.normalization import GroupNorm, InstanceNorm


def _positional_reduction(x: nx.NamedArrayBase, kept: set[str], name: str) -> tuple[nx.NamedArrayBase, list[str]]:
    """Names the positional axes NNX reduces over (temporary names); returns the tagged input and those names."""
    count = len(x.positional_shape)
    named_batch = any(n not in kept for n in x.named_shape)
    skip = 0 if named_batch else min(count, 1)
    if not count:
        return x, []
    temps = [f"__{name}_lead"] * skip + [f"__{name}_axis{i}" for i in range(count - skip)]
    return x.tag(*temps), temps[skip:]


def _untag(out: nx.NamedArrayBase, x: nx.NamedArrayBase, name: str) -> nx.NamedArrayBase:
    count = len(x.positional_shape)
    if not count:
        return out
    named_batch = f"__{name}_lead" not in out.named_shape
    names = ([] if named_batch else [f"__{name}_lead"]) + [f"__{name}_axis{i}" for i in range(count - (not named_batch))]
    return out.untag(*names)


def _present(middle_axes: tuple[str, ...] | None, x: nx.NamedArrayBase) -> tuple[str, ...]:
    return tuple(n for n in middle_axes or () if nx.is_namedarray(x) and n in x.named_shape)


def middle_names(rank: int, naming: AxisNaming) -> tuple[str, ...]:
    """Names for the axes NNX's GroupNorm / InstanceNorm reduce in a rank-``rank`` call (between batch and features).

    Spatial names for up to three (``depth, height, width``, the last ones
    first), numbered ``spatial{i}`` beyond.

    Example:
        >>> middle_names(4, AxisNaming()), middle_names(2, AxisNaming())
        (('height', 'width'), ())
    """
    count = max(rank - 2, 0)
    spatial = (naming.depth, naming.height, naming.width)
    if count <= len(spatial):
        return spatial[len(spatial) - count:]
    return tuple(f"spatial{i}" for i in range(count))


def _call_middle(naming: AxisNaming, args: Sequence[Any]) -> tuple[str, ...] | None:
    """The middle axes of the call ``args`` (the rank of its first input), or None without one."""
    if not args or not hasattr(args[0], "shape"):
        return None
    return middle_names(len(args[0].shape), naming)


def _for_call(layer: Any, convention: CallingConvention | None) -> Any:
    """``layer`` with the middle axes one traced call names (``convention.inputs[0]`` but the channels)."""
    if convention is None or not convention.inputs:
        return layer
    middle = tuple(convention.inputs[0][:-1])
    if layer.middle_axes is not None and layer.middle_axes != middle:
        raise Untraceable(f"a {type(layer).__name__} is called on inputs of different ranks (middle axes "
                          f"{list(layer.middle_axes)} and {list(middle)})")
    return dataclasses.replace(layer, middle_axes=middle)


def _reject_mask(side_inputs: dict[str, Any], what: str) -> None:
    if side_inputs.get("mask") is not None:
        raise NotImplementedError(f"{what}: the NNX `mask` argument is not supported by the lifted layer; "
                                  "lower the model to NNX to normalise with a mask.")


@pytree_dataclass
class NnxGroupNorm(GroupNorm):
    """``nnx.GroupNorm`` lifted: NNX's positional reduction rule plus named ``across_axes``.

    Attributes:
      config: The original module's statics (static; None if built in pzbridge).
      middle_axes: Names of the axes NNX reduces between its leading batch axis
        and the channels at the lifted call, or None when unknown (static).

    Example:
        >>> import jax.numpy as jnp
        >>> gn = NnxGroupNorm(None, None, "channels", 2, (), 0.0)
        >>> x = pzb.nx.wrap(jnp.array([[1.0, 3.0, 5.0, 9.0]])).tag_prefix("batch")
        >>> gn(x.tag("channels")).unwrap("batch", "channels").tolist()
        [[-1.0, 1.0, -1.0, 1.0]]
    """

    config: Any = static_field(default=None)
    middle_axes: tuple[str, ...] | None = static_field(default=None)

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        _reject_mask(side_inputs, "NnxGroupNorm")
        middle = _present(self.middle_axes, x)
        kept = {self.channel_axis, *self.across_axes, *middle}
        tagged, temps = _positional_reduction(x, kept, "groupnorm")
        layer = dataclasses.replace(self, across_axes=(*self.across_axes, *middle, *temps))
        return _untag(GroupNorm.__call__(layer, tagged, **side_inputs), x, "groupnorm")


@pytree_dataclass
class NnxInstanceNorm(InstanceNorm):
    """``nnx.InstanceNorm`` lifted: NNX's positional reduction rule plus named ``across_axes``.

    Attributes:
      config: The original module's statics (static).
      middle_axes: As for :class:`NnxGroupNorm` (static).

    Example:
        >>> import jax.numpy as jnp
        >>> norm = NnxInstanceNorm(None, None, (), 0.0)
        >>> norm(pzb.nx.wrap(jnp.array([[1.0, 3.0]]))).unwrap().tolist()  # leading positional axis: batch
        [[-1.0, 1.0]]
    """

    config: Any = static_field(default=None)
    middle_axes: tuple[str, ...] | None = static_field(default=None)

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        _reject_mask(side_inputs, "NnxInstanceNorm")
        param = self.scale if self.scale is not None else self.bias
        middle = _present(self.middle_axes, x)
        kept = {*self.across_axes, *middle, *(storage_names(param) if param is not None else ())}
        tagged, temps = _positional_reduction(x, kept, "instancenorm")
        layer = dataclasses.replace(self, across_axes=(*self.across_axes, *middle, *temps))
        return _untag(InstanceNorm.__call__(layer, tagged, **side_inputs), x, "instancenorm")


_KNOBS = ("dtype", "axis_name", "axis_index_groups", "promote_dtype")


@functools.lru_cache(maxsize=None)
def _defaults(kind: str) -> NnxStatics:
    make: dict[str, Callable[[], Any]] = {
        "group": lambda: nnx.GroupNorm(2, num_groups=1, rngs=nnx.Rngs(0)),
        "instance": lambda: nnx.InstanceNorm(1, rngs=nnx.Rngs(0)),
    }
    return fresh_statics(make[kind])


def _convention(naming: AxisNaming) -> CallingConvention:
    return CallingConvention(((naming.channels,),), (naming.channels,))


def _call_convention(naming: AxisNaming, args: Sequence[Any]) -> CallingConvention:
    """One call's names: ``(*middle, channels)``, the leading (batch) axis passing through as NNX keeps it."""
    names = (*(_call_middle(naming, args) or ()), naming.channels)
    return CallingConvention((names,), names)


class _MiddleAxes:
    """What the GroupNorm and InstanceNorm rules share: per-call names of the axes NNX reduces.

    A traced parent asks :meth:`call_convention` per call site and then
    :meth:`for_call` for the lifted layer of that call, so a Conv's
    ``height, width`` reaching the norm are reduced as NNX reduces them.
    """

    _supported: Callable[[Any], bool]  # Each rule's own test of the module's settings.

    def call_convention(self, module: Any, naming: AxisNaming, args: Sequence[Any],
                        kwargs: Mapping[str, Any]) -> CallingConvention | None:
        """The names of one call: ``(*middle, channels)`` by the input's rank (None when kept Foreign).

        Example:
            >>> import jax.numpy as jnp
            >>> norm = nnx.GroupNorm(4, num_groups=2, rngs=nnx.Rngs(0))
            >>> GroupNormRule().call_convention(norm, AxisNaming(), (jnp.ones((2, 3, 3, 4)),), {}).inputs
            (('height', 'width', 'channels'),)
        """
        return _call_convention(naming, args) if self._supported(module) else None

    def for_call(self, layer: Any, convention: CallingConvention | None) -> Any:
        """The lifted layer knowing the middle axes of the traced call ``convention`` describes."""
        return _for_call(layer, convention)


def _example_middle(ctx: LiftContext) -> tuple[str, ...] | None:
    """A root lifted with an example knows its call's middle axes (named only when called by name)."""
    example = ctx.example
    return None if example is None else _call_middle(ctx.naming, example.args)


def _native(layer: Any, channel_names: tuple[str, ...]) -> bool:
    params = [p for p in (layer.scale, layer.bias) if p is not None]
    return (layer.config is not None and layer.scale_into_inverse and layer.dtype_policy == "promote"
            and layer.dtype is None and not layer.across_axes
            and all(storage_names(p) == channel_names for p in params))


@nnx_rule(source=nnx.GroupNorm, lifted=(NnxGroupNorm,))
class GroupNormRule(_MiddleAxes):
    """``nnx.GroupNorm`` <-> ``NnxGroupNorm``; ``scale`` / ``bias (C,)`` -> ``{channels}``.

    ``num_groups`` -> ``groups``; statistics over the channels of a group and
    the positional axes after the leading one (NNX's default reduction).
    """

    def _supported(self, module: nnx.GroupNorm) -> bool:
        return (has_data(module, ("scale", "bias")) and statics_match(module, _defaults("group"), _KNOBS)
                and module.reduction_axes is None and module.feature_axis in (-1,))

    def lift(self, module: nnx.GroupNorm, ctx: LiftContext) -> Any:
        if not self._supported(module):
            return lift_foreign(module, ctx)
        c = ctx.naming.channels
        scale = lift_variable(module.scale, ctx.child("scale"), (c,)) if module.scale is not None else None
        bias = lift_variable(module.bias, ctx.child("bias"), (c,)) if module.bias is not None else None
        return NnxGroupNorm(scale, bias, c, module.num_groups, (), module.epsilon,
                            use_fast_variance=module.use_fast_variance, scale_into_inverse=True,
                            dtype_policy="promote", config=NnxStatics.of(module),
                            middle_axes=_example_middle(ctx))

    def convention(self, module: nnx.GroupNorm, naming: AxisNaming) -> CallingConvention | None:
        return _convention(naming) if self._supported(module) else None

    def lower(self, layer: NnxGroupNorm, ctx: LowerContext) -> Any:
        names = (layer.channel_axis,)
        if not _native(layer, names) or layer.groups != layer.config["num_groups"]:
            return NnxAdapter.wrap(layer, ctx, CallingConvention((names,), names))
        config = layer.config.replace(epsilon=layer.epsilon, use_fast_variance=layer.use_fast_variance)
        return build_module(nnx.GroupNorm, config, {
            "scale": None if layer.scale is None else nnx_variable(layer.scale, ctx.child("scale"), names),
            "bias": None if layer.bias is None else nnx_variable(layer.bias, ctx.child("bias"), names),
        })


@nnx_rule(source=nnx.InstanceNorm, lifted=(NnxInstanceNorm,))
class InstanceNormRule(_MiddleAxes):
    """``nnx.InstanceNorm`` <-> ``NnxInstanceNorm``; ``scale`` / ``bias (C,)`` -> ``{channels}``.

    Statistics per example and channel over the positional axes after the
    leading one (NNX's reduction for ``feature_axes=-1``).
    """

    def _supported(self, module: nnx.InstanceNorm) -> bool:
        return (has_data(module, ("scale", "bias")) and statics_match(module, _defaults("instance"), _KNOBS)
                and module.feature_axes in (-1, (-1,), [-1]))

    def lift(self, module: nnx.InstanceNorm, ctx: LiftContext) -> Any:
        if not self._supported(module):
            return lift_foreign(module, ctx)
        c = ctx.naming.channels
        scale = lift_variable(module.scale, ctx.child("scale"), (c,)) if module.scale is not None else None
        bias = lift_variable(module.bias, ctx.child("bias"), (c,)) if module.bias is not None else None
        return NnxInstanceNorm(scale, bias, (), module.epsilon, use_fast_variance=module.use_fast_variance,
                               scale_into_inverse=True, dtype_policy="promote", config=NnxStatics.of(module),
                               middle_axes=_example_middle(ctx))

    def convention(self, module: nnx.InstanceNorm, naming: AxisNaming) -> CallingConvention | None:
        return _convention(naming) if self._supported(module) else None

    def lower(self, layer: NnxInstanceNorm, ctx: LowerContext) -> Any:
        param = layer.scale if layer.scale is not None else layer.bias
        names = storage_names(param) if param is not None else ("channels",)
        if param is None or len(names) != 1 or not _native(layer, names):
            return NnxAdapter.wrap(layer, ctx, CallingConvention((names,), names))
        config = layer.config.replace(epsilon=layer.epsilon, use_fast_variance=layer.use_fast_variance)
        return build_module(nnx.InstanceNorm, config, {
            "scale": None if layer.scale is None else nnx_variable(layer.scale, ctx.child("scale"), names),
            "bias": None if layer.bias is None else nnx_variable(layer.bias, ctx.child("bias"), names),
        })
