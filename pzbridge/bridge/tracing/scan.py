"""``jax.lax.scan`` in traced code: the body becomes its own graph inside a :class:`~pzbridge.nn.LayerStack`.

A scan equation has constants, an initial carry and scanned inputs (``xs``).
Its body jaxpr is converted by a nested converter whose inputs are

- the first carried value as the body's data input, the other carried
  values, the activation constants and the per-step activation inputs as
  side inputs (``scan_carry1``, ``scan_const0``, ``scan_x0``), named as
  they are outside (a per-step input without its leading, scanned axis);
- the module's arrays used as constants, as the same parameters;
- the module's arrays used as ``xs`` (stacked layers: ``eqx.filter_vmap``
  blocks run by ``lax.scan``, or raw ``(layers, ...)`` weights), as one
  slice each, whose :class:`~pzbridge.Parameter` holds the whole stacked
  array with the stack axis in front. A child whose arrays are all such
  slices is a stacked child; the bridge lifts it as one layer whose
  parameters carry the stack axis.

The stack axis is named after the scanned activations when there are any
(a scan over ``seq``), else ``layers``; a scan over ``length`` only (the
same block repeated, a ``fori_loop``) runs over ``steps``. Per-step outputs
come back stacked along it. The data input is the first carried value that
is not a literal (a ``fori_loop``'s counter, carried first, is a side input).

Example:
    >>> import jax, jax.numpy as jnp
    >>> closed = jax.make_jaxpr(lambda c, xs: jax.lax.scan(lambda c, x: (c + x, None), c, xs))(
    ...     jnp.zeros(2), jnp.ones((3, 2)))
    >>> [e.primitive.name for e in closed.eqns]
    ['scan']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from pzbridge.bridge.tracing.graph_types import InputRole, Lit, NestedGraph, ParamAtom, Untraceable
from pzbridge.nn.layer_stack import LayerStack

NameOf = Callable[[Any], "tuple[str | None, ...]"]


@dataclasses.dataclass
class _Operands:
    consts: list[Any]
    carry: list[Any]
    xs: list[Any]

    @classmethod
    def of(cls, eqn: Any) -> _Operands:
        consts, carry = eqn.params["num_consts"], eqn.params["num_carry"]
        return cls(eqn.ins[:consts], eqn.ins[consts: consts + carry], eqn.ins[consts + carry:])

    @property
    def data_carry(self) -> int:
        """The carried value that is the body's data input: the first that is not a literal (a
        ``fori_loop``'s counter starts as one)."""
        return next((k for k, atom in enumerate(self.carry) if not isinstance(atom, Lit)), 0)

    def stack_order(self, values: list[Any]) -> list[Any]:
        """Carried values (then anything after them) in the order a LayerStack takes them: the data carry first."""
        k, count = self.data_carry, len(self.carry)
        carry = [values[k], *values[:k], *values[k + 1: count]]
        return [*carry, *values[count:]]


def _is_value(atom: Any) -> bool:
    return isinstance(atom, int)


class ScanConversion:
    """The converter's handling of ``scan`` equations (mixed into the converter class)."""

    # Provided by the converter.
    roles: list[InputRole]
    table: Any
    avals: dict[int, Any]
    child_handler: Any
    param_handler: Any
    param_hint: Any
    rename: Any

    def _scan_body(self, eqn: Any, names_of: NameOf, axis: str) -> tuple[Any, list[str], dict[int, int]]:
        """The nested converter of a scan body, the body's side-input names, and inner -> outer param roles."""
        ops = _Operands.of(eqn)
        roles: list[InputRole] = []
        side_names: list[str] = []
        outer_role: dict[int, int] = {}

        def param_role(atom: ParamAtom, stacked: bool) -> InputRole:
            if atom.perm != tuple(range(len(atom.perm))):
                raise Untraceable("a scan reads a transposed weight (transpose it inside the scanned function)")
            role = self.roles[atom.role]
            outer_role[len(roles)] = atom.role
            if not stacked:
                return role
            array = role.array
            step = jax.ShapeDtypeStruct(tuple(array.shape[1:]), array.dtype)
            return dataclasses.replace(role, array=step, stacked=array, stack_axis=axis)

        def side(name: str, names: tuple[str | None, ...]) -> InputRole:
            side_names.append(name)
            return InputRole("side", name=name, names=names)

        for k, atom in enumerate(ops.consts):
            if isinstance(atom, ParamAtom):
                roles.append(param_role(atom, stacked=False))
            elif isinstance(atom, Lit):
                roles.append(InputRole("const", array=atom.value))
            else:
                roles.append(side(f"scan_const{k}", names_of(atom)))
        carry_roles = []
        for k, atom in enumerate(ops.carry):
            names = names_of(atom)
            is_data = k == ops.data_carry
            carry_roles.append(InputRole("data", names=names) if is_data else side(f"scan_carry{k}", names))
        # Side inputs are ordered carry, constants, per-step inputs (as LayerStack passes them).
        carry_sides = [name for name in side_names if name.startswith("scan_carry")]
        const_sides = [name for name in side_names if name.startswith("scan_const")]
        side_names[:] = [*carry_sides, *const_sides]
        roles.extend(carry_roles)
        for k, atom in enumerate(ops.xs):
            if isinstance(atom, ParamAtom):
                roles.append(param_role(atom, stacked=True))
            elif isinstance(atom, Lit):
                raise Untraceable("a scan runs over a constant array (make it an argument or a weight)")
            else:
                roles.append(side(f"scan_x{k}", names_of(atom)[1:]))
        body = eqn.params["jaxpr"]
        inner = type(self)(body, roles, self.child_handler, self._stacked_param_handler, self._stacked_param_hint,
                             self.rename)
        return inner, side_names, outer_role

    def _stacked_param_handler(self, role: InputRole, storage_names: tuple[str, ...]) -> Any:
        if role.stacked is None:
            return self.param_handler(role, storage_names)
        whole = dataclasses.replace(role, array=role.stacked, stacked=None, stack_axis="")
        return self.param_handler(whole, (role.stack_axis, *storage_names))

    def _stacked_param_hint(self, role: InputRole) -> tuple[str, ...] | None:
        if role.stacked is None:
            return self.param_hint(role)
        hint = self.param_hint(dataclasses.replace(role, array=role.stacked, stacked=None, stack_axis=""))
        return tuple(hint[1:]) if hint is not None and len(hint) == len(role.stacked.shape) else None

    def _scan_activation_xs(self, eqn: Any) -> list[int]:
        return [atom for atom in _Operands.of(eqn).xs if _is_value(atom)]

    def _infer_scan(self, eqn: Any) -> None:
        ops = _Operands.of(eqn)
        activations = self._scan_activation_xs(eqn)
        if activations:
            axis_class = self.dims_of(activations[0])[0]
            for other in activations[1:]:
                self.table.unify(axis_class, self.dims_of(other)[0])
        else:  # a loop over `length` only repeats its body: its steps are no layers
            axis_class = self.table.new("layers" if _Operands.of(eqn).xs else "steps", fixed=True)
        self.scan_axes[eqn.outs[0]] = axis_class

        def current(atom: Any) -> tuple[str | None, ...]:
            return tuple(self.table.find(d).name if d is not None else None for d in self.dims_of(atom))

        inner, _, _ = self._scan_body(eqn, current, self.table.find(axis_class).name)
        inner.infer()
        for k, atom in enumerate(ops.carry):
            # A carry named only by the body (``h = jnp.zeros(n)`` fed to a Linear) takes the body's names.
            for outside, inside in zip(self.dims_of(atom), inner.dims_of(inner.outputs[k])):
                root = self.table.find(outside) if outside is not None else None
                name = inner.table.find(inside).name if inside is not None else "axis"
                if root is not None and not root.fixed and name != "axis":
                    root.name, root.fixed = name, True
        by_name = {(self.table.find(d).name, size): d for atom in (*ops.consts, *ops.carry, *ops.xs)
                   for d, size in zip(self.dims_of(atom), self.shape(atom)) if d is not None}
        for out, atom in zip(eqn.outs, ops.carry):
            self.set_dims(out, list(self.dims_of(atom)))
        for out, atom in zip(eqn.outs[len(ops.carry):], inner.outputs[len(ops.carry):]):
            step_dims = []
            for d, size in zip(inner.dims_of(atom), inner.shape(atom)):
                name = inner.table.find(d).name if d is not None else None
                step_dims.append(by_name.get((name, size)) if (name, size) in by_name else (
                    None if size == 1 else self.table.new(name or "axis")))
            self.set_dims(out, [axis_class, *step_dims])

    def _node_scan(self, eqn: Any) -> None:
        ops = _Operands.of(eqn)
        activations = self._scan_activation_xs(eqn)
        axis = self.table.name_of(self.scan_axes[eqn.outs[0]], self.final)
        inner, side_names, outer_role = self._scan_body(eqn, self.names_of, axis)
        graph = inner.build()
        for k, (atom, out) in enumerate(zip(ops.carry, graph.output_ids)):
            before = {n for n in self.names_of(atom) if n is not None}
            after = {n for n in graph.names.get(out, ()) if n is not None}
            if before != after:
                raise Untraceable(f"a scan's carry {k} changes its axes from {sorted(before)} to {sorted(after)}")
        for inner_index, parameter in inner.params.items():
            if inner_index in outer_role:
                self.params.setdefault(outer_role[inner_index], parameter)
        carry_count, ys_count = len(ops.carry), len(eqn.outs) - len(ops.carry)
        const_values = [a for a in ops.consts if _is_value(a)]
        length = None if ops.xs else int(eqn.params["length"])
        unroll = eqn.params.get("unroll", 1)
        make = lambda bodies: LayerStack(  # noqa: E731
            bodies[0], axis, carry_count, len(const_values), len(activations), ys_count, tuple(side_names),
            bool(eqn.params.get("reverse", False)), 1 if isinstance(unroll, bool) else int(unroll), length=length)
        graph.output_ids = ops.stack_order(list(graph.output_ids))
        layer = NestedGraph([graph], len(graph.output_ids), make)
        ins = [self.materialize(a) for a in (*ops.stack_order(list(ops.carry)), *const_values, *activations)]
        self._add_multi(layer, ins, ops.stack_order(list(eqn.outs)))
