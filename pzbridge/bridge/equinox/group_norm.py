"""Equinox rule for ``GroupNorm``.

Equinox normalises an unbatched ``(channels, *spatial)`` input of *any*
spatial rank: channels split group-major into ``groups``, statistics over
each group's channels and all spatial positions, in at least float32, as
``weight * ((x - mean) * rsqrt(var + eps)) + bias`` with ``weight`` / ``bias``
of shape ``(channels,)``. The pzbridge :class:`~pzbridge.nn.normalization.GroupNorm`
computes exactly that (same op order) over named axes.

Because the spatial rank is only known when the layer is called, the lifted
layer is an :class:`EqxGroupNormNd`: its ``across_axes`` are the candidate
spatial names (``depth, height, width``) and it reduces over those the input
has. A positional input (as the original took it) has its axes named
``(channels, *spatial)`` on the way in and un-named on the way out, so
``lifted.positional(x)`` takes exactly what the original took; extra named
axes (``batch``) pass through.

Example:
    >>> import jax.numpy as jnp, equinox as eqx
    >>> import pzbridge as pzb
    >>> norm = eqx.nn.GroupNorm(2, 4)
    >>> x = jnp.arange(12.0).reshape(4, 3)
    >>> bool(jnp.allclose(pzb.lift(norm).positional(x), norm(x), atol=1e-6))
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import equinox as eqx

from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.equinox.adapter import EquinoxAdapter
from pzbridge.bridge.equinox.traversal import (
    EqxOrigin,
    equinox_rule,
    origin_of,
    rebuild_from_origin,
)
from pzbridge.bridge.lifted import CallingConvention
from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.normalization import GroupNorm


@pytree_dataclass
class EqxGroupNorm(GroupNorm):
    """``eqx.nn.GroupNorm`` lifted; channels first, ``across_axes`` the spatial names.

    Attributes:
      origin: The original class and static fields (static).
    """

    origin: EqxOrigin | None = static_field(default=None)


@pytree_dataclass
class EqxGroupNormNd(EqxGroupNorm):
    """``eqx.nn.GroupNorm`` lifted for any spatial rank.

    Reduces over the names in ``across_axes`` that the input has. Positional
    axes, if any, are first named ``(channel_axis, *across_axes[-k:])`` (the
    last ``k`` spatial names, ``k`` = positional rank - 1) and un-named after.

    Example:
        >>> import jax.numpy as jnp
        >>> norm = EqxGroupNormNd(None, None, "channels", 2, ("depth", "height", "width"), 0.0)
        >>> norm(nx.wrap(jnp.array([[1.0, 3.0], [5.0, 7.0]]))).unwrap().tolist()
        [[-1.0, 1.0], [-1.0, 1.0]]
    """

    def input_names(self, rank: int) -> tuple[str, ...] | None:
        """The names of an example's ``rank`` positional axes, ``(channels, *spatial[-rank + 1:])`` (as Equinox).

        Example:
            >>> EqxGroupNormNd(None, None, "channels", 2, ("depth", "height", "width"), 0.0).input_names(2)
            ('channels', 'width')
        """
        if not 1 <= rank <= len(self.across_axes) + 1:
            return None
        return (self.channel_axis, *self.across_axes[len(self.across_axes) - rank + 1:])

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        tagged: tuple[str, ...] = ()
        if nx.is_namedarray(x) and x.positional_shape:
            rank = len(x.positional_shape)
            if not 1 <= rank <= len(self.across_axes) + 1:
                raise NamedAxisError(
                    f"EqxGroupNormNd: expected (channels, *spatial) with at most {len(self.across_axes)} spatial "
                    f"axes, found positional shape {x.positional_shape} (named {dict(x.named_shape)}). "
                    "Fix: pass a (channels, ...) array as to the original eqx.nn.GroupNorm."
                )
            tagged = self.input_names(rank) or ()
            x = x.tag(*tagged)
        present = tuple(name for name in self.across_axes if nx.is_namedarray(x) and name in x.named_shape)
        out = GroupNorm.__call__(dataclasses.replace(self, across_axes=present), x, **side_inputs)
        return out.untag(*tagged) if tagged else out


@equinox_rule(source=eqx.nn.GroupNorm, lifted=(EqxGroupNormNd,))
class GroupNormRule:
    """``eqx.nn.GroupNorm(groups, channels)`` <-> ``EqxGroupNormNd``; ``weight``/``bias (C,)`` -> ``{channels}``.

    Lowers back to ``eqx.nn.GroupNorm`` when the layer still computes what
    Equinox computes (affine over the channel axis only, both or neither
    of scale and bias, Equinox op order and dtype policy); otherwise to an
    adapter called like the original.
    """

    def lift(self, module: eqx.nn.GroupNorm, ctx: LiftContext) -> EqxGroupNormNd:
        c = ctx.naming.channels
        weight = None if module.weight is None else ctx.child("weight").parameter(module.weight, (c,))
        bias = None if module.bias is None else ctx.child("bias").parameter(module.bias, (c,))
        spatial = (ctx.naming.depth, ctx.naming.height, ctx.naming.width)
        return EqxGroupNormNd(weight, bias, c, module.groups, spatial, module.eps, origin=origin_of(module))

    def convention(self, module: eqx.nn.GroupNorm, naming: Any) -> CallingConvention:
        # Nothing named: EqxGroupNormNd names (channels, *spatial) itself, whatever the rank.
        return CallingConvention(((),), ())

    def call_convention(self, module: eqx.nn.GroupNorm, naming: Any, args: Sequence[Any],
                        kwargs: Mapping[str, Any]) -> CallingConvention:
        """One call's names, ``(channels, *spatial[-rank + 1:])`` by the input's rank (traced parents ask it).

        A traced parent then renames what reaches the norm (a Linear's
        ``features``) to ``channels``, as Equinox takes the first axis as the
        channels whatever it means upstream.

        Example:
            >>> import jax.numpy as jnp
            >>> from pzbridge.bridge.naming import AxisNaming
            >>> norm, x = eqx.nn.GroupNorm(2, 4), jnp.ones((4, 5))
            >>> convention = GroupNormRule().call_convention(norm, AxisNaming(), (x,), {})
            >>> convention.inputs, convention.output
            ((('channels', 'width'),), ('channels', 'width'))
        """
        rank = len(getattr(args[0], "shape", ())) if args else 0
        spatial = (naming.depth, naming.height, naming.width)
        if not 1 <= rank <= len(spatial) + 1:
            return self.convention(module, naming)
        names = (naming.channels, *spatial[len(spatial) - rank + 1:])
        return CallingConvention((names,), names)

    def lower(self, layer: EqxGroupNormNd, ctx: LowerContext) -> Any:
        c = layer.channel_axis
        params = [p for p in (layer.scale, layer.bias) if p is not None]
        fits = (
            len(params) in (0, 2) and not layer.use_fast_variance and not layer.scale_into_inverse
            and layer.dtype_policy == "input" and all(_axes(p) == (c,) for p in params)
        )
        if not fits:
            return EquinoxAdapter.wrap(layer, ctx, CallingConvention(((),), ()))
        weight = None if layer.scale is None else ctx.child("weight").array(layer.scale, (c,))
        bias = None if layer.bias is None else ctx.child("bias").array(layer.bias, (c,))
        origin = layer.origin
        channels = weight.shape[0] if weight is not None else (origin.get("channels") if origin else None)
        return rebuild_from_origin(
            origin, eqx.nn.GroupNorm, groups=layer.groups, channels=channels, eps=layer.epsilon,
            channelwise_affine=weight is not None, weight=weight, bias=bias,
        )


def _axes(param: Any) -> tuple[str, ...]:
    value = getattr(param, "value", None)
    return tuple(value.named_shape) if nx.is_namedarray(value) and not value.positional_shape else ()
