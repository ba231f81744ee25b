"""Tests for pzbridge/bridge/tracing/structure.py: hand-made dataflow graphs to combinator trees.

The property builds random DAGs of elementwise nodes over one input and
compares the built layer with a tiny evaluator that runs the graph node by
node from the ops' own specification (not from the node layers). A second
property adds a side input and child calls that count how often they run:
a child computed only from side inputs and constants runs exactly once per
call and appears once in the built layer, however often its value is used.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pzbridge.bridge.tracing.graph import Graph, Node, Untraceable
from pzbridge.bridge.tracing.structure import Unflatten, build_layer, sequence, shared_values
from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError
from pzbridge.core.selectors import select
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.basic import Elementwise
from pzbridge.nn.combinators import BranchAndAddTogether, BranchAndMultiplyTogether, Identity, Residual, Sequential
from pzbridge.nn.dataflow import BindSideInputs, Branch, CallChild, SideInput
from pzbridge.nn.layer import Layer
from pzbridge.nn.named_ops import ApplyPrimitive, Constant

TWO_INPUTS = (("input", 0), ("input", 1))
X = np.array([[0.3, -0.7, 0.9], [-0.2, 0.5, -1.0]], dtype=np.float32)


def _graph(nodes, outputs, input_id=0):
    return Graph(nodes, input_id, list(outputs), {}, [])


def _x():
    return nx.wrap(jnp.asarray(X), "seq", "features")


def _f(fn=jnp.tanh):
    return Elementwise(fn)


def _binary(primitive, **kwargs):
    return ApplyPrimitive(primitive, (), TWO_INPUTS, **kwargs)


# Hand-made shapes -------------------------------------------------------------------------

def test_a_chain_is_one_flat_sequential():
    f, g, h = _f(jnp.tanh), _f(jnp.sin), _f(jnp.negative)
    layer = build_layer(_graph([Node(f, (0,), 1), Node(g, (1,), 2), Node(h, (2,), 3)], [3]))
    assert type(layer) is Sequential
    assert [id(s) for s in layer.sublayers] == [id(f), id(g), id(h)]
    np.testing.assert_allclose(layer(_x()).unwrap("seq", "features"), -np.sin(np.tanh(X)), rtol=1e-6, atol=1e-6)


def test_a_single_node_is_its_layer_and_the_input_itself_is_identity():
    f = _f()
    assert build_layer(_graph([Node(f, (0,), 1)], [1])) is f
    assert isinstance(build_layer(_graph([Node(f, (0,), 1)], [0])), Identity)


@pytest.mark.parametrize("delta_first", [False, True])
def test_d_plus_f_of_d_is_a_residual(delta_first):
    pre, f = _f(jnp.sin), _f(jnp.tanh)
    ins = (2, 1) if delta_first else (1, 2)
    layer = build_layer(_graph([Node(pre, (0,), 1), Node(f, (1,), 2), Node(_binary(jax.lax.add_p), ins, 3)], [3]))
    assert type(layer) is Sequential and layer.sublayers[0] is pre
    residual = layer.sublayers[1]
    assert type(residual) is Residual and residual.delta is f
    d = np.sin(X)
    np.testing.assert_allclose(layer(_x()).unwrap("seq", "features"), d + np.tanh(d), rtol=1e-6, atol=1e-6)


def test_f_plus_g_of_one_value_is_branch_and_add_together():
    f1, f2, g = _f(jnp.tanh), _f(jnp.sin), _f(jnp.negative)
    nodes = [Node(f1, (0,), 1), Node(f2, (1,), 2), Node(g, (0,), 3), Node(_binary(jax.lax.add_p), (2, 3), 4)]
    layer = build_layer(_graph(nodes, [4]))
    assert type(layer) is BranchAndAddTogether
    first, second = layer.branches
    assert type(first) is Sequential and [id(s) for s in first.sublayers] == [id(f1), id(f2)]
    assert second is g
    np.testing.assert_allclose(layer(_x()).unwrap("seq", "features"), np.sin(np.tanh(X)) - X, rtol=1e-6, atol=1e-6)


def test_f_times_g_is_branch_and_multiply_together():
    f, g = _f(jnp.tanh), _f(jnp.sin)
    layer = build_layer(_graph([Node(f, (0,), 1), Node(g, (0,), 2), Node(_binary(jax.lax.mul_p), (1, 2), 3)], [3]))
    assert type(layer) is BranchAndMultiplyTogether
    assert [id(b) for b in layer.branches] == [id(f), id(g)]
    np.testing.assert_allclose(layer(_x()).unwrap("seq", "features"), np.tanh(X) * np.sin(X), rtol=1e-6, atol=1e-6)


def test_d_times_f_of_d_is_a_branch_into_the_product():
    f = _f()
    mul = _binary(jax.lax.mul_p)
    layer = build_layer(_graph([Node(f, (0,), 1), Node(mul, (0, 1), 2)], [2]))
    assert type(layer) is Sequential and layer.sublayers[-1] is mul
    branch = layer.sublayers[0]
    assert type(branch) is Branch and isinstance(branch.branches[0], Identity) and branch.branches[1] is f
    np.testing.assert_allclose(layer(_x()).unwrap("seq", "features"), X * np.tanh(X), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op", ["sub", "add_with_renames", "add_with_constant_operand"])
def test_other_two_input_nodes_read_their_operands_from_a_branch(op):
    f, g = _f(jnp.tanh), _f(jnp.sin)
    if op == "sub":
        node_layer, expected = _binary(jax.lax.sub_p), np.tanh(X) - np.sin(X)
    elif op == "add_with_renames":
        node_layer = _binary(jax.lax.add_p, renames=((("seq", "seq"),), ()))
        expected = np.tanh(X) + np.sin(X)
    else:  # an add with a constant operand is not a plain add, though the node reads two values
        node_layer = ApplyPrimitive(jax.lax.add_p, (), (("input", 0), ("constant", 0)), (2.0,))
        expected = np.tanh(X) + 2.0
    layer = build_layer(_graph([Node(f, (0,), 1), Node(g, (0,), 2), Node(node_layer, (1, 2), 3)], [3]))
    assert type(layer) is Sequential and len(layer.sublayers) == 2
    branch, last = layer.sublayers
    assert type(branch) is Branch and [id(b) for b in branch.branches] == [id(f), id(g)]
    assert last is node_layer
    np.testing.assert_allclose(layer(_x()).unwrap("seq", "features"), expected, rtol=1e-6, atol=1e-6)


def test_a_three_input_node_gets_a_three_way_branch():
    select = ApplyPrimitive(jax.lax.select_n_p, (), (("input", 0), ("input", 1), ("input", 2)))
    positive = Elementwise(lambda v: v > 0)
    f, g = _f(jnp.tanh), _f(jnp.sin)
    nodes = [Node(positive, (0,), 1), Node(f, (0,), 2), Node(g, (0,), 3), Node(select, (1, 2, 3), 4)]
    layer = build_layer(_graph(nodes, [4]))
    assert type(layer) is Sequential and type(layer.sublayers[0]) is Branch
    assert len(layer.sublayers[0].branches) == 3
    np.testing.assert_allclose(layer(_x()).unwrap("seq", "features"), np.where(X > 0, np.sin(X), np.tanh(X)),
                               rtol=1e-6, atol=1e-6)


def test_a_shared_prefix_is_computed_once_before_the_branches():
    pre, g, h = _f(jnp.sin), _f(jnp.tanh), _f(jnp.negative)
    nodes = [Node(pre, (0,), 1), Node(g, (1,), 2), Node(h, (1,), 3), Node(_binary(jax.lax.add_p), (2, 3), 4)]
    layer = build_layer(_graph(nodes, [4]))
    assert type(layer) is Sequential and layer.sublayers[0] is pre
    assert type(layer.sublayers[1]) is BranchAndAddTogether
    d = np.sin(X)
    np.testing.assert_allclose(layer(_x()).unwrap("seq", "features"), np.tanh(d) - d, rtol=1e-6, atol=1e-6)


def test_two_residual_blocks_in_a_row():
    ln1, attn, ln2, mlp = _f(jnp.sin), _f(jnp.tanh), _f(jnp.cos), _f(jnp.negative)
    add1, add2 = _binary(jax.lax.add_p), _binary(jax.lax.add_p)
    nodes = [Node(ln1, (0,), 1), Node(attn, (1,), 2), Node(add1, (0, 2), 3),
             Node(ln2, (3,), 4), Node(mlp, (4,), 5), Node(add2, (3, 5), 6)]
    layer = build_layer(_graph(nodes, [6]))
    assert type(layer) is Sequential and [type(s) for s in layer.sublayers] == [Residual, Residual]
    assert [id(s) for s in layer.sublayers[0].delta.sublayers] == [id(ln1), id(attn)]
    assert [id(s) for s in layer.sublayers[1].delta.sublayers] == [id(ln2), id(mlp)]
    h = X + np.tanh(np.sin(X))
    np.testing.assert_allclose(layer(_x()).unwrap("seq", "features"), h - np.cos(h), rtol=1e-6, atol=1e-6)


def test_input_independent_values_are_recomputed_where_used():
    bias = nx.wrap(jnp.array([1.0, 2.0, 3.0]), "features")
    const = Constant(bias)
    f = _f()
    nodes = [Node(const, (), 1), Node(f, (0,), 2), Node(_binary(jax.lax.mul_p), (2, 1), 3),
             Node(_binary(jax.lax.sub_p), (3, 1), 4)]
    layer = build_layer(_graph(nodes, [4]))
    b = np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(layer(_x()).unwrap("seq", "features"), np.tanh(X) * b - b, rtol=1e-6, atol=1e-6)
    # x + constant adds a bias, not a residual branch: the constant is read through a Branch.
    add = _binary(jax.lax.add_p)
    layer = build_layer(_graph([Node(const, (), 1), Node(add, (0, 1), 2)], [2]))
    assert type(layer) is Sequential and layer.sublayers[-1] is add
    branch = layer.sublayers[0]
    assert type(branch) is Branch and isinstance(branch.branches[0], Identity) and branch.branches[1] is const
    np.testing.assert_allclose(layer(_x()).unwrap("seq", "features"), X + b, rtol=1e-6, atol=1e-6)


def test_several_outputs_are_unflattened_into_the_output_structure():
    f, g = _f(jnp.tanh), _f(jnp.sin)
    treedef = jax.tree_util.tree_structure({"a": 0, "b": [0]})
    layer = build_layer(_graph([Node(f, (0,), 1), Node(g, (1,), 2)], [1, 2]), treedef)
    out = layer(_x())
    assert set(out) == {"a", "b"}
    np.testing.assert_allclose(out["a"].unwrap("seq", "features"), np.tanh(X), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out["b"][0].unwrap("seq", "features"), np.sin(np.tanh(X)), rtol=1e-6, atol=1e-6)
    # A one-leaf structure is the layer itself.
    assert build_layer(_graph([Node(f, (0,), 1)], [1]), jax.tree_util.tree_structure(0)) is f


def test_a_graph_that_ignores_its_input_is_untraceable():
    with pytest.raises(Untraceable, match="input"):
        build_layer(_graph([Node(Constant(1.0), (), 1)], [1], input_id=None))


def test_sequence_flattens_plain_sequentials_and_drops_identities():
    f, g, h = _f(jnp.tanh), _f(jnp.sin), _f(jnp.cos)
    flat = sequence(Identity(), Sequential([f, g]), Identity(), h)
    assert type(flat) is Sequential and [id(s) for s in flat.sublayers] == [id(f), id(g), id(h)]
    assert sequence(Identity(), f) is f
    assert isinstance(sequence(), Identity)
    assert Unflatten(jax.tree_util.tree_structure((0, [0, 0])))((1, 2, 3)) == (1, [2, 3])


# Property: random DAGs ------------------------------------------------------------------------

CONST = np.array([0.5, -1.0, 0.25], dtype=np.float32)  # over "features"

# name -> (arity, layer factory, reference on float32 jnp arrays)
OPS = {
    "tanh": (1, lambda: Elementwise(jnp.tanh), jnp.tanh),
    "sin": (1, lambda: Elementwise(jnp.sin), jnp.sin),
    "neg": (1, lambda: Elementwise(jnp.negative), jnp.negative),
    "half": (1, lambda: ApplyPrimitive(jax.lax.mul_p, (), (("input", 0), ("constant", 0)), (0.5,)),
             lambda v: v * jnp.float32(0.5)),
    "add": (2, lambda: _binary(jax.lax.add_p), jnp.add),
    "mul": (2, lambda: _binary(jax.lax.mul_p), jnp.multiply),
    "sub": (2, lambda: _binary(jax.lax.sub_p), jnp.subtract),
    "max": (2, lambda: _binary(jax.lax.max_p), jnp.maximum),
    "const": (0, lambda: Constant(nx.wrap(jnp.asarray(CONST), "features")), lambda: jnp.asarray(CONST)),
}


@st.composite
def random_dags(draw):
    # At most 7 nodes from inputs in [-1, 1]: repeated squaring stays far below float32 overflow.
    specs, values = [], [0]
    for out in range(1, draw(st.integers(1, 7)) + 1):
        op = draw(st.sampled_from(sorted(OPS)))
        ins = tuple(draw(st.sampled_from(values)) for _ in range(OPS[op][0]))
        specs.append((op, ins, out))
        values.append(out)
    outputs = draw(st.lists(st.sampled_from(values), min_size=1, max_size=3))
    data = draw(st.lists(st.floats(-1, 1, width=32), min_size=6, max_size=6))
    return specs, outputs, np.asarray(data, np.float32).reshape(2, 3)


def _evaluate(specs, outputs, x):
    """The reference: run each node's op on its operands' values, in graph order."""
    env = {0: jnp.asarray(x)}
    for op, ins, out in specs:
        env[out] = OPS[op][2](*(env[i] for i in ins))
    return [np.asarray(env[o]) for o in outputs]


@given(random_dags())
def test_built_layer_computes_what_the_graph_computes(dag):
    specs, outputs, x = dag
    graph = _graph([Node(OPS[op][1](), ins, out) for op, ins, out in specs], outputs)
    treedef = jax.tree_util.tree_structure(tuple(outputs)) if len(outputs) > 1 else None
    layer = build_layer(graph, treedef)
    got = layer(nx.wrap(jnp.asarray(x), "seq", "features"))
    got = got if len(outputs) > 1 else (got,)
    assert len(got) == len(outputs)
    for value, expected in zip(got, _evaluate(specs, outputs, x)):
        names = [n for n in ("seq", "features") if n in value.named_shape]
        data = np.asarray(value.unwrap(*names))
        assert data.shape == expected.shape
        # The same float32 ops in the same operand order: only rounding of the kernels may differ.
        np.testing.assert_allclose(data, expected, rtol=1e-6, atol=1e-6)


# Values that do not depend on the input, used several times ------------------------------------

T = np.array([[0.1, 0.4, -0.6], [0.8, -0.3, 0.2]], dtype=np.float32)  # the side input "t"
CALLS: list[int] = []  # tags of the counting children, in call order


@pytree_dataclass
class _Counted(Layer):
    """sin, recording its ``tag`` in ``CALLS`` at each call (a stand-in for a stateful child)."""

    tag: int = static_field()

    def __call__(self, x, /, **side_inputs):
        CALLS.append(self.tag)
        return Elementwise(jnp.sin)(x)


def _child(tag):
    return CallChild(_Counted(tag), name=f"child{tag}")


def _t():
    return nx.wrap(jnp.asarray(T), "seq", "features")


def _calls(layer):
    return [c.name for c in select(layer).at_instances_of(CallChild).get_sequence()]


def _run_counting(layer, **side):
    CALLS.clear()
    out = layer(_x(), t=_t(), **side)
    return out, list(CALLS)


def test_a_side_input_child_used_twice_is_computed_once_and_read_as_a_side_input():
    # emb = child(t); out = f(x + emb) * emb: two uses of emb, a function of t alone.
    f = _f()
    nodes = [Node(SideInput("t"), (), 1, "source"), Node(_child(0), (1,), 2, "child"),
             Node(_binary(jax.lax.add_p), (0, 2), 3), Node(f, (3,), 4), Node(_binary(jax.lax.mul_p), (4, 2), 5)]
    layer = build_layer(_graph(nodes, [5]))
    assert type(layer) is BindSideInputs and layer.names == ("__pzb_shared_0",)
    (value,) = layer.values
    assert type(value) is Sequential and type(value.sublayers[0]) is SideInput and value.sublayers[1].name == "child0"
    assert _calls(layer) == ["child0"]
    reads = select(layer.body).at_instances_of(SideInput).get_sequence()
    assert [r.name for r in reads] == ["__pzb_shared_0"] * 2
    out, calls = _run_counting(layer)
    assert calls == [0]
    emb = np.sin(T)
    np.testing.assert_allclose(out.unwrap("seq", "features"), np.tanh(X + emb) * emb, rtol=1e-6, atol=1e-6)
    # Adding a value independent of the input is still no residual.
    assert not select(layer).at_instances_of(Residual).count()


def test_a_value_used_once_is_built_in_place_as_before():
    nodes = [Node(SideInput("t"), (), 1, "source"), Node(_child(0), (1,), 2, "child"),
             Node(_binary(jax.lax.add_p), (0, 2), 3)]
    layer = build_layer(_graph(nodes, [3]))
    assert type(layer) is Sequential and type(layer.sublayers[0]) is Branch
    identity, emb = layer.sublayers[0].branches
    assert isinstance(identity, Identity) and [type(s) for s in emb.sublayers] == [SideInput, CallChild]
    # Sources (constants, side inputs) used several times are read where used, not bound.
    nodes = [Node(SideInput("t"), (), 1, "source"), Node(_binary(jax.lax.add_p), (0, 1), 2),
             Node(_binary(jax.lax.mul_p), (2, 1), 3)]
    assert type(build_layer(_graph(nodes, [3]))) is Sequential


def test_shared_values_are_bound_in_graph_order_and_later_ones_read_earlier_ones():
    # a = child0(t) is used by b = child1(a) and by the output; b is used twice.
    nodes = [Node(SideInput("t"), (), 1, "source"), Node(_child(0), (1,), 2, "child"),
             Node(_child(1), (2,), 3, "child"), Node(_binary(jax.lax.add_p), (0, 3), 4),
             Node(_binary(jax.lax.mul_p), (4, 3), 5), Node(_binary(jax.lax.sub_p), (5, 2), 6)]
    layer = build_layer(_graph(nodes, [6]))
    assert type(layer) is BindSideInputs and layer.names == ("__pzb_shared_0", "__pzb_shared_1")
    first, second = layer.values
    assert _calls(first) == ["child0"] and _calls(second) == ["child1"]
    assert [type(s) for s in second.sublayers] == [SideInput, CallChild]
    assert second.sublayers[0].name == "__pzb_shared_0"
    assert _calls(layer.body) == []
    out, calls = _run_counting(layer)
    assert calls == [0, 1]
    a = np.sin(T)
    b = np.sin(a)
    np.testing.assert_allclose(out.unwrap("seq", "features"), (X + b) * b - a, rtol=1e-6, atol=1e-6)


def test_a_node_reading_a_value_twice_and_an_output_count_as_uses():
    # out = (child(t) * child(t), child(t)): one node reads emb twice, and emb is an output too.
    nodes = [Node(SideInput("t"), (), 1, "source"), Node(_child(0), (1,), 2, "child"),
             Node(_binary(jax.lax.mul_p), (2, 2), 3), Node(_binary(jax.lax.add_p), (0, 3), 4)]
    treedef = jax.tree_util.tree_structure((0, 0))
    layer = build_layer(_graph(nodes, [4, 2]), treedef)
    assert type(layer) is BindSideInputs and _calls(layer) == ["child0"]
    (out, emb), calls = _run_counting(layer)
    assert calls == [0]
    np.testing.assert_allclose(emb.unwrap("seq", "features"), np.sin(T), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out.unwrap("seq", "features"), X + np.sin(T) ** 2, rtol=1e-6, atol=1e-6)


def test_uses_by_nodes_no_output_needs_do_not_count():
    nodes = [Node(SideInput("t"), (), 1, "source"), Node(_child(0), (1,), 2, "child"),
             Node(_f(), (2,), 3), Node(_binary(jax.lax.add_p), (0, 2), 4)]  # node 3 is dead
    graph = _graph(nodes, [4])
    assert shared_values(graph, {0, 4}) == []
    assert type(build_layer(graph)) is Sequential


def test_the_shared_names_avoid_the_side_inputs_the_graph_reads():
    nodes = [Node(SideInput("__pzb_shared_0"), (), 1, "source"), Node(_child(0), (1,), 2, "child"),
             Node(_binary(jax.lax.add_p), (0, 2), 3), Node(_binary(jax.lax.mul_p), (3, 2), 4)]
    layer = build_layer(_graph(nodes, [4]))
    assert layer.names == ("__pzb_shared_1",)
    CALLS.clear()
    out = layer(_x(), __pzb_shared_0=_t())
    assert CALLS == [0]
    np.testing.assert_allclose(out.unwrap("seq", "features"), (X + np.sin(T)) * np.sin(T), rtol=1e-6, atol=1e-6)


def test_bind_side_inputs_passes_the_caller_side_inputs_on_and_checks_its_names():
    body = Branch([SideInput("t"), SideInput("v")])
    layer = BindSideInputs((Sequential([SideInput("t"), Elementwise(jnp.negative)]),), ("v",), body)
    t, v = layer(_x(), t=_t())
    np.testing.assert_array_equal(t.unwrap("seq", "features"), T)
    np.testing.assert_array_equal(v.unwrap("seq", "features"), -T)
    with pytest.raises(NamedAxisError, match="one name per value"):
        BindSideInputs((Identity(),), (), body)(_x(), t=_t())


# name -> (arity, node factory(tag), reference); "child" nodes are counting child calls.
SIDE_OPS = {
    **{name: (arity, lambda tag, make=make: (make(), "op"), ref) for name, (arity, make, ref) in OPS.items()
       if name != "const"},
    "const": (0, lambda tag: (OPS["const"][1](), "source"), OPS["const"][2]),
    "side": (0, lambda tag: (SideInput("t"), "source"), lambda: jnp.asarray(T)),
    "child": (1, lambda tag: (_child(tag), "child"), jnp.sin),
}


@st.composite
def random_dags_with_side_inputs(draw):
    # Value 1 is the side input; operands are values independent of the input half of the time, and the
    # last value is an output, so most graphs have a child of side inputs only, often used several times.
    specs, values, independent = [("side", (), 1)], [0, 1], [1]
    for out in range(2, draw(st.integers(2, 9)) + 1):
        op = draw(st.sampled_from([*sorted(SIDE_OPS), "child", "child"]))
        pick = st.one_of(st.sampled_from(independent), st.sampled_from(values))
        ins = tuple(draw(pick) for _ in range(SIDE_OPS[op][0]))
        specs.append((op, ins, out))
        values.append(out)
        if all(i in independent for i in ins):
            independent.append(out)
    outputs = [values[-1], *draw(st.lists(st.sampled_from(values), max_size=2))]
    data = draw(st.lists(st.floats(-1, 1, width=32), min_size=6, max_size=6))
    return specs, outputs, np.asarray(data, np.float32).reshape(2, 3)


def _needed_and_live(specs, outputs):
    ins = {out: i for _, i, out in specs}
    live = {0}
    for _, i, out in specs:
        if any(v in live for v in i):
            live.add(out)
    needed, stack = set(), list(outputs)
    while stack:
        v = stack.pop()
        if v not in needed:
            needed.add(v)
            stack.extend(ins.get(v, ()))
    return needed, live


@settings(max_examples=60)  # about one graph in ten binds a child of side inputs used several times
@given(random_dags_with_side_inputs())
def test_children_of_side_inputs_only_run_once_and_the_outputs_are_unchanged(dag):
    specs, outputs, x = dag
    nodes = []
    for op, ins, out in specs:
        layer, kind = SIDE_OPS[op][1](out)
        nodes.append(Node(layer, ins, out, kind))
    graph = _graph(nodes, outputs)
    treedef = jax.tree_util.tree_structure(tuple(outputs)) if len(outputs) > 1 else None
    layer = build_layer(graph, treedef)
    CALLS.clear()
    got = layer(nx.wrap(jnp.asarray(x), "seq", "features"), t=_t())
    calls = list(CALLS)
    got = got if len(outputs) > 1 else (got,)
    env = {0: jnp.asarray(x)}
    for op, ins, out in specs:
        env[out] = SIDE_OPS[op][2](*(env[i] for i in ins))
    for value, o in zip(got, outputs):
        expected = np.asarray(env[o])
        names = [n for n in ("seq", "features") if n in value.named_shape]
        data = np.asarray(value.unwrap(*names))
        assert data.shape == expected.shape
        np.testing.assert_allclose(data, expected, rtol=1e-6, atol=1e-6)
    needed, live = _needed_and_live(specs, outputs)
    in_tree = _calls(layer)
    for op, _, out in specs:
        if op == "child" and out in needed and out not in live:
            # Computed from side inputs and constants only: once in the layer, once per call.
            assert in_tree.count(f"child{out}") == 1
            assert calls.count(out) == 1
    if not shared_values(graph, live):
        assert not select(layer).at_instances_of(BindSideInputs).count()
