"""The converter's handling of position-based primitives (a mixin of the graph converter).

A primitive that is neither elementwise nor one the converter rewrites into
named layers (contractions, reshapes, reductions, ``table[ids]`` ...) becomes
one :class:`~pzbridge.nn.positional_ops.ApplyPositional` node. Axis names flow
through it by position: a result's axis is the operand's axis at the same
position when the sizes agree (``cumsum``, ``sort``, ``dynamic_update_slice``,
the unpadded axes of ``pad``), else a new axis that takes the operand's name
as a suggestion (the sliced ``seq`` of a ``dynamic_slice``). A convolution
maps its axes through its dimension numbers: batch to batch, the input's
channels to the kernel's input channels, the kernel's output channels to
the result's, spatial axes keeping their names.

Primitives with a body (``while``), random-number and collective primitives,
and primitives with side effects (callbacks) stay untraceable.

Example:
    >>> import jax, jax.numpy as jnp
    >>> closed = jax.make_jaxpr(lambda x: jax.lax.cumsum(x, axis=0))(jnp.ones((3, 2)))
    >>> is_positional(closed.eqns[0])
    True
"""

from __future__ import annotations

from typing import Any

import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr

from pzbridge.bridge.tracing.graph_types import FlatEqn, Lit, ParamAtom, Untraceable
from pzbridge.nn.named_ops import static_params
from pzbridge.nn.positional_ops import ApplyPositional

# Shape-preserving along the positions they act on, so the elementwise shape test would misread them.
_ALWAYS_POSITIONAL = {
    "scatter", "scatter-add", "scatter_add", "scatter_mul", "scatter_min", "scatter_max", "dynamic_slice",
    "dynamic_update_slice", "conv_general_dilated", "sort", "cumsum", "cumprod", "cummax", "cummin",
    "cumlogsumexp", "pad", "rev", "top_k", "select_and_scatter_add", "reduce_window", "reduce_window_sum",
    "reduce_window_max", "reduce_window_min", "fft", "cholesky", "triangular_solve", "tridiagonal_solve", "lu",
    "eigh", "eig", "svd", "qr", "schur", "householder_product", "lu_pivots_to_permutation", "tridiagonal",
}
_UNSUPPORTED = {
    "while", "random_bits", "random_seed", "random_wrap", "random_unwrap", "random_fold_in", "random_split",
    "threefry2x32", "rng_bit_generator", "rng_uniform", "psum", "pmax", "pmin", "all_gather", "all_to_all",
    "axis_index", "ppermute", "custom_lin", "pure_callback", "io_callback", "debug_callback",
}
# Operands whose axes are the first operand's axes, position by position (where the sizes agree).
_OPERANDS_ALIGNED = {"sort", "dynamic_update_slice", "select_and_scatter_add"}
_BODY_PARAMS = {"update_jaxpr", "jaxpr"}  # a scatter's combiner / a reduce_window's reducer: static code


def is_positional(eqn: Any) -> bool:
    """Whether a jaxpr equation must be applied by position (see the module docstring).

    Raises:
      Untraceable: For primitives traced lifting cannot apply at all.
    """
    name = eqn.primitive.name
    if name in _UNSUPPORTED or getattr(eqn, "effects", None):
        raise Untraceable(f"the code uses `{name}`, which traced lifting cannot express yet")
    if name in _ALWAYS_POSITIONAL:
        return True
    bodies = [k for k, p in eqn.params.items() if isinstance(p, (ClosedJaxpr, Jaxpr))]
    if any(k not in _BODY_PARAMS for k in bodies):
        raise Untraceable(f"the code uses `{name}`, which traced lifting cannot express yet")
    return False


class PositionalConversion:
    """Axis inference and node building for position-based primitives (mixed into the converter class)."""

    table: Any
    avals: dict[int, Any]
    names: dict[int, tuple[str | None, ...]]

    def _infer_positional(self, eqn: FlatEqn) -> None:
        if eqn.primitive.name == "conv_general_dilated":
            self._infer_conv(eqn)
            return
        if eqn.primitive.name == "gather":
            self._infer_general_gather(eqn)
            return
        operand = eqn.ins[0]
        in_dims, in_shape = self.dims_of(operand), self.shape(operand)
        if eqn.primitive.name in _OPERANDS_ALIGNED:
            for other in eqn.ins[1:]:
                for d, e, a, b in zip(in_dims, self.dims_of(other), in_shape, self.shape(other)):
                    if d is not None and e is not None and a == b and len(self.shape(other)) == len(in_shape):
                        self.table.unify(d, e)
        for out in eqn.outs:
            shape = self.avals[out].shape
            dims = []
            for axis, size in enumerate(shape):
                same_rank = len(in_shape) == len(shape)
                if same_rank and in_shape[axis] == size and in_dims[axis] is not None:
                    dims.append(in_dims[axis])
                elif size == 1:
                    dims.append(None)
                else:
                    suggested = self.table.find(in_dims[axis]).name if same_rank and in_dims[axis] else "axis"
                    dims.append(self.table.new(suggested))
            self.set_dims(out, dims)

    def _infer_general_gather(self, eqn: FlatEqn) -> None:
        """A gather's result axes through its dimension numbers: batch axes from the indices, slices from the operand.

        ``jax.vmap`` of a lookup (``weight[token]`` per token) is such a gather:
        its indices carry the mapped ``seq`` and the result must keep it.
        """
        operand, indices = eqn.ins[0], eqn.ins[1]
        numbers = eqn.params["dimension_numbers"]
        sizes = tuple(eqn.params["slice_sizes"])
        op_dims, op_shape = self.dims_of(operand), self.shape(operand)
        index_dims, index_shape = self.dims_of(indices), self.shape(indices)
        for o_axis, i_axis in zip(numbers.operand_batching_dims, numbers.start_indices_batching_dims):
            if op_dims[o_axis] is not None and index_dims[i_axis] is not None and op_shape[o_axis] == index_shape[i_axis]:
                self.table.unify(op_dims[o_axis], index_dims[i_axis])
        shape = self.avals[eqn.outs[0]].shape
        dims: list[Any] = [None] * len(shape)
        batch_positions = [p for p in range(len(shape)) if p not in numbers.offset_dims]
        for position, i_axis in zip(batch_positions, range(len(index_shape) - 1)):  # the last is the index vector
            if index_shape[i_axis] == shape[position]:
                dims[position] = index_dims[i_axis]
        sliced = [a for a in range(len(op_shape)) if a not in numbers.collapsed_slice_dims
                  and a not in numbers.operand_batching_dims]
        for position, o_axis in zip(numbers.offset_dims, sliced):
            if sizes[o_axis] == op_shape[o_axis] == shape[position]:
                dims[position] = op_dims[o_axis]
            elif shape[position] != 1 and op_dims[o_axis] is not None:
                dims[position] = self.table.new(self.table.find(op_dims[o_axis]).name)
        for position, size in enumerate(shape):
            if dims[position] is None and size != 1:
                dims[position] = self.table.new("axis")
        self.set_dims(eqn.outs[0], dims)

    def _infer_conv(self, eqn: FlatEqn) -> None:
        lhs, rhs = eqn.ins
        numbers = eqn.params["dimension_numbers"]
        lhs_spec, rhs_spec, out_spec = numbers.lhs_spec, numbers.rhs_spec, numbers.out_spec
        ld, rd = self.dims_of(lhs), self.dims_of(rhs)
        if eqn.params.get("feature_group_count", 1) == 1 and ld[lhs_spec[1]] is not None and rd[rhs_spec[1]] is not None:
            self.table.unify(ld[lhs_spec[1]], rd[rhs_spec[1]])
        out = eqn.outs[0]
        shape = self.avals[out].shape
        dims: list[Any] = [None] * len(shape)
        if eqn.params.get("batch_group_count", 1) == 1:
            dims[out_spec[0]] = ld[lhs_spec[0]]
        out_channels = rd[rhs_spec[0]]
        if out_channels is not None:
            root = self.table.find(out_channels)
            if not root.fixed and root.name == "axis":  # the kernel's output channels: named like the input's
                root.name = self.table.find(ld[lhs_spec[1]]).name if ld[lhs_spec[1]] is not None else "channels"
        dims[out_spec[1]] = out_channels
        for k, (o_axis, l_axis, r_axis) in enumerate(zip(out_spec[2:], lhs_spec[2:], rhs_spec[2:])):
            spatial = self.table.find(ld[l_axis]).name if ld[l_axis] is not None else f"spatial{k}"
            kernel = rd[r_axis]
            if kernel is not None and not self.table.find(kernel).fixed and self.table.find(kernel).name == "axis":
                self.table.find(kernel).name = f"kernel_{spatial}"
            same = self.shape(lhs)[l_axis] == shape[o_axis] and ld[l_axis] is not None
            dims[o_axis] = ld[l_axis] if same else self.table.new(spatial)
        for axis, size in enumerate(shape):
            if dims[axis] is None and size != 1:
                dims[axis] = self.table.new("channels" if axis == out_spec[1] else "axis")
        self.set_dims(out, dims)

    def _node_positional(self, eqn: FlatEqn) -> None:
        order: list[tuple[str, int]] = []
        constants: list[Any] = []
        operand_axes: list[tuple[str | None, ...]] = []
        ins: list[int] = []
        for atom in eqn.ins:
            if isinstance(atom, Lit):
                order.append(("constant", len(constants)))
                constants.append(np.asarray(atom.value) if not hasattr(atom.value, "aval") else atom.value)
                operand_axes.append(())
                continue
            names = self.names_of(atom)
            if isinstance(atom, ParamAtom):  # a raw weight stays a Parameter inside the layer
                order.append(("constant", len(constants)))
                constants.append(self.parameter_use(atom, names))
            else:
                order.append(("input", len(ins)))
                ins.append(self.materialize(atom))
            operand_axes.append(names)
        outputs = tuple(self.names[out] for out in eqn.outs)
        layer = ApplyPositional(eqn.primitive, static_params(eqn.params), tuple(order), tuple(constants),
                                tuple(operand_axes), outputs)
        if not ins and len(eqn.outs) == 1:  # computed from weights and constants only
            self.add(layer, (), eqn.outs[0], kind="source")
            return
        if not ins:
            raise Untraceable(f"`{eqn.primitive.name}` of weights and constants only, with several results")
        self._add_multi(layer, ins, eqn.outs)
