"""``jax.lax.cond`` / ``lax.switch`` in traced code: each branch becomes its own graph inside a :class:`~pzbridge.nn.Switch`.

A ``cond`` equation has an integer index and operands; every branch jaxpr
takes the operands. Each branch is converted by a nested converter whose
inputs are the first activation operand (the data input), the other
activation operands as side inputs (``cond_in1`` ...) named as outside, the
module's arrays as the same parameters, and constants inlined. The outputs
take the names the first branch gives them.

Example:
    >>> import jax, jax.numpy as jnp
    >>> closed = jax.make_jaxpr(lambda x: jax.lax.cond(x.sum() > 0, jnp.tanh, jnp.negative, x))(jnp.ones(3))
    >>> closed.eqns[-1].primitive.name
    'cond'
"""

from __future__ import annotations

from typing import Any

from pzbridge.bridge.tracing.graph_types import InputRole, Lit, NestedGraph, ParamAtom, Untraceable
from pzbridge.nn.switch import Switch


class CondConversion:
    """The converter's handling of ``cond`` equations (mixed into the converter class)."""

    roles: list[InputRole]
    table: Any
    child_handler: Any
    param_handler: Any
    param_hint: Any
    rename: Any

    def _cond_branches(self, eqn: Any, names_of: Any) -> tuple[list[Any], list[str], dict[int, int]]:
        """The nested converters of the branches, the side-input names, and inner -> outer param roles."""
        roles: list[InputRole] = []
        side_names: list[str] = []
        outer_role: dict[int, int] = {}
        for atom in eqn.ins[1:]:
            if isinstance(atom, ParamAtom):
                if atom.perm != tuple(range(len(atom.perm))):
                    raise Untraceable("a cond reads a transposed weight (transpose it inside the branch)")
                outer_role[len(roles)] = atom.role
                roles.append(self.roles[atom.role])
            elif isinstance(atom, Lit):
                roles.append(InputRole("const", array=atom.value))
            elif not any(role.kind == "data" for role in roles):
                roles.append(InputRole("data", names=names_of(atom)))
            else:
                side_names.append(f"cond_in{len(side_names) + 1}")
                roles.append(InputRole("side", name=side_names[-1], names=names_of(atom)))
        if not any(role.kind == "data" for role in roles):
            raise Untraceable("a cond whose branches read no activation")
        branches = [type(self)(branch, roles, self.child_handler, self.param_handler, self.param_hint, self.rename)
                    for branch in eqn.params["branches"]]
        return branches, side_names, outer_role

    def _infer_cond(self, eqn: Any) -> None:
        def current(atom: Any) -> tuple[str | None, ...]:
            return tuple(self.table.find(d).name if d is not None else None for d in self.dims_of(atom))

        branches, _, _ = self._cond_branches(eqn, current)
        for branch in branches:
            branch.infer()
        first = branches[0]
        for out, atom in zip(eqn.outs, first.outputs):
            names = [first.table.find(d).name if d is not None else None for d in first.dims_of(atom)]
            self.set_dims(out, [None if n is None else self.table.new(n, fixed=True) for n in names])

    def _node_cond(self, eqn: Any) -> None:
        branches, side_names, outer_role = self._cond_branches(eqn, self.names_of)
        graphs = [branch.build() for branch in branches]
        out_names = tuple(tuple(n for n in self.names[out] if n is not None) for out in eqn.outs)
        for graph in graphs:
            for out, names in zip(graph.output_ids, out_names):
                found = {n for n in graph.names.get(out, ()) if n is not None}
                if found != set(names):
                    raise Untraceable(f"the branches of a cond name their outputs differently ({sorted(found)} "
                                      f"vs {sorted(names)})")
        for branch in branches:
            for inner_index, parameter in branch.params.items():
                if inner_index in outer_role:
                    self.params.setdefault(outer_role[inner_index], parameter)
        layer = NestedGraph(graphs, len(eqn.outs), lambda bodies: Switch(list(bodies), tuple(side_names), out_names))
        values = [a for a in eqn.ins[1:] if isinstance(a, int)]
        ins = [self.materialize(a) for a in (eqn.ins[0], *values)]
        self._add_multi(layer, ins, eqn.outs)
