"""Attention pieces and the Attention combinator against pure-jax references.

Every property test stores the operands' axes in a random order and adds
extra named batch axes (``batch``, ``b2``); the reference is written for one
example and vectorised with ``jax.vmap``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError
from pzbridge.nn.attention import AttendToValues, Attention, AttentionLogits
from pzbridge.nn.combinators import Identity
from pzbridge.nn.masks import ApplyCausalMask, ApplyExplicitMask, ApplySlidingWindowMask
from pzbridge.nn.rope import ApplyRoPE
from pzbridge.testing.numerics import assert_bitwise_reproducible, exact_computation

ATOL = 1e-5


def named(data: jax.Array, names: tuple[str, ...], order: list[int] | None = None) -> nx.NamedArrayBase:
    """Wraps ``data`` (axes in ``names`` order) and stores it in the axis order ``order``."""
    x = nx.wrap(data, *names)
    return x if order is None else x.order_as(*[names[i] for i in order])


def vmap_batch(fn, n_batch: int):
    for _ in range(n_batch):
        fn = jax.vmap(fn)
    return fn


batch_shapes = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)
BATCH_NAMES = ("batch", "b2")


def ref_logits(q, k):  # q [T, H, d], k [S, Hk, d] -> [T, H, S]
    k = jnp.repeat(k, q.shape[1] // k.shape[1], axis=1)
    return jnp.einsum("thd,shd->ths", q, k)


def ref_attend(w, v):  # w [T, H, S], v [S, Hk, e] -> [T, H, e]
    v = jnp.repeat(v, w.shape[1] // v.shape[1], axis=1)
    return jnp.einsum("ths,she->the", w, v)


@st.composite
def head_config(draw):
    kv = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))
    return kv * group, kv, draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 4))


@settings(max_examples=15)
@given(head_config(), batch_shapes, st.randoms(use_true_random=False), st.integers(0, 2**31 - 1))
def test_logits_match_vmapped_einsum_reference(cfg, batch, rnd, seed):
    heads, kv_heads, t, s, d = cfg
    grouped = kv_heads != heads
    kv_name = "kv_heads" if grouped else "heads"
    kq, kk = jax.random.split(jax.random.key(seed))
    q = jax.random.normal(kq, batch + (t, heads, d))
    k = jax.random.normal(kk, batch + (s, kv_heads, d))
    bn = BATCH_NAMES[: len(batch)]
    q_names, k_names = bn + ("seq", "heads", "projection"), bn + ("kv_seq", kv_name, "projection")
    q_order, k_order = rnd.sample(range(len(q_names)), len(q_names)), rnd.sample(range(len(k_names)), len(k_names))
    layer = AttentionLogits(kv_heads_axis=kv_name)

    @jax.jit  # One compilation per example instead of one per eager op.
    def both(q, k):
        out = layer((named(q, q_names, q_order), named(k, k_names, k_order)))
        return out.unwrap(*bn, "seq", "heads", "kv_seq"), vmap_batch(ref_logits, len(batch))(q, k)

    np.testing.assert_allclose(*both(q, k), atol=ATOL, rtol=1e-5)


@settings(max_examples=15)
@given(head_config(), batch_shapes, st.randoms(use_true_random=False), st.integers(0, 2**31 - 1))
def test_attend_to_values_matches_vmapped_reference(cfg, batch, rnd, seed):
    heads, kv_heads, t, s, e = cfg
    kv_name = "kv_heads" if kv_heads != heads else "heads"
    kw, kv = jax.random.split(jax.random.key(seed))
    w = jax.random.uniform(kw, batch + (t, heads, s))
    v = jax.random.normal(kv, batch + (s, kv_heads, e))
    bn = BATCH_NAMES[: len(batch)]
    w_names, v_names = bn + ("seq", "heads", "kv_seq"), bn + ("kv_seq", kv_name, "projection")
    w_order, v_order = rnd.sample(range(len(w_names)), len(w_names)), rnd.sample(range(len(v_names)), len(v_names))

    @jax.jit
    def both(w, v):
        out = AttendToValues(kv_heads_axis=kv_name)((named(w, w_names, w_order), named(v, v_names, v_order)))
        return out.unwrap(*bn, "seq", "heads", "projection"), vmap_batch(ref_attend, len(batch))(w, v)

    np.testing.assert_allclose(*both(w, v), atol=ATOL, rtol=1e-5)


def ref_mask(logits, q_pos, k_pos, kind, window, fill):  # logits [T, S]
    diff = q_pos[:, None] - k_pos[None, :]
    if kind == "causal":
        keep = diff >= 0
    elif kind == "window":
        keep = (diff >= 0) & (diff < window)
    else:
        keep = jnp.abs(diff) < window
    return jnp.where(keep, logits, fill)


@settings(max_examples=15)
@given(
    st.sampled_from(["causal", "window", "window_noncausal"]),
    st.integers(1, 4), st.integers(1, 5), st.integers(1, 5), batch_shapes,
    st.sampled_from([None, -1e9, -jnp.inf]), st.booleans(), st.integers(0, 2**31 - 1),
)
def test_position_masks_match_vmapped_reference(kind, window, t, s, batch, fill, given_positions, seed):
    k1, k2 = jax.random.split(jax.random.key(seed))
    logits = jax.random.normal(k1, batch + (s, t))  # stored kv_seq before seq on purpose
    bn = BATCH_NAMES[: len(batch)]
    layer = (ApplyCausalMask(masked_out_value=fill) if kind == "causal"
             else ApplySlidingWindowMask(window, causal=kind == "window", masked_out_value=fill))
    q_pos = jax.random.randint(k2, batch + (t,), 0, 6) if given_positions else jnp.broadcast_to(jnp.arange(t), batch + (t,))
    fill_value = jnp.finfo(jnp.float32).min if fill is None else fill

    @jax.jit
    def both(logits, q_pos):
        side = {"token_positions": nx.wrap(q_pos, *bn, "seq")} if given_positions else {}
        out = layer(nx.wrap(logits, *bn, "kv_seq", "seq"), **side)
        expected = vmap_batch(
            lambda l, qp: ref_mask(l.T, qp, jnp.arange(s), kind, window, fill_value), len(batch)
        )(logits, q_pos)
        return out.unwrap(*bn, "seq", "kv_seq"), expected

    assert exact_computation(both, logits, q_pos)  # masking rounds nowhere: equal on any CPU
    np.testing.assert_array_equal(*both(logits, q_pos))


@settings(max_examples=10)
@given(st.integers(1, 4), st.integers(1, 4), batch_shapes, st.booleans(), st.integers(0, 2**31 - 1))
def test_explicit_mask_from_side_input_or_field_matches_where(t, s, batch, as_field, seed):
    k1, k2 = jax.random.split(jax.random.key(seed))
    logits = jax.random.normal(k1, batch + (t, s))
    keep = jax.random.bernoulli(k2, 0.5, (t, s))
    bn = BATCH_NAMES[: len(batch)]
    mask = nx.wrap(keep, "seq", "kv_seq")
    layer = ApplyExplicitMask(mask if as_field else None, masked_out_value=-7.0)
    call = jax.jit(lambda lg, m: layer(nx.wrap(lg, *bn, "seq", "kv_seq"), **({} if as_field else {"attn_mask": m})))
    out = call(logits, mask)
    assert exact_computation(call, logits, mask)  # a select rounds nowhere: equal to NumPy's on any CPU
    np.testing.assert_array_equal(out.unwrap(*bn, "seq", "kv_seq"), np.where(keep, logits, -7.0))


def test_default_masked_out_value_is_dtype_minimum_like_nnx():
    out = ApplyCausalMask()(nx.zeros({"seq": 2, "kv_seq": 2}, jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    assert out.unwrap("seq", "kv_seq")[0, 1] == jnp.finfo(jnp.bfloat16).min


# The full Attention layer. ----------------------------------------------------------


def ref_attention(x, p, heads, kv_heads, qk, use_rope, masked):  # x [T, D]
    q = jnp.einsum("td,dhk->thk", x, p["wq"])
    k = jnp.einsum("td,dhk->thk", x, p["wk"])
    v = jnp.einsum("td,dhk->thk", x, p["wv"])
    if "bq" in p:
        q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
    if use_rope:
        pos = jnp.arange(x.shape[0])
        q, k = ref_rope(q, pos), ref_rope(k, pos)
    logits = ref_logits(q / math.sqrt(qk), k)  # [T, H, S]
    if masked:
        t = x.shape[0]
        causal = jnp.tril(jnp.ones((t, t), bool))[:, None, :]
        logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
    out = ref_attend(jax.nn.softmax(logits, axis=-1), v)
    y = jnp.einsum("the,hed->td", out, p["wo"])
    return y + p["bo"] if "bo" in p else y


def ref_rope(x, pos):  # x [T, H, d], rotate-half
    half = x.shape[-1] // 2
    freq = 10_000.0 ** (-jnp.arange(half) * 2.0 / x.shape[-1])
    ang = pos[:, None, None] * freq
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * jnp.cos(ang) - x2 * jnp.sin(ang), x2 * jnp.cos(ang) + x1 * jnp.sin(ang)], -1)


def attention_params(attn: Attention, grouped: bool, bias: bool) -> dict[str, jax.Array]:
    """Reads the layer's weights by axis name into the reference layout."""
    kvh = "kv_heads" if grouped else "heads"
    first = lambda layer: layer.sublayers[0]  # noqa: E731
    lin = lambda seq: first(seq) if bias else seq  # Affine is [Linear, AddBias]  # noqa: E731
    q, k, v = (first(attn.input_to_query), first(attn.input_to_key), first(attn.input_to_value))
    o = attn.attn_value_to_output.sublayers[1]
    p = {
        "wq": lin(q).weights.value.unwrap("features", "heads", "projection"),
        "wk": lin(k).weights.value.unwrap("features", kvh, "projection"),
        "wv": lin(v).weights.value.unwrap("features", kvh, "projection"),
        "wo": lin(o).weights.value.unwrap("heads", "projection", "features"),
    }
    if bias:
        p["bq"] = q.sublayers[1].bias.value.unwrap("heads", "projection")
        p["bk"] = k.sublayers[1].bias.value.unwrap(kvh, "projection")
        p["bv"] = v.sublayers[1].bias.value.unwrap(kvh, "projection")
        p["bo"] = o.sublayers[1].bias.value.unwrap("features")
    return p


def randomize(tree, seed):
    """Replaces every parameter's value by random data (biases start at zero otherwise)."""
    variables = [leaf for leaf in jax.tree_util.tree_leaves(tree) if isinstance(leaf, pzb.Parameter)]
    for var, key in zip(variables, jax.random.split(jax.random.key(seed), max(len(variables), 1))):
        var.value = nx.NamedArray(jax.random.normal(key, var.value.data_array.shape) * 0.5, var.value.named_axes)
    return tree


@settings(max_examples=12)
@given(head_config(), batch_shapes, st.booleans(), st.booleans(), st.booleans(), st.integers(0, 2**31 - 1))
def test_attention_matches_vmapped_pure_jax_reference(cfg, batch, bias, use_rope, masked, seed):
    heads, kv_heads, t, _, half = cfg
    qk = 2 * half
    grouped = kv_heads != heads
    d_model = 5
    attn = Attention.from_config(
        "a", jax.random.key(seed), d_model=d_model, num_heads=heads, qk_size=qk,
        num_kv_heads=kv_heads, use_qkv_bias=bias, use_output_bias=bias,
        mask=ApplyCausalMask() if masked else None, rope=ApplyRoPE() if use_rope else None,
    )
    randomize(attn, seed)
    x = jax.random.normal(jax.random.key(seed + 1), batch + (t, d_model))
    bn = BATCH_NAMES[: len(batch)]
    slots, values = pzb.unbind_params(attn, freeze=True)
    p = attention_params(attn, grouped, bias)

    @jax.jit
    def both(values, p, x):
        out = slots.stateless_call(values, nx.wrap(x, *bn, "seq", "features"))[0]
        ref = vmap_batch(lambda xx: ref_attention(xx, p, heads, kv_heads, qk, use_rope, masked), len(batch))(x)
        return out.unwrap(*bn, "seq", "features"), ref

    np.testing.assert_allclose(*both(values, p, x), atol=ATOL, rtol=1e-5)


def test_separate_value_head_size_changes_output_projection_input():
    attn = Attention.from_config("a", jax.random.key(0), d_model=6, num_heads=2, qk_size=4, vo_size=3)
    assert dict(attn.input_to_value.sublayers[0].weights.value.named_shape) == {
        "features": 6, "heads": 2, "projection": 3}
    x = nx.wrap(jax.random.normal(jax.random.key(1), (4, 6)), "seq", "features")
    p = attention_params(attn, False, False)
    np.testing.assert_allclose(
        attn(x).unwrap("seq", "features"), ref_attention(x.unwrap("seq", "features"), p, 2, 2, 4, False, True),
        atol=ATOL)


def test_from_config_is_deterministic_and_slots_without_rng():
    build = lambda key: Attention.from_config("blk.attn", key, d_model=4, num_heads=2, qk_size=2,  # noqa: E731
                                              use_qkv_bias=True)
    a, b = pzb.unbind_params(build(jax.random.key(3)), freeze=True)[1], pzb.unbind_params(
        build(jax.random.key(3)), freeze=True)[1]
    assert [v.label for v in a] == [v.label for v in b]
    assert "blk.attn.query.weights" in {v.label for v in a}
    for va, vb in zip(a, b):
        np.testing.assert_array_equal(va.value.data_array, vb.value.data_array)
    c = pzb.unbind_params(build(jax.random.key(4)), freeze=True)[1]
    assert not np.allclose(a[0].value.data_array, c[0].value.data_array)
    slots = build(None)
    labels = {leaf.label for leaf in jax.tree_util.tree_leaves(slots, is_leaf=lambda n: isinstance(n, pzb.ParameterSlot))
              if isinstance(leaf, pzb.ParameterSlot)}
    assert labels == {v.label for v in a}
    # Binding the values into the slots gives the built model's output.
    x = nx.wrap(jnp.ones((3, 4)), "seq", "features")
    built = build(jax.random.key(3))
    assert_bitwise_reproducible(lambda v: slots.stateless_call(a, v)[0], built, x)  # the same program
    np.testing.assert_array_equal(slots.stateless_call(a, x)[0].unwrap("seq", "features"),
                                  built(x).unwrap("seq", "features"))


def test_jit_and_grad_through_stateless_call_match_reference_gradient():
    attn = randomize(Attention.from_config("a", jax.random.key(0), d_model=4, num_heads=2, qk_size=2), 1)
    slots, values = pzb.unbind_params(attn, freeze=True)
    x = jax.random.normal(jax.random.key(2), (3, 4))

    def loss(vals):
        return slots.stateless_call(vals, nx.wrap(x, "seq", "features"))[0].unwrap("seq", "features").sum()

    p = attention_params(attn, False, False)
    g = jax.jit(jax.grad(loss))(values)
    by_label = {v.label: v.value for v in g}
    ref_g = jax.grad(lambda pp: ref_attention(x, pp, 2, 2, 2, False, True).sum())(p)
    np.testing.assert_allclose(by_label["a.query.weights"].unwrap("features", "heads", "projection"), ref_g["wq"],
                               atol=ATOL)
    np.testing.assert_allclose(by_label["a.output.weights"].unwrap("heads", "projection", "features"), ref_g["wo"],
                               atol=ATOL)


def test_attention_sublayers_are_selectable_and_replaceable():
    attn = Attention.from_config("a", jax.random.key(0), d_model=4, num_heads=2, qk_size=2)
    unmasked = pzb.select(attn).at_instances_of(ApplyCausalMask).set(Identity())
    x = nx.wrap(jax.random.normal(jax.random.key(1), (3, 4)), "seq", "features")
    p = attention_params(attn, False, False)
    np.testing.assert_allclose(unmasked(x).unwrap("seq", "features"),
                               ref_attention(x.unwrap("seq", "features"), p, 2, 2, 2, False, False), atol=ATOL)


def test_errors_name_the_problem_and_fix():
    with pytest.raises(NamedAxisError, match="RenameAxes"):
        AttentionLogits()((nx.ones({"seq": 2, "heads": 1, "projection": 2}),
                           nx.ones({"seq": 2, "heads": 1, "projection": 2})))
    with pytest.raises(NamedAxisError, match="multiple of the number of key/value heads"):
        AttentionLogits(kv_heads_axis="kv_heads")((nx.ones({"seq": 2, "heads": 3, "projection": 2}),
                                                   nx.ones({"kv_seq": 2, "kv_heads": 2, "projection": 2})))
    with pytest.raises(NamedAxisError, match="num_kv_heads"):
        Attention.from_config("a", None, d_model=4, num_heads=3, qk_size=2, num_kv_heads=2)
    with pytest.raises(NamedAxisError, match="attn_mask"):
        ApplyExplicitMask()(nx.zeros({"seq": 1, "kv_seq": 1}))
    with pytest.raises(NamedAxisError, match="kv_seq"):
        ApplyCausalMask()(nx.zeros({"seq": 1, "other": 1}))
    with pytest.raises(NamedAxisError, match="axes \\['batch'\\] that the logits lack"):
        ApplyExplicitMask()(nx.zeros({"seq": 1, "kv_seq": 1}), attn_mask=nx.ones({"batch": 2}, bool))
    with pytest.raises(NamedAxisError, match="window"):
        ApplySlidingWindowMask(0)
