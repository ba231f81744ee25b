"""From a dataflow graph to combinators: ``Sequential``, ``Residual``, branches.

A traced module is a graph with one main input. Every value is computed
from the nearest value that dominates it (every path from the input passes
through it), so the graph is rebuilt top-down: to compute ``v`` from a
scope value ``s``, first compute the immediate dominator ``d`` of ``v``'s
operands from ``s``, then the operands from ``d`` in a :class:`Branch`, then
``v``'s own layer. Two shapes get their own combinators because they are what
people look for: ``d + f(d)`` is a ``Residual`` (the residual stream of a
transformer is then the input and output of each ``Residual``), and
``f(d) + g(d)`` / ``f(d) * g(d)`` are ``BranchAndAddTogether`` /
``BranchAndMultiplyTogether`` (SwiGLU); adding a value that does not depend
on the input (a positional embedding table) is not a residual.

Values that do not depend on the input are not on any path from it. Sources
(constants, iotas, side inputs) are recomputed where used. A value computed
from them and used more than once (a UNet's time embedding ``self.time(t)``
added at every resolution) is computed exactly once, as in the original code:
the whole layer becomes a :class:`~pzbridge.nn.dataflow.BindSideInputs` that
computes it first and passes it on as a side input with a reserved name
(``__pzb_shared_0``, ...), and each use reads it with a
:class:`~pzbridge.nn.dataflow.SideInput`. A child is then called once, LoRA
sees one copy of its ``Linear`` and a stateful child (dropout, a capture
saver) runs once. A graph without such a value is built as before. Several
outputs branch from the value that dominates them all, so the shared part
before it runs once. (A value that depends on the input is still built once
per path where two paths that read it are not series-parallel, e.g.
``(a + b) - a * b``.)

Example:
    >>> import jax
    >>> from pzbridge.bridge.tracing.graph import Graph, Node
    >>> from pzbridge.nn.named_ops import ApplyPrimitive
    >>> f = pzb.nn.Elementwise(jax.numpy.tanh)
    >>> add = ApplyPrimitive(jax.lax.add_p, (), (("input", 0), ("input", 1)))
    >>> graph = Graph([Node(f, (1,), 2), Node(add, (1, 2), 3)], 1, [3], {}, [])
    >>> layer = build_layer(graph)
    >>> type(layer).__name__, type(layer.delta).__name__
    ('Residual', 'Elementwise')
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from pzbridge.bridge.tracing.graph_types import Graph, NestedGraph, Node, Untraceable
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.combinators import BranchAndAddTogether, BranchAndMultiplyTogether, Identity, Residual, Sequential
from pzbridge.nn.dataflow import BindSideInputs, Branch, SideInput
from pzbridge.nn.layer import Layer
from pzbridge.nn.named_ops import ApplyPrimitive


@pytree_dataclass
class Unflatten(Layer):
    """Turns a tuple of outputs into the original output structure (a list, a dict, nested tuples).

    Example:
        >>> Unflatten(jax.tree_util.tree_structure({"a": 0, "b": 0}))((1, 2))
        {'a': 1, 'b': 2}
    """

    treedef: Any = static_field()

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        return jax.tree_util.tree_unflatten(self.treedef, list(x))


def sequence(*layers: Layer) -> Layer:
    """``Sequential`` of ``layers`` with nested plain ``Sequential`` s flattened and ``Identity`` dropped.

    Example:
        >>> sequence(pzb.nn.Identity(), pzb.nn.Identity())
        Identity()
    """
    flat: list[Layer] = []
    for layer in layers:
        if type(layer) is Sequential:
            flat.extend(layer.sublayers)
        elif not isinstance(layer, Identity):
            flat.append(layer)
    if not flat:
        return Identity()
    return flat[0] if len(flat) == 1 else Sequential(flat)


def _is_plain(node: Node, primitive_name: str) -> bool:
    layer = node.layer
    return (isinstance(layer, ApplyPrimitive) and layer.primitive.name == primitive_name and not layer.constants
            and layer.operand_order == (("input", 0), ("input", 1)) and not any(layer.renames))


_SHARED_PREFIX = "__pzb_shared_"  # the side-input names of the values build_layer computes once

def shared_values(graph: Graph, live: set[int]) -> list[int]:
    """The values of ``graph`` to compute once: not depending on the input, not sources, used more than once.

    A use is one operand slot of a node the outputs need, or one output slot
    (a node reading a value twice uses it twice). A value that is read once
    by a value computed once is computed once too, so only values used
    several times need binding. In graph order (a value's operands first).

    Args:
      graph: A converted graph.
      live: The values that depend on the graph's input.

    Example:
        >>> from pzbridge.nn.named_ops import Constant
        >>> f = pzb.nn.Elementwise(jax.numpy.tanh)
        >>> mul = ApplyPrimitive(jax.lax.mul_p, (), (("input", 0), ("input", 1)))
        >>> nodes = [Node(Constant(1.0), (), 1), Node(f, (1,), 2), Node(mul, (0, 2), 3), Node(mul, (3, 2), 4)]
        >>> shared_values(Graph(nodes, 0, [4], {}, []), {0, 3, 4})
        [2]
    """
    producer = {node.out: node for node in graph.nodes}
    needed: set[int] = set()
    stack = list(graph.output_ids)
    while stack:
        value = stack.pop()
        if value in needed:
            continue
        needed.add(value)
        if value in producer:
            stack.extend(producer[value].ins)
    uses: dict[int, int] = {}
    for value in graph.output_ids:
        uses[value] = uses.get(value, 0) + 1
    for node in graph.nodes:
        if node.out in needed:
            for value in node.ins:
                uses[value] = uses.get(value, 0) + 1
    return [node.out for node in graph.nodes
            if node.ins and node.out in needed and node.out not in live and uses.get(node.out, 0) > 1]


def _shared_names(graph: Graph, count: int) -> list[str]:
    """``count`` names with the reserved prefix, none of them a side input the graph reads."""
    taken = {node.layer.name for node in graph.nodes if isinstance(node.layer, SideInput)}
    names: list[str] = []
    index = 0
    while len(names) < count:
        name = f"{_SHARED_PREFIX}{index}"
        if name not in taken:
            names.append(name)
        index += 1
    return names


class _Builder:
    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.producer = {node.out: node for node in graph.nodes}
        self.live: set[int] = set()
        self.parent: dict[int, int | None] = {}
        self.depth: dict[int, int] = {}
        if graph.input_id is None:
            raise Untraceable("the module does not read its input")
        root = graph.input_id
        self.live.add(root)
        self.parent[root], self.depth[root] = None, 0
        for node in graph.nodes:
            preds = [i for i in node.ins if i in self.live]
            if not preds:
                continue
            self.live.add(node.out)
            dom = self.common_dominator(preds)
            self.parent[node.out], self.depth[node.out] = dom, self.depth[dom] + 1
        shared = shared_values(graph, self.live)
        self.shared: dict[int, str] = dict(zip(shared, _shared_names(graph, len(shared))))

    def bound_values(self) -> tuple[tuple[Layer, ...], tuple[str, ...]]:
        """The layers computing the shared values (each reads earlier ones by name) and their names."""
        root = self.graph.input_id
        layers = tuple(self.compute(value, root) for value in self.shared)  # type: ignore[arg-type]
        return layers, tuple(self.shared.values())

    def common_dominator(self, values: Sequence[int]) -> int:
        current = values[0]
        for other in values[1:]:
            a, b = current, other
            while a != b:
                if self.depth[a] >= self.depth[b]:
                    a = self.parent[a]  # type: ignore[assignment]
                else:
                    b = self.parent[b]  # type: ignore[assignment]
            current = a
        return current

    def build(self, target: int, scope: int) -> Layer:
        if target in self.shared:
            return SideInput(self.shared[target])
        return self.compute(target, scope)

    def compute(self, target: int, scope: int) -> Layer:
        if target == scope:
            return Identity()
        node = self.producer.get(target)
        if node is None:
            raise Untraceable(f"value {target} has no producer (an internal error in traced lifting)")
        if not node.ins:
            return node.layer
        live = [i for i in node.ins if i in self.live]
        dom = self.common_dominator(live) if live else scope
        if dom != scope and target in self.live and not self.dominates(scope, dom):
            dom = scope
        prefix = self.build(dom, scope) if dom != scope else Identity()
        return sequence(prefix, self.body(node, dom))

    def dominates(self, a: int, b: int) -> bool:
        while b is not None:
            if b == a:
                return True
            b = self.parent.get(b)  # type: ignore[assignment]
        return False

    def body(self, node: Node, dom: int) -> Layer:
        if len(node.ins) == 1:
            return sequence(self.build(node.ins[0], dom), node.layer)
        first, second = node.ins[0], node.ins[-1]
        both_live = first in self.live and second in self.live  # adding a constant is not a residual
        if len(node.ins) == 2 and both_live and _is_plain(node, "add"):
            if first == dom and second != dom:
                return Residual(self.build(second, dom))
            if second == dom and first != dom:
                return Residual(self.build(first, dom))
            return BranchAndAddTogether([self.build(first, dom), self.build(second, dom)])
        if len(node.ins) == 2 and both_live and _is_plain(node, "mul") and dom not in node.ins:
            return BranchAndMultiplyTogether([self.build(first, dom), self.build(second, dom)])
        return sequence(Branch([self.build(i, dom) for i in node.ins]), node.layer)


def build_layer(graph: Graph, out_treedef: Any = None) -> Layer:
    """The combinator tree computing ``graph``'s outputs from its input.

    Args:
      graph: A converted graph.
      out_treedef: The module's output structure (None: one array).

    Returns:
      The layer.

    Raises:
      Untraceable: If the graph does not read its input.
    """
    for node in graph.nodes:
        if isinstance(node.layer, NestedGraph):
            nested = node.layer
            treedef = jax.tree_util.tree_structure((0,) * nested.output_count) if nested.output_count > 1 else None
            node.layer = nested.make([build_layer(graph, treedef) for graph in nested.graphs])
    builder = _Builder(graph)
    root = graph.input_id
    if out_treedef is None or out_treedef.num_leaves == 1 and jax.tree_util.treedef_is_leaf(out_treedef):
        layer = builder.build(graph.output_ids[0], root)  # type: ignore[arg-type]
    else:
        # Several outputs branch from the value they all depend on, so what comes before it runs once.
        live = [o for o in graph.output_ids if o in builder.live]
        fork = builder.common_dominator(live) if live else root
        outputs = [builder.build(o, fork) for o in graph.output_ids]
        layer = sequence(builder.build(fork, root), Branch(outputs), Unflatten(out_treedef))  # type: ignore[arg-type]
    if not builder.shared:
        return layer
    values, names = builder.bound_values()
    return BindSideInputs(values, names, layer)
