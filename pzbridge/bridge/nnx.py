"""Flax NNX lifting and lowering rules, both directions side by side.

Each rule names the ``nnx`` class it lifts and the lifted class(es) it
lowers, and documents the axis naming. A rule lifts a module only when it can
reproduce it exactly (default ``dot_general``, ``precision``, ``dtype`` ...);
otherwise the module stays ``Foreign`` (still correct, children still
lifted). The shared machinery (dispatch, variables, ``Foreign`` templates,
adapters) is in :mod:`pzbridge.bridge.nnx_core`; the lifted subclasses are in
:mod:`pzbridge.bridge.nnx_layers`.

NNX layers act on batched inputs, so a lifted root's calling convention
names only the trailing axes a layer consumes (``features`` for ``Linear``);
leading axes stay positional and pass through every lifted layer.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import pzbridge as pzb
    >>> linear = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    >>> lifted = pzb.lift(linear)
    >>> x = jnp.ones((2, 3))
    >>> bool(jnp.all(lifted.positional(x) == linear(x)))
    True
    >>> lowered = pzb.lower(lifted)
    >>> lowered.kernel is linear.kernel, lowered.kernel.get_raw_value() is linear.kernel.get_raw_value()
    (False, True)
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.equinox_layers import EqxLinear
from pzbridge.bridge.lifted import CallingConvention
from pzbridge.bridge.naming import AxisNaming
from pzbridge.bridge.nnx_core import (
    NNX,
    NnxStatics,
    build_module,
    fresh_statics,
    lift_foreign,
    lift_variable,
    lower_node,
    new_lower_context,
    nnx_rule,
    nnx_variable,
    with_names,
)
from pzbridge.bridge.nnx_layers import (
    LayerDict,
    LayerList,
    NnxEinsum,
    NnxFunction,
    NnxLinear,
    NnxLinearGeneral,
    NnxSequential,
)
from pzbridge.core.errors import LowerError
from pzbridge.core.struct import Struct
from pzbridge.core.variable_base import AbstractVariable
from pzbridge.core.variables import AbstractVariableValue
from pzbridge.nn.basic import Elementwise, NamedEinsum, RenameAxes
from pzbridge.nn.combinators import Sequential
from pzbridge.nn.foreign import Foreign
from pzbridge.nn.linear import AddBias, Affine, Linear, weight_output_name


def lift_root(module: nnx.Module, ctx: LiftContext) -> Any:
    """Lifts the root module of an NNX model (what ``pzb.lift`` calls).

    Example:
        >>> from pzbridge.bridge.nnx_core import new_lift_context
        >>> type(lift_root(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), new_lift_context())).__name__
        'NnxLinear'
    """
    return ctx.lift_node(module, ctx)


def lower_root(body: Any) -> Any:
    """Lowers a lifted body to a new NNX module (what ``pzb.lower`` calls).

    Example:
        >>> from pzbridge.bridge.nnx_core import new_lift_context
        >>> lin = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
        >>> nnx.graphdef(lower_root(lift_root(lin, new_lift_context()))) == nnx.graphdef(lin)
        True
    """
    ctx = new_lower_context()
    return lower_node(body, ctx)


def convention_of(module: Any, naming: AxisNaming) -> CallingConvention | None:
    """The calling convention of a module with a rule that records one, else None.

    Example:
        >>> convention_of(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), AxisNaming()).inputs
        (('features',),)
    """
    rule = NNX.lift_rule_for(type(module))
    return rule.convention(module, naming) if rule is not None and hasattr(rule, "convention") else None


def _statics_equal(module: Any, defaults: NnxStatics, names: Sequence[str]) -> bool:
    for name in names:
        mine, default = getattr(module, name, None), defaults[name]
        if mine is not default and mine != default:
            return False
    return True


@functools.lru_cache(maxsize=None)
def _linear_statics(in_features: int, out_features: int, use_bias: bool) -> NnxStatics:
    return fresh_statics(lambda: nnx.Linear(in_features, out_features, use_bias=use_bias, rngs=nnx.Rngs(0)))


_NUMERIC = ("dtype", "precision", "dot_general", "promote_dtype", "preferred_element_type")


@nnx_rule(source=nnx.Linear, lifted=(NnxLinear, Affine, Linear, EqxLinear))
class LinearRule:
    """``nnx.Linear`` <-> ``NnxLinear([Linear, AddBias])``.

    ``kernel (in, out)`` -> ``{features, features_out}`` (the NNX buffer, not
    transposed); ``bias (out,)`` -> ``{features}``. Non-default numerics
    (``dtype``, ``precision``, ``dot_general`` ...) stay ``Foreign``. Any
    ``Affine`` / ``Linear`` mapping one axis to one axis (e.g. lifted from
    Equinox) lowers to ``nnx.Linear`` too.
    """

    def _supported(self, module: nnx.Linear) -> bool:
        return _statics_equal(module, _linear_statics(1, 1, True), _NUMERIC) and module.kernel.ndim == 2

    def lift(self, module: nnx.Linear, ctx: LiftContext) -> Any:
        if not self._supported(module):
            return lift_foreign(module, ctx)
        f = ctx.naming.features
        kernel = lift_variable(module.kernel, ctx.child("kernel"), (f, f + "_out"))
        layers: list[Any] = [Linear(kernel, (f,), (f,))]
        if module.bias is not None:
            layers.append(AddBias(lift_variable(module.bias, ctx.child("bias"), (f,))))
        return NnxLinear(layers, config=NnxStatics.of(module))

    def convention(self, module: nnx.Linear, naming: AxisNaming) -> CallingConvention | None:
        if not self._supported(module):
            return None
        return CallingConvention(((naming.features,),), (naming.features,))

    def lower(self, layer: Any, ctx: LowerContext) -> Any:
        sublayers = layer.sublayers if isinstance(layer, Sequential) else [layer]
        linear, bias = sublayers[0] if sublayers else None, (sublayers[1] if len(sublayers) > 1 else None)
        if (not isinstance(linear, Linear) or len(sublayers) > 2 or (bias is not None and not isinstance(bias, AddBias))
                or isinstance(layer, EqxLinear) and "scalar" in (layer.in_features, layer.out_features)):
            return SequentialRule().lower(Sequential(list(sublayers)), ctx)
        if len(linear.in_axis_names) != 1 or len(linear.out_axis_names) != 1:
            raise LowerError(
                f"{ctx.where}: nnx.Linear maps one axis to one axis; this Linear maps "
                f"{list(linear.in_axis_names)} -> {list(linear.out_axis_names)}. "
                "Fix: wrap it in pzb.nn.Sequential([...]) to lower it through an adapter, or reshape the axes."
            )
        (f_in,), (f_out,) = linear.in_axis_names, linear.out_axis_names
        kernel = nnx_variable(linear.weights, ctx.child("kernel"), (f_in, weight_output_name(f_out, (f_in,))))
        bias_var = None if bias is None else nnx_variable(bias.bias, ctx.child("bias"), (f_out,))
        config = getattr(layer, "config", None)
        if config is None:
            config = _linear_statics(int(kernel.shape[0]), int(kernel.shape[1]), bias is not None)
        return build_module(nnx.Linear, config, {"kernel": kernel, "bias": bias_var})


def _axis_names(base: str, count: int) -> tuple[str, ...]:
    return (base,) if count == 1 else tuple(f"{base}_{i}" for i in range(count))


@nnx_rule(source=nnx.LinearGeneral, lifted=(NnxLinearGeneral,))
class LinearGeneralRule:
    """``nnx.LinearGeneral`` <-> ``NnxLinearGeneral([Linear, AddBias])``.

    The contracted trailing axes are ``features`` (one) or ``features_0,
    features_1, ...`` (several), likewise the output axes; ``kernel (*in,
    *out)`` keeps its layout (output names clashing with input names get
    ``_out`` inside the kernel). A ``batch_axis``, non-trailing ``axis`` or
    non-default numerics stay ``Foreign``.
    """

    def _names(self, module: nnx.LinearGeneral, naming: AxisNaming) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return (_axis_names(naming.features, len(module.in_features)),
                _axis_names(naming.features, len(module.out_features)))

    def _supported(self, module: nnx.LinearGeneral) -> bool:
        k = len(module.in_features)
        return (not module.batch_axis and tuple(module.axis) == tuple(range(-k, 0))
                and module.dtype is None and module.precision is None and module.dot_general is None
                and module.dot_general_cls is None and module.preferred_element_type is None
                and module.promote_dtype is _linear_statics(1, 1, True)["promote_dtype"])

    def lift(self, module: nnx.LinearGeneral, ctx: LiftContext) -> Any:
        if not self._supported(module):
            return lift_foreign(module, ctx)
        ins, outs = self._names(module, ctx.naming)
        weight_names = (*ins, *(weight_output_name(n, ins) for n in outs))
        layers: list[Any] = [Linear(lift_variable(module.kernel, ctx.child("kernel"), weight_names), ins, outs)]
        if module.bias is not None:
            layers.append(AddBias(lift_variable(module.bias, ctx.child("bias"), outs)))
        return NnxLinearGeneral(layers, config=NnxStatics.of(module))

    def convention(self, module: nnx.LinearGeneral, naming: AxisNaming) -> CallingConvention | None:
        if not self._supported(module):
            return None
        ins, outs = self._names(module, naming)
        return CallingConvention((ins,), outs)

    def lower(self, layer: NnxLinearGeneral, ctx: LowerContext) -> Any:
        linear, bias = layer.sublayers[0], (layer.sublayers[1] if len(layer.sublayers) > 1 else None)
        if layer.config is None or not isinstance(linear, Linear) or len(layer.sublayers) > 2:
            return SequentialRule().lower(Sequential(list(layer.sublayers)), ctx)
        ins, outs = linear.in_axis_names, linear.out_axis_names
        kernel = nnx_variable(linear.weights, ctx.child("kernel"), (*ins, *(weight_output_name(n, ins) for n in outs)))
        bias_var = None if bias is None else nnx_variable(bias.bias, ctx.child("bias"), outs)
        return build_module(nnx.LinearGeneral, layer.config, {"kernel": kernel, "bias": bias_var})


_EINSUM = re.compile(r"^([a-zA-Z]+),([a-zA-Z]+)->([a-zA-Z]+)$")


@functools.lru_cache(maxsize=None)
def _einsum_statics() -> NnxStatics:
    return fresh_statics(lambda: nnx.Einsum("a,ab->b", (1, 1), rngs=nnx.Rngs(0)))


def _einsum_plan(module: nnx.Einsum) -> tuple[str, str, str] | None:
    """``(input, kernel, output)`` letters if the einsum is expressible by name, else None."""
    match = _EINSUM.match(module.einsum_str.replace(" ", ""))
    if match is None:
        return None
    inp, ker, out = match.groups()
    if any(len(set(s)) != len(s) for s in (inp, ker, out)) or not set(out) <= set(inp) | set(ker):
        return None
    only_input = [c for c in inp if c not in ker]
    shared = [c for c in inp if c in ker]
    # Positional (input-only) axes must lead the input and the output in order; named ones trail.
    if list(inp) != only_input + shared or list(out[: len(only_input)]) != only_input:
        return None
    if any(c in only_input for c in out[len(only_input):]):
        return None
    bias = getattr(module, "bias_shape", None)
    if bias is not None and any(c in only_input for c in out[len(out) - len(bias):]):
        return None
    default = _einsum_statics()
    if (module.dtype is not None or module.precision is not None or module.preferred_element_type is not None
            or module.einsum_op is not default["einsum_op"] or module.promote_dtype is not default["promote_dtype"]):
        return None
    return inp, ker, out


@nnx_rule(source=nnx.Einsum, lifted=(NnxEinsum,))
class EinsumRule:
    """``nnx.Einsum`` <-> ``NnxEinsum([NamedEinsum, AddBias])``; axis names are the einsum letters.

    For ``"bta,ahd->bthd"`` the kernel is ``{a, h, d}``, the input's trailing
    ``a`` is contracted, ``b, t`` stay positional, and the output's trailing
    ``h, d`` are named ``h`` and ``d``; the bias covers the output's trailing
    letters. Einsums whose positional letters are not leading (or with
    ``...``, repeated letters, or non-default numerics) stay ``Foreign``.
    """

    def lift(self, module: nnx.Einsum, ctx: LiftContext) -> Any:
        plan = _einsum_plan(module)
        if plan is None:
            return lift_foreign(module, ctx)
        inp, ker, out = plan
        contracted = tuple(c for c in inp if c in ker and c not in out)
        layers: list[Any] = [NamedEinsum((lift_variable(module.kernel, ctx.child("kernel"), tuple(ker)),), contracted)]
        if module.bias is not None:
            layers.append(AddBias(lift_variable(module.bias, ctx.child("bias"), tuple(out[len(out) - module.bias.ndim:]))))
        return NnxEinsum(layers, config=NnxStatics.of(module))

    def convention(self, module: nnx.Einsum, naming: AxisNaming) -> CallingConvention | None:
        plan = _einsum_plan(module)
        if plan is None:
            return None
        inp, ker, out = plan
        return CallingConvention((tuple(c for c in inp if c in ker),), tuple(c for c in out if c in ker))

    def lower(self, layer: NnxEinsum, ctx: LowerContext) -> Any:
        einsum, bias = layer.sublayers[0], (layer.sublayers[1] if len(layer.sublayers) > 1 else None)
        if layer.config is None or not isinstance(einsum, NamedEinsum) or len(einsum.weights) != 1:
            return SequentialRule().lower(Sequential(list(layer.sublayers)), ctx)
        _, ker, out = _EINSUM.match(layer.config["einsum_str"].replace(" ", "")).groups()
        kernel = nnx_variable(einsum.weights[0], ctx.child("kernel"), tuple(ker))
        bias_var = None
        if bias is not None:
            rank = len(layer.config["bias_shape"])
            bias_var = nnx_variable(bias.bias, ctx.child("bias"), tuple(out[len(out) - rank:]))
        return build_module(nnx.Einsum, layer.config, {"kernel": kernel, "bias": bias_var})


ELEMENTWISE_FUNCTIONS: frozenset[Any] = frozenset(
    fn for fn in (
        jax.nn.relu, jax.nn.gelu, jax.nn.silu, jax.nn.swish, jax.nn.sigmoid, jnp.tanh, jax.nn.elu, jax.nn.selu, jax.nn.celu, jax.nn.leaky_relu, jax.nn.softplus, jax.nn.relu6,
        jax.nn.hard_tanh, jax.nn.hard_sigmoid, jax.nn.hard_silu, jax.nn.log_sigmoid, jax.nn.soft_sign,
        jnp.exp, jnp.abs, jnp.square, jnp.sin, jnp.cos,
        nnx.relu, nnx.gelu, nnx.silu, nnx.sigmoid, nnx.tanh, nnx.elu, nnx.softplus, nnx.leaky_relu, nnx.swish,
    ) if fn is not None
)
"""Functions that an ``nnx.Sequential`` item may hold and that lift to ``Elementwise``."""


def _lift_item(item: Any, ctx: LiftContext, *keys: str | int) -> Any:
    if isinstance(item, nnx.Variable) or isinstance(item, jax.Array):
        return lift_variable(item, ctx.child(*keys))
    if isinstance(item, nnx.Module):
        return ctx.lift(item, *keys)
    return item


def _lower_item(item: Any, ctx: LowerContext, *keys: str | int) -> Any:
    if isinstance(item, (AbstractVariable, AbstractVariableValue)):
        return nnx_variable(item, ctx.child(*keys))
    if isinstance(item, Struct):
        return ctx.lower(item, *keys)
    return item


def _io_names(module: Any, naming: AxisNaming) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None]:
    if not isinstance(module, nnx.Module):
        return None, None  # a function: passes names through
    rule = NNX.lift_rule_for(type(module))
    if getattr(rule, "elementwise", False) and convention_of(module, naming) is not None:
        return None, None  # an elementwise layer (Dropout): passes names through
    convention = convention_of(module, naming)
    if convention is None:
        return (), ()
    return (convention.inputs[0] if convention.inputs else ()), convention.output


def _rename_between(produced: tuple[str, ...], consumed: tuple[str, ...]) -> RenameAxes | None:
    """A rename joining one layer's trailing output names to the next layer's input names, if they differ."""
    k = min(len(produced), len(consumed))
    if k == 0 or produced[-k:] == consumed[-k:]:
        return None
    old, new = produced[-k:], consumed[-k:]
    pairs = [(o, n) for o, n in zip(old, new) if o != n]
    kept = set(produced) - {o for o, _ in pairs}
    if any(n in kept for _, n in pairs):
        return None
    return RenameAxes(tuple(o for o, _ in pairs), tuple(n for _, n in pairs))


@nnx_rule(source=nnx.Sequential, lifted=(NnxSequential, Sequential))
class SequentialRule:
    """``nnx.Sequential`` <-> ``NnxSequential`` (layers lifted in order).

    Functions become ``Elementwise`` (known activations, see
    :data:`ELEMENTWISE_FUNCTIONS`) or ``NnxFunction``. Where one layer's
    output names differ from the next layer's input names (``Einsum`` letters
    then ``Linear`` features) a ``RenameAxes`` joins them; lowering drops
    every ``RenameAxes`` (a rename is the identity on positional arrays). A ``Foreign`` item
    consumes the axes the previous known layer produced and names its output
    for the next known layer. Any other pzbridge ``Sequential`` lowers to
    ``nnx.Sequential`` of its lowered sublayers.
    """

    def _plan(self, module: nnx.Sequential, naming: AxisNaming) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
        """``(consumed, produced)`` trailing names per item (functions pass names through)."""
        raw = [_io_names(item, naming) for item in module.layers]
        plan: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
        current: tuple[str, ...] = ()
        for index, (ins, outs) in enumerate(raw):
            if ins is None:
                plan.append((current, current))
            elif ins == () and outs == ():
                following = next((r[0] for r in raw[index + 1:] if r[0]), ())
                plan.append((current, tuple(following)))
            else:
                plan.append((tuple(ins), tuple(outs or ())))
            current = plan[-1][1]
        return plan

    def lift(self, module: nnx.Sequential, ctx: LiftContext) -> NnxSequential:
        plan = self._plan(module, ctx.naming)
        sublayers: list[Any] = []
        current: tuple[str, ...] = ()
        for index, (item, (ins, outs)) in enumerate(zip(module.layers, plan)):
            rename = _rename_between(current, ins)
            if rename is not None:
                sublayers.append(rename)
            current = outs
            if isinstance(item, nnx.Module):
                lifted = ctx.lift(item, "layers", index)
                if isinstance(lifted, Foreign):
                    lifted = with_names(lifted, ins, outs)
            elif item in ELEMENTWISE_FUNCTIONS:
                lifted = Elementwise(item)
            else:
                lifted = NnxFunction(item, ins, outs)
            sublayers.append(lifted)
        return NnxSequential(sublayers, config=NnxStatics.of(module))

    def convention(self, module: nnx.Sequential, naming: AxisNaming) -> CallingConvention:
        plan = self._plan(module, naming)
        if not plan:
            return CallingConvention()
        return CallingConvention((plan[0][0],), plan[-1][1])

    def lower(self, layer: Sequential, ctx: LowerContext) -> nnx.Sequential:
        items = []
        for index, sub in enumerate(layer.sublayers):
            if isinstance(sub, RenameAxes):
                continue  # NNX is positional: a rename is the identity there.
            if isinstance(sub, (Elementwise, NnxFunction)):
                items.append(sub.fn)
            else:
                items.append(ctx.lower(sub, "layers", index))
        return nnx.Sequential(*items)


@nnx_rule(source=nnx.List, lifted=(LayerList,))
class ListRule:
    """``nnx.List`` <-> ``LayerList``: modules and Variables lifted, other items kept as they are."""

    def lift(self, module: nnx.List, ctx: LiftContext) -> LayerList:
        return LayerList([_lift_item(item, ctx, index) for index, item in enumerate(module)])

    def lower(self, layer: LayerList, ctx: LowerContext) -> nnx.List:
        return nnx.List([_lower_item(item, ctx, index) for index, item in enumerate(layer.items)])


@nnx_rule(source=nnx.Dict, lifted=(LayerDict,))
class DictRule:
    """``nnx.Dict`` <-> ``LayerDict``: modules and Variables lifted, other items kept as they are."""

    def lift(self, module: nnx.Dict, ctx: LiftContext) -> LayerDict:
        items = {k: v for k, v in vars(module).items() if not k.startswith("_pytree__")}
        return LayerDict({k: _lift_item(v, ctx, k) for k, v in items.items()})

    def lower(self, layer: LayerDict, ctx: LowerContext) -> nnx.Dict:
        return nnx.Dict({k: _lower_item(v, ctx, k) for k, v in layer.items.items()})


# Rules for further layers live in their own modules; importing them registers them.
from pzbridge.bridge import nnx_attention as _nnx_attention  # noqa: E402,F401
from pzbridge.bridge import nnx_dropout as _nnx_dropout  # noqa: E402,F401
from pzbridge.bridge import nnx_embed as _nnx_embed  # noqa: E402,F401
from pzbridge.bridge import nnx_norm as _nnx_norm  # noqa: E402,F401
from pzbridge.bridge import nnx_conv as _nnx_conv  # noqa: E402,F401
from pzbridge.bridge import nnx_groupnorm as _nnx_groupnorm  # noqa: E402,F401
from pzbridge.bridge import nnx_prelu as _nnx_prelu  # noqa: E402,F401
from pzbridge.bridge import nnx_recurrent as _nnx_recurrent  # noqa: E402,F401
