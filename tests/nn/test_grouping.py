"""NamedGroup and inline_anonymous_sequentials (Penzai 0.2.5 pz.nn.NamedGroup / inline_anonymous_sequentials)."""

import jax.numpy as jnp
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.nn import (
    ConstantRescale,
    Identity,
    NamedGroup,
    Sequential,
    inline_anonymous_sequentials,
)


def test_named_group_runs_in_order_and_keeps_its_name_static():
    group = NamedGroup("mlp", [ConstantRescale(2.0), pzb.nn.Elementwise(lambda v: v + 1)])
    assert group(pzb.nx.wrap(jnp.array([1.0]), "f")).unwrap("f").tolist() == [3.0]
    assert [str(p) for p, _ in __import__("jax").tree_util.tree_flatten_with_path(group)[0]] == []
    assert group.name == "mlp" and pzb.select(group).at_instances_of(ConstantRescale).count() == 1


def test_inline_splices_only_plain_sequentials_at_every_depth():
    affine = pzb.nn.Affine([Identity()])
    model = NamedGroup("top", [
        Sequential([Identity(), Sequential([ConstantRescale(2.0)])]),
        affine,
        NamedGroup("inner", [Sequential([Identity()])]),
    ])
    flat = inline_anonymous_sequentials(model)
    assert [type(layer).__name__ for layer in flat.sublayers] == ["Identity", "ConstantRescale", "Affine", "NamedGroup"]
    assert [type(layer).__name__ for layer in flat.sublayers[3].sublayers] == ["Identity"]
    assert flat.sublayers[2] == affine
    root = Sequential([Sequential([Identity()])])
    assert type(inline_anonymous_sequentials(root)) is Sequential and len(inline_anonymous_sequentials(root).sublayers) == 1
    assert inline_anonymous_sequentials({"a": Sequential([Sequential([Identity()])])})["a"].sublayers == [Identity()]


NESTS = st.recursive(st.just("leaf"), lambda inner: st.lists(inner, min_size=0, max_size=3), max_leaves=8)


def _build(spec, factors):
    if spec == "leaf":
        return ConstantRescale(next(factors))
    return Sequential([_build(s, factors) for s in spec])


def _count(spec):
    return 1 if spec == "leaf" else sum(_count(s) for s in spec)


@settings(max_examples=20, derandomize=True)
@given(st.lists(NESTS, min_size=1, max_size=3))
def test_inlining_keeps_the_function_and_leaves_no_nested_plain_sequential(spec):
    factors = iter([2.0, 0.5, 3.0, -1.0] * 10)
    model = NamedGroup("g", [_build(s, factors) for s in spec])
    flat = inline_anonymous_sequentials(model)
    x = pzb.nx.wrap(jnp.array([1.0, -2.0]), "f")
    assert pzb.tree_equal(flat(x), model(x))
    assert all(type(layer) is ConstantRescale for layer in flat.sublayers)
    assert len(flat.sublayers) == sum(_count(s) for s in spec)


def test_inline_groups_with_custom_filters():
    from pzbridge.nn import inline_groups

    model = Sequential([NamedGroup("keep", [Identity()]), NamedGroup("drop", [ConstantRescale(2.0)]), Identity()])
    flat = inline_groups(model, lambda g: type(g) is Sequential, lambda g: isinstance(g, NamedGroup) and g.name == "drop")
    assert [type(layer).__name__ for layer in flat.sublayers] == ["NamedGroup", "ConstantRescale", "Identity"]
    assert flat.sublayers[0].name == "keep"
