"""The combinator-built GPT against the hand-written pure-jax reference.

Weights are drawn in the reference layout, then loaded into a slot-only model
(``build_gpt(..., init_base_rng=None)``) with every array stored in a random
axis order, so the test also pins that layers address axes by name.
"""

from __future__ import annotations

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError
from pzbridge.models.gpt import MLP, GPTConfig, TransformerBlock, build_gpt, greedy_decode, make_kv_cached
from pzbridge.models.gpt_reference import gpt_forward, params_from_model
from pzbridge.testing.numerics import assert_bitwise_reproducible

ATOL = 1e-5


def random_reference_params(cfg: GPTConfig, seed: int) -> dict:
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    d, f, h, kvh, hd, v = cfg.d_model, cfg.d_mlp, cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.vocab_size
    normal = lambda *shape, s=1.0: jax.random.normal(next(keys), shape) * s  # noqa: E731

    def norm():
        p = {"scale": 1.0 + normal(d, s=0.1)}
        if cfg.norm == "layer":
            p["bias"] = normal(d, s=0.1)
        return p

    blocks = []
    for _ in range(cfg.num_layers):
        b = {"attn_norm": norm(), "mlp_norm": norm(),
             "wq": normal(d, h, hd, s=d**-0.5), "wk": normal(d, kvh, hd, s=d**-0.5),
             "wv": normal(d, kvh, hd, s=d**-0.5), "wo": normal(h, hd, d, s=(h * hd) ** -0.5),
             "w_in": normal(d, f, s=d**-0.5), "b_in": normal(f, s=0.1),
             "w_out": normal(f, d, s=f**-0.5), "b_out": normal(d, s=0.1)}
        if cfg.attention_bias:
            b.update(bq=normal(h, hd, s=0.1), bk=normal(kvh, hd, s=0.1), bv=normal(kvh, hd, s=0.1), bo=normal(d, s=0.1))
        blocks.append(b)
    return {"embed": normal(v, d), "blocks": blocks, "final_norm": norm()}


def values_for_model(params: dict, cfg: GPTConfig, rnd: random.Random) -> list[pzb.ParameterValue]:
    """ParameterValues by label, each stored in a random axis order."""
    kvh = "heads" if cfg.num_kv_heads in (None, cfg.num_heads) else "kv_heads"
    out = []

    def add(label, array, *names):
        order = list(names)
        rnd.shuffle(order)
        out.append(pzb.ParameterValue(nx.wrap(array, *names).order_as(*order), f"{cfg.name}.{label}"))

    def norm(label, p):
        add(f"{label}.scale", p["scale"], "features")
        if "bias" in p:
            add(f"{label}.bias", p["bias"], "features")

    add("embed.embeddings", params["embed"], "vocabulary", "features")
    for i, b in enumerate(params["blocks"]):
        p = f"blocks.{i}"
        norm(f"{p}.attn_norm", b["attn_norm"])
        norm(f"{p}.mlp_norm", b["mlp_norm"])
        add(f"{p}.attn.query.weights", b["wq"], "features", "heads", "projection")
        add(f"{p}.attn.key.weights", b["wk"], "features", kvh, "projection")
        add(f"{p}.attn.value.weights", b["wv"], "features", kvh, "projection")
        add(f"{p}.attn.output.weights", b["wo"], "heads", "projection", "features")
        if "bq" in b:
            add(f"{p}.attn.query.bias", b["bq"], "heads", "projection")
            add(f"{p}.attn.key.bias", b["bk"], kvh, "projection")
            add(f"{p}.attn.value.bias", b["bv"], kvh, "projection")
            add(f"{p}.attn.output.bias", b["bo"], "features")
        add(f"{p}.mlp.in.weights", b["w_in"], "features", "neurons")
        add(f"{p}.mlp.in.bias", b["b_in"], "neurons")
        add(f"{p}.mlp.out.weights", b["w_out"], "neurons", "features")
        add(f"{p}.mlp.out.bias", b["b_out"], "features")
    norm("final_norm", params["final_norm"])
    return out


configs = st.builds(
    dict,
    num_layers=st.integers(1, 2),
    heads=st.sampled_from([(2, None), (4, 2), (2, 1)]),
    norm=st.sampled_from(["layer", "rms"]),
    attention_bias=st.booleans(),
)


def make(cfg_dict: dict, key=None):
    heads, kv = cfg_dict["heads"]
    return build_gpt("gpt", key, vocab_size=11, num_layers=cfg_dict["num_layers"], num_heads=heads, d_model=8,
                     d_mlp=16, max_seq_len=12, num_kv_heads=kv, norm=cfg_dict["norm"],
                     attention_bias=cfg_dict["attention_bias"])


@settings(max_examples=6)
@given(configs, st.integers(1, 6), st.booleans(), st.integers(0, 1000), st.randoms(use_true_random=False))
def test_gpt_logits_match_hand_written_reference_with_same_weights(cfg_dict, seq, extra_batch, seed, rnd):
    model = make(cfg_dict)  # slots only
    params = random_reference_params(model.config, seed)
    values = values_for_model(params, model.config, rnd)
    shape = (2, 3, seq) if extra_batch else (3, seq)
    names = ("b2", "batch", "seq") if extra_batch else ("batch", "seq")
    tokens = jax.random.randint(jax.random.key(seed), shape, 0, 11)

    @jax.jit
    def both(values, params, tokens):
        logits = model.stateless_call(values, nx.wrap(tokens, *names))[0].unwrap(*names, "vocabulary")
        ref = lambda t: gpt_forward(params, t, model.config)  # noqa: E731
        return logits, (jax.vmap(ref) if extra_batch else ref)(tokens)

    np.testing.assert_allclose(*both(values, params, tokens), atol=ATOL, rtol=1e-5)


@settings(max_examples=5)
@given(configs, st.integers(1, 4), st.integers(1, 4), st.integers(0, 1000))
def test_kv_cache_decoding_gives_full_forward_logits(cfg_dict, prompt, steps, seed):
    model = make(cfg_dict, jax.random.key(seed))
    total = prompt + steps
    tokens = jax.random.randint(jax.random.key(seed + 1), (2, total), 0, 11)
    full = jax.jit(lambda t: model(nx.wrap(t, "batch", "seq")).unwrap("batch", "seq", "vocabulary"))(tokens)
    slots, values = pzb.unbind_variables(make_kv_cached(model, {"batch": 2}, cache_len=total + 1), freeze=True)
    step = jax.jit(lambda vals, t: slots.stateless_call(vals, nx.wrap(t, "batch", "seq")))
    pieces, start = [], 0
    for size in [prompt] + [1] * steps:
        logits, new_state = step(values, tokens[:, start : start + size])
        new = {v.label: v for v in new_state}
        values = tuple(new.get(v.label, v) for v in values)
        pieces.append(logits.unwrap("batch", "seq", "vocabulary"))
        start += size
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=ATOL, rtol=1e-5)


def test_greedy_decode_is_deterministic_and_matches_reference_argmax_loop():
    model = build_gpt("gpt", jax.random.key(7), vocab_size=13, num_layers=2, num_heads=4, d_model=8, d_mlp=16,
                      max_seq_len=16, num_kv_heads=2)
    before = [v.value.data_array for v in pzb.unbind_params(model, freeze=True)[1]]
    prompt = jax.random.randint(jax.random.key(8), (2, 4), 0, 13)
    first = greedy_decode(model, nx.wrap(prompt, "batch", "seq"), 5).unwrap("batch", "seq")
    second = greedy_decode(model, nx.wrap(prompt, "batch", "seq"), 5).unwrap("batch", "seq")
    np.testing.assert_array_equal(first, second)
    params, seq = params_from_model(model), prompt
    reference = jax.jit(gpt_forward, static_argnums=2)
    for _ in range(5):
        logits = reference(params, seq, model.config)[:, -1]
        # The decoder is not the reference's program, so its logits may differ in the last bits on other CPUs:
        # equal tokens need a clear argmax (a top-2 margin far beyond rounding).
        top2 = jnp.sort(logits, axis=-1)[:, -2:]
        assert bool(jnp.all(top2[:, 1] - top2[:, 0] > 1e-4)), top2
        nxt = logits.argmax(-1)
        seq = jnp.concatenate([seq, nxt[:, None]], axis=1)
    np.testing.assert_array_equal(first, seq[:, 4:])
    after = [v.value.data_array for v in pzb.unbind_params(model, freeze=True)[1]]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


def test_build_is_deterministic_labelled_and_slots_without_rng():
    a = pzb.unbind_params(build_gpt("gpt", jax.random.key(0), 7, 2, 2, 8, 16, 8), freeze=True)[1]
    b = pzb.unbind_params(build_gpt("gpt", jax.random.key(0), 7, 2, 2, 8, 16, 8), freeze=True)[1]
    assert [v.label for v in a] == [v.label for v in b]
    assert all(np.array_equal(x.value.data_array, y.value.data_array) for x, y in zip(a, b))
    slots = build_gpt("gpt", None, 7, 2, 2, 8, 16, 8)
    assert pzb.unbind_params(slots)[1] == ()
    tokens = nx.wrap(jnp.array([[1, 2, 3]]), "batch", "seq")
    built = build_gpt("gpt", jax.random.key(0), 7, 2, 2, 8, 16, 8)
    assert_bitwise_reproducible(lambda t: slots.stateless_call(a, t)[0], built, tokens)  # the same program
    np.testing.assert_array_equal(slots.stateless_call(a, tokens)[0].unwrap("batch", "seq", "vocabulary"),
                                  built(tokens).unwrap("batch", "seq", "vocabulary"))
    # One embedding table, used twice (tied).
    assert sum(v.label == "gpt.embed.embeddings" for v in a) == 1


def test_structure_is_selectable_by_group_class():
    model = build_gpt("gpt", None, 7, 3, 2, 8, 16, 8)
    assert pzb.select(model).at_instances_of(TransformerBlock).count() == 3
    assert pzb.select(model).at_instances_of(MLP).count() == 3


def test_gpt_errors_explain_configuration_and_inputs():
    with pytest.raises(NamedAxisError, match="multiple of num_heads"):
        build_gpt("gpt", None, 7, 1, 3, 8, 16, 8)
    with pytest.raises(NamedAxisError, match="'seq' axis"):
        greedy_decode(build_gpt("gpt", jax.random.key(0), 7, 1, 2, 8, 16, 8), nx.wrap(jnp.array([1]), "time"), 2)
