"""nmap against a nested-vmap reference (one vmap per name), plus its tracing cost."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pzbridge.core.errors import NamedAxisError
from pzbridge.core.named_axes import nmap, wrap
from pzbridge.testing.named_arrays import broadcastable_named_array_cases

POSITIONAL_FNS = {
    "product": lambda a, b: a * b,
    "sum_plus": lambda a, b: jnp.sum(a) + b,
    "pytree_out": lambda a, b: {"c": jnp.cumsum(jnp.atleast_1d(a + b)), "m": jnp.max(a) - jnp.min(b)},
    "outer": lambda a, b: jnp.outer(jnp.ravel(a), jnp.ravel(b)),
}


def _names_first(case, union):
    """numpy: the case's reference with its names moved to the front, in union order."""
    p = case.reference.ndim - len(case.names)
    present = [n for n in union if n in case.names]
    return present, np.transpose(case.reference, [p + case.names.index(n) for n in present] + list(range(p)))


def _nested_vmap_reference(fn, cases, union):
    """One jax.vmap per name, outermost first: the textbook definition of nmap."""
    prepared = [_names_first(c, union) for c in cases]
    mapped = fn
    for name in reversed(list(union)):
        in_axes = tuple(0 if name in present else None for present, _ in prepared)
        mapped = jax.vmap(mapped, in_axes=in_axes)
    return mapped(*[jnp.asarray(data) for _, data in prepared])


@given(broadcastable_named_array_cases(count=2), st.sampled_from(sorted(POSITIONAL_FNS)))
def test_nmap_equals_nested_vmap_reference(drawn, fn_name):
    union, _, cases = drawn
    fn = POSITIONAL_FNS[fn_name]
    out = nmap(fn)(*[c.array for c in cases])
    expected = _nested_vmap_reference(fn, cases, union)
    names = list(union)
    for got, want in zip(jax.tree_util.tree_leaves(out, is_leaf=lambda x: hasattr(x, "named_shape")),
                         jax.tree_util.tree_leaves(expected)):
        assert dict(got.named_shape) == dict(union)
        want = np.moveaxis(np.asarray(want), list(range(len(names))), list(range(-len(names), 0)))
        np.testing.assert_allclose(np.asarray(got.unwrap(*names)), want, rtol=1e-5, atol=1e-5)


@given(broadcastable_named_array_cases(count=3))
def test_nmap_accepts_pytree_arguments_keywords_and_passthrough_values(drawn):
    union, _, cases = drawn
    a, b, c = (case.array for case in cases)

    def fn(pair, scale, *, third):
        assert isinstance(scale, int)  # Non-array arguments reach the function unchanged.
        return pair["x"] * scale + pair["y"] - third

    out = nmap(fn)({"x": a, "y": b}, 3, third=c)
    expected = _nested_vmap_reference(lambda x, y, z: x * 3 + y - z, cases, union)
    want = np.moveaxis(np.asarray(expected), list(range(len(union))), list(range(-len(union), 0)))
    np.testing.assert_allclose(np.asarray(out.unwrap(*union)), want, rtol=1e-5, atol=1e-5)


def test_nmap_passes_plain_arrays_unmapped():
    x = wrap(jnp.arange(6.0).reshape(2, 3), "b", "s")
    w = jnp.arange(3.0)
    out = nmap(lambda xi, wi: xi * wi.sum())(x, w)
    np.testing.assert_allclose(np.asarray(out.unwrap("b", "s")), np.arange(6.0).reshape(2, 3) * 3.0)


def test_nmap_size_mismatch_names_axis_sizes_and_arguments():
    a = wrap(jnp.zeros(3), "seq")
    b = wrap(jnp.zeros(4), "seq")
    with pytest.raises(NamedAxisError, match=r"axis 'seq' has size 3 in argument 0 and 4 in argument 1"):
        nmap(jnp.add)(a, b)


def test_nmap_rejects_functions_returning_named_arrays():
    with pytest.raises(NamedAxisError, match="must return plain arrays"):
        nmap(lambda x: wrap(x))(wrap(jnp.zeros(2), "a"))


def _count_vmaps(monkeypatch):
    calls = []
    real_vmap = jax.vmap

    def counting_vmap(*args, **kwargs):
        calls.append(1)
        return real_vmap(*args, **kwargs)

    monkeypatch.setattr(jax, "vmap", counting_vmap)
    return calls


def test_nmap_uses_one_vmap_for_names_shared_by_all_arguments(monkeypatch):
    x = wrap(jnp.ones((2, 3, 4, 5, 6))).tag_prefix("a", "b", "c", "d")
    y = wrap(jnp.ones((5, 4, 3, 2))).tag("d", "c", "b", "a")
    calls = _count_vmaps(monkeypatch)
    out = nmap(lambda u, v: u * v)(x, y)
    assert len(calls) == 1
    assert dict(out.named_shape) == {"a": 2, "b": 3, "c": 4, "d": 5}


def test_nmap_adds_one_vmap_per_group_of_names_missing_somewhere(monkeypatch):
    x = wrap(jnp.ones((2, 3, 4)), "a", "b", "only_x1").untag("only_x1")
    y = wrap(jnp.ones((2, 3, 7, 8)), "a", "b", "only_y1", "only_y2")
    calls = _count_vmaps(monkeypatch)
    out = nmap(lambda u, v: u.sum() + v)(x, y)
    assert len(calls) == 2  # {a, b} shared by both, {only_y1, only_y2} only in y.
    assert dict(out.named_shape) == {"a": 2, "b": 3, "only_y1": 7, "only_y2": 8}


def test_nmap_traces_no_transpose_when_layouts_already_agree():
    x = wrap(jnp.ones((2, 3, 4)), "a", "b", "f")
    jaxpr = jax.make_jaxpr(lambda x: nmap(jnp.sum)(x.untag("f")))(x)
    primitives = {eqn.primitive.name for eqn in jaxpr.jaxpr.eqns}
    assert "transpose" not in primitives
