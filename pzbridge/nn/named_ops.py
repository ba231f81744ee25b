"""Glue on named axes: the operations that sit between the layers of a traced module.

When pzbridge traces a custom ``__call__`` (see ``docs/lifting_custom_modules.md``)
the code between child calls becomes these layers: elementwise primitives
(``+``, ``*``, ``jnp.exp``, casts ...) in :class:`ApplyPrimitive`, contractions
between activations in :class:`ContractInputs`, head split and merge in
:class:`SplitAxis` / :class:`MergeAxes`, reductions, concatenation, slicing,
new axes and ``iota``. Each one says *which named axes* it acts on, never
where they sit, so a traced model runs on any batch or sequence length and
every axis it does not use (a ``batch`` added by the caller) passes through.

Axis sizes that depend on the input (``jnp.arange(x.shape[0])``) are read at
call time from the :data:`AXIS_SIZES` side input that the enclosing
:class:`~pzbridge.nn.dataflow.Traced` layer provides; other sizes are static.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> x = pzb.nx.wrap(jnp.arange(6.0), "features")
    >>> double = ApplyPrimitive(jax.lax.mul_p, (), (("input", 0), ("constant", 0)), (2.0,))
    >>> double(x).unwrap("features").tolist()
    [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError
from pzbridge.core.named_axes_core import make_named
from pzbridge.core.named_axes_ops import elementwise
from pzbridge.core.struct import Struct, pytree_dataclass, static_field
from pzbridge.nn.attention import merge_axes, split_axis
from pzbridge.nn.basic import rename_axes
from pzbridge.nn.contraction import contract, data_layout
from pzbridge.nn.layer import Layer

AXIS_SIZES = "axis_sizes"
"""Side input holding ``{name: size}`` of the traced module's input axes (sizes that vary per call)."""


def _operands(x: Any) -> tuple[Any, ...]:
    return x if isinstance(x, tuple) else (x,)


def _renamed(x: Any, renames: Mapping[str, str]) -> Any:
    if not renames or not nx.is_namedarray(x):
        return x
    present = {old: new for old, new in renames.items() if old in x.named_shape and old != new}
    return rename_axes(x, present) if present else x


def _size(entry: tuple[Any, ...], side_inputs: Mapping[str, Any]) -> int:
    # (name, static size[, name of the input axis whose size it has, "" for none: the size is fixed])
    source = entry[2] if len(entry) > 2 else entry[0]
    if not source:
        return int(entry[1])
    return int(dict(side_inputs.get(AXIS_SIZES, ())).get(source, entry[1]))


@pytree_dataclass
class ParameterUse(Struct):
    """A ``Parameter`` used as a glue operand, with the axis names this use gives its dimensions.

    One parameter may be used in several ways (a tied embedding is looked up
    and contracted); each use names the parameter's storage axes its own way.

    Attributes:
      parameter: The ``Parameter`` (or frozen value).
      stored: Its value's axis names in storage order, or None for a raw
        (positional) value (static).
      use: The name each storage axis has in this use; None drops a size-one
        axis (static).

    Example:
        >>> p = pzb.Parameter(pzb.nx.wrap(jnp.ones((2, 3)), "vocabulary", "features"), "table")
        >>> dict(ParameterUse(p, ("vocabulary", "features"), ("features_out", "features")).named_value().named_shape)
        {'features_out': 2, 'features': 3}
    """

    parameter: Any
    stored: tuple[str, ...] | None = static_field()
    use: tuple[str | None, ...] = static_field()

    def named_value(self) -> nx.NamedArrayBase:
        """The parameter's value named as this use needs."""
        value = self.parameter.value
        if self.stored is not None and nx.is_namedarray(value):
            dropped = {s: 0 for s, u in zip(self.stored, self.use) if u is None}
            value = value[dropped] if dropped else value
            renames = {s: u for s, u in zip(self.stored, self.use) if u is not None and s != u}
            return rename_axes(value, renames) if renames else value
        data = value.unwrap() if nx.is_namedarray(value) else jnp.asarray(value)
        keep = [i for i, u in enumerate(self.use) if u is not None]
        data = data.reshape(tuple(data.shape[i] for i in keep))
        return nx.NamedArray(data, {self.use[i]: data.shape[k] for k, i in enumerate(keep)})


@pytree_dataclass
class AxisSize(Struct):
    """A scalar constant that is the size of an input axis at call time (code that uses ``x.shape[0]`` as a number).

    Attributes:
      name: The input axis, read from :data:`AXIS_SIZES` (static).
      example: Its size in the traced example (used without ``AXIS_SIZES``) (static).
      dtype: The constant's dtype (static).

    Example:
        >>> AxisSize("seq", 5, "int32").value({AXIS_SIZES: (("seq", 9),)})
        Array(9, dtype=int32)
    """

    name: str = static_field()
    example: int = static_field()
    dtype: str = static_field()

    def value(self, side_inputs: Mapping[str, Any]) -> jax.Array:
        """The size at call time, as a scalar of ``dtype``."""
        return jnp.asarray(_size((self.name, self.example), side_inputs), dtype=self.dtype)


def constant_value(value: Any) -> Any:
    """The value a glue constant contributes (a :class:`ParameterUse` named for its use, else itself).

    Example:
        >>> constant_value(2.0)
        2.0
    """
    return value.named_value() if isinstance(value, ParameterUse) else value


@pytree_dataclass
class ApplyPrimitive(Layer):
    """Applies one elementwise JAX primitive to inputs and constants, aligning axes by name.

    Attributes:
      primitive: The primitive (``jax.lax.add_p``, ``exp_p`` ...) (static).
      params: Its parameters as ``((name, value), ...)`` (static).
      operand_order: Where each operand comes from: ``("input", i)`` is the
        ``i``-th element of the (tuple) input, ``("constant", j)`` is
        ``constants[j]`` (static).
      constants: Scalars, :class:`AxisSize` s, arrays, named arrays or ``Parameter`` s; parameters
        stay selectable (``at_instances_of(pzb.Parameter)``).
      renames: Per operand, ``((old, new), ...)`` renames that align the
        operands' axis names before the primitive (static).

    Example:
        >>> add = ApplyPrimitive(jax.lax.add_p, (), (("input", 0), ("input", 1)))
        >>> a, b = pzb.nx.wrap(jnp.ones(2), "features"), pzb.nx.wrap(jnp.ones(3), "seq")
        >>> dict(add((a, b)).named_shape)
        {'features': 2, 'seq': 3}
    """

    primitive: Any = static_field()
    params: tuple[tuple[str, Any], ...] = static_field()
    operand_order: tuple[tuple[str, int], ...] = static_field()
    constants: tuple[Any, ...] = ()
    renames: tuple[tuple[tuple[str, str], ...], ...] = static_field(default=())

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        inputs = _operands(x)
        operands = []
        for position, (source, index) in enumerate(self.operand_order):
            value = inputs[index] if source == "input" else self.constants[index]
            value = value.value(side_inputs) if isinstance(value, AxisSize) else constant_value(value)
            renames = dict(self.renames[position]) if position < len(self.renames) else {}
            operands.append(_renamed(value, renames))
        params = dict(self.params)
        return elementwise(functools.partial(_bind, self.primitive, params), *operands, what=str(self.primitive))


_NO_IMPLICIT_BROADCAST = ("select_n", "clamp")


def _bind(primitive: Any, params: Mapping[str, Any], *data: Any) -> Any:
    # Operands come aligned by name with size-one axes where a name is missing; most lax
    # primitives broadcast those, select_n and clamp need equal shapes.
    if primitive.name in _NO_IMPLICIT_BROADCAST:
        shape = jnp.broadcast_shapes(*(jnp.shape(d) for d in data if jnp.ndim(d)))
        data = tuple(jnp.broadcast_to(d, shape) if jnp.ndim(d) else d for d in data)
    return primitive.bind(*data, **params)


@pytree_dataclass
class ContractInputs(Layer):
    """Multiplies the elements of a tuple input and sums over ``contract_axes`` (attention scores, ``p @ v``).

    Attributes:
      contract_axes: Names summed over (static).
      renames: Per operand, renames applied first (static): contracted and
        shared axes must carry the same name, other axes distinct ones.
      precision: ``lax`` precision of the contraction (static).

    Example:
        >>> q = pzb.nx.wrap(jnp.ones((2, 4)), "seq", "projection")
        >>> k = pzb.nx.wrap(jnp.ones((3, 4)), "kv_seq", "projection")
        >>> dict(ContractInputs(("projection",))((q, k)).named_shape)
        {'seq': 2, 'kv_seq': 3}
    """

    contract_axes: tuple[str, ...] = static_field()
    renames: tuple[tuple[tuple[str, str], ...], ...] = static_field(default=())
    precision: Any = static_field(default=None)

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        operands = [_renamed(v, dict(self.renames[i]) if i < len(self.renames) else {})
                    for i, v in enumerate(_operands(x))]
        return contract(operands, self.contract_axes, precision=self.precision)


@pytree_dataclass
class SplitAxis(Layer):
    """Splits named axis ``axis`` into ``(first, second)`` (``first`` major) by a free reshape.

    Code that forms attention heads by ``reshape(seq, heads, -1)`` of a flat
    projection does exactly this on names.

    Attributes:
      axis: The axis split (static).
      first: Name of the major part (static).
      first_size: Its size (static).
      second: Name of the minor part (static).

    Example:
        >>> dict(SplitAxis("projection", "heads", 2, "projection")(pzb.nx.ones({"projection": 6})).named_shape)
        {'heads': 2, 'projection': 3}
    """

    axis: str = static_field()
    first: str = static_field()
    first_size: int = static_field()
    second: str = static_field()

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        return split_axis(x, self.axis, self.first, self.first_size, self.second)


@pytree_dataclass
class MergeAxes(Layer):
    """Merges named axes ``(first, second)`` (``first`` major) into ``merged``.

    Example:
        >>> dict(MergeAxes("heads", "projection", "projection")(pzb.nx.ones({"heads": 2, "projection": 3})).named_shape)
        {'projection': 6}
    """

    first: str = static_field()
    second: str = static_field()
    merged: str = static_field()

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        return merge_axes(x.canonicalize() if hasattr(x, "canonicalize") else x, self.first, self.second,
                          self.merged)


_REDUCERS = {
    "reduce_sum": jnp.sum, "reduce_max": jnp.max, "reduce_min": jnp.min, "reduce_prod": jnp.prod,
    "reduce_and": jnp.all, "reduce_or": jnp.any, "argmax": jnp.argmax, "argmin": jnp.argmin,
}


@pytree_dataclass
class ReduceAxes(Layer):
    """Reduces the named ``axes`` with one of ``sum``, ``max``, ``min``, ``prod``, ``and``, ``or``, ``argmax``, ``argmin``.

    Attributes:
      reduction: The ``lax`` name of the reduction (``"reduce_sum"`` ...) (static).
      axes: Names reduced (static); ``argmax`` / ``argmin`` take one.
      index_dtype: Result dtype of ``argmax`` / ``argmin`` (static).

    Example:
        >>> ReduceAxes("reduce_sum", ("features",))(pzb.nx.ones({"seq": 2, "features": 3})).unwrap("seq").tolist()
        [3.0, 3.0]
    """

    reduction: str = static_field()
    axes: tuple[str, ...] = static_field()
    index_dtype: Any = static_field(default=None)

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> Any:
        fn = _REDUCERS[self.reduction]
        data, positional, names = data_layout(x)
        missing = [a for a in self.axes if a not in names]
        if missing:
            raise NamedAxisError(
                f"ReduceAxes({self.reduction}): input lacks named axes {missing} (found {dict(x.named_shape)}). "
                "Fix: reduce axes the input has, or rename them first."
            )
        axes = tuple(names[a] for a in self.axes)
        if self.reduction in ("argmax", "argmin"):
            out = fn(data, axis=axes[0]).astype(self.index_dtype or jnp.int32)
        else:
            out = fn(data, axis=axes)
        return _drop(out, positional, names, set(axes))


def _drop(out: jax.Array, positional: tuple[int, ...], names: Mapping[str, int], dropped: set[int]) -> Any:
    shift = lambda axis: axis - sum(1 for d in dropped if d < axis)  # noqa: E731
    kept = {n: shift(a) for n, a in names.items() if a not in dropped}
    return make_named(out, tuple(shift(a) for a in positional), kept)


@pytree_dataclass
class Concatenate(Layer):
    """Concatenates the elements of a tuple input along the named axis ``axis`` (U-Net skips).

    Attributes:
      axis: The axis joined (static).
      renames: Per operand, renames applied first (static).

    Example:
        >>> a, b = pzb.nx.ones({"channels": 2, "width": 3}), pzb.nx.zeros({"channels": 1, "width": 3})
        >>> Concatenate("channels")((a, b)).named_shape["channels"]
        3
    """

    axis: str = static_field()
    renames: tuple[tuple[tuple[str, str], ...], ...] = static_field(default=())

    def __call__(self, x: Any, /, **side_inputs: Any) -> nx.NamedArray:
        operands = [_renamed(_named_constant(v), dict(self.renames[i]) if i < len(self.renames) else {})
                    for i, v in enumerate(_operands(x))]
        sizes: dict[str, int] = {}
        for v in operands:
            for name, size in v.named_shape.items():
                if name != self.axis:
                    sizes.setdefault(name, size)
        order = list(sizes)
        # An operand lacking another's axis (a constant index next to a batched one) is broadcast along it.
        operands = [_broadcast_to(v, {n: s for n, s in sizes.items() if n not in v.named_shape}) for v in operands]
        datas = [v.order_as(*order, self.axis).data_array if self.axis in v.named_shape
                 else v.order_as(*order).data_array[..., None] for v in operands]
        data = jnp.concatenate(datas, axis=-1)
        return nx.NamedArray(data, dict(zip([*order, self.axis], data.shape[-len(order) - 1:])))


def _named_constant(value: Any) -> Any:
    # A traced constant whose every axis has size one arrives as a plain array: a scalar to broadcast.
    if not nx.is_namedarray(value) and np.size(value) == 1:
        return nx.wrap(jnp.reshape(value, ()))
    return value


def _broadcast_to(value: Any, extra: Mapping[str, int]) -> Any:
    return value + nx.zeros(dict(extra), dtype=value.dtype) if extra else value


@pytree_dataclass
class SliceAxes(Layer):
    """Takes ``start:stop:step`` of each named axis in ``slices``.

    Attributes:
      slices: ``((name, start, stop, step[, follow]), ...)`` (static). With
        ``follow`` (the name of an input axis), the slice is that axis's
        length at call time (``positions[:seq]``), read from :data:`AXIS_SIZES`.

    Example:
        >>> SliceAxes((("seq", 1, 3, 1),))(pzb.nx.wrap(jnp.arange(4), "seq")).unwrap("seq").tolist()
        [1, 2]
        >>> table = pzb.nx.wrap(jnp.arange(6), "pos")
        >>> SliceAxes((("pos", 0, 3, 1, "seq"),))(table, axis_sizes=(("seq", 5),)).unwrap("pos").tolist()
        [0, 1, 2, 3, 4]
    """

    slices: tuple[tuple[Any, ...], ...] = static_field()

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        sizes = dict(side_inputs.get(AXIS_SIZES, ()))
        index = {}
        for name, start, stop, step, *follow in self.slices:
            if follow and follow[0] in sizes:
                stop = start + sizes[follow[0]]
            index[name] = slice(start, stop, step)
        return x[index]


@pytree_dataclass
class SqueezeAxes(Layer):
    """Removes named axes of size one.

    Example:
        >>> dict(SqueezeAxes(("seq",))(pzb.nx.ones({"seq": 1, "features": 2})).named_shape)
        {'features': 2}
    """

    axes: tuple[str, ...] = static_field()

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        return x[{name: 0 for name in self.axes}]


@pytree_dataclass
class AddAxes(Layer):
    """Broadcasts the input over new named axes (``jnp.broadcast_to`` on names).

    Attributes:
      sizes: ``((name, size[, source]), ...)``; the size of an axis that
        follows the input (``source``, default ``name``) is read from the
        :data:`AXIS_SIZES` side input when it is there (static).

    Example:
        >>> dict(AddAxes((("seq", 3),))(pzb.nx.ones({"features": 2})).named_shape)
        {'seq': 3, 'features': 2}
    """

    sizes: tuple[tuple[str, int], ...] = static_field()

    def __call__(self, x: Any, /, **side_inputs: Any) -> nx.NamedArrayBase:
        x = x if nx.is_namedarray(x) else nx.wrap(jnp.asarray(x))
        new = {entry[0]: _size(entry, side_inputs) for entry in self.sizes}
        data, positional, names = data_layout(x)
        out = jnp.broadcast_to(data, tuple(new.values()) + data.shape)
        return make_named(out, tuple(a + len(new) for a in positional),
                          {**{n: i for i, n in enumerate(new)}, **{n: a + len(new) for n, a in names.items()}})


@pytree_dataclass
class Iota(Layer):
    """``lax.iota`` along the named axis ``axis``, broadcast over the other named axes in ``sizes``.

    The input is ignored (iota has no operand); sizes of input-dependent
    axes come from the :data:`AXIS_SIZES` side input, so positions follow
    the sequence length of each call.

    Attributes:
      axis: The counted axis (static).
      sizes: ``((name, size[, source]), ...)`` of every result axis, ``axis``
        included (static; see :class:`AddAxes`).
      dtype: Result dtype (static).

    Example:
        >>> Iota("seq", (("seq", 3),), jnp.int32)(None, axis_sizes=(("seq", 4),)).unwrap("seq").tolist()
        [0, 1, 2, 3]
    """

    axis: str = static_field()
    sizes: tuple[tuple[str, int], ...] = static_field()
    dtype: Any = static_field()

    def __call__(self, x: Any, /, **side_inputs: Any) -> nx.NamedArray:
        shape = {entry[0]: _size(entry, side_inputs) for entry in self.sizes}
        data = jax.lax.broadcasted_iota(self.dtype, tuple(shape.values()), list(shape).index(self.axis))
        return nx.NamedArray(data, shape)


@pytree_dataclass
class TakeAlongAxis(Layer):
    """Looks up entries of a table along its named axis ``axis`` at integer indices (``table[ids]``).

    The result has the table's other axes and the indices' axes (an
    embedding lookup: ``{vocabulary, features}`` at ``{batch, seq}`` ids gives
    ``{batch, seq, features}``).

    Attributes:
      axis: The table axis indexed (static).
      table: A constant table (a :class:`ParameterUse`), or None when the
        table is the first element of a ``(table, indices)`` input.
      mode: Out-of-bounds mode of ``.at[ids].get`` (``"clip"``, ``"fill"``, ``"promise_in_bounds"``) (static).

    Example:
        >>> table = pzb.nx.wrap(jnp.arange(6.0).reshape(3, 2), "vocabulary", "features")
        >>> out = TakeAlongAxis("vocabulary")((table, pzb.nx.wrap(jnp.array([2, 0]), "seq")))
        >>> out.unwrap("seq", "features").tolist()
        [[4.0, 5.0], [0.0, 1.0]]
    """

    axis: str = static_field()
    table: Any = None
    mode: str | None = static_field(default=None)

    def __call__(self, x: Any, /, **side_inputs: Any) -> nx.NamedArray:
        table, ids = (constant_value(self.table), x) if self.table is not None else x
        others = [n for n in table.named_shape if n != self.axis]
        data = table.unwrap(self.axis, *others)
        id_names = list(ids.named_shape)
        out = data.at[ids.unwrap(*id_names)].get(mode=self.mode)
        return nx.NamedArray(out, dict(zip([*id_names, *others], out.shape)))


@pytree_dataclass
class Constant(Layer):
    """Returns a constant (a named array, an array or a ``Parameter`` s value); the input is ignored.

    Example:
        >>> Constant(pzb.nx.wrap(jnp.ones(2), "features"))(None).unwrap("features").tolist()
        [1.0, 1.0]
    """

    value: Any

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        return constant_value(self.value)


def static_params(params: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """A primitive's parameters as a hashable tuple (numpy arrays become tuples).

    Example:
        >>> static_params({"y": 2})
        (('y', 2),)
    """
    return tuple((k, tuple(np.asarray(v).tolist()) if isinstance(v, np.ndarray) else v) for k, v in params.items())
