"""From a traced jaxpr to a dataflow graph of pzbridge layers on named axes.

The converter walks the jaxpr of a module's ``__call__`` (nested ``jit``,
``custom_jvp`` / ``custom_vjp`` calls and ``checkpoint`` bodies inlined) in
two passes. The first gives every dimension of every value an
:class:`~pzbridge.bridge.tracing.axes.AxisClass` (see that module for how
names flow). The second turns each equation into a node: a layer, the values
it reads and the value it makes. Child calls become
:class:`~pzbridge.nn.dataflow.CallChild` around the lifted child; a
contraction of an activation with one of the module's own arrays becomes a
``pzb.nn.Linear`` holding it as a ``Parameter``; elementwise code becomes
:class:`~pzbridge.nn.named_ops.ApplyPrimitive`; transposes and unit-axis
reshapes are free (named axes have no order) and make no node.

Code the converter cannot express raises :class:`Untraceable` with the
reason; the bridge then keeps the module ``Foreign`` (or raises with
``strict=True``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

from pzbridge.bridge.tracing.axes import AxisClass, AxisTable
from pzbridge.bridge.tracing.child_calls import ChildCall
from pzbridge.bridge.tracing.graph_types import (
    ChildHandler,
    ChildSpec,
    FlatEqn,
    Graph,
    InputRole,
    Lit,
    Node,
    ParamAtom,
    ParamHandler,
    ParamHint,
    Untraceable,
)
from pzbridge.bridge.tracing.cond import CondConversion
from pzbridge.bridge.tracing.overrides import ModuleRenames
from pzbridge.bridge.tracing.positional import PositionalConversion, is_positional
from pzbridge.bridge.tracing.scan import ScanConversion
from pzbridge.bridge.tracing.sizes import Retrace, SizeVariation
from pzbridge.core import named_axes as nx
from pzbridge.core.variables import unbind_variables
from pzbridge.nn.dataflow import CallChild, Pick, SideInput, Traced
from pzbridge.nn.linear import Linear, weight_output_name
from pzbridge.nn.named_mean import MeanAxes
from pzbridge.nn.named_ops import (
    AddAxes,
    ApplyPrimitive,
    Concatenate,
    Constant,
    ContractInputs,
    Iota,
    MergeAxes,
    ParameterUse,
    ReduceAxes,
    SliceAxes,
    SplitAxis,
    SqueezeAxes,
    static_params,
)


_INLINED = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
            "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
            "custom_vjp_call_jaxpr": "fun_jaxpr", "checkpoint": "jaxpr", "remat": "jaxpr",
            "remat2": "jaxpr"}  # the primitive of jax.checkpoint / eqx.filter_checkpoint in current jax
_REDUCTIONS = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or"}
_STRUCTURAL = {"scan", "cond", "gather", "dot_general", "reshape", "transpose", "broadcast_in_dim", "concatenate", "slice", "split", "squeeze",
               "expand_dims", "iota", "argmax", "argmin", "pzb_child_call", *_REDUCTIONS}


def _flatten(closed: Any, roles: Sequence[InputRole]) -> tuple[list[FlatEqn], list[Any], dict[int, Any]]:
    avals: dict[int, Any] = {}
    counter = [0]

    def new_id(aval: Any) -> int:
        counter[0] += 1
        avals[counter[0]] = aval
        return counter[0]

    eqns: list[FlatEqn] = []
    env: dict[Any, Any] = {}
    for var, const in zip(closed.jaxpr.constvars, closed.consts):
        env[var] = Lit(const)
    for index, (var, role) in enumerate(zip(closed.jaxpr.invars, roles)):
        if role.kind == "param":
            env[var] = ParamAtom(index, tuple(range(len(var.aval.shape))))
        else:
            env[var] = Lit(role.array) if role.kind == "const" else new_id(var.aval)

    def read(scope: dict[Any, Any], atom: Any) -> Any:
        if isinstance(atom, Literal):
            return Lit(np.asarray(atom.val, dtype=atom.aval.dtype))
        return scope[atom]

    def walk(jaxpr: Any, scope: dict[Any, Any]) -> None:
        for eqn in jaxpr.eqns:
            ins = [read(scope, v) for v in eqn.invars]
            name = eqn.primitive.name
            if name in _INLINED and _INLINED[name] in eqn.params:
                inner = eqn.params[_INLINED[name]]
                inner_jaxpr = getattr(inner, "jaxpr", inner)
                inner_scope: dict[Any, Any] = {}
                for var, const in zip(inner_jaxpr.constvars, getattr(inner, "consts", ())):
                    inner_scope[var] = Lit(const)
                for var, atom in zip(inner_jaxpr.invars, ins[len(ins) - len(inner_jaxpr.invars):]):
                    inner_scope[var] = atom
                walk(inner_jaxpr, inner_scope)
                for out, inner_out in zip(eqn.outvars, inner_jaxpr.outvars):
                    scope[out] = read(inner_scope, inner_out)
                continue
            if name == "transpose" and isinstance(ins[0], ParamAtom):
                # A transposed weight is the same weight (named axes have no order).
                perm = eqn.params["permutation"]
                scope[eqn.outvars[0]] = ParamAtom(ins[0].role, tuple(ins[0].perm[p] for p in perm))
                continue
            positional = name not in _STRUCTURAL and (is_positional(eqn) or not _is_elementwise(eqn))
            outs = [new_id(v.aval) for v in eqn.outvars]
            for var, out in zip(eqn.outvars, outs):
                scope[var] = out
            eqns.append(FlatEqn(eqn.primitive, dict(eqn.params), ins, outs, positional))

    walk(closed.jaxpr, env)
    outputs = [read(env, v) for v in closed.jaxpr.outvars]
    return eqns, outputs, avals


def _is_elementwise(eqn: Any) -> bool:
    if len(eqn.outvars) != 1 or any(isinstance(p, (ClosedJaxpr, Jaxpr)) for p in eqn.params.values()):
        return False
    shape = eqn.outvars[0].aval.shape
    for var in eqn.invars:
        in_shape = getattr(var.aval, "shape", ())
        if in_shape and (len(in_shape) != len(shape) or any(a not in (b, 1) for a, b in zip(in_shape, shape))):
            return False
    return True


class _Converter(ScanConversion, CondConversion, PositionalConversion, SizeVariation):
    def __init__(self, closed: Any, roles: Sequence[InputRole], child_handler: ChildHandler,
                 param_handler: ParamHandler, param_hint: ParamHint | None = None,
                 rename: ModuleRenames | None = None) -> None:
        self.roles = list(roles)
        self.rename = rename
        self.inferred = False
        self.size_bound: set[AxisClass] = set()  # axes a rule child consumes (their size is its weights')
        self.size_handled: set[int] = set()  # equations whose size-dependent constants a node follows
        self.child_handler = child_handler
        self.param_handler = param_handler
        self.param_hint = param_hint or (lambda role: None)
        self.eqns, self.outputs, self.avals = _flatten(closed, roles)
        self.table = AxisTable()
        self.dims: dict[int, list[AxisClass | None]] = {}
        self.param_dims: dict[int, list[AxisClass]] = {}
        self.lit_dims: dict[int, list[AxisClass]] = {}
        self.children: dict[int, ChildSpec] = {}
        self.split_names: dict[int, list[tuple]] = {}
        self.broadcast_new: set[int] = set()  # ids of the classes broadcast_in_dim made for new axes
        self.input_ids: dict[int, int] = {}
        self.scan_axes: dict[int, AxisClass] = {}  # per scan (its first output): the class of its stack axis
        self.child_stacks: dict[int, str] = {}  # per stacked child call (its first output): the stack axis
        ids = iter(sorted(i for i in self.avals))
        for index, role in enumerate(roles):
            if role.kind not in ("param", "const"):
                self.input_ids[index] = next(ids)

    # ------------------------------------------------------------------ pass 1: axis classes

    def shape(self, atom: Any) -> tuple[int, ...]:
        if isinstance(atom, int):
            return tuple(self.avals[atom].shape)
        if isinstance(atom, ParamAtom):
            base = self.roles[atom.role].array.shape
            return tuple(base[p] for p in atom.perm)
        return tuple(np.shape(atom.value))

    def dtype(self, atom: Any) -> Any:
        if isinstance(atom, int):
            return self.avals[atom].dtype
        if isinstance(atom, ParamAtom):
            return self.roles[atom.role].array.dtype
        return np.asarray(atom.value).dtype

    def dims_of(self, atom: Any) -> list[AxisClass | None]:
        if isinstance(atom, int):
            return self.dims[atom]
        if isinstance(atom, ParamAtom):
            if atom.role not in self.param_dims:
                role = self.roles[atom.role]
                hint = self.param_hint(role)
                names = hint if hint is not None and len(hint) == len(role.array.shape) else ("axis",) * len(
                    role.array.shape)
                self.param_dims[atom.role] = [self.table.new(n) for n in names]
            base = self.param_dims[atom.role]
            return [base[p] for p in atom.perm]
        key = id(atom)
        if key not in self.lit_dims:
            self.lit_dims[key] = [self.table.new("axis") for _ in np.shape(atom.value)]
        return self.lit_dims[key]

    def set_dims(self, value: int, dims: list[AxisClass | None]) -> None:
        dims = list(dims)
        self.dims[value] = dims
        self.table.record_value(dims)

    def assign_inputs(self) -> None:
        for index, role in enumerate(self.roles):
            if role.kind in ("param", "const"):
                continue
            value = self.input_ids[index]
            shape = self.avals[value].shape
            if role.kind == "data" or role.names:
                dims = [None if n is None else self.table.new(n, fixed=role.fixed) for n in role.names]
            else:
                dims = [self.table.new(f"{role.name}_{i}" if len(shape) > 1 else role.name) for i in range(len(shape))]
            self.set_dims(value, [None if s == 1 and not (role.kind == "data") else d for d, s in zip(dims, shape)])

    def infer(self) -> None:
        self.inferred = True
        self.assign_inputs()
        for eqn in self.eqns:
            infer = self._infer_positional if eqn.positional else getattr(
                self, "_infer_" + eqn.primitive.name, self._infer_elementwise)
            infer(eqn)

    def _infer_elementwise(self, eqn: FlatEqn) -> None:
        out = eqn.outs[0]
        shape = self.avals[out].shape
        dims: list[AxisClass | None] = []
        for axis, size in enumerate(shape):
            candidates = [self.dims_of(a)[axis] for a in eqn.ins
                          if len(self.shape(a)) == len(shape) and self.shape(a)[axis] == size]
            candidates = [c for c in candidates if c is not None]
            if not candidates:
                dims.append(None if size == 1 else self.table.new("axis"))
                continue
            first = candidates[0]
            for other in candidates[1:]:
                self.table.unify(first, other)
            dims.append(first)
        self.set_dims(out, dims)

    def _infer_dot_general(self, eqn: FlatEqn) -> None:
        lhs, rhs = eqn.ins
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        ld, rd = self.dims_of(lhs), self.dims_of(rhs)
        for a, b in zip((*lc, *lb), (*rc, *rb)):
            if ld[a] is not None and rd[b] is not None:
                self.table.unify(ld[a], rd[b])
        lfree = [i for i in range(len(ld)) if i not in lc and i not in lb]
        rfree = [i for i in range(len(rd)) if i not in rc and i not in rb]
        contracted = [self.table.find(ld[a]).name for a in lc if ld[a] is not None]
        for side, free, dims in ((lhs, lfree, ld), (rhs, rfree, rd)):
            if isinstance(side, (ParamAtom, Lit)):
                self._suggest_weight_names([dims[i] for i in free], contracted)
        out = [ld[a] for a in lb] + [ld[i] for i in lfree]
        seen = {id(self.table.find(d)) for d in out if d is not None}
        for i in rfree:
            d = rd[i]
            if d is not None and id(self.table.find(d)) in seen:
                name = self.table.find(d).name
                d = self.table.new(name if name.startswith("kv_") else "kv_" + name, fixed=True, size_like=d)
            out.append(d)
        self.set_dims(eqn.outs[0], out)

    def _suggest_weight_names(self, free: list[AxisClass | None], contracted: list[str]) -> None:
        unfixed = [d for d in free if d is not None and not self.table.find(d).fixed and self.table.find(d).name == "axis"]
        if len(unfixed) == 1:
            self.table.find(unfixed[0]).name = contracted[0] if len(contracted) == 1 else "features"
        elif len(unfixed) == 2:
            self.table.find(unfixed[0]).name, self.table.find(unfixed[1]).name = "heads", "projection"

    def _infer_pzb_child_call(self, eqn: FlatEqn) -> None:
        call: ChildCall = eqn.params["call"]
        vmaps = eqn.params["vmaps"]
        args = eqn.ins[call.module_leaf_count:]
        views = [list(self.dims_of(a)) for a in args]
        shapes = [list(self.shape(a)) for a in args]
        mapped: list[AxisClass | None] = []
        for level in vmaps:
            level_axes = level[call.module_leaf_count:]
            cls = None
            for view, shape, axis in zip(views, shapes, level_axes):
                if axis is None:
                    continue
                d = view.pop(axis)
                shape.pop(axis)
                if cls is None:
                    cls = d
                elif d is not None:
                    self.table.unify(cls, d)
            mapped.append(cls)
        structs = [jax.ShapeDtypeStruct(tuple(s), self.dtype(a)) for s, a in zip(shapes, args)]
        arg_names = [tuple(self.table.find(d).name if d is not None else None for d in view) for view in views]
        stack = self._child_stack(eqn.ins[: call.module_leaf_count])
        if stack is not None:
            self.child_stacks[eqn.outs[0]] = stack[0]
        spec = self.child_handler(call, structs, arg_names, stack=stack)
        self.children[eqn.outs[0]] = spec
        if not isinstance(spec.layer, Traced):  # a traced child checks its own sizes
            # Only axes the child's arrays have (a Linear's features) fix a size; an attention's seq is free.
            weights = _named_sizes(spec.layer)
            for view, shape, names in zip(views[: spec.data_count], shapes, spec.input_names):
                if not names:  # no convention: every axis may be the child's
                    self.size_bound.update(d for d in view if d is not None)
                    continue
                k = min(len(names), len(view))
                self.size_bound.update(d for d, name, size in zip(view[-k:], names[-k:], shape[-k:])
                                       if d is not None and (name, size) in weights)
        for view, names in zip(views[: spec.data_count], spec.input_names):
            if names is None:
                continue
            for d, name in zip(view[len(view) - len(names):], names):
                if d is not None and not self.table.find(d).fixed:
                    root = self.table.find(d)
                    root.name, root.fixed = name, True
        # A lifted child passes through every axis it does not consume: the leading axes of its first
        # input (batch axes of batched NNX code) are the leading axes of each output it names.
        consumed = spec.input_names[0] if spec.data_count and spec.input_names else None
        lead_in = views[0][: len(views[0]) - len(consumed)] if consumed is not None and views else None
        lead_shape = shapes[0][: len(lead_in)] if lead_in is not None else None
        if lead_in:
            self._unify_side_leading(views[spec.data_count:], shapes[spec.data_count:],
                                     spec.input_names[spec.data_count:], lead_in, lead_shape)
        for out, names in zip(eqn.outs, spec.output_names):
            shape = self.avals[out].shape
            own = len(shape) - len(mapped)
            if names is None and len(eqn.outs) == 1 and views and list(shape[len(mapped):]) == shapes[0]:
                # No convention (Identity, Dropout, a known activation): the lifted layer keeps its input's names.
                self.set_dims(out, list(mapped) + list(views[0]))
                continue
            tail: list[AxisClass | None] = []
            known_names = names is not None
            names = tuple(names) if names is not None else ()
            lead = own - len(names)
            passed = (known_names and lead_in is not None and len(lead_in) == lead > 0
                      and list(shape[len(mapped): len(mapped) + lead]) == list(lead_shape))
            for i, size in enumerate(shape[len(mapped):]):
                if passed and i < lead:
                    tail.append(lead_in[i])
                    continue
                known = names[i - lead] if i >= lead else None
                tail.append(None if size == 1 and known is None else self.table.new(known or "axis", fixed=known is not None))
            self.set_dims(out, list(mapped) + tail)

    def _unify_side_leading(self, views: Sequence[list[AxisClass | None]], shapes: Sequence[list[int]],
                            names: Sequence[tuple[str, ...] | None], lead_in: list[AxisClass | None],
                            lead_shape: list[int]) -> None:
        """A named side input's leading axes are the first input's leading (batch) axes, right-aligned.

        NNX broadcasts a ``mask=`` ``[batch..., heads, q, kv]`` against the
        query's batch axes, which the child does not name.
        """
        for view, shape, own in zip(views, shapes, names):
            if not own or len(view) <= len(own):
                continue
            lead, sizes = view[: len(view) - len(own)], shape[: len(shape) - len(own)]
            for d, size, outer, outer_size in zip(reversed(lead), reversed(sizes), reversed(lead_in),
                                                  reversed(lead_shape)):
                if d is not None and outer is not None and size == outer_size:
                    self.table.unify(outer, d)

    def _child_stack(self, module_operands: Sequence[Any]) -> tuple[str, int] | None:
        """``(axis, size)`` when a child's arrays are all slices of stacked arrays (a scan over layers)."""
        stacked = [isinstance(a, ParamAtom) and self.roles[a.role].stacked is not None for a in module_operands]
        if not any(stacked):
            return None
        if not all(stacked):
            raise Untraceable("a child called inside a scan mixes per-layer (scanned) and shared weights")
        role = self.roles[module_operands[0].role]
        return role.stack_axis, int(role.stacked.shape[0])

    def _infer_reshape(self, eqn: FlatEqn) -> None:
        x = eqn.ins[0]
        in_shape, out_shape = self.shape(x), self.avals[eqn.outs[0]].shape
        groups = _reshape_groups(in_shape, out_shape)
        if groups is None:
            raise Untraceable(f"a reshape from {in_shape} to {out_shape} that is neither a split nor a merge of axes")
        in_dims = self.dims_of(x)
        out: list[AxisClass | None] = [None] * len(out_shape)
        plan = []
        for ins, outs in groups:
            named_in = [in_dims[i] for i in ins]
            if len(ins) == 1 and len(outs) == 1:
                out[outs[0]] = named_in[0]
            elif len(ins) == 1:
                base = self.table.find(named_in[0]).name if named_in[0] is not None else "axis"
                names = ["heads", "projection"] if len(outs) == 2 and base == "features" else [
                    f"{base}_{k}" for k in range(len(outs))]
                for o, n in zip(outs, names):
                    out[o] = self.table.new(n, fixed=True)
                plan.append(("split", ins, outs))
            elif len(outs) == 1:
                repeated = self._repeated_axis(named_in)
                if repeated is not None:
                    out[outs[0]] = repeated
                    plan.append(("merge", ins, outs))
                    continue
                parts = [self.table.find(d).name for d in named_in if d is not None]
                merged = "features" if parts[-2:] == ["heads", "projection"] else "_".join(parts)
                out[outs[0]] = self.table.new(merged, fixed=True)
                plan.append(("merge", ins, outs))
            else:
                raise Untraceable(f"a reshape from {in_shape} to {out_shape} that mixes several axes")
        self.split_names[eqn.outs[0]] = plan
        self.set_dims(eqn.outs[0], out)

    def _repeated_axis(self, merged: list[AxisClass | None]) -> AxisClass | None:
        """The class of an axis repeated by ``jnp.repeat`` / ``jnp.tile``, or None for another merge.

        Both merge an axis with a new axis that ``broadcast_in_dim`` made. The
        result is the axis the code goes on to use (the ``heads`` of grouped-query
        attention), so it takes the repeated axis's name and that axis, when its
        name was only suggested, becomes ``kv_<name>`` (``kv_heads``).
        """
        if len(merged) != 2 or any(d is None for d in merged):
            return None
        new = [id(d) in self.broadcast_new for d in merged]
        if new.count(True) != 1:
            return None
        base = self.table.find(merged[new.index(False)])
        name = base.name
        if not base.fixed and not name.startswith("kv_") and name != "axis":
            base.name = "kv_" + name
        return self.table.new(name)

    def _infer_transpose(self, eqn: FlatEqn) -> None:
        dims = self.dims_of(eqn.ins[0])
        self.set_dims(eqn.outs[0], [dims[p] for p in eqn.params["permutation"]])

    def _infer_broadcast_in_dim(self, eqn: FlatEqn) -> None:
        x = eqn.ins[0]
        in_dims, in_shape = self.dims_of(x), self.shape(x)
        shape, bdims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
        out: list[AxisClass | None] = []
        for j, size in enumerate(shape):
            if j in bdims and in_shape[bdims.index(j)] == size:
                out.append(in_dims[bdims.index(j)])
            elif size == 1:
                out.append(None)
            else:
                new = self.table.new("axis")
                self.broadcast_new.add(id(new))
                out.append(new)
        self.set_dims(eqn.outs[0], out)

    def _infer_squeeze(self, eqn: FlatEqn) -> None:
        dims = self.dims_of(eqn.ins[0])
        gone = set(eqn.params["dimensions"])
        self.set_dims(eqn.outs[0], [d for i, d in enumerate(dims) if i not in gone])

    def _infer_expand_dims(self, eqn: FlatEqn) -> None:
        self._infer_elementwise(eqn)

    def _reduce(self, eqn: FlatEqn) -> None:
        dims = self.dims_of(eqn.ins[0])
        gone = set(eqn.params["axes"])
        self.set_dims(eqn.outs[0], [d for i, d in enumerate(dims) if i not in gone])

    _infer_reduce_sum = _infer_reduce_max = _infer_reduce_min = _infer_reduce_prod = _reduce
    _infer_reduce_and = _infer_reduce_or = _infer_argmax = _infer_argmin = _reduce

    def _infer_concatenate(self, eqn: FlatEqn) -> None:
        axis = eqn.params["dimension"]
        dims = [self.dims_of(a) for a in eqn.ins]
        out: list[AxisClass | None] = []
        for i in range(len(dims[0])):
            if i == axis:
                first = next((d[i] for d in dims if d[i] is not None), None)
                out.append(self.table.new(self.table.find(first).name if first else "axis", fixed=True))
                continue
            present = [d[i] for d in dims if d[i] is not None]
            for other in present[1:]:
                self.table.unify(present[0], other)
            out.append(present[0] if present else None)
        self.set_dims(eqn.outs[0], out)

    def _infer_slice(self, eqn: FlatEqn) -> None:
        x = eqn.ins[0]
        dims, shape = self.dims_of(x), self.shape(x)
        out_shape = self.avals[eqn.outs[0]].shape
        out = []
        for d, before, after in zip(dims, shape, out_shape):
            if before == after or d is None:
                out.append(d if after != 1 or d is not None else None)
            else:
                root = self.table.find(d)
                out.append(self.table.new(root.name, fixed=root.fixed))
        self.set_dims(eqn.outs[0], out)

    def _infer_split(self, eqn: FlatEqn) -> None:
        x = eqn.ins[0]
        axis = eqn.params["axis"]
        dims = self.dims_of(x)
        for out in eqn.outs:
            part = list(dims)
            if dims[axis] is not None:
                part[axis] = self.table.new(self.table.find(dims[axis]).name, fixed=True)
            self.set_dims(out, part)

    def _take_axis(self, eqn: FlatEqn) -> int:
        """The operand axis a gather takes along, for the ``table[ids]`` / ``jnp.take`` form; else Untraceable."""
        numbers = eqn.params["dimension_numbers"]
        operand, indices = eqn.ins
        shape, index_shape = self.shape(operand), self.shape(indices)
        axis = numbers.collapsed_slice_dims[0] if len(numbers.collapsed_slice_dims) == 1 else None
        sizes = tuple(eqn.params["slice_sizes"])
        if (axis is None or tuple(numbers.start_index_map) != (axis,) or numbers.operand_batching_dims
                or not index_shape or index_shape[-1] != 1
                or sizes != tuple(1 if i == axis else n for i, n in enumerate(shape))
                or tuple(numbers.offset_dims) != tuple(range(len(index_shape) - 1, len(eqn.outs and self.avals[
                    eqn.outs[0]].shape)))):
            raise Untraceable("it uses a gather that is not a lookup along one axis (table[ids])")
        return axis

    def _infer_gather(self, eqn: FlatEqn) -> None:
        try:
            axis = self._take_axis(eqn)
        except Untraceable:  # not a lookup: applied by position
            eqn.positional = True
            self._infer_positional(eqn)
            return
        operand, indices = eqn.ins
        dims = self.dims_of(operand)
        unnamed = [d for d in dims if d is not None and not self.table.find(d).fixed and self.table.find(d).name == "axis"]
        if dims[axis] in unnamed:  # an embedding table: {vocabulary, features}
            self.table.find(dims[axis]).name = "vocabulary"
            rest = [d for d in unnamed if d is not dims[axis]]
            if len(rest) == 1:
                self.table.find(rest[0]).name = "features"
        table = [d for i, d in enumerate(dims) if i != axis]
        self.set_dims(eqn.outs[0], list(self.dims_of(indices)[:-1]) + table)

    def _infer_iota(self, eqn: FlatEqn) -> None:
        self.set_dims(eqn.outs[0], [None if s == 1 else self.table.new("axis") for s in self.avals[eqn.outs[0]].shape])

    # ------------------------------------------------------------------ pass 2: nodes

    def build(self) -> Graph:
        if not self.inferred:
            self.infer()
        values = list(self.dims.values())
        self.final = self.table.final_names(values)
        if self.rename is not None:
            self.final = self.rename.apply(self.final)
        self.names = {v: tuple(self.table.name_of(d, self.final) for d in dims) for v, dims in self.dims.items()}
        if self.rename is not None:
            for names in self.names.values():
                self.rename.check_value(names)
        self.alias: dict[int, int] = {}
        self.nodes: list[Node] = []
        self.params: dict[int, Any] = {}
        self.constant_values: dict[int, int] = {}
        self.sums: dict[int, tuple[int, tuple[str, ...], int]] = {}  # reduce_sum out -> (source, axes, size)
        self.next_id = max(self.avals) + 1 if self.avals else 1
        for index, role in enumerate(self.roles):
            if role.kind == "side":
                value = self.input_ids[index]
                self.nodes.append(Node(SideInput(role.name), (), value, kind="source"))
        for eqn in self.eqns:
            node = self._node_positional if eqn.positional else getattr(
                self, "_node_" + eqn.primitive.name, self._node_elementwise)
            node(eqn)
            self.assert_sizes_followed(eqn, id(eqn) in self.size_handled)
        outputs = [self.materialize(atom) for atom in self.outputs]
        data = next((self.input_ids[i] for i, r in enumerate(self.roles) if r.kind == "data"), None)
        used = set(self.params)
        unused = [i for i, r in enumerate(self.roles) if r.kind == "param" and i not in used]
        return Graph(self.nodes, data, outputs, self.names, unused,
                     output_names=[tuple(self.names_of(atom)) for atom in self.outputs])

    def input_names(self) -> set[str]:
        """Names of the data input's axes (their sizes vary per call)."""
        data = [self.input_ids[i] for i, r in enumerate(self.roles) if r.kind == "data"]
        return {n for value in data for n in self.names.get(value, ()) if n is not None}

    def size_source(self, cls: AxisClass | None) -> str:
        """The input axis whose size this axis has at run time (``kv_seq`` has ``seq``'s), or "" (a fixed size)."""
        root = self.table.find(cls)
        while root.size_like is not None:
            root = self.table.find(root.size_like)
        data = [self.input_ids[i] for i, r in enumerate(self.roles) if r.kind == "data"]
        if not any(d is not None and self.table.find(d) is root for value in data for d in self.dims.get(value, ())):
            return ""  # an axis of the module's own making that merely shares an input axis's name
        return self.table.name_of(root, self.final) or ""

    def shape_size_source(self, eqn: FlatEqn, index: int, cls: AxisClass | None) -> str:
        """The input axis whose size entry ``index`` of ``eqn``'s ``shape`` has at run time, or "" (fixed).

        By the axis class when the code links it to an input axis; else by the second trace (a mask built
        with ``jnp.ones((x.shape[0], x.shape[0]))`` has no data path from ``x``, only its size).
        """
        return self.size_source(cls) or self.shape_follows(eqn, index) or ""

    def resolve(self, value: int) -> int:
        while value in self.alias:
            value = self.alias[value]
        return value

    def names_of(self, atom: Any, dims: Sequence[AxisClass | None] | None = None) -> tuple[str | None, ...]:
        if isinstance(atom, int):
            return self.names[atom]
        if isinstance(atom, ParamAtom) and dims is None:
            # One array's axes need distinct names even where the code made two of them one axis class.
            self.dims_of(atom)
            storage = _dedupe(tuple(self.table.name_of(d, self.final) for d in self.param_dims[atom.role]))
            return tuple(storage[p] for p in atom.perm)
        return tuple(self.table.name_of(d, self.final) for d in (dims or self.dims_of(atom)))

    def parameter_use(self, atom: ParamAtom, use_names: tuple[str | None, ...]) -> Any:
        """The Parameter behind ``atom`` renamed to ``use_names`` (per view dim) for one use."""
        self.dims_of(atom)
        base = self.param_dims[atom.role]
        storage_names = tuple(self.table.name_of(d, self.final) for d in base)
        storage_names = _dedupe(storage_names)
        parameter = self.param(atom.role, storage_names)
        per_storage: list[str | None] = [None] * len(base)
        for view_dim, storage_dim in enumerate(atom.perm):
            per_storage[storage_dim] = use_names[view_dim]
        return ParameterUse(parameter, self._step_names(atom.role, parameter), tuple(per_storage))

    def param(self, role: int, storage_names: tuple[str, ...]) -> Any:
        if role not in self.params:
            self.params[role] = self.param_handler(self.roles[role], storage_names)
        return self.params[role]

    def add(self, layer: Any, ins: Sequence[int], out: int, kind: str = "op") -> None:
        self.nodes.append(Node(layer, tuple(self.resolve(i) for i in ins), out, kind))

    def materialize(self, atom: Any) -> int:
        """A value id for any operand (constants and parameters become source nodes)."""
        if isinstance(atom, int):
            return self.resolve(atom)
        key = id(atom)
        if key in self.constant_values:
            return self.constant_values[key]
        value = self.next_id
        self.next_id += 1
        if isinstance(atom, ParamAtom):
            names = self.names_of(atom)
            layer = Constant(self.parameter_use(atom, names))
        else:
            names = self.names_of(atom)
            data = np.asarray(atom.value) if not hasattr(atom.value, "aval") else atom.value
            layer = Constant(_name_constant(data, names))
        self.names[value] = tuple(n for n in names)
        self.nodes.append(Node(layer, (), value, kind="source"))
        self.constant_values[key] = value
        return value

    def _renames_to(self, atom: Any, target: Sequence[str | None]) -> tuple[tuple[str, str], ...]:
        own = self.names_of(atom)
        return tuple((a, b) for a, b in zip(own, target) if a is not None and b is not None and a != b)

    def _node_elementwise(self, eqn: FlatEqn) -> None:
        out = eqn.outs[0]
        target = self.names[out]
        order, constants, renames, ins = [], [], [], []
        for position, atom in enumerate(eqn.ins):
            shape = self.shape(atom)
            aligned = target if len(shape) == len(target) else (None,) * len(shape)
            if isinstance(atom, int):
                order.append(("input", len(ins)))
                ins.append(atom)
                renames.append(self._renames_to(atom, aligned))
            elif isinstance(atom, ParamAtom):
                use = tuple(t if s != 1 else None for t, s in zip(aligned, shape))
                order.append(("constant", len(constants)))
                constants.append(self.parameter_use(atom, use))
                renames.append(())
            else:
                order.append(("constant", len(constants)))
                data = atom.value
                size = self.size_constant(eqn, position, data)
                if size is not None:
                    constants.append(size)
                elif np.ndim(data) == 0:
                    constants.append(data)
                else:
                    use = tuple(t if s != 1 else None for t, s in zip(aligned, np.shape(data)))
                    constants.append(_name_constant(np.asarray(data) if not hasattr(data, "aval") else data, use))
                renames.append(())
        layer = ApplyPrimitive(eqn.primitive, static_params(eqn.params), tuple(order), tuple(constants),
                               tuple(renames))
        if all(isinstance(k, int) for k in eqn.varies):  # every moving constant is an AxisSize now
            self.size_handled.add(id(eqn))
        if not ins:
            self.names[out] = target
            self.add(layer, (), out, kind="source")
            return
        self.add(layer, ins, out)

    def _node_dot_general(self, eqn: FlatEqn) -> None:
        lhs, rhs = eqn.ins
        (lc, rc), _ = eqn.params["dimension_numbers"]
        out = eqn.outs[0]
        precision = eqn.params.get("precision")
        activation, weight = (lhs, rhs) if isinstance(rhs, ParamAtom) else (rhs, lhs)
        if isinstance(weight, ParamAtom) and isinstance(activation, int) and precision is None:
            # A Linear stores a weight output that clashes with an input name suffixed (features_out), so
            # its contracted names need only avoid the activation's other axes.
            l_target, r_target, w_free = self._dot_targets(eqn, share_weight_free=weight)
            contracted = tuple(l_target[a] for a in lc if l_target[a] is not None)
            a_target, w_target = (l_target, r_target) if activation is lhs else (r_target, l_target)
            storage_target = tuple(weight_output_name(n, contracted) if i in w_free else n
                                   for i, n in enumerate(w_target))
            parameter = self._linear_weight(weight, storage_target)
            if parameter is not None:
                layer = Linear(parameter, contracted, tuple(w_target[i] for i in w_free))
                self._chain(layer, activation, self._renames_to(activation, a_target), out)
                return
        l_target, r_target, _ = self._dot_targets(eqn)
        contracted = tuple(l_target[a] for a in lc if l_target[a] is not None)
        ins = [self.materialize(lhs), self.materialize(rhs)]
        renames = (self._renames_from_names(self.names_of(lhs), l_target),
                   self._renames_from_names(self.names_of(rhs), r_target))
        self.add(ContractInputs(contracted, renames, precision), ins, out)

    def _dot_targets(self, eqn: FlatEqn, share_weight_free: Any = None) -> tuple[list, list, list[int]]:
        """The names each operand's axes take in a ``dot_general`` (contracted pairs share one name).

        With ``share_weight_free`` (the weight operand), a contracted name may
        equal one of the weight's free axes. Returns both operands' target
        names and the weight's free positions (empty without a weight).
        """
        lhs, rhs = eqn.ins
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        target = self.names[eqn.outs[0]]
        ln, rn = self.names_of(lhs), self.names_of(rhs)
        lfree = [i for i in range(len(ln)) if i not in lc and i not in lb]
        rfree = [i for i in range(len(rn)) if i not in rc and i not in rb]
        # Result positions: batch, lhs free, rhs free.
        l_target, r_target = list(ln), list(rn)
        for k, (a, b) in enumerate(zip(lb, rb)):
            l_target[a] = r_target[b] = target[k]
        for k, i in enumerate(lfree):
            l_target[i] = target[len(lb) + k]
        for k, i in enumerate(rfree):
            r_target[i] = target[len(lb) + len(lfree) + k]
        may_share: set[str | None] = set()
        w_free: list[int] = []
        if share_weight_free is not None:
            w_target, w_free = (r_target, rfree) if share_weight_free is rhs else (l_target, lfree)
            a_target, a_contracted = (l_target, lc) if share_weight_free is rhs else (r_target, rc)
            may_share = {w_target[i] for i in w_free} - {n for i, n in enumerate(a_target) if i not in a_contracted}
        for k, (a, b) in enumerate(zip(lc, rc)):
            # A contracted pair needs one name that no other axis of either operand has.
            others = {n for i, n in enumerate(l_target) if i != a} | {n for i, n in enumerate(r_target) if i != b}
            others -= may_share
            common = next(n for n in (ln[a], rn[b], f"__pzb_contract{k}") if n is not None and n not in others)
            l_target[a] = r_target[b] = common
        return l_target, r_target, w_free

    def _linear_weight(self, atom: ParamAtom, view_names: tuple[str | None, ...]) -> Any | None:
        per_storage: list[str | None] = [None] * len(atom.perm)
        for view_dim, storage_dim in enumerate(atom.perm):
            per_storage[storage_dim] = view_names[view_dim]
        if None in per_storage:
            return None
        parameter = self.param(atom.role, tuple(per_storage))
        return parameter if self._step_names(atom.role, parameter) == tuple(per_storage) else None

    def _step_names(self, role: int, parameter: Any) -> tuple[str, ...] | None:
        """A parameter's stored axis names as one step sees it (a stacked one without its stack axis)."""
        names = _stored_names(parameter)
        stack_axis = self.roles[role].stack_axis
        if names is not None and stack_axis and names[:1] == (stack_axis,):
            return names[1:]
        return names

    @staticmethod
    def _renames_from_names(own: Sequence[str | None], target: Sequence[str | None]) -> tuple[tuple[str, str], ...]:
        return tuple((a, b) for a, b in zip(own, target) if a is not None and b is not None and a != b)

    def _chain(self, layer: Any, source: int, renames: tuple[tuple[str, str], ...], out: int) -> None:
        from pzbridge.nn.basic import RenameAxes

        if renames:
            mid = self.next_id
            self.next_id += 1
            self.add(RenameAxes(tuple(a for a, _ in renames), tuple(b for _, b in renames)), [source], mid)
            source = mid
        self.add(layer, [source], out)

    def _node_pzb_child_call(self, eqn: FlatEqn) -> None:
        spec = self.children[eqn.outs[0]]
        call: ChildCall = eqn.params["call"]
        args = eqn.ins[call.module_leaf_count:]
        ins = [self.materialize(a) for a in args]
        vmaps = eqn.params["vmaps"]
        in_renames = []
        for position, atom in enumerate(args):
            names = list(self.names_of(atom))
            for level in vmaps:
                axis = level[call.module_leaf_count + position]
                if axis is not None:
                    names.pop(axis)
            expected = spec.input_names[position] if position < len(spec.input_names) else None
            pairs: tuple[tuple[str, str], ...] = ()
            if expected:
                pairs = self._renames_from_names(names[len(names) - len(expected):], expected)
            in_renames.append(pairs)
        out_renames: tuple[tuple[str, str], ...] = ()
        outs = eqn.outs
        first_names = spec.output_names[0] if spec.output_names else None
        if len(outs) == 1 and first_names:
            actual = self.names[outs[0]][len(self.names[outs[0]]) - len(first_names):]
            out_renames = self._renames_from_names(first_names, actual)
        layer = CallChild(spec.layer, spec.data_count, spec.side_names, spec.static_side,
                          tuple(in_renames), out_renames, call.key, self.child_stacks.get(outs[0], ""))
        self._add_multi(layer, ins, outs, kind="child")

    def _add_multi(self, layer: Any, ins: Sequence[int], outs: Sequence[int], kind: str = "op") -> None:
        """Adds ``layer`` making ``outs`` (a tuple picked apart when there are several)."""
        if len(outs) == 1:
            self.add(layer, ins, outs[0], kind=kind)
            return
        whole = self.next_id
        self.next_id += 1
        self.add(layer, ins, whole, kind=kind)
        for index, out in enumerate(outs):
            self.add(Pick(index), [whole], out)

    def _node_reshape(self, eqn: FlatEqn) -> None:
        x, out = eqn.ins[0], eqn.outs[0]
        plan = self.split_names.get(out, [])
        source = self.materialize(x)
        in_names = self.names_of(x)
        out_names = self.names[out]
        squeeze = self._dropped_named_units(x, eqn)
        if squeeze:
            mid = self._fresh_like(source)
            self.names[mid] = tuple(n for n in self.names[mid] if n not in squeeze)
            self.add(SqueezeAxes(squeeze), [source], mid)
            source = mid
        if not plan:
            self._alias_with_renames(source, out)
            return
        for step, ins, outs in plan:
            mid = self._fresh_like(source)
            if step == "split":
                axis = in_names[ins[0]]
                parts = [out_names[o] for o in outs]
                sizes = [self.avals[out].shape[o] for o in outs]
                current, rest = axis, parts
                for k in range(len(parts) - 1):
                    second = rest[1] if len(rest) == 2 else f"__pzb_rest{k}"
                    self.add(SplitAxis(current, rest[0], sizes[k], second), [source], mid)
                    source, current, rest = mid, second, rest[1:]
                    mid = self._fresh_like(source)
            else:
                parts = [in_names[i] for i in ins]
                merged = out_names[outs[0]]
                current = parts[0]
                for k, part in enumerate(parts[1:]):
                    into = merged if k == len(parts) - 2 else f"__pzb_merge{k}"
                    self.add(MergeAxes(current, part, into), [source], mid)
                    source, current = mid, into
                    mid = self._fresh_like(source)
        self.alias[out] = source

    def _dropped_named_units(self, x: Any, eqn: FlatEqn) -> tuple[str, ...]:
        in_names, in_shape = self.names_of(x), self.shape(x)
        out_names = set(self.names[eqn.outs[0]])
        return tuple(n for n, s in zip(in_names, in_shape) if s == 1 and n is not None and n not in out_names)

    def _fresh_like(self, source: int) -> int:
        value = self.next_id
        self.next_id += 1
        self.names[value] = self.names.get(source, ())
        return value

    def _alias_with_renames(self, source: int, out: int) -> None:
        have = [n for n in self.names[source] if n is not None]
        want = [n for n in self.names[out] if n is not None]
        if sorted(have) == sorted(want):
            self.alias[out] = source
            return
        from pzbridge.nn.basic import RenameAxes

        pairs = [(a, b) for a, b in zip(have, want) if a != b]
        self.add(RenameAxes(tuple(a for a, _ in pairs), tuple(b for _, b in pairs)), [source], out)

    def _node_transpose(self, eqn: FlatEqn) -> None:
        self.alias[eqn.outs[0]] = self.materialize(eqn.ins[0])

    def _node_broadcast_in_dim(self, eqn: FlatEqn) -> None:
        x, out = eqn.ins[0], eqn.outs[0]
        have = {n for n in self.names_of(x) if n is not None}
        shape = self.avals[out].shape
        new = tuple((n, s, self.shape_size_source(eqn, i, d)) for i, (n, s, d)
                    in enumerate(zip(self.names[out], shape, self.dims[out])) if n is not None and n not in have)
        source = self.materialize(x)
        squeeze = tuple(n for n, s in zip(self.names_of(x), self.shape(x))
                        if n is not None and s == 1 and n not in self.names[out])
        if squeeze:
            mid = self._fresh_like(source)
            self.add(SqueezeAxes(squeeze), [source], mid)
            source = mid
        if not new:
            self.alias[out] = source
            return
        self.add(AddAxes(new), [source], out)

    def _node_squeeze(self, eqn: FlatEqn) -> None:
        x, out = eqn.ins[0], eqn.outs[0]
        source = self.materialize(x)
        own = self.names_of(x)
        gone = tuple(own[i] for i in eqn.params["dimensions"] if own[i] is not None)
        if gone:
            self.add(SqueezeAxes(gone), [source], out)
        else:
            self.alias[out] = source

    def _node_expand_dims(self, eqn: FlatEqn) -> None:
        self.alias[eqn.outs[0]] = self.materialize(eqn.ins[0])

    def _node_reduce(self, eqn: FlatEqn) -> None:
        source = self.materialize(eqn.ins[0])
        own = self.names_of(eqn.ins[0])
        names = tuple(own[a] for a in eqn.params["axes"] if own[a] is not None)
        if not names:
            self.alias[eqn.outs[0]] = source
            return
        self.add(ReduceAxes(eqn.primitive.name, names, eqn.params.get("index_dtype")), [source], eqn.outs[0])
        if eqn.primitive.name == "reduce_sum":
            size = math.prod(self.shape(eqn.ins[0])[a] for a in eqn.params["axes"])
            self.sums[eqn.outs[0]] = (source, names, size)

    _node_reduce_sum = _node_reduce_max = _node_reduce_min = _node_reduce_prod = _node_reduce
    _node_reduce_and = _node_reduce_or = _node_argmax = _node_argmin = _node_reduce

    def _node_div(self, eqn: FlatEqn) -> None:
        """``jnp.mean``: a sum divided by the example's size of its axes becomes a mean over them.

        The count then follows each call's sizes (an average pool over
        ``height, width`` at another image size, a mean over ``seq`` at
        another length) instead of staying the example's constant.
        """
        total, divisor = eqn.ins
        summed = self.sums.get(self.resolve(total)) if isinstance(total, int) else None
        if (summed is not None and isinstance(divisor, Lit) and np.ndim(divisor.value) == 0 and summed[2] > 1
                and jax.numpy.issubdtype(np.asarray(divisor.value).dtype, jax.numpy.floating)
                and float(divisor.value) == summed[2]):
            self.add(MeanAxes(summed[1]), [summed[0]], eqn.outs[0])
            self.size_handled.add(id(eqn))  # the count follows each call's sizes
            return
        self._node_elementwise(eqn)

    def _node_concatenate(self, eqn: FlatEqn) -> None:
        out = eqn.outs[0]
        target = self.names[out]
        axis_name = target[eqn.params["dimension"]]
        ins = [self.materialize(a) for a in eqn.ins]
        renames = tuple(self._renames_from_names(self.names_of(a), target) for a in eqn.ins)
        self.add(Concatenate(axis_name, renames), ins, out)

    def _node_slice(self, eqn: FlatEqn) -> None:
        x, out = eqn.ins[0], eqn.outs[0]
        source = self.materialize(x)
        strides = eqn.params.get("strides") or (1,) * len(self.shape(x))
        slices = []
        renames = []
        inputs = self.input_names()
        self.size_handled.add(id(eqn))
        for axis, (name, new, start, stop, step, size) in enumerate(zip(
                self.names_of(x), self.names[out], eqn.params["start_indices"], eqn.params["limit_indices"],
                strides, self.shape(x))):
            if name is None:
                continue
            bounds = self.slice_bounds(eqn, axis) if eqn.other is not None else None
            moved = bounds is not None and bounds != ("start", "start")
            if moved and int(step) != 1:
                raise Untraceable(f"a strided slice of `{name}` changes with the input's size")
            if moved:
                if bounds[1] == "follow" and new in inputs:  # ``table[:seq]`` follows that axis's length
                    slices.append((name, int(start), int(stop), 1, new))
                elif "follow" not in bounds:  # ``x[-1]``, ``x[1:]``: bounds count from the end at any length
                    slices.append((name, int(start) - size if bounds[0] == "end" else int(start),
                                   (int(stop) - size or None) if bounds[1] == "end" else int(stop), 1, ""))
                else:
                    raise Untraceable(f"a slice of `{name}` changes with the size of another axis")
            elif (start, stop, step) != (0, size, 1):
                # Without a second trace: a slice as long as an input axis (``table[:seq]``) follows that axis.
                follow = new if bounds is None and new in inputs and int(step) == 1 else ""
                slices.append((name, int(start), int(stop), int(step), follow))
            if new is not None and new != name:
                renames.append((name, new))
        layer = SliceAxes(tuple(slices))
        if renames:
            from pzbridge.nn.basic import RenameAxes

            mid = self._fresh_like(source)
            self.add(layer, [source], mid)
            self.add(RenameAxes(tuple(a for a, _ in renames), tuple(b for _, b in renames)), [mid], out)
            return
        self.add(layer, [source], out)

    def _node_split(self, eqn: FlatEqn) -> None:
        x = eqn.ins[0]
        source = self.materialize(x)
        axis = eqn.params["axis"]
        name = self.names_of(x)[axis]
        start = 0
        for out, size in zip(eqn.outs, eqn.params["sizes"]):
            layer = SliceAxes(((name, start, start + int(size), 1),))
            new = self.names[out][axis]
            if new != name:
                from pzbridge.nn.basic import RenameAxes

                mid = self._fresh_like(source)
                self.add(layer, [source], mid)
                self.add(RenameAxes((name,), (new,)), [mid], out)
            else:
                self.add(layer, [source], out)
            start += int(size)

    def _node_gather(self, eqn: FlatEqn) -> None:
        from pzbridge.nn.named_ops import TakeAlongAxis

        axis = self._take_axis(eqn)
        operand, indices = eqn.ins
        out = eqn.outs[0]
        target = self.names[out]
        n_ids = len(self.shape(indices)) - 1
        ids = self.materialize(indices)
        id_renames = self._renames_from_names(self.names_of(indices)[:-1], target[:n_ids])
        if id_renames:
            from pzbridge.nn.basic import RenameAxes

            mid = self._fresh_like(ids)
            self.add(RenameAxes(tuple(a for a, _ in id_renames), tuple(b for _, b in id_renames)), [ids], mid)
            ids = mid
        table_names = list(target[n_ids:])
        table_names.insert(axis, self.names_of(operand)[axis] or "__pzb_take")
        if self.names_of(operand)[axis] in target:
            table_names[axis] = "__pzb_take"
        mode = str(eqn.params.get("mode", "")).rsplit(".", 1)[-1]
        jnp_mode = {"CLIP": "clip", "FILL_OR_DROP": "fill", "PROMISE_IN_BOUNDS": "promise_in_bounds"}.get(mode)
        if isinstance(operand, ParamAtom):
            layer = TakeAlongAxis(table_names[axis], self.parameter_use(operand, tuple(table_names)), jnp_mode)
            self.add(layer, [ids], out)
            return
        table = self.materialize(operand)
        renames = self._renames_from_names(self.names_of(operand), table_names)
        if renames:
            from pzbridge.nn.basic import RenameAxes

            mid = self._fresh_like(table)
            self.add(RenameAxes(tuple(a for a, _ in renames), tuple(b for _, b in renames)), [table], mid)
            table = mid
        self.add(TakeAlongAxis(table_names[axis], None, jnp_mode), [table, ids], out)

    def _node_iota(self, eqn: FlatEqn) -> None:
        out = eqn.outs[0]
        shape = self.avals[out].shape
        names = self.names[out]
        dimension = eqn.params["dimension"]
        if names[dimension] is None:
            layer = Constant(nx.NamedArray(jax.numpy.zeros((), eqn.params["dtype"]), {}))
        else:
            layer = Iota(names[dimension], tuple((n, s, self.shape_size_source(eqn, i, d)) for i, (n, s, d)
                                                 in enumerate(zip(names, shape, self.dims[out])) if n is not None),
                         eqn.params["dtype"])
        self.add(layer, (), out, kind="source")


def _named_sizes(layer: Any) -> set[tuple[str, int]]:
    """Every ``(axis name, size)`` of the named arrays a lifted layer holds (its variables' values included)."""
    _, variables = unbind_variables(layer)
    arrays = [v.value for v in variables] + jax.tree_util.tree_leaves(layer, is_leaf=nx.is_namedarray)
    return {(n, int(size)) for a in arrays if nx.is_namedarray(a) for n, size in a.named_shape.items()}


def _dedupe(names: tuple[str | None, ...]) -> tuple[str, ...]:
    out: list[str] = []
    for i, name in enumerate(names):
        name = name or f"axis{i}"
        base, k = name, 2
        while name in out:
            name = weight_output_name(base, tuple(out)) if k == 2 else f"{base}_{k}"
            k += 1
        out.append(name)
    return tuple(out)


def _stored_names(parameter: Any) -> tuple[str, ...] | None:
    value = getattr(parameter, "value", None)
    if nx.is_namedarray(value) and not value.positional_shape:
        return tuple(value.named_shape)
    return None


def _name_constant(data: Any, names: Sequence[str | None]) -> Any:
    data = np.asarray(data) if isinstance(data, (list, tuple)) else data
    keep = [i for i, n in enumerate(names) if n is not None]
    squeezed = data.reshape(tuple(data.shape[i] for i in keep)) if len(keep) != len(names) else data
    return nx.NamedArray(jax.numpy.asarray(squeezed), {names[i]: data.shape[i] for i in keep})


def _reshape_groups(in_shape: Sequence[int], out_shape: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Pairs groups of input and output axes (size-1 axes skipped) whose sizes multiply to the same number."""
    ins = [i for i, s in enumerate(in_shape) if s != 1]
    outs = [o for o, s in enumerate(out_shape) if s != 1]
    groups: list[tuple[list[int], list[int]]] = []
    i = o = 0
    while i < len(ins) or o < len(outs):
        if i >= len(ins) or o >= len(outs):
            return None
        gi, go = [ins[i]], [outs[o]]
        pi, po = in_shape[ins[i]], out_shape[outs[o]]
        i, o = i + 1, o + 1
        while pi != po:
            if pi < po:
                if i >= len(ins):
                    return None
                gi.append(ins[i])
                pi *= in_shape[ins[i]]
                i += 1
            else:
                if o >= len(outs):
                    return None
                go.append(outs[o])
                po *= out_shape[outs[o]]
                o += 1
        groups.append((gi, go))
    if math.prod(in_shape) != math.prod(out_shape):
        return None
    return groups


def convert(closed: Any, roles: Sequence[InputRole], child_handler: ChildHandler,
            param_handler: ParamHandler, param_hint: ParamHint | None = None,
            rename: ModuleRenames | None = None, retrace: Retrace | None = None) -> Graph:
    """Converts a traced jaxpr into a :class:`Graph`.

    Args:
      closed: The ``ClosedJaxpr`` of the module's ``__call__``.
      roles: One :class:`InputRole` per jaxpr input.
      child_handler: Lifts one child call (see :class:`ChildSpec`).
      param_handler: ``(role, storage names) -> Parameter`` for the module's arrays.
      param_hint: ``role -> names`` suggested for an array's axes (the names
        a child's rule already gave it), or None.
      rename: The user's axis renames for this module (``pzb.lift(axis_names=...)``).
      retrace: Traces the same call at other input sizes (see :mod:`~pzbridge.bridge.tracing.sizes`);
        None skips that check.

    Returns:
      The graph.

    Raises:
      Untraceable: For code the converter cannot express.
    """
    converter = _Converter(closed, roles, child_handler, param_handler, param_hint, rename)
    if retrace is not None:
        converter.infer()

        def flatten(other: Any) -> tuple[list[FlatEqn], dict[int, Any]]:
            eqns, _, avals = _flatten(other, roles)
            return eqns, avals

        converter.check_sizes(retrace, flatten)
    return converter.build()
