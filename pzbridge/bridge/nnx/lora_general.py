"""LoRA <-> Flax NNX for ``nnx.LinearGeneral`` and ``nnx.Einsum``.

NNX ships a native LoRA class only for ``nnx.Linear`` (``nnx.LoRALinear``,
see :mod:`pzbridge.bridge.nnx.lora`). For the multi-axis layers this module
provides two small genuine ``nnx.Module`` s, :class:`LoRALinearGeneral` and
:class:`LoRAEinsum`. Each keeps the original layer as ``base`` (built exactly
as the lifted base lowers, so its graphdef is the original one) and adds
``lora_a`` / ``lora_b`` as ``nnx.LoRAParam`` s, so
``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` trains only the adapters.

Why a wrapper and not a subclass: keeping ``base`` untouched means merging
only has to drop the wrapper, and re-lifting reuses the existing
``LinearGeneral`` / ``Einsum`` rules for the base (same labels, same axis
names).

Axis layouts (the adapter's named axes mapped to NNX positions):

- ``LinearGeneral``: ``lora_a (*in, rank)``, ``lora_b (rank, *out)``; the
  update is ``tensordot(tensordot(x, A, len(in)), B, 1)``.
- ``Einsum "inp,ker->out"``: ``lora_a`` holds the contracted letters (kernel
  order) then ``rank``; ``lora_b`` holds ``rank`` then every other kernel
  letter (kernel order). Kernel letters also present in the input and the
  output (per-head weights) stay elementwise in the update, as in the base.

Unlike ``nnx.LoRA`` the modules keep ``alpha`` (static) and scale the update
by ``alpha / rank``, so a re-lifted adapter has the same ``alpha``.

Calling: each wrapper accepts what its base's ``__call__`` accepts, because
NNX code calls the layer in the base's place that way (flax's
``nnx.MultiHeadAttention`` calls its projections as
``self.query(x, out_sharding=...)``). ``out_sharding`` goes to the base and to
the adapter's last contraction, so both terms of the sum come out with the
requested sharding (under explicit sharding, adding differently sharded arrays
is an error); the rank-sized hidden array keeps JAX's default sharding.
``LoRAEinsum`` also takes the base's call-time ``einsum_str``.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import pzbridge as pzb
    >>> from pzbridge.toolshed.lora import loraify_linears_in_selection
    >>> lg = nnx.LinearGeneral((2, 3), 4, axis=(-2, -1), rngs=nnx.Rngs(0))
    >>> edited = loraify_linears_in_selection(pzb.select(pzb.lift(lg)).at_instances_of(pzb.nn.Linear), 2,
    ...                                       jax.random.key(1))
    >>> lowered = pzb.lower(edited)
    >>> type(lowered).__name__, type(lowered.lora_a).__name__, lowered.lora_a.shape, lowered.lora_b.shape
    ('LoRALinearGeneral', 'LoRAParam', (2, 3, 2), (2, 4))
"""

from __future__ import annotations

import dataclasses
import re
import string
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.lifted import CallingConvention
from pzbridge.bridge.naming import AxisNaming
from pzbridge.bridge.nnx.linear import NnxEinsum, NnxLinearGeneral
from pzbridge.bridge.nnx.lora import _lora_param
from pzbridge.bridge.nnx.traversal import NNX, lift_foreign
from pzbridge.bridge.nnx.variables import lift_variable
from pzbridge.core.errors import LowerError, NamedAxisError
from pzbridge.nn.basic import NamedEinsum
from pzbridge.nn.linear import Linear, weight_output_name
from pzbridge.toolshed.lora import RANK_AXIS, LowRankAdapter

_EINSUM = re.compile(r"^([a-zA-Z]+),([a-zA-Z]+)->([a-zA-Z]+)$")


def _scaled(update: jax.Array, alpha: float, rank: int) -> jax.Array:
    scale = float(alpha) / rank
    # Same arithmetic as the lifted LowRankAdapter: no multiply when the scale is 1.
    return update if scale == 1.0 else update * jnp.asarray(scale, update.dtype)


class LoRALinearGeneral(nnx.Module):
    """An ``nnx.LinearGeneral`` plus a low-rank update ``(alpha / rank) * (x . A) . B``.

    Args:
      base: The ``nnx.LinearGeneral`` (contracting the trailing ``len(in_features)`` axes).
      lora_a: ``nnx.LoRAParam`` of shape ``(*in_features, rank)``.
      lora_b: ``nnx.LoRAParam`` of shape ``(rank, *out_features)``.
      alpha: Scaling numerator (static).

    Example:
        >>> import jax.numpy as jnp
        >>> base = nnx.LinearGeneral(2, (2, 2), rngs=nnx.Rngs(0))
        >>> m = LoRALinearGeneral(base, nnx.LoRAParam(jnp.ones((2, 1))), nnx.LoRAParam(jnp.ones((1, 2, 2))), alpha=1.0)
        >>> x = jnp.array([[1.0, 2.0]])
        >>> bool(jnp.allclose(m(x), base(x) + 3.0))
        True
    """

    def __init__(self, base: nnx.LinearGeneral, lora_a: nnx.LoRAParam, lora_b: nnx.LoRAParam, *,
                 alpha: float) -> None:
        self.base = base
        self.lora_a = lora_a
        self.lora_b = lora_b
        self.alpha = float(alpha)

    def __call__(self, x: jax.Array, out_sharding: Any = None) -> jax.Array:
        """``base(x) + (alpha / rank) * (x . A) . B``.

        Args:
          x: The input (any leading axes, the base's ``in_features`` trailing).
          out_sharding: As for ``nnx.LinearGeneral``: the output's sharding,
            passed to the base's ``dot_general`` and to the update's last
            contraction.

        Returns:
          The output, shaped as the base's.
        """
        a, b = self.lora_a[...], self.lora_b[...]
        hidden = jnp.tensordot(x, a, axes=a.ndim - 1)
        update = jnp.tensordot(hidden, b, axes=1, out_sharding=out_sharding)
        return self.base(x, out_sharding=out_sharding) + _scaled(update, self.alpha, a.shape[-1])


def einsum_lora_specs(einsum_str: str) -> tuple[str, str]:
    """The two einsums of the LoRA update for an ``nnx.Einsum`` string: ``(x . A, hidden . B)``.

    Args:
      einsum_str: The base's ``"inp,ker->out"`` string (letters only).

    Returns:
      ``(first, second)``: ``first`` maps the input and ``A`` to the hidden
      array, ``second`` maps the hidden array and ``B`` to the output.

    Raises:
      LowerError: If the string is not of the ``"inp,ker->out"`` letters form.

    Example:
        >>> einsum_lora_specs("bsha,had->bshd")
        ('bsha,aA->bshA', 'bshA,Ahd->bshd')
    """
    match = _EINSUM.match(einsum_str.replace(" ", ""))
    if match is None:
        raise LowerError(
            f"LoRAEinsum: expected an einsum of the form 'inp,ker->out' (letters only), found {einsum_str!r}. "
            "Fix: adapt only nnx.Einsum layers that pzbridge lifts natively (no '...')."
        )
    inp, ker, out = match.groups()
    contracted = [c for c in ker if c in inp and c not in out]
    others = [c for c in ker if c not in contracted]
    rank = next(c for c in string.ascii_uppercase + string.ascii_lowercase if c not in inp + ker + out)
    hidden = "".join(c for c in inp if c not in contracted) + rank
    return f"{inp},{''.join(contracted)}{rank}->{hidden}", f"{hidden},{rank}{''.join(others)}->{out}"


class LoRAEinsum(nnx.Module):
    """An ``nnx.Einsum`` plus a low-rank update ``(alpha / rank) * (x . A) . B``.

    ``A`` holds the contracted letters (in kernel order) then the rank; ``B``
    holds the rank then the other kernel letters (see :func:`einsum_lora_specs`).

    Args:
      base: The ``nnx.Einsum``.
      lora_a: ``nnx.LoRAParam`` (contracted axes, rank).
      lora_b: ``nnx.LoRAParam`` (rank, other kernel axes).
      alpha: Scaling numerator (static).

    Example:
        >>> import jax.numpy as jnp
        >>> base = nnx.Einsum("ba,ad->bd", (2, 3), rngs=nnx.Rngs(0))
        >>> m = LoRAEinsum(base, nnx.LoRAParam(jnp.ones((2, 1))), nnx.LoRAParam(jnp.ones((1, 3))), alpha=1.0)
        >>> x = jnp.array([[1.0, 2.0]])
        >>> bool(jnp.allclose(m(x), base(x) + 3.0))
        True
    """

    def __init__(self, base: nnx.Einsum, lora_a: nnx.LoRAParam, lora_b: nnx.LoRAParam, *, alpha: float) -> None:
        einsum_lora_specs(base.einsum_str)  # fail early on unsupported strings
        self.base = base
        self.lora_a = lora_a
        self.lora_b = lora_b
        self.alpha = float(alpha)

    def __call__(self, x: jax.Array, einsum_str: str | None = None, out_sharding: Any = None) -> jax.Array:
        """``base(x) + (alpha / rank) * (x . A) . B``.

        Args:
          x: The input.
          einsum_str: As for ``nnx.Einsum``: a call-time equation replacing the
            base's. It must contract the same kernel axes (``A`` and ``B`` are
            laid out for those).
          out_sharding: As for ``nnx.Einsum``: the output's sharding, passed
            to the base's einsum and to the update's last einsum.

        Returns:
          The output, shaped as the base's.

        Raises:
          NamedAxisError: If ``einsum_str`` contracts other kernel axes than the base's.
        """
        equation = self.base.einsum_str if einsum_str is None else _checked_equation(self.base.einsum_str, einsum_str)
        first, second = einsum_lora_specs(equation)
        a, b = self.lora_a[...], self.lora_b[...]
        update = jnp.einsum(second, jnp.einsum(first, x, a), b, out_sharding=out_sharding)
        return self.base(x, einsum_str, out_sharding=out_sharding) + _scaled(update, self.alpha, a.shape[-1])


def _contracted_kernel_positions(einsum_str: str) -> tuple[int, ...] | None:
    match = _EINSUM.match(einsum_str.replace(" ", ""))
    if match is None:
        return None
    inp, ker, out = match.groups()
    return tuple(i for i, c in enumerate(ker) if c in inp and c not in out)


def _checked_equation(base_str: str, call_str: str) -> str:
    """``call_str`` if it contracts the same kernel positions as ``base_str`` (so ``A`` / ``B`` fit it)."""
    call_str = call_str.replace(" ", "")
    if call_str == base_str.replace(" ", ""):
        return call_str
    positions, expected = _contracted_kernel_positions(call_str), _contracted_kernel_positions(base_str)
    if positions is None or positions != expected:
        raise NamedAxisError(
            f"LoRAEinsum: the call's einsum_str {call_str!r} contracts kernel positions {positions}, but the "
            f"adapter was built for {base_str!r}, which contracts {expected} (lora_a holds those kernel axes). "
            "Fix: call with an equation contracting the same kernel axes, or merge the adapter first "
            "(pzb.toolshed.merge_lora) and lower the plain nnx.Einsum."
        )
    return call_str


def _linear_general_names(linear: Linear, rank_axis: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    ins = linear.in_axis_names
    return (*ins, rank_axis), (rank_axis, *(weight_output_name(n, ins) for n in linear.out_axis_names))


def _einsum_names(einsum_str: str, rank_axis: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    first, second = einsum_lora_specs(einsum_str)
    a_letters = first.split(",")[1].split("->")[0]
    b_letters = second.split(",")[1].split("->")[0]
    return (*a_letters[:-1], rank_axis), (rank_axis, *b_letters[1:])


class _LoRAGeneralLowerRule:
    """``NnxLinearGeneral`` / ``NnxEinsum`` whose first layer is a ``LowRankAdapter`` -> LoRA module."""

    def __init__(self, previous: Any, base_cls: type, lora_cls: type, base_layer_cls: type) -> None:
        self.previous, self.base_cls, self.lora_cls, self.base_layer_cls = previous, base_cls, lora_cls, base_layer_cls

    def lower(self, layer: Any, ctx: LowerContext) -> Any:
        sublayers = layer.sublayers
        if not sublayers or not isinstance(sublayers[0], LowRankAdapter):
            return self.previous.lower(layer, ctx)
        adapter = sublayers[0]
        if layer.config is None or not isinstance(adapter.base, self.base_layer_cls):
            raise LowerError(
                f"{ctx.where}: a LowRankAdapter inside {type(layer).__name__} lowers to {self.lora_cls.__name__} "
                f"only when the layer came from {self.base_cls.__name__} (config recorded) and the adapter's base "
                f"is a {self.base_layer_cls.__name__}; found config={'None' if layer.config is None else 'set'}, "
                f"base {type(adapter.base).__name__}. Fix: adapt layers lifted from NNX, or wrap the adapter in "
                "pzb.nn.Sequential([...]) to lower it through an adapter module."
            )
        base = self.previous.lower(dataclasses.replace(layer, sublayers=[adapter.base, *sublayers[1:]]),
                                   ctx.child("base"))
        if type(base) is not self.base_cls:
            raise LowerError(
                f"{ctx.where}: the LoRA base here must lower to {self.base_cls.__name__}, found "
                f"{type(base).__name__}. Fix: adapt only layers that lower to a plain {self.base_cls.__name__}."
            )
        if self.base_cls is nnx.LinearGeneral:
            a_names, b_names = _linear_general_names(adapter.base, adapter.rank_axis)
        else:
            a_names, b_names = _einsum_names(layer.config["einsum_str"], adapter.rank_axis)
        a = _lora_param(adapter.lora_a, ctx.child("lora_a"), a_names, 1.0)
        b = _lora_param(adapter.lora_b, ctx.child("lora_b"), b_names, 1.0)
        return self.lora_cls(base, a, b, alpha=adapter.alpha)


class _LoRAGeneralLiftRule:
    """LoRA module -> ``Nnx{LinearGeneral,Einsum}([LowRankAdapter(base layer), AddBias?])``.

    The base is lifted by its own rule at the wrapper's path, so labels are
    ``<path>.kernel``, ``<path>.bias``, ``<path>.lora_a``, ``<path>.lora_b``
    (what ``loraify_linears_in_selection`` gives). A base the rule would keep
    ``Foreign`` keeps the whole wrapper ``Foreign``.
    """

    def __init__(self, base_cls: type) -> None:
        self.base_cls = base_cls

    def _base_rule(self) -> Any:
        return NNX.lift_rule_for(self.base_cls)

    def lift(self, module: Any, ctx: LiftContext) -> Any:
        rule = self._base_rule()
        if rule.convention(module.base, ctx.naming) is None:
            return lift_foreign(module, ctx)
        lifted = rule.lift(module.base, ctx)
        inner = lifted.sublayers[0]
        if isinstance(inner, Linear):
            a_names, b_names = _linear_general_names(inner, RANK_AXIS)
        else:
            a_names, b_names = _einsum_names(module.base.einsum_str, RANK_AXIS)
        a = lift_variable(module.lora_a, ctx.child("lora_a"), a_names)
        b = lift_variable(module.lora_b, ctx.child("lora_b"), b_names)
        adapter = LowRankAdapter(inner, a, b, alpha=float(module.alpha))
        return dataclasses.replace(lifted, sublayers=[adapter, *lifted.sublayers[1:]])

    def convention(self, module: Any, naming: AxisNaming) -> CallingConvention | None:
        return self._base_rule().convention(module.base, naming)


NNX.add(_LoRAGeneralLiftRule(nnx.LinearGeneral), source=LoRALinearGeneral)


NNX.add(_LoRAGeneralLiftRule(nnx.Einsum), source=LoRAEinsum)


NNX.add(_LoRAGeneralLowerRule(NNX.lower_rule_for(NnxLinearGeneral), nnx.LinearGeneral, LoRALinearGeneral, Linear),
        lifted=(NnxLinearGeneral,))


NNX.add(_LoRAGeneralLowerRule(NNX.lower_rule_for(NnxEinsum), nnx.Einsum, LoRAEinsum, NamedEinsum),
        lifted=(NnxEinsum,))
