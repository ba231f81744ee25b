"""Flax NNX ``Linear``, ``LinearGeneral`` and ``Einsum``, both directions side by side.

Each rule names the ``nnx`` class it lifts and the lifted class it lowers
(:class:`NnxLinear`, :class:`NnxLinearGeneral`, :class:`NnxEinsum`: named
``Sequential`` subclasses whose static ``config`` carries the NNX statics
back), and documents the axis naming. A rule lifts a module only when it can
reproduce it exactly; otherwise the module stays ``Foreign`` (still correct,
children still lifted). A layer with a compute ``dtype``, a ``precision``, a
``preferred_element_type`` or non-float32 parameters lifts natively to
:class:`NnxPromotedLinear` (``Linear``, ``LinearGeneral``) or
:class:`NnxPromotedEinsum` (``Einsum``), plus :class:`NnxPromotedBias`: they
run NNX's own promotion (``promote_dtype``), its ``dot_general`` / einsum
with ``precision`` and ``preferred_element_type``, and add the bias as NNX
does. Only a layer with a custom ``dot_general`` / ``einsum_op`` /
``promote_dtype`` function (pzbridge cannot see what it computes), or one
whose bias NNX adds in a dtype the bias layer cannot know (see
:func:`bias_dtype_fixed`), stays ``Foreign``. The shared machinery is in
:mod:`pzbridge.bridge.nnx.traversal`, :mod:`~pzbridge.bridge.nnx.variables`
and :mod:`~pzbridge.bridge.nnx.statics`.

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
    >>> general = nnx.LinearGeneral((2, 3), 4, axis=(-2, -1), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    >>> [type(layer).__name__ for layer in pzb.lift(general).body.sublayers]
    ['NnxPromotedLinear', 'NnxPromotedBias']
    >>> bool((pzb.lift(general).positional(jnp.ones((5, 2, 3))) == general(jnp.ones((5, 2, 3)))).all())
    True
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
from pzbridge.bridge.equinox.adapter import EquinoxAdapterRule
from pzbridge.bridge.equinox.linear import EqxLinear
from pzbridge.bridge.equinox.traversal import EQUINOX
from pzbridge.bridge.lifted import CallingConvention
from pzbridge.bridge.naming import AxisNaming
from pzbridge.bridge.nnx.adapter import NnxAdapter
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
    """A ``Linear`` computing as ``nnx.Linear`` / ``nnx.LinearGeneral`` with non-default numerics.

    Like NNX, it casts the input and the weight to the compute dtype (``dtype``,
    or their promoted type when ``dtype`` is None) and runs one ``dot_general``
    with ``precision`` and ``preferred_element_type``, contracting every input
    axis at once (several for ``LinearGeneral``). The weight keeps its stored
    dtype (NNX's ``param_dtype``); only the computation is cast.

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
class NnxPromotedEinsum(NamedEinsum):
    """A ``NamedEinsum`` computing as ``nnx.Einsum`` with non-default numerics.

    Casts the input and the weights to the compute dtype as
    :class:`NnxPromotedLinear` does (``dtype``, or their promoted type) and
    runs one einsum with ``precision`` and ``preferred_element_type``.

    Attributes:
      dtype: NNX's ``dtype`` (static; None: promote input and weights).
      precision: NNX's ``precision`` (static).
      preferred_element_type: NNX's ``preferred_element_type`` (static).

    Example:
        >>> import pzbridge as pzb
        >>> w = pzb.Parameter(pzb.nx.ones({"a": 2, "d": 3}), "w")
        >>> NnxPromotedEinsum((w,), ("a",), dtype=jnp.float16)(pzb.nx.ones({"a": 2})).unwrap("d")
        Array([2., 2., 2.], dtype=float16)
    """

    dtype: Any = static_field(default=None)
    precision: Any = static_field(default=None)
    preferred_element_type: Any = static_field(default=None)

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        values = [w.value for w in self.weights]
        dtype = nnx_compute_dtype(self.dtype, x.data_array, *(v.data_array for v in values))
        return contract([_cast(x, dtype), *(_cast(v, dtype) for v in values)], self.contract_axes,
                        dict(self.rename), precision=self.precision,
                        preferred_element_type=self.preferred_element_type)


def _trailing_data(bias: Any, names: dict[str, int], ndim: int) -> jax.Array | None:
    """The bias's data if its axes are the trailing data axes of ``names``' array, in the same order."""
    if not nx.is_namedarray(bias) or bias.positional_shape or not bias.named_shape:
        return None
    data, _, bias_names = data_layout(bias)
    order = sorted(bias_names, key=bias_names.__getitem__)  # the bias's names in its data order
    if [names.get(name) for name in order] != list(range(ndim - data.ndim, ndim)):
        return None
    return data


@pytree_dataclass
class NnxPromotedBias(AddBias):
    """An ``AddBias`` that casts the bias as NNX's dense layers do before adding it.

    The bias is cast to ``dtype`` (None: to the incoming array's dtype, which
    is NNX's compute dtype when no ``preferred_element_type`` is set) and,
    when its axes are the incoming array's trailing data axes in its own
    order, added as NNX adds it (``y + reshape(bias, (1, ..., 1, *bias.shape))``),
    so the program is NNX's own; otherwise it is added by name.

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
        data, positional, names = data_layout(x)
        trailing = _trailing_data(bias, names, data.ndim)
        if trailing is None:
            return x + _cast(bias, dtype)
        flat = jnp.reshape(jnp.asarray(trailing, dtype), (1,) * (data.ndim - trailing.ndim) + trailing.shape)
        return make_named(data + flat, positional, names)


# Lowering these to Equinox as eqx.nn.Linear would drop the numerics: the adapter runs them exactly.
EQUINOX.add(EquinoxAdapterRule(), lifted=(NnxPromotedLinear, NnxPromotedEinsum, NnxPromotedBias))


def _statics_equal(module: Any, defaults: NnxStatics, names: Sequence[str]) -> bool:
    for name in names:
        mine, default = getattr(module, name, None), defaults[name]
        if mine is not default and mine != default:
            return False
    return True


@functools.lru_cache(maxsize=None)
def _linear_statics(in_features: int, out_features: int, use_bias: bool) -> NnxStatics:
    return fresh_statics(lambda: nnx.Linear(in_features, out_features, use_bias=use_bias, rngs=nnx.Rngs(0)))


_NUMERIC = ("dtype", "precision", "dot_general", "promote_dtype", "preferred_element_type")  # used by recurrent.py
_PROMOTED = ("dtype", "precision", "preferred_element_type")  # settings the promoted layers reproduce


def _raw_dtype(variable: Any) -> Any:
    return None if variable is None else variable.get_raw_value().dtype


def _numerics_of(layer: Any) -> dict[str, Any]:
    """``dtype`` / ``precision`` / ``preferred_element_type`` a lifted layer (or NNX module) computes with."""
    return {name: getattr(layer, name, None) for name in _PROMOTED}


def _widest_float() -> Any:
    # float32 unless x64 is enabled: no inferred NNX compute dtype of real arrays is wider.
    return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))


def bias_dtype_fixed(dtype: Any, preferred_element_type: Any, kernel_dtype: Any, bias_dtype: Any) -> bool:
    """Whether a bias layer can add the bias exactly as NNX's ``Linear`` / ``LinearGeneral`` / ``Einsum`` do.

    NNX casts input, kernel and bias to one compute dtype (``dtype``, or the
    three's promoted type when ``dtype`` is None) and adds the cast bias to
    the dot's output. The bias layer sees only that output and the bias.
    With ``dtype`` set it casts the bias to ``dtype``: exact. With ``dtype``
    None it casts the bias to the output's dtype, which is what NNX computes
    when (1) the bias does not widen the promotion (its dtype promotes into
    the kernel's) and (2) there is no ``preferred_element_type``, or one
    every compute dtype promotes into (float32; float64 under x64): then
    NNX's bias, widened to the compute dtype and then to the output's, has
    the values of the bias widened to the output's dtype directly.

    Args:
      dtype: The layer's ``dtype``.
      preferred_element_type: The layer's ``preferred_element_type``.
      kernel_dtype: The stored kernel's dtype.
      bias_dtype: The stored bias's dtype (None: no bias).

    Returns:
      True when the lifted bias layer reproduces NNX's bias addition.

    Example:
        >>> bias_dtype_fixed(None, jnp.float32, jnp.bfloat16, jnp.bfloat16)
        True
        >>> bias_dtype_fixed(None, jnp.bfloat16, jnp.float32, jnp.float32)  # NNX adds a float32 bias to bf16
        False
    """
    if bias_dtype is None or dtype is not None:
        return True
    if jnp.promote_types(kernel_dtype, bias_dtype) != jnp.dtype(kernel_dtype):
        return False
    return (preferred_element_type is None
            or jnp.promote_types(preferred_element_type, _widest_float()) == jnp.dtype(preferred_element_type))


def _numerics_liftable(module: Any) -> bool:
    """NNX's own promotion function, and a bias the lifted bias layer adds as NNX does."""
    return (module.promote_dtype is _linear_statics(1, 1, True)["promote_dtype"]
            and bias_dtype_fixed(module.dtype, module.preferred_element_type, _raw_dtype(module.kernel),
                                 _raw_dtype(module.bias)))


def _plain_numerics(module: Any) -> bool:
    # NNX's defaults on float32 parameters: plain layers compute the same program, without casts.
    return all(value is None for value in _numerics_of(module).values()) and _raw_dtype(module.kernel) == jnp.float32


def _bias_layers(module: Any, ctx: LiftContext, names: tuple[str, ...]) -> list[Any]:
    if module.bias is None:
        return []
    bias = lift_variable(module.bias, ctx.child("bias"), names)
    return [AddBias(bias) if _plain_numerics(module) else NnxPromotedBias(bias, dtype=module.dtype)]


def linear_layers(module: nnx.Linear | nnx.LinearGeneral, ctx: LiftContext, ins: tuple[str, ...],
                  outs: tuple[str, ...]) -> list[Any]:
    """The lifted layers of an ``nnx.Linear`` / ``nnx.LinearGeneral`` contracting ``ins`` into ``outs``.

    ``[Linear, AddBias?]`` with NNX's default numerics on float32 parameters,
    else ``[NnxPromotedLinear, NnxPromotedBias?]``. The kernel keeps NNX's
    layout ``(*ins, *outs)`` (outputs clashing with inputs get ``_out``).
    The caller checks that the module lifts (:func:`bias_dtype_fixed`, no
    custom functions).

    Example:
        >>> from pzbridge.bridge.nnx.traversal import new_lift_context
        >>> m = nnx.LinearGeneral(2, (3, 4), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        >>> [type(l).__name__ for l in linear_layers(m, new_lift_context(), ("features",), ("heads", "head"))]
        ['NnxPromotedLinear', 'NnxPromotedBias']
    """
    weight_names = (*ins, *(weight_output_name(name, ins) for name in outs))
    kernel = lift_variable(module.kernel, ctx.child("kernel"), weight_names)
    if _plain_numerics(module):
        linear: Linear = Linear(kernel, ins, outs)
    else:
        linear = NnxPromotedLinear(kernel, ins, outs, **_numerics_of(module))
    return [linear, *_bias_layers(module, ctx, outs)]


def _bias_expressible(numerics: dict[str, Any], bias: AddBias | None, kernel_dtype: Any, bias_dtype: Any) -> bool:
    """Whether an NNX layer with these numerics adds this bias exactly as the lifted bias layer does.

    With ``dtype`` set NNX casts the bias to ``dtype`` (an ``NnxPromotedBias``
    with the same ``dtype`` does the same); with ``dtype`` None the bias layer
    must not cast (plain, or ``dtype`` None) and :func:`bias_dtype_fixed` must hold.
    """
    if bias is None:
        return True
    dtype = numerics["dtype"]
    if dtype is not None:
        return isinstance(bias, NnxPromotedBias) and bias.dtype == dtype
    return (getattr(bias, "dtype", None) is None
            and bias_dtype_fixed(None, numerics["preferred_element_type"], kernel_dtype, bias_dtype))


def _value_dtype(layer: Any, field: str) -> Any:
    return None if layer is None else getattr(layer, field).value.dtype


def _lowered_config(config: NnxStatics, numerics: dict[str, Any], **others: Any) -> NnxStatics:
    # The lifted layers decide what the module computes; untouched values keep the original objects.
    wanted = {**numerics, **others}
    changed = {name: value for name, value in wanted.items() if not _statics_equal_value(config[name], value)}
    return config.replace(**changed) if changed else config


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
    kernel that is not 2-d, and, with ``dtype=None``, a bias NNX adds in a
    dtype the bias layer cannot know (:func:`bias_dtype_fixed`: a bias wider
    than the kernel, or a ``preferred_element_type`` narrower than float32).
    """

    def _supported(self, module: nnx.Linear) -> bool:
        return (_statics_equal(module, _linear_statics(1, 1, True), ("dot_general",)) and module.kernel.ndim == 2
                and _numerics_liftable(module))

    def lift(self, module: nnx.Linear, ctx: LiftContext) -> Any:
        if not self._supported(module):
            return lift_foreign(module, ctx)
        f = ctx.naming.features
        return NnxLinear(linear_layers(module, ctx, (f,), (f,)), config=NnxStatics.of(module))

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
        if not _bias_expressible(numerics, bias, linear.weights.value.dtype, _value_dtype(bias, "bias")):
            # Linear and bias separately: an nnx.Linear without bias, then the bias layer as an adapter.
            return SequentialRule().lower(Sequential(list(sublayers)), ctx)
        (f_in,), (f_out,) = linear.in_axis_names, linear.out_axis_names
        kernel = nnx_variable(linear.weights, ctx.child("kernel"), (f_in, weight_output_name(f_out, (f_in,))))
        bias_var = None if bias is None else nnx_variable(bias.bias, ctx.child("bias"), (f_out,))
        config = getattr(layer, "config", None)
        if config is None:
            config = _linear_statics(int(kernel.shape[0]), int(kernel.shape[1]), bias is not None)
        config = _lowered_config(config, numerics, use_bias=bias is not None)
        return build_module(nnx.Linear, config, {"kernel": kernel, "bias": bias_var})


def _statics_equal_value(mine: Any, other: Any) -> bool:
    return mine is other or (type(mine) is type(other) and mine == other)


def _axis_names(base: str, count: int) -> tuple[str, ...]:
    return (base,) if count == 1 else tuple(f"{base}_{i}" for i in range(count))


def _numerics_lowerable(layer: Linear | NamedEinsum, bias: Any) -> bool:
    """The lifted dense layer and bias compute what an NNX layer with the dense layer's numerics computes."""
    if bias is not None and not isinstance(bias, AddBias):
        return False
    weights = layer.weights[0] if isinstance(layer, NamedEinsum) else layer.weights
    return _bias_expressible(_numerics_of(layer), bias, weights.value.dtype, _value_dtype(bias, "bias"))


@nnx_rule(source=nnx.LinearGeneral, lifted=(NnxLinearGeneral,))
class LinearGeneralRule:
    """``nnx.LinearGeneral`` <-> ``NnxLinearGeneral([Linear, AddBias])``.

    The contracted trailing axes are ``features`` (one) or ``features_0,
    features_1, ...`` (several), likewise the output axes; ``kernel (*in,
    *out)`` keeps its layout (output names clashing with input names get
    ``_out`` inside the kernel). Numerics as for :class:`LinearRule`: a
    compute ``dtype``, ``precision``, ``preferred_element_type`` or
    non-float32 parameters give ``[NnxPromotedLinear, NnxPromotedBias]``,
    NNX's own program (the bias reshaped to ``(1, ..., 1, *out)`` and added).
    A ``batch_axis``, a non-trailing ``axis``, a custom ``dot_general`` /
    ``dot_general_cls`` / ``promote_dtype`` and a bias :func:`bias_dtype_fixed`
    rejects stay ``Foreign``. On lowering the numerics come from the lifted
    layers; layers no ``LinearGeneral`` computes lower to an adapter.
    """

    def _names(self, module: nnx.LinearGeneral, naming: AxisNaming) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return (_axis_names(naming.features, len(module.in_features)),
                _axis_names(naming.features, len(module.out_features)))

    def _supported(self, module: nnx.LinearGeneral) -> bool:
        k = len(module.in_features)
        return (not module.batch_axis and tuple(module.axis) == tuple(range(-k, 0))
                and module.dot_general is None and module.dot_general_cls is None and _numerics_liftable(module))

    def lift(self, module: nnx.LinearGeneral, ctx: LiftContext) -> Any:
        if not self._supported(module):
            return lift_foreign(module, ctx)
        ins, outs = self._names(module, ctx.naming)
        return NnxLinearGeneral(linear_layers(module, ctx, ins, outs), config=NnxStatics.of(module))

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
        if not _numerics_lowerable(linear, bias):
            return NnxAdapter.wrap(layer, ctx, CallingConvention((ins,), outs))
        kernel = nnx_variable(linear.weights, ctx.child("kernel"), (*ins, *(weight_output_name(n, ins) for n in outs)))
        bias_var = None if bias is None else nnx_variable(bias.bias, ctx.child("bias"), outs)
        config = _lowered_config(layer.config, _numerics_of(linear))
        return build_module(nnx.LinearGeneral, config, {"kernel": kernel, "bias": bias_var})


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
    # NNX's einsum and promotion, with any dtype / precision / preferred_element_type (NnxPromotedEinsum).
    if module.einsum_op is not _einsum_statics()["einsum_op"] or not _numerics_liftable(module):
        return None
    return inp, ker, out


@nnx_rule(source=nnx.Einsum, lifted=(NnxEinsum,))
class EinsumRule:
    """``nnx.Einsum`` <-> ``NnxEinsum([NamedEinsum, AddBias])``; axis names are the einsum letters.

    For ``"bta,ahd->bthd"`` the kernel is ``{a, h, d}``, the input's trailing
    ``a`` is contracted, ``b, t`` stay positional, and the output's trailing
    ``h, d`` are named ``h`` and ``d``; the bias covers the output's trailing
    letters. Numerics as for :class:`LinearRule`: a compute ``dtype``,
    ``precision``, ``preferred_element_type`` or non-float32 parameters give
    ``[NnxPromotedEinsum, NnxPromotedBias]``, which promote and run the einsum
    as NNX does. Einsums whose positional letters are not leading (or with
    ``...``, repeated letters, a custom ``einsum_op`` / ``promote_dtype``, or a
    bias :func:`bias_dtype_fixed` rejects) stay ``Foreign``.
    """

    def lift(self, module: nnx.Einsum, ctx: LiftContext) -> Any:
        plan = _einsum_plan(module)
        if plan is None:
            return lift_foreign(module, ctx)
        inp, ker, out = plan
        contracted = tuple(c for c in inp if c in ker and c not in out)
        kernel = lift_variable(module.kernel, ctx.child("kernel"), tuple(ker))
        if _plain_numerics(module):
            einsum: NamedEinsum = NamedEinsum((kernel,), contracted)
        else:
            einsum = NnxPromotedEinsum((kernel,), contracted, **_numerics_of(module))
        bias_names = () if module.bias is None else tuple(out[len(out) - module.bias.ndim:])
        return NnxEinsum([einsum, *_bias_layers(module, ctx, bias_names)], config=NnxStatics.of(module))

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
        inp, ker, out = _EINSUM.match(layer.config["einsum_str"].replace(" ", "")).groups()
        if len(layer.sublayers) > 2 or not _numerics_lowerable(einsum, bias):
            convention = CallingConvention((tuple(c for c in inp if c in ker),), tuple(c for c in out if c in ker))
            return NnxAdapter.wrap(layer, ctx, convention)
        kernel = nnx_variable(einsum.weights[0], ctx.child("kernel"), tuple(ker))
        bias_var = None
        if bias is not None:
            rank = len(layer.config["bias_shape"])
            bias_var = nnx_variable(bias.bias, ctx.child("bias"), tuple(out[len(out) - rank:]))
        config = _lowered_config(layer.config, _numerics_of(einsum))
        return build_module(nnx.Einsum, config, {"kernel": kernel, "bias": bias_var})
