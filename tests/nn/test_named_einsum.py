"""named_einsum / InputEinsum: Penzai 0.2.5's parameter-free NamedEinsum (indices per axis, diagonals)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.core.errors import NamedAxisError
from pzbridge.nn import InputEinsum, named_einsum


def test_attention_logits_with_different_names_for_one_index():
    q = pzb.nx.wrap(jnp.arange(6.0).reshape(3, 2), "seq", "proj")
    k = pzb.nx.wrap(jnp.array([[1.0, 0.0], [0.0, 1.0]]), "kv_seq", "proj")
    out = named_einsum(({"seq": "t", "proj": "p"}, {"kv_seq": "s", "proj": "p"}), {"seq": "t", "kv_seq": "s"}, q, k)
    assert out.unwrap("seq", "kv_seq").tolist() == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]


def test_diagonal_trace_and_batch_axes():
    m = pzb.nx.wrap(jnp.array([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]]), "batch", "r", "c")
    assert named_einsum(({"r": "i", "c": "i"},), {}, m).unwrap("batch").tolist() == [5.0, 13.0]
    diag = named_einsum(({"r": "i", "c": "i"},), {"d": "i"}, m)
    assert diag.unwrap("batch", "d").tolist() == [[1.0, 4.0], [5.0, 8.0]]
    transposed = named_einsum((("r", "c"),), {"c": "r", "r": "c"}, m)
    # Output axis "c" takes index "r" (the old rows): a transpose that swaps the names.
    np.testing.assert_array_equal(transposed.unwrap("batch", "c", "r"), np.asarray(m.unwrap("batch", "r", "c")))


def test_errors():
    a = pzb.nx.zeros({"x": 2, "y": 3})
    with pytest.raises(NamedAxisError, match="index 'i' has size 3 at input 0 axis 'y', but 2 at input 0 axis 'x'"):
        named_einsum(({"x": "i", "y": "i"},), {}, a)
    with pytest.raises(NamedAxisError, match="lacks axes"):
        named_einsum((("z",),), (), a)
    with pytest.raises(NamedAxisError, match=r"axes \['y'\] that its spec does not name"):
        named_einsum((("x",), ("x",)), (), a, pzb.nx.zeros({"x": 2}))
    assert dict(named_einsum((("x",),), (), a).named_shape) == {"y": 3}  # in every input, in no spec: batch
    with pytest.raises(NamedAxisError, match="output indices"):
        named_einsum((("x", "y"),), {"o": "q"}, a)
    with pytest.raises(NamedAxisError, match="without positional axes"):
        named_einsum((("x",),), (), pzb.nx.wrap(jnp.zeros((2, 2))).tag_prefix("x"))
    with pytest.raises(NamedAxisError, match="2 input specs for 1 arrays"):
        named_einsum((("x", "y"), ("x",)), (), a)


def test_layer_is_parameter_free_and_jittable():
    layer = InputEinsum(({"a": "i", "b": "j"}, ("b", "c")), {"a": "i", "c": "c"})
    assert jax.tree_util.tree_leaves(layer) == []
    assert layer.replace() == layer
    x, y = pzb.nx.ones({"a": 2, "b": 3}), pzb.nx.ones({"b": 3, "c": 4})
    out = jax.jit(lambda u, v: layer((u, v)))(x, y)
    # b is summed over in the second input only (index "b"), and over j in the first: 3 * 3 per entry.
    assert dict(out.named_shape) == {"a": 2, "c": 4}
    assert out.unwrap("a", "c").tolist() == [[9.0] * 4] * 2


@settings(max_examples=15, derandomize=True)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(0, 10_000))
def test_matches_jnp_einsum(i, j, k, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(i, j)).astype(np.float32), rng.normal(size=(j, k)).astype(np.float32)
    out = named_einsum((("i", "j"), ("j", "k")), ("i", "k"), pzb.nx.wrap(a, "i", "j"), pzb.nx.wrap(b, "j", "k"))
    np.testing.assert_allclose(out.unwrap("i", "k"), a @ b, rtol=1e-5, atol=1e-5)
