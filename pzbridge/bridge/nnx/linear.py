"""Flax NNX ``Linear``, ``LinearGeneral`` and ``Einsum``, both directions side by side.

Each rule names the ``nnx`` class it lifts and the lifted class it lowers
(:class:`NnxLinear`, :class:`NnxLinearGeneral`, :class:`NnxEinsum`: named
``Sequential`` subclasses whose static ``config`` carries the NNX statics
back), and documents the axis naming. A rule lifts a module only when it can
reproduce it exactly; otherwise the module stays ``Foreign`` (still correct,
children still lifted). ``nnx.Linear`` with a compute ``dtype``, a
``precision`` or a ``preferred_element_type`` lifts natively to
:class:`NnxPromotedLinear` / :class:`NnxPromotedBias`, which run NNX's own
promotion and ``dot_general``; ``LinearGeneral`` and ``Einsum`` with such
settings, and any layer with a custom ``dot_general`` / ``promote_dtype``,
stay ``Foreign``. The shared machinery is in :mod:`pzbridge.bridge.nnx.traversal`,
:mod:`~pzbridge.bridge.nnx.variables` and :mod:`~pzbridge.bridge.nnx.statics`.

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
    >>> bool(jnp.allclose(lifted.positional(x), linear(x), atol=1e-6))
    True
    >>> lowered = pzb.lower(lifted)
    >>> lowered.kernel is linear.kernel, lowered.kernel.get_raw_value() is linear.kernel.get_raw_value()
    (False, True)
    >>> half = nnx.Linear(3, 4, dtype=jnp.bfloat16, precision="highest", rngs=nnx.Rngs(0))
    >>> [type(layer).__name__ for layer in pzb.lift(half).body.sublayers]
    ['NnxPromotedLinear', 'NnxPromotedBias']
    >>> pzb.lift(half).positional(x).dtype, nnx.graphdef(pzb.lower(pzb.lift(half))) == nnx.graphdef(half)
    (dtype(bfloat16), True)
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from flax import nnx

from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.equinox.adapter import EquinoxAdapterRule
from pzbridge.bridge.equinox.linear import EqxLinear
from pzbridge.bridge.equinox.traversal import EQUINOX
from pzbridge.bridge.lifted import CallingConvention
from pzbridge.bridge.naming import AxisNaming
from pzbridge.bridge.nnx.containers import SequentialRule
from pzbridge.bridge.nnx.statics import NnxStatics, build_module, fresh_statics
from pzbridge.bridge.nnx.traversal import lift_foreign, nnx_rule
from pzbridge.bridge.nnx.variables import lift_variable, nnx_variable
from pzbridge.core import named_axes as nx
from pzbridge.core.errors import LowerError
from pzbridge.core.named_axes_core import make_named
from pzbridge.core.named_axes_ops import map_data
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.basic import NamedEinsum
from pzbridge.nn.combinators import Sequential
from pzbridge.nn.contraction import contract, data_layout
from pzbridge.nn.linear import AddBias, Affine, Linear, weight_output_name
from pzbridge.toolshed.lora import LowRankAdapter


@pytree_dataclass
class NnxDenseGroup(Sequential):
    """The lifted NNX dense layers: ``[Linear or NamedEinsum, AddBias?]`` plus the module's NNX statics.

    With LoRA, ``[LowRankAdapter(base), AddBias]``, the group computes as the
    NNX module it lowers to (``nnx.LoRALinear``, ``LoRALinearGeneral``,
    ``LoRAEinsum``) does: ``bias(base(x)) + update(x)``, the update added
    *after* the bias. The order matters when the layer computes in a narrower
    dtype than its adapters (``dtype=bfloat16`` with float32 LoRA parameters:
    NNX rounds ``base(x) + bias`` to bfloat16 first).

    Attributes:
      config: The original module's static attributes (static; ``None`` for
        layers created in pzbridge).

    Example:
        >>> NnxDenseGroup([]).config is None
        True
    """

    config: Any = static_field(default=None)

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        sublayers = self.sublayers
        if len(sublayers) == 2 and isinstance(sublayers[0], LowRankAdapter) and isinstance(sublayers[1], AddBias):
            adapter, bias = sublayers
            return bias(adapter.base(x, **side_inputs), **side_inputs) + adapter.update(x)
        return super().__call__(x, **side_inputs)


@pytree_dataclass
class NnxLinear(NnxDenseGroup):
    """``nnx.Linear`` lifted: ``[Linear]`` or ``[Linear, AddBias]`` plus the NNX statics (see :class:`NnxDenseGroup`).

    Example:
        >>> NnxLinear([]).config is None
        True
    """


@pytree_dataclass
class NnxLinearGeneral(NnxDenseGroup):
    """``nnx.LinearGeneral`` lifted: ``[Linear, AddBias?]`` over several input / output axes.

    Example:
        >>> NnxLinearGeneral([]).sublayers
        []
    """


@pytree_dataclass
class NnxEinsum(NnxDenseGroup):
    """``nnx.Einsum`` lifted: ``[NamedEinsum, AddBias?]`` with one axis name per einsum letter.

    Example:
        >>> NnxEinsum([]).config is None
        True
    """


def nnx_compute_dtype(dtype: Any, *arrays: Any) -> Any:
    """The dtype NNX's default ``promote_dtype`` casts to: ``dtype``, or the arrays' promoted (inexact) type.

    This is ``flax.nnx.nn.dtypes.canonicalize_dtype``: ``None`` entries are
    ignored, an integer result is promoted with ``float32``.

    Args:
      dtype: The layer's ``dtype`` (None: infer).
      *arrays: The arrays (or None) the layer promotes together.

    Returns:
      The compute dtype.

    Example:
        >>> nnx_compute_dtype(None, jnp.ones(2, jnp.bfloat16), jnp.ones(2)), nnx_compute_dtype(jnp.float16, jnp.ones(2))
        (dtype('float32'), <class 'jax.numpy.float16'>)
    """
    if dtype is None:
        dtype = jnp.result_type(*(a for a in arrays if a is not None))
        if not jnp.issubdtype(dtype, jnp.inexact):
            dtype = jnp.promote_types(jnp.float32, dtype)
    return dtype


def _cast(x: nx.NamedArrayBase, dtype: Any) -> nx.NamedArrayBase:
    # ``jnp.asarray`` as NNX's promote_dtype does: no operation at all when the dtype already matches.
    return map_data(lambda data: jnp.asarray(data, dtype), x)


@pytree_dataclass
class NnxPromotedLinear(Linear):
    """A ``Linear`` computing as ``nnx.Linear`` with non-default numerics.

    Like NNX, it casts the input and the weight to the compute dtype (``dtype``,
    or their promoted type when ``dtype`` is None) and runs one ``dot_general``
    with ``precision`` and ``preferred_element_type``. The weight keeps its
    stored dtype (NNX's ``param_dtype``); only the computation is cast.

    Attributes:
      dtype: NNX's ``dtype`` (static; None: promote input and weight).
      precision: NNX's ``precision`` (static).
      preferred_element_type: NNX's ``preferred_element_type`` (static).

    Example:
        >>> import pzbridge as pzb
        >>> w = pzb.Parameter(pzb.nx.wrap(jnp.ones((2, 3)), "features", "features_out"), "w")
        >>> lin = NnxPromotedLinear(w, ("features",), ("features",), dtype=jnp.bfloat16)
        >>> lin(pzb.nx.wrap(jnp.ones(2), "features")).unwrap("features")
        Array([2, 2, 2], dtype=bfloat16)
    """

    dtype: Any = static_field(default=None)
    precision: Any = static_field(default=None)
    preferred_element_type: Any = static_field(default=None)

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        weights = self.weights.value
        self._check_input(x, weights)
        dtype = nnx_compute_dtype(self.dtype, x.data_array, weights.data_array)
        return contract([_cast(x, dtype), _cast(weights, dtype)], self.in_axis_names, self._output_rename(),
                        precision=self.precision, preferred_element_type=self.preferred_element_type)


@pytree_dataclass
class NnxPromotedBias(AddBias):
    """An ``AddBias`` that casts the bias as ``nnx.Linear`` does before adding it.

    The bias is cast to ``dtype`` (None: to the incoming array's dtype, which
    is NNX's compute dtype when no ``preferred_element_type`` is set) and, for
    a one-axis bias on the trailing data axis, added as NNX adds it
    (``y + reshape(bias, (1, ..., 1, -1))``), so the program is NNX's own.

    Attributes:
      dtype: NNX's ``dtype`` (static).

    Example:
        >>> import pzbridge as pzb
        >>> b = pzb.Parameter(pzb.nx.wrap(jnp.array([0.5, 1.0]), "features"), "b")
        >>> NnxPromotedBias(b, dtype=jnp.float16)(pzb.nx.zeros({"features": 2}, jnp.float16)).unwrap("features")
        Array([0.5, 1. ], dtype=float16)
    """

    dtype: Any = static_field(default=None)

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        bias = self.bias.value
        dtype = x.dtype if self.dtype is None else self.dtype
        if isinstance(bias, nx.NamedArray) and len(bias.named_axes) == 1:
            data, positional, names = data_layout(x)
            (name,) = tuple(bias.named_axes)
            if names.get(name) == data.ndim - 1:
                flat = jnp.reshape(jnp.asarray(bias.data_array, dtype), (1,) * (data.ndim - 1) + (-1,))
                return make_named(data + flat, positional, names)
        return x + _cast(bias, dtype)


# Lowering these to Equinox as eqx.nn.Linear would drop the numerics: the adapter runs them exactly.
EQUINOX.add(EquinoxAdapterRule(), lifted=(NnxPromotedLinear, NnxPromotedBias))


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
_PROMOTED = ("dtype", "precision", "preferred_element_type")  # settings NnxPromotedLinear reproduces


def _raw_dtype(variable: Any) -> Any:
    return None if variable is None else variable.get_raw_value().dtype


def _numerics_of(linear: Linear) -> dict[str, Any]:
    """``dtype`` / ``precision`` / ``preferred_element_type`` a lifted linear computes with (None: NNX default)."""
    return {name: getattr(linear, name, None) for name in _PROMOTED}


def _bias_expressible(numerics: dict[str, Any], bias: AddBias | None, kernel_dtype: Any, bias_dtype: Any) -> bool:
    """Whether ``nnx.Linear`` with these numerics adds this bias exactly as the lifted bias layer does.

    NNX casts the bias to the compute dtype of ``(input, kernel, bias)`` before
    adding it. With ``dtype`` set that is ``dtype`` (an ``NnxPromotedBias``
    with the same ``dtype`` does the same). With ``dtype`` None it is the
    dot's dtype only when the bias has the kernel's dtype and no
    ``preferred_element_type`` changes the dot's output dtype.
    """
    if bias is None:
        return True
    dtype = numerics["dtype"]
    if dtype is not None:
        return isinstance(bias, NnxPromotedBias) and bias.dtype == dtype
    return (getattr(bias, "dtype", None) is None and numerics["preferred_element_type"] is None
            and bias_dtype == kernel_dtype)


@nnx_rule(source=nnx.Linear, lifted=(NnxLinear, Affine, Linear, EqxLinear))
class LinearRule:
    """``nnx.Linear`` <-> ``NnxLinear([Linear, AddBias])``.

    ``kernel (in, out)`` -> ``{features, features_out}`` (the NNX buffer, not
    transposed); ``bias (out,)`` -> ``{features}``. Any ``Affine`` / ``Linear``
    mapping one axis to one axis (e.g. lifted from Equinox) lowers to
    ``nnx.Linear`` too.

    Numerics: with NNX's defaults (``dtype``, ``precision`` and
    ``preferred_element_type`` None, a float32 kernel) the layers are a plain
    ``Linear`` and ``AddBias``. Otherwise they are :class:`NnxPromotedLinear` and
    :class:`NnxPromotedBias`, which cast input, kernel and bias to the compute
    dtype and run the dot with NNX's ``precision`` and
    ``preferred_element_type``: the same program as ``nnx.Linear.__call__``.
    Any ``param_dtype`` and ``use_bias`` lift; ``param_dtype`` and the other
    statics are kept in ``config``, so ``lower(lift(m))`` has ``m``'s graphdef.
    On lowering, the numerics come from the lifted layers (an edit of them
    reaches the ``nnx.Linear``).

    Kept ``Foreign`` (NNX code runs, exact): a custom ``dot_general`` or
    ``promote_dtype`` function (pzbridge cannot see what it computes), a
    kernel that is not 2-d, and, with ``dtype=None``, a bias whose dtype
    differs from the kernel's or a bias together with a
    ``preferred_element_type`` (NNX then adds the bias in a dtype inferred
    from the input, which the bias layer does not see).
    """

    def _supported(self, module: nnx.Linear) -> bool:
        defaults = _linear_statics(1, 1, True)
        if not _statics_equal(module, defaults, ("dot_general", "promote_dtype")) or module.kernel.ndim != 2:
            return False
        if module.dtype is None and module.bias is not None:
            return (_raw_dtype(module.bias) == _raw_dtype(module.kernel)
                    and module.preferred_element_type is None)
        return True

    def lift(self, module: nnx.Linear, ctx: LiftContext) -> Any:
        if not self._supported(module):
            return lift_foreign(module, ctx)
        f = ctx.naming.features
        kernel = lift_variable(module.kernel, ctx.child("kernel"), (f, f + "_out"))
        bias = None if module.bias is None else lift_variable(module.bias, ctx.child("bias"), (f,))
        numerics = {name: getattr(module, name) for name in _PROMOTED}
        layers: list[Any]
        if all(value is None for value in numerics.values()) and _raw_dtype(module.kernel) == jnp.float32:
            layers = [Linear(kernel, (f,), (f,))] + ([] if bias is None else [AddBias(bias)])
        else:
            layers = [NnxPromotedLinear(kernel, (f,), (f,), **numerics)]
            layers += [] if bias is None else [NnxPromotedBias(bias, dtype=module.dtype)]
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
        numerics = _numerics_of(linear)
        if not _bias_expressible(numerics, bias, linear.weights.value.dtype,
                                 None if bias is None else bias.bias.value.dtype):
            # Linear and bias separately: an nnx.Linear without bias, then the bias layer as an adapter.
            return SequentialRule().lower(Sequential(list(sublayers)), ctx)
        (f_in,), (f_out,) = linear.in_axis_names, linear.out_axis_names
        kernel = nnx_variable(linear.weights, ctx.child("kernel"), (f_in, weight_output_name(f_out, (f_in,))))
        bias_var = None if bias is None else nnx_variable(bias.bias, ctx.child("bias"), (f_out,))
        config = getattr(layer, "config", None)
        if config is None:
            config = _linear_statics(int(kernel.shape[0]), int(kernel.shape[1]), bias is not None)
        # The lifted layers decide what the module computes; untouched values keep the original objects.
        wanted = {**numerics, "use_bias": bias is not None}
        changed = {name: value for name, value in wanted.items() if not _statics_equal_value(config[name], value)}
        if changed:
            config = config.replace(**changed)
        return build_module(nnx.Linear, config, {"kernel": kernel, "bias": bias_var})


def _statics_equal_value(mine: Any, other: Any) -> bool:
    return mine is other or (type(mine) is type(other) and mine == other)


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
