"""Normalisation layers over named axes: LayerNorm, RMSNorm, GroupNorm, InstanceNorm, BatchNorm.

Why one shared kernel with explicit knobs: Equinox and Flax NNX compute the
"same" normalisations with small differences that change the last bits of
the result (two-pass vs ``E[x^2] - E[x]^2`` variance, whether the scale is
folded into ``rsqrt(var + eps)`` before multiplying, which dtype the
statistics and the output have, ``/ sqrt`` vs ``* rsqrt``). A lifted layer
must compute exactly what the original computed, so each difference is a
static field with a default that reads like the textbook formula

    y = (x - mean) * rsqrt(var + epsilon) * scale + bias

and bridges set the fields that reproduce their framework bit for bit.

The statistics are reduced over axes *named* in ``across_axes``; every other
named (and positional) axis is kept, so batching is free. ``scale`` and
``bias`` are named arrays broadcast by name, over any subset of the input's
axes (Equinox stores a LayerNorm weight over the whole normalised shape,
NNX over the feature axis only), stored in any axis order. All arithmetic is
done once on the raw data: no transposes of the input, no vmap.

See docs/architecture.md ("Axis naming and calling conventions").

Example:
    >>> import jax, jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> norm = LayerNorm.from_config("ln", jax.random.key(0), {"features": 4})
    >>> y = norm(pzb.nx.wrap(jnp.arange(8.0).reshape(2, 4), "batch", "features"))
    >>> [round(v, 3) for v in y.unwrap("batch", "features")[0].tolist()]
    [-1.342, -0.447, 0.447, 1.342]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError, PzbridgeError
from pzbridge.core.named_axes_core import make_named
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.core.variables import StateVariable
from pzbridge.nn.contraction import data_layout
from pzbridge.nn.initializers import constant, make_parameter
from pzbridge.nn.layer import Layer

DtypePolicy = Literal["input", "promote"]
_POLICIES = ("input", "promote")


def _names(axes: str | Sequence[str] | Mapping[str, int]) -> tuple[str, ...]:
    if isinstance(axes, str):
        return (axes,)
    return tuple(axes)


def _label(variable: Any) -> str:
    return repr(getattr(variable, "label", "?"))


def require_axes(x: Any, names: Sequence[str], layer: str) -> None:
    """Raises a :class:`NamedAxisError` naming the layer if ``x`` lacks any of ``names``.

    Example:
        >>> require_axes(pzb.nx.zeros({"features": 2}), ("features",), "LayerNorm 'ln'")
    """
    if not nx.is_namedarray(x):
        raise NamedAxisError(
            f"{layer}: expected a NamedArray input, found {type(x).__name__} with shape {getattr(x, 'shape', None)}. "
            "Fix: wrap the input, e.g. pzb.nx.wrap(x, 'batch', 'features')."
        )
    missing = [name for name in names if name not in x.named_shape]
    if missing:
        raise NamedAxisError(
            f"{layer}: input lacks named axes {missing} (expects {list(names)}; found named shape "
            f"{dict(x.named_shape)}, positional shape {x.positional_shape}). "
            "Fix: tag the input with these names, or build the layer with the input's axis names."
        )


def align_to_layout(
    value: Any, data_ndim: int, name_axes: Mapping[str, int], data_shape: Sequence[int], what: str
) -> jax.Array:
    """Lays out a named parameter so it broadcasts against data with ``name_axes``.

    The result has rank ``data_ndim``: each of the parameter's names sits on
    the data axis that name has in the input, every other axis has size 1.
    A plain scalar (shape ``()``) is returned as is.

    Args:
      value: A NamedArray (no positional axes) whose names are all input names,
        or a scalar.
      data_ndim: Rank of the input's data array.
      name_axes: Data axis of each input name.
      data_shape: Shape of the input's data array.
      what: Description used in error messages (layer and parameter label).

    Returns:
      A ``jax.Array`` broadcastable to the input's data.

    Raises:
      NamedAxisError: If the parameter has positional axes, names the input
        lacks, or sizes that differ from the input's.

    Example:
        >>> w = pzb.nx.wrap(jnp.arange(3.0), "features")
        >>> align_to_layout(w, 2, {"batch": 0, "features": 1}, (2, 3), "w").shape
        (1, 3)
    """
    if not nx.is_namedarray(value):
        array = jnp.asarray(value)
        if array.ndim:
            raise NamedAxisError(
                f"{what}: expected a NamedArray (or a scalar), found an unnamed array of shape {array.shape}. "
                "Fix: name its axes, e.g. pzb.nx.wrap(array, 'features')."
            )
        return array
    if value.positional_shape:
        raise NamedAxisError(
            f"{what}: parameter has positional axes {value.positional_shape} (named {dict(value.named_shape)}). "
            "Fix: name every axis of the parameter with .tag(...)."
        )
    extra = [n for n in value.named_shape if n not in name_axes]
    wrong = {n: (s, data_shape[name_axes[n]]) for n, s in value.named_shape.items()
             if n in name_axes and data_shape[name_axes[n]] != s}
    if extra or wrong:
        raise NamedAxisError(
            f"{what}: parameter named shape {dict(value.named_shape)} does not fit the input "
            f"(input axes {({n: data_shape[a] for n, a in name_axes.items()})}; "
            f"names missing from the input: {extra}; size mismatches (parameter, input): {wrong}). "
            "Fix: give the parameter a subset of the input's axis names with matching sizes."
        )
    view = value.as_namedarrayview()
    ordered = sorted(value.named_shape, key=lambda n: name_axes[n])
    perm = tuple(view.data_axis_for_name[n] for n in ordered)
    data = view.data_array
    if perm != tuple(range(len(perm))):
        data = jnp.transpose(data, perm)
    shape = [1] * data_ndim
    for name in ordered:
        shape[name_axes[name]] = value.named_shape[name]
    return jnp.reshape(data, shape)


def resolve_dtypes(
    data: jax.Array, params: Sequence[jax.Array | None], policy: str, dtype: Any
) -> tuple[jax.Array, list[jax.Array | None], Any, Any]:
    """Casts input and parameters per ``policy``; returns them with the stats and output dtypes.

    ``"input"`` (Equinox): compute in ``result_type(x, float32)``, parameters
    cast to it, output cast back to the input dtype. ``"promote"`` (Flax NNX):
    input and parameters cast to ``dtype`` (or their common type), statistics
    in at least float32, output in that common dtype.

    Example:
        >>> x, _, stats, out = resolve_dtypes(jnp.ones(2, jnp.bfloat16), [None], "input", None)
        >>> x.dtype, stats, out
        (dtype('float32'), dtype('float32'), dtype(bfloat16))
    """
    with jax.numpy_dtype_promotion("standard"):
        if policy == "input":
            compute = jnp.result_type(data.dtype, jnp.float32)
            cast = [None if p is None else p.astype(compute) for p in params]
            return data.astype(compute), cast, compute, data.dtype
        common = dtype if dtype is not None else jnp.result_type(data, *[p for p in params if p is not None])
        cast = [None if p is None else jnp.asarray(p, common) for p in params]
        return jnp.asarray(data, common), cast, jnp.promote_types(common, jnp.float32), common


def compute_stats(
    data: jax.Array, axes: tuple[int, ...], stats_dtype: Any, center: bool, fast_variance: bool
) -> tuple[jax.Array, jax.Array | None]:
    """Mean (``None`` when not centring) and variance over data ``axes``, keeping dims.

    Example:
        >>> m, v = compute_stats(jnp.array([1.0, 3.0]), (0,), jnp.float32, True, False)
        >>> float(m[0]), float(v[0])
        (2.0, 1.0)
    """
    xs = jnp.asarray(data, stats_dtype)
    if not center:
        return None, jnp.mean(jax.lax.square(xs), axis=axes, keepdims=True)
    if fast_variance:
        mean = jnp.mean(xs, axis=axes, keepdims=True)
        mean2 = jnp.mean(jax.lax.square(xs), axis=axes, keepdims=True)
        return mean, jnp.maximum(0.0, mean2 - jax.lax.square(mean))
    mean = jnp.mean(xs, axis=axes, keepdims=True)
    return mean, jnp.mean(jax.lax.square(xs - mean), axis=axes, keepdims=True)


def apply_stats(
    data: jax.Array,
    mean: jax.Array | None,
    var: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    epsilon: float,
    scale_into_inverse: bool,
    divide_by_sqrt: bool = False,
) -> jax.Array:
    """``(x - mean) * rsqrt(var + eps) * scale + bias`` in the configured op order.

    Example:
        >>> float(apply_stats(jnp.array(3.0), jnp.array(1.0), jnp.array(4.0), None, None, 0.0, False))
        1.0
    """
    centred = data if mean is None else data - mean
    if divide_by_sqrt:
        out = centred / jnp.sqrt(var + epsilon)
    elif scale_into_inverse:
        inverse = jax.lax.rsqrt(var + epsilon)
        if scale is not None:
            inverse = inverse * scale
        out = centred * inverse
        return out if bias is None else out + bias
    else:
        out = centred * jax.lax.rsqrt(var + epsilon)
    if scale is not None:
        out = scale * out
    return out if bias is None else out + bias


def _check_policy(layer: str, policy: str) -> None:
    if policy not in _POLICIES:
        raise PzbridgeError(
            f"{layer}: dtype_policy must be one of {_POLICIES}, found {policy!r}. "
            "Fix: use 'input' (Equinox) or 'promote' (Flax NNX)."
        )


@pytree_dataclass
class _StatNorm(Layer):
    """Shared fields and call of LayerNorm / RMSNorm / InstanceNorm (statistics over named axes)."""

    scale: Any
    bias: Any
    across_axes: tuple[str, ...] = static_field()
    epsilon: float = static_field()
    use_fast_variance: bool = static_field(default=False)
    scale_into_inverse: bool = static_field(default=False)
    dtype_policy: str = static_field(default="input")
    dtype: Any = static_field(default=None)

    _center = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "across_axes", _names(self.across_axes))
        _check_policy(type(self).__name__, self.dtype_policy)

    def _where(self) -> str:
        param = self.scale if self.scale is not None else self.bias
        return f"{type(self).__name__} {_label(param)}"

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        where = self._where()
        require_axes(x, self.across_axes, where)
        data, positional, name_axes = data_layout(x)
        params = [
            None if p is None else align_to_layout(p.value, data.ndim, name_axes, data.shape, f"{where} {kind}")
            for p, kind in ((self.scale, "scale"), (self.bias, "bias"))
        ]
        data, (scale, bias), stats_dtype, out_dtype = resolve_dtypes(data, params, self.dtype_policy, self.dtype)
        axes = tuple(name_axes[n] for n in self.across_axes)
        mean, var = compute_stats(data, axes, stats_dtype, self._center, self.use_fast_variance)
        out = apply_stats(data, mean, var, scale, bias, self.epsilon, self.scale_into_inverse)
        return make_named(out.astype(out_dtype), positional, name_axes)


def _affine_params(
    name: str, init_base_rng: jax.Array | None, shape: Mapping[str, int], use_scale: bool, use_bias: bool, dtype: Any
) -> tuple[Any, Any]:
    scale = make_parameter(f"{name}.scale", init_base_rng, lambda _: constant(shape, 1.0, dtype)) if use_scale else None
    bias = make_parameter(f"{name}.bias", init_base_rng, lambda _: constant(shape, 0.0, dtype)) if use_bias else None
    return scale, bias


@pytree_dataclass
class LayerNorm(_StatNorm):
    """Layer normalisation: statistics over ``across_axes``, then scale and bias.

    Computes ``(x - mean) * rsqrt(var + epsilon) * scale + bias`` with mean
    and variance over the named ``across_axes``, independently for every
    other axis. ``scale`` / ``bias`` broadcast by name.

    Attributes:
      scale: A ``Parameter`` (or frozen value / slot) over some of the input's
        axes, or ``None`` (no scale).
      bias: Likewise, or ``None`` (no bias).
      across_axes: Names the statistics are computed over (static).
      epsilon: Added to the variance (static). Equinox uses 1e-5, NNX 1e-6.
      use_fast_variance: ``E[x^2] - E[x]^2`` instead of the two-pass variance
        (NNX's default; static).
      scale_into_inverse: Multiply ``scale`` into ``rsqrt(var + eps)`` before
        applying it (NNX's op order; static).
      dtype_policy: ``"input"`` (Equinox: compute in at least float32, return
        the input dtype) or ``"promote"`` (NNX: promote input and parameters to
        ``dtype`` or their common type; statistics in at least float32;
        static).
      dtype: The NNX ``dtype`` for ``"promote"`` (static).

    Example:
        >>> ln = LayerNorm(None, None, ("features",), 0.0)
        >>> ln(pzb.nx.wrap(jnp.array([1.0, 3.0]), "features")).unwrap("features")
        Array([-1.,  1.], dtype=float32)
    """

    @classmethod
    def from_config(
        cls,
        name: str,
        init_base_rng: jax.Array | None,
        across_axes: Mapping[str, int],
        epsilon: float = 1e-6,
        use_scale: bool = True,
        use_bias: bool = True,
        dtype: Any = jnp.float32,
    ) -> LayerNorm:
        """Builds a LayerNorm with ones scale (``f"{name}.scale"``) and zeros bias (``f"{name}.bias"``).

        Args:
          name: Layer name (parameter label prefix).
          init_base_rng: Base key, or None for parameter slots.
          across_axes: Names and sizes normalised over; scale and bias span them.
          epsilon: Added to the variance.
          use_scale: Whether to have a scale.
          use_bias: Whether to have a bias.
          dtype: Parameter dtype.

        Returns:
          The layer.

        Example:
            >>> LayerNorm.from_config("ln", None, {"features": 3}).scale
            ParameterSlot(label='ln.scale')
        """
        scale, bias = _affine_params(name, init_base_rng, across_axes, use_scale, use_bias, dtype)
        return cls(scale, bias, tuple(across_axes), epsilon)


@pytree_dataclass
class RMSNorm(_StatNorm):
    """Root-mean-square normalisation: ``x * rsqrt(mean(x^2) + epsilon) * scale + bias``.

    The mean of squares is over ``across_axes``; no mean is subtracted.
    Equinox's RMSNorm has a weight and a bias by default; NNX's only a scale.
    Fields as in :class:`LayerNorm` (``use_fast_variance`` has no effect).

    Example:
        >>> rms = RMSNorm(None, None, ("features",), 0.0)
        >>> rms(pzb.nx.wrap(jnp.array([2.0, 2.0, 0.0, 0.0]), "features")).unwrap("features").tolist()
        [1.4142135381698608, 1.4142135381698608, 0.0, 0.0]
    """

    _center = False

    @classmethod
    def from_config(
        cls,
        name: str,
        init_base_rng: jax.Array | None,
        across_axes: Mapping[str, int],
        epsilon: float = 1e-6,
        use_scale: bool = True,
        use_bias: bool = False,
        dtype: Any = jnp.float32,
    ) -> RMSNorm:
        """Builds an RMSNorm with ones scale (``f"{name}.scale"``) and optional zeros bias.

        Example:
            >>> RMSNorm.from_config("rms", jax.random.key(0), {"features": 3}).bias is None
            True
        """
        scale, bias = _affine_params(name, init_base_rng, across_axes, use_scale, use_bias, dtype)
        return cls(scale, bias, tuple(across_axes), epsilon)


@pytree_dataclass
class InstanceNorm(LayerNorm):
    """Instance normalisation: statistics per example and channel, over the spatial axes.

    Named, this is a :class:`LayerNorm` whose ``across_axes`` are the spatial
    axes and whose scale and bias span the channel axes (NNX
    ``InstanceNorm``; Equinox expresses it as ``GroupNorm`` with one channel
    per group). A subclass so renderings and selectors can tell it apart.

    Example:
        >>> norm = InstanceNorm.from_config("in", jax.random.key(0), {"channels": 2}, ("height", "width"))
        >>> norm.across_axes, dict(norm.scale.value.named_shape)
        (('height', 'width'), {'channels': 2})
    """

    @classmethod
    def from_config(  # type: ignore[override]
        cls,
        name: str,
        init_base_rng: jax.Array | None,
        channel_axes: Mapping[str, int],
        across_axes: Sequence[str] = ("height", "width"),
        epsilon: float = 1e-6,
        use_scale: bool = True,
        use_bias: bool = True,
        dtype: Any = jnp.float32,
    ) -> InstanceNorm:
        """Builds an InstanceNorm with ones scale / zeros bias over ``channel_axes``.

        Example:
            >>> InstanceNorm.from_config("in", None, {"channels": 2}).bias
            ParameterSlot(label='in.bias')
        """
        scale, bias = _affine_params(name, init_base_rng, channel_axes, use_scale, use_bias, dtype)
        return cls(scale, bias, _names(across_axes), epsilon)


def _grouped(array: jax.Array, axis: int, groups: int) -> jax.Array:
    """Splits data ``axis`` into ``(groups, size // groups)``, group-major (size-1 axes stay size 1)."""
    shape = array.shape
    split = (groups, shape[axis] // groups) if shape[axis] != 1 else (1, 1)
    return jnp.reshape(array, shape[:axis] + split + shape[axis + 1 :])


@pytree_dataclass
class GroupNorm(Layer):
    """Group normalisation: channels split into ``groups``; statistics per group and example.

    The ``channel_axis`` is split group-major (group ``g`` holds channels
    ``g * size .. (g + 1) * size - 1``, as in Equinox and NNX); mean and
    variance are over the channels of a group and the named ``across_axes``
    (spatial axes), independently for every other axis (batch).

    Attributes:
      scale: Parameter over (a subset of) the input's axes, usually the channel axis, or None.
      bias: Likewise, or None.
      channel_axis: The name of the channel axis (static).
      groups: Number of groups; must divide the channel count (static).
      across_axes: Other names reduced over, e.g. ``("height", "width")`` (static).
      epsilon, use_fast_variance, scale_into_inverse, dtype_policy, dtype:
        As in :class:`LayerNorm` (static).

    Example:
        >>> gn = GroupNorm(None, None, "channels", 2, (), 0.0)
        >>> gn(pzb.nx.wrap(jnp.array([1.0, 3.0, 5.0, 9.0]), "channels")).unwrap("channels")
        Array([-1.,  1., -1.,  1.], dtype=float32)
    """

    scale: Any
    bias: Any
    channel_axis: str = static_field()
    groups: int = static_field()
    across_axes: tuple[str, ...] = static_field()
    epsilon: float = static_field()
    use_fast_variance: bool = static_field(default=False)
    scale_into_inverse: bool = static_field(default=False)
    dtype_policy: str = static_field(default="input")
    dtype: Any = static_field(default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "across_axes", _names(self.across_axes))
        _check_policy("GroupNorm", self.dtype_policy)

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        param = self.scale if self.scale is not None else self.bias
        where = f"GroupNorm {_label(param)}"
        require_axes(x, (self.channel_axis, *self.across_axes), where)
        channels = x.named_shape[self.channel_axis]
        if channels % self.groups:
            raise NamedAxisError(
                f"{where}: {self.groups} groups do not divide axis {self.channel_axis!r} of size {channels}. "
                "Fix: choose a number of groups that divides the channel count."
            )
        data, positional, name_axes = data_layout(x)
        params = [
            None if p is None else align_to_layout(p.value, data.ndim, name_axes, data.shape, f"{where} {kind}")
            for p, kind in ((self.scale, "scale"), (self.bias, "bias"))
        ]
        data, params, stats_dtype, out_dtype = resolve_dtypes(data, params, self.dtype_policy, self.dtype)
        c = name_axes[self.channel_axis]
        grouped = _grouped(data, c, self.groups)
        shifted = {n: a + (a > c) for n, a in name_axes.items()}
        axes = (c + 1, *(shifted[n] for n in self.across_axes))
        mean, var = compute_stats(grouped, axes, stats_dtype, True, self.use_fast_variance)
        scale, bias = (p if p is None or p.ndim == 0 else _grouped(p, c, self.groups) for p in params)
        out = apply_stats(grouped, mean, var, scale, bias, self.epsilon, self.scale_into_inverse)
        return make_named(jnp.reshape(out, data.shape).astype(out_dtype), positional, name_axes)

    @classmethod
    def from_config(
        cls,
        name: str,
        init_base_rng: jax.Array | None,
        channels: Mapping[str, int],
        groups: int,
        across_axes: Sequence[str] = ("height", "width"),
        epsilon: float = 1e-6,
        use_scale: bool = True,
        use_bias: bool = True,
        dtype: Any = jnp.float32,
    ) -> GroupNorm:
        """Builds a GroupNorm; ``channels`` is one ``{name: size}`` entry.

        Raises:
          PzbridgeError: If ``channels`` is not a single axis or ``groups`` does not divide it.

        Example:
            >>> GroupNorm.from_config("gn", None, {"channels": 4}, 2).scale
            ParameterSlot(label='gn.scale')
        """
        if len(channels) != 1 or next(iter(channels.values())) % groups:
            raise PzbridgeError(
                f"GroupNorm.from_config {name!r}: channels must be one axis whose size {groups} groups divide; "
                f"found {dict(channels)}. Fix: pass e.g. {{'channels': {groups * 4}}}."
            )
        scale, bias = _affine_params(name, init_base_rng, channels, use_scale, use_bias, dtype)
        return cls(scale, bias, next(iter(channels)), groups, _names(across_axes), epsilon)


def _state_or_slot(label: str, init_base_rng: jax.Array | None, value: Any) -> Any:
    from pzbridge.core.variables import StateVariableSlot

    return StateVariableSlot(label) if init_base_rng is None else StateVariable(value, label)


def _to_stat_layout(array: jax.Array, old: nx.NamedArrayBase, name_axes: Mapping[str, int],
                    across: tuple[int, ...]) -> nx.NamedArray:
    """Squeezes the reduced axes of a keepdims statistic and stores it like ``old``."""
    kept = sorted((a, n) for n, a in name_axes.items() if a not in across)
    squeezed = jnp.squeeze(array, axis=across) if across else array
    named = nx.wrap(squeezed, *(n for _, n in kept))
    return named.order_as(*old.named_shape).astype(old.dtype)


@pytree_dataclass
class BatchNorm(Layer):
    """Batch normalisation with running statistics in ``StateVariable``s and a train/eval switch.

    Statistics are over ``across_axes`` (the batch axis and, for images, the
    spatial axes); the running mean and variance are named arrays over the
    remaining axes (the features), stored in any order.

    Train / eval: the static ``use_running_average`` is the default (False =
    training); a ``train=True/False`` side input overrides it for one call,
    so a whole model switches with ``model(x, train=False)``.

    In training the running statistics are updated as
    ``momentum * running + (1 - momentum) * batch`` (written into the
    StateVariables; under ``stateless_call`` they come back as new state).
    ``mode`` decides what training normalises with:

    - ``"batch"``: the batch statistics (NNX ``BatchNorm``, Equinox mode
      ``"batch"``). With ``debias=True`` (Equinox ``"batch"``) a ``counter``
      state counts training calls and evaluation divides the running
      statistics by ``1 - momentum ** counter``.
    - ``"ema"``: the freshly updated running statistics, except on the first
      training call (``first_call`` state is True) which uses and stores the
      batch statistics (Equinox mode ``"ema"``).

    In evaluation the running statistics are used and nothing changes.

    Attributes:
      scale, bias: Parameters over the feature axes, or None.
      running_mean, running_var: StateVariables (or values / slots) over the feature axes.
      counter: StateVariable with the number of training calls (needed when ``debias``), or None.
      first_call: StateVariable holding a bool (needed for mode ``"ema"``), or None.
      across_axes: Names reduced over (static).
      epsilon: Added to the variance (static).
      momentum: Running-average decay (static).
      mode: ``"batch"`` or ``"ema"`` (static).
      use_running_average: Default switch, True = evaluation (static).
      debias: Zero-debias running statistics in evaluation (static).
      use_fast_variance: ``E[x^2] - E[x]^2`` batch variance (NNX; static).
      scale_into_inverse: NNX op order (static).
      divide_by_sqrt: ``(x - m) / sqrt(v + eps)`` instead of ``* rsqrt`` (Equinox; static).
      dtype_policy, dtype: As in :class:`LayerNorm`; ``"promote"`` also
        promotes the running statistics, as NNX does (static).

    Example:
        >>> bn = BatchNorm.from_config("bn", jax.random.key(0), {"features": 2}, momentum=0.5)
        >>> x = pzb.nx.wrap(jnp.array([[1.0, 2.0], [3.0, 6.0]]), "batch", "features")
        >>> y = bn(x)
        >>> bn.running_mean.value.unwrap("features")
        Array([1., 2.], dtype=float32)
        >>> bn.running_var.value.unwrap("features")
        Array([1. , 2.5], dtype=float32)
        >>> bn(x, train=False).unwrap("batch", "features")[0]  # x[0] equals the running mean
        Array([0., 0.], dtype=float32)
    """

    scale: Any
    bias: Any
    running_mean: Any
    running_var: Any
    counter: Any = None
    first_call: Any = None
    across_axes: tuple[str, ...] = static_field(default=("batch",))
    epsilon: float = static_field(default=1e-5)
    momentum: float = static_field(default=0.99)
    mode: str = static_field(default="batch")
    use_running_average: bool = static_field(default=False)
    debias: bool = static_field(default=False)
    use_fast_variance: bool = static_field(default=False)
    scale_into_inverse: bool = static_field(default=False)
    divide_by_sqrt: bool = static_field(default=False)
    dtype_policy: str = static_field(default="input")
    dtype: Any = static_field(default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "across_axes", _names(self.across_axes))
        where = f"BatchNorm {_label(self.running_mean)}"
        _check_policy(where, self.dtype_policy)
        if self.mode not in ("batch", "ema"):
            raise PzbridgeError(f"{where}: mode must be 'batch' or 'ema', found {self.mode!r}.")
        if self.mode == "ema" and self.first_call is None:
            raise PzbridgeError(f"{where}: mode 'ema' needs a first_call StateVariable (a bool, initially True). "
                                "Fix: build it with BatchNorm.from_config(..., mode='ema').")
        if self.debias and self.counter is None:
            raise PzbridgeError(f"{where}: debias=True needs a counter StateVariable (an int, initially 0). "
                                "Fix: build it with BatchNorm.from_config(..., debias=True).")

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        where = f"BatchNorm {_label(self.running_mean)}"
        require_axes(x, self.across_axes, where)
        if x.positional_shape:
            raise NamedAxisError(
                f"{where}: input has positional axes {x.positional_shape}; batch statistics need named axes "
                f"(found named shape {dict(x.named_shape)}). Fix: tag them, e.g. x.tag('height', 'width')."
            )
        train = side_inputs.get("train")
        use_running = self.use_running_average if train is None else not train
        data, positional, name_axes = data_layout(x)
        old_mean, old_var = self.running_mean.value, self.running_var.value
        feature_names = [n for n in x.named_shape if n not in self.across_axes]
        if set(old_mean.named_shape) != set(feature_names):
            raise NamedAxisError(
                f"{where}: running statistics have axes {dict(old_mean.named_shape)} but the input's axes other "
                f"than {list(self.across_axes)} are {feature_names}. Fix: add the extra axes to across_axes, or "
                "give the statistics exactly the feature axes."
            )
        aligned = [
            None if p is None else align_to_layout(v, data.ndim, name_axes, data.shape, f"{where} {kind}")
            for p, v, kind in (
                (self.running_mean, old_mean, "running_mean"), (self.running_var, old_var, "running_var"),
                (self.scale, None if self.scale is None else self.scale.value, "scale"),
                (self.bias, None if self.bias is None else self.bias.value, "bias"),
            )
        ]
        data, (run_mean, run_var, scale, bias), stats_dtype, out_dtype = resolve_dtypes(
            data, aligned, self.dtype_policy, self.dtype)
        if use_running:
            mean, var = run_mean, run_var
            if self.debias:
                count = self.counter.value
                divisor = jnp.where(count == 0, 1, 1 - self.momentum ** count)
                mean, var = mean / divisor, var / divisor
        else:
            axes = tuple(name_axes[n] for n in self.across_axes)
            batch_mean, batch_var = compute_stats(data, axes, stats_dtype, True, self.use_fast_variance)
            new_mean = self.momentum * run_mean + (1 - self.momentum) * batch_mean
            new_var = self.momentum * run_var + (1 - self.momentum) * batch_var
            if self.mode == "ema":
                first = self.first_call.value
                new_mean = jax.lax.select(jnp.broadcast_to(first, new_mean.shape), batch_mean, new_mean)
                new_var = jax.lax.select(jnp.broadcast_to(first, new_var.shape), batch_var, new_var)
                mean, var = new_mean, new_var
                self.first_call.value = jnp.zeros_like(first)
            else:
                mean, var = batch_mean, batch_var
            if self.counter is not None:
                self.counter.value = self.counter.value + 1
            self.running_mean.value = _to_stat_layout(jax.lax.stop_gradient(new_mean), old_mean, name_axes, axes)
            self.running_var.value = _to_stat_layout(jax.lax.stop_gradient(new_var), old_var, name_axes, axes)
        out = apply_stats(data, mean, var, scale, bias, self.epsilon, self.scale_into_inverse, self.divide_by_sqrt)
        return make_named(out.astype(out_dtype), positional, name_axes)

    @classmethod
    def from_config(
        cls,
        name: str,
        init_base_rng: jax.Array | None,
        feature_axes: Mapping[str, int],
        across_axes: Sequence[str] = ("batch",),
        epsilon: float = 1e-5,
        momentum: float = 0.99,
        mode: str = "batch",
        debias: bool = False,
        use_scale: bool = True,
        use_bias: bool = True,
        dtype: Any = jnp.float32,
    ) -> BatchNorm:
        """Builds a BatchNorm; running mean 0 / variance 1 in ``f"{name}.mean"`` / ``f"{name}.var"``.

        With ``init_base_rng=None`` parameters and state are slots. Mode
        ``"ema"`` adds ``f"{name}.first_call"``; ``debias`` adds ``f"{name}.counter"``.

        Example:
            >>> BatchNorm.from_config("bn", None, {"features": 2}).running_mean
            StateVariableSlot(label='bn.mean')
        """
        scale, bias = _affine_params(name, init_base_rng, feature_axes, use_scale, use_bias, dtype)
        mean = _state_or_slot(f"{name}.mean", init_base_rng, constant(feature_axes, 0.0, dtype))
        var = _state_or_slot(f"{name}.var", init_base_rng, constant(feature_axes, 1.0, dtype))
        counter = _state_or_slot(f"{name}.counter", init_base_rng, jnp.zeros((), jnp.int32)) if debias else None
        first = _state_or_slot(f"{name}.first_call", init_base_rng, jnp.ones((), bool)) if mode == "ema" else None
        return cls(scale, bias, mean, var, counter, first, _names(across_axes), epsilon, momentum, mode,
                   debias=debias)
