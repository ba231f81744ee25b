"""Recurrent cells and scans against textbook pure-jax references, Equinox and Flax NNX.

References here are written positionally (one example, no batch) from the
textbook equations; extra named batch axes are checked against ``jax.vmap``
of those references. Framework tests copy the original cells' buffers into
lifted cells (as the bridges will) and pin the exact conventions: gate order,
fused vs per-gate kernels, bias placement, carry order, GRU update form,
NNX ``RNN``'s reverse / keep_order / seq_lengths semantics.
"""

from __future__ import annotations

import dataclasses
import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError, StructError
from pzbridge.nn.recurrent import GRUCell, LSTMCell, SimpleCell
from pzbridge.nn.recurrent_scan import Bidirectional, ScanOverAxis, flip_sequences
from pzbridge.testing.numerics import assert_outputs_match

P = pzb.Parameter
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True)
# Scans compile per shape: fewer examples keep the file within its time budget.
SCAN_SETTINGS = settings(max_examples=8, deadline=None, derandomize=True)
GATES = {"simple": ("h",), "gru": ("r", "z", "n"), "lstm": ("i", "f", "g", "o")}
TOL = dict(rtol=2e-5, atol=2e-5)


# Pure-jax references (one example, positional). -------------------------------------


def ref_simple(p, h, x, residual=False):
    pre = p["W"]["h"] @ x + p["b"]["h"] + p["U"]["h"] @ h
    return jnp.tanh(pre + h if residual else pre)


def ref_gru(p, h, x):
    W, U, b = p["W"], p["U"], p["b"]
    r = jax.nn.sigmoid(W["r"] @ x + b["r"] + U["r"] @ h)
    z = jax.nn.sigmoid(W["z"] @ x + b["z"] + U["z"] @ h)
    n = jnp.tanh(W["n"] @ x + b["n"] + r * (U["n"] @ h + p["c_n"]))
    return (1 - z) * n + z * h


def ref_lstm(p, h, c, x):
    W, U, b = p["W"], p["U"], p["b"]
    pre = {g: W[g] @ x + U[g] @ h + b[g] for g in "ifgo"}
    i, f, o = (jax.nn.sigmoid(pre[g]) for g in "ifo")
    c_new = f * c + i * jnp.tanh(pre["g"])
    return o * jnp.tanh(c_new), c_new


def random_params(seed, kind, in_size, hidden, use_bias=True, recurrent_bias=False):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape) * 0.6, jnp.float32)  # noqa: E731
    gates = GATES[kind]
    zeros = lambda: jnp.zeros(hidden, jnp.float32)  # noqa: E731
    return {
        "W": {g: normal(hidden, in_size) for g in gates},
        "U": {g: normal(hidden, hidden) for g in gates},
        "b": {g: normal(hidden) if use_bias else zeros() for g in gates},
        "c_n": normal(hidden) if recurrent_bias else zeros(),
    }


# Building lifted cells from canonical (hidden, in) matrices in any layout. ---------


@dataclasses.dataclass
class Layout:
    fused: bool = True
    transpose: bool = False  # store (in, out) like NNX instead of (out, in) like Equinox
    gate_order: tuple[str, ...] = ()
    in_axis: str = "features"
    hidden_axis: str = "features"


def _out_name(layout, in_axis):
    return layout.hidden_axis + "_out" if layout.hidden_axis == in_axis else layout.hidden_axis


def kernel(mats, layout, in_axis, label):
    if layout.fused:
        w = jnp.concatenate([mats[g] for g in layout.gate_order], axis=0)
        named = nx.wrap(w.T, in_axis, "gates") if layout.transpose else nx.wrap(w, "gates", in_axis)
        return P(named, label)
    out = _out_name(layout, in_axis)
    wrap = lambda m: nx.wrap(m.T, in_axis, out) if layout.transpose else nx.wrap(m, out, in_axis)  # noqa: E731
    return tuple(P(wrap(mats[g]), f"{label}.{g}") for g in layout.gate_order)


def bias(vecs, layout, label):
    if layout.fused:
        return P(nx.wrap(jnp.concatenate([vecs[g] for g in layout.gate_order]), "gates"), label)
    return tuple(P(nx.wrap(vecs[g], layout.hidden_axis), f"{label}.{g}") for g in layout.gate_order)


def simple_cell(p, layout, **config):
    one = dataclasses.replace(layout, fused=False, gate_order=("h",))
    w = kernel(p["W"], one, layout.in_axis, "w")[0]
    u = kernel(p["U"], one, layout.hidden_axis, "u")[0]
    b = P(nx.wrap(p["b"]["h"], layout.hidden_axis), "b")
    return SimpleCell(w, u, b, input_axis=layout.in_axis, hidden_axis=layout.hidden_axis, **config)


def gru_cell(p, layout, **config):
    return GRUCell(
        kernel(p["W"], layout, layout.in_axis, "w"), kernel(p["U"], layout, layout.hidden_axis, "u"),
        bias(p["b"], layout, "b"), P(nx.wrap(p["c_n"], layout.hidden_axis), "c_n"),
        input_axis=layout.in_axis, hidden_axis=layout.hidden_axis, gate_order=layout.gate_order, **config,
    )


def lstm_cell(p, layout, **config):
    return LSTMCell(
        kernel(p["W"], layout, layout.in_axis, "w"), kernel(p["U"], layout, layout.hidden_axis, "u"),
        bias(p["b"], layout, "b"), input_axis=layout.in_axis, hidden_axis=layout.hidden_axis,
        gate_order=layout.gate_order, **config,
    )


# Strategies. --------------------------------------------------------------------------


@st.composite
def cases(draw, kind):
    layout = Layout(
        fused=draw(st.booleans()),
        transpose=draw(st.booleans()),
        gate_order=tuple(draw(st.permutations(GATES[kind]))),
        hidden_axis=draw(st.sampled_from(["features", "hidden"])),
    )
    names = draw(st.lists(st.sampled_from(["batch", "b2"]), unique=True, max_size=2))
    batch = {name: {"batch": 2, "b2": 3}[name] for name in names}
    return dict(
        layout=layout,
        # Few distinct sizes: eager jax compiles every op once per shape.
        in_size=draw(st.sampled_from([2, 3])),
        hidden=draw(st.sampled_from([2, 3])),
        batch=batch,
        name_order_seed=draw(st.integers(0, 100)),
        seed=draw(st.integers(0, 2**16)),
    )


def named_input(data, names, seed):
    """Wraps ``data`` (axes in ``names`` order) with its axes stored in a random order."""
    perm = np.random.default_rng(seed).permutation(len(names))
    return nx.wrap(jnp.transpose(data, perm), *[names[i] for i in perm])


def vmapped(fn, n_batch):
    for _ in range(n_batch):
        fn = jax.vmap(fn)
    return fn


def random_data(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


# Cells vs references, with named batch axes == vmap. ---------------------------------


@SETTINGS
@given(cases("simple"), st.booleans())
def test_simple_cell_matches_reference_and_vmaps_over_named_batch_axes(case, residual):
    lay, b_names, b_sizes = case["layout"], list(case["batch"]), tuple(case["batch"].values())
    p = random_params(case["seed"], "simple", case["in_size"], case["hidden"])
    x = random_data(case["seed"] + 1, b_sizes + (case["in_size"],))
    h = random_data(case["seed"] + 2, b_sizes + (case["hidden"],))
    cell = simple_cell(p, lay, residual=residual)
    new_h, y = cell((named_input(h, b_names + [lay.hidden_axis], case["name_order_seed"]),
                     named_input(x, b_names + [lay.in_axis], case["name_order_seed"] + 1)))
    expected = vmapped(lambda h, x: ref_simple(p, h, x, residual), len(b_names))(h, x)
    np.testing.assert_allclose(y.unwrap(*b_names, lay.hidden_axis), expected, **TOL)
    assert new_h is y


@SETTINGS
@given(cases("gru"), st.sampled_from(["interpolate", "difference"]))
def test_gru_cell_matches_reference_in_every_layout_and_gate_order(case, update):
    lay, b_names, b_sizes = case["layout"], list(case["batch"]), tuple(case["batch"].values())
    p = random_params(case["seed"], "gru", case["in_size"], case["hidden"], recurrent_bias=True)
    x = random_data(case["seed"] + 1, b_sizes + (case["in_size"],))
    h = random_data(case["seed"] + 2, b_sizes + (case["hidden"],))
    cell = gru_cell(p, lay, update=update)
    _, y = cell((named_input(h, b_names + [lay.hidden_axis], case["name_order_seed"]),
                 named_input(x, b_names + [lay.in_axis], case["name_order_seed"] + 1)))
    expected = vmapped(lambda h, x: ref_gru(p, h, x), len(b_names))(h, x)
    np.testing.assert_allclose(y.unwrap(*b_names, lay.hidden_axis), expected, **TOL)


@SETTINGS
@given(cases("lstm"), st.sampled_from(["input", "recurrent", "sum"]), st.sampled_from([("h", "c"), ("c", "h")]))
def test_lstm_cell_matches_reference_in_every_layout_placement_and_carry_order(case, placement, carry_order):
    lay, b_names, b_sizes = case["layout"], list(case["batch"]), tuple(case["batch"].values())
    p = random_params(case["seed"], "lstm", case["in_size"], case["hidden"])
    x = random_data(case["seed"] + 1, b_sizes + (case["in_size"],))
    h = random_data(case["seed"] + 2, b_sizes + (case["hidden"],))
    c = random_data(case["seed"] + 3, b_sizes + (case["hidden"],))
    cell = lstm_cell(p, lay, bias_placement=placement, carry_order=carry_order)
    state = {"h": named_input(h, b_names + [lay.hidden_axis], case["name_order_seed"]),
             "c": named_input(c, b_names + [lay.hidden_axis], case["name_order_seed"] + 2)}
    new_carry, y = cell(((state[carry_order[0]], state[carry_order[1]]),
                         named_input(x, b_names + [lay.in_axis], case["name_order_seed"] + 1)))
    exp_h, exp_c = vmapped(lambda h, c, x: ref_lstm(p, h, c, x), len(b_names))(h, c, x)
    new = dict(zip(carry_order, new_carry))
    np.testing.assert_allclose(y.unwrap(*b_names, lay.hidden_axis), exp_h, **TOL)
    np.testing.assert_allclose(new["h"].unwrap(*b_names, lay.hidden_axis), exp_h, **TOL)
    np.testing.assert_allclose(new["c"].unwrap(*b_names, lay.hidden_axis), exp_c, **TOL)


def test_cells_without_bias_equal_reference_with_zero_bias():
    p = random_params(3, "lstm", 3, 2, use_bias=False)
    cell = dataclasses.replace(lstm_cell(p, Layout(gate_order=GATES["lstm"])), bias=None)
    x, h, c = random_data(0, (3,)), random_data(1, (2,)), random_data(2, (2,))
    (new_h, new_c), _ = cell(((nx.wrap(h, "features"), nx.wrap(c, "features")), nx.wrap(x, "features")))
    exp_h, exp_c = ref_lstm(p, h, c, x)
    np.testing.assert_allclose(new_h.unwrap("features"), exp_h, **TOL)
    np.testing.assert_allclose(new_c.unwrap("features"), exp_c, **TOL)


# Scanning. ----------------------------------------------------------------------------


def ref_scan(step, carry, xs, reverse=False, keep_order=True):
    """Python loop over the leading (time) axis; ``step(carry, x) -> (carry, y)``."""
    order = range(len(xs) - 1, -1, -1) if reverse else range(len(xs))
    ys = [None] * len(xs)
    for k, t in enumerate(order):
        carry, y = step(carry, xs[t])
        ys[t if keep_order else k] = y
    return carry, jnp.stack(ys)


@SCAN_SETTINGS
@given(cases("lstm"), st.sampled_from([1, 4]), st.booleans(), st.booleans(), st.booleans())
def test_scan_over_axis_equals_python_loop_reference(case, steps, reverse, keep_order, given_carry):
    lay, b_names, b_sizes = case["layout"], list(case["batch"]), tuple(case["batch"].values())
    p = random_params(case["seed"], "lstm", case["in_size"], case["hidden"])
    cell = lstm_cell(p, lay)
    xs = random_data(case["seed"] + 1, (steps,) + b_sizes + (case["in_size"],))
    h0 = random_data(case["seed"] + 2, b_sizes + (case["hidden"],)) if given_carry else jnp.zeros(
        b_sizes + (case["hidden"],))
    c0 = random_data(case["seed"] + 3, b_sizes + (case["hidden"],)) if given_carry else jnp.zeros_like(h0)
    layer = ScanOverAxis(cell, axis="seq", reverse=reverse, keep_order=keep_order, return_carry=True)
    named_xs = named_input(xs, ["seq"] + b_names + [lay.in_axis], case["name_order_seed"])
    arg = named_xs
    if given_carry:
        arg = ((nx.wrap(h0, *b_names, lay.hidden_axis), nx.wrap(c0, *b_names, lay.hidden_axis)), named_xs)
    (h, c), ys = layer(arg)

    def one(h0, c0, xs):
        def step(carry, x):
            new = ref_lstm(p, carry[0], carry[1], x)
            return new, new[0]
        return ref_scan(step, (h0, c0), xs, reverse, keep_order)

    (exp_h, exp_c), exp_ys = vmapped(one, len(b_names))(h0, c0, jnp.moveaxis(xs, 0, len(b_names)))
    np.testing.assert_allclose(h.unwrap(*b_names, lay.hidden_axis), exp_h, **TOL)
    np.testing.assert_allclose(c.unwrap(*b_names, lay.hidden_axis), exp_c, **TOL)
    np.testing.assert_allclose(ys.unwrap(*b_names, "seq", lay.hidden_axis), exp_ys, **TOL)


@SCAN_SETTINGS
@given(st.sampled_from([3, 5]), st.sampled_from([1, 3]), st.data())
def test_padded_reverse_scan_equals_scan_of_each_valid_prefix(steps, batch, data):
    lengths = data.draw(st.lists(st.integers(1, steps), min_size=batch, max_size=batch))
    p = random_params(steps * 10 + batch, "gru", 2, 3, recurrent_bias=True)
    cell = gru_cell(p, Layout(gate_order=GATES["gru"]))
    xs = random_data(batch, (batch, steps, 2))
    layer = ScanOverAxis(cell, reverse=True, keep_order=True, return_carry=True)
    carry, ys = layer(nx.wrap(xs, "batch", "seq", "features"), seq_lengths=nx.wrap(jnp.array(lengths), "batch"))
    for k, length in enumerate(lengths):
        exp_carry, exp_ys = ref_scan(lambda h, x: (ref_gru(p, h, x),) * 2, jnp.zeros(3), xs[k, :length], reverse=True)
        np.testing.assert_allclose(carry.unwrap("batch", "features")[k], exp_carry, **TOL)
        np.testing.assert_allclose(ys.unwrap("batch", "seq", "features")[k, :length], exp_ys, **TOL)


@SCAN_SETTINGS
@given(st.sampled_from([1, 4, 6]), st.data())
def test_flip_sequences_is_an_involution_that_reverses_each_valid_prefix(steps, data):
    lengths = data.draw(st.lists(st.integers(0, steps), min_size=1, max_size=3))
    xs = jnp.arange(len(lengths) * steps).reshape(len(lengths), steps)
    named = nx.wrap(xs, "batch", "seq")
    lens = nx.wrap(jnp.array(lengths), "batch")
    flipped = flip_sequences(named, "seq", lens)
    for k, length in enumerate(lengths):
        assert flipped.unwrap("batch", "seq")[k, :length].tolist() == xs[k, :length][::-1].tolist()
    assert flip_sequences(flipped, "seq", lens).unwrap("batch", "seq").tolist() == xs.tolist()


def test_bidirectional_concatenates_forward_and_order_kept_backward_outputs():
    pf, pb = random_params(1, "simple", 2, 3), random_params(2, "simple", 2, 3)
    lay = Layout()
    layer = Bidirectional(ScanOverAxis(simple_cell(pf, lay)), ScanOverAxis(simple_cell(pb, lay)), return_carry=True)
    xs = random_data(0, (4, 2))
    (cf, cb), ys = layer(nx.wrap(xs, "seq", "features"))
    step = lambda p: lambda h, x: (ref_simple(p, h, x),) * 2  # noqa: E731
    exp_cf, exp_f = ref_scan(step(pf), jnp.zeros(3), xs)
    exp_cb, exp_b = ref_scan(step(pb), jnp.zeros(3), xs, reverse=True)
    np.testing.assert_allclose(ys.unwrap("seq", "features"), jnp.concatenate([exp_f, exp_b], -1), **TOL)
    np.testing.assert_allclose(cf.unwrap("features"), exp_cf, **TOL)
    np.testing.assert_allclose(cb.unwrap("features"), exp_cb, **TOL)


# Equinox: weights copied over, exact semantics. ---------------------------------------


def _w(array, *names):
    return nx.wrap(array, *names)


def eqx_gru_to_cell(m: eqx.nn.GRUCell) -> GRUCell:
    bias = P(_w(m.bias, "gates"), "bias") if m.use_bias else None
    bias_n = P(_w(m.bias_n, "features"), "bias_n") if m.use_bias else None
    return GRUCell(P(_w(m.weight_ih, "gates", "features"), "weight_ih"),
                   P(_w(m.weight_hh, "gates", "features"), "weight_hh"), bias, bias_n, update="difference")


def eqx_lstm_to_cell(m: eqx.nn.LSTMCell) -> LSTMCell:
    bias = P(_w(m.bias, "gates"), "bias") if m.use_bias else None
    return LSTMCell(P(_w(m.weight_ih, "gates", "features"), "weight_ih"),
                    P(_w(m.weight_hh, "gates", "features"), "weight_hh"), bias, bias_placement="sum")


@pytest.mark.parametrize("use_bias", [True, False])
def test_equinox_gru_cell_lifts_to_gru_cell_with_difference_update(use_bias):
    m = eqx.nn.GRUCell(3, 4, use_bias=use_bias, key=jax.random.key(0))
    cell = eqx_gru_to_cell(m)
    xs, h = random_data(1, (5, 3)), random_data(2, (4,))
    expected = jax.vmap(m, in_axes=(0, None))(xs, h)
    _, y = cell((nx.wrap(h, "features"), nx.wrap(xs, "batch", "features")))
    np.testing.assert_allclose(y.unwrap("batch", "features"), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("use_bias", [True, False])
def test_equinox_lstm_cell_lifts_with_sum_bias_and_h_c_carry(use_bias):
    m = eqx.nn.LSTMCell(3, 4, use_bias=use_bias, key=jax.random.key(0))
    cell = eqx_lstm_to_cell(m)
    x, h, c = random_data(1, (3,)), random_data(2, (4,)), random_data(3, (4,))
    exp_h, exp_c = m(x, (h, c))
    (new_h, new_c), y = cell(((nx.wrap(h, "features"), nx.wrap(c, "features")), nx.wrap(x, "features")))
    np.testing.assert_allclose(new_h.unwrap("features"), exp_h, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new_c.unwrap("features"), exp_c, rtol=1e-6, atol=1e-6)


def test_equinox_cells_are_reproduced_within_ulps_under_jit():
    # Not Equinox's program (the jaxprs differ: contraction layout), so not bitwise on every CPU.
    x, h, c = random_data(1, (3,)), random_data(2, (4,)), random_data(3, (4,))
    gru = eqx.nn.GRUCell(3, 4, key=jax.random.key(0))
    lifted = eqx_gru_to_cell(gru)
    got = jax.jit(lambda x, h: lifted((nx.wrap(h, "features"), nx.wrap(x, "features")))[1].unwrap("features"))(x, h)
    assert_outputs_match(got, jax.jit(lambda x, h: gru(x, h))(x, h), same_computation=False)
    lstm = eqx.nn.LSTMCell(3, 4, key=jax.random.key(0))
    cell = eqx_lstm_to_cell(lstm)
    got = jax.jit(lambda x, h, c: cell(((nx.wrap(h, "features"), nx.wrap(c, "features")), nx.wrap(x, "features")))[0])
    got_h, got_c = got(x, h, c)
    exp_h, exp_c = jax.jit(lambda x, s: lstm(x, s))(x, (h, c))
    assert_outputs_match(got_h.unwrap("features"), exp_h, same_computation=False)
    assert_outputs_match(got_c.unwrap("features"), exp_c, same_computation=False)


def test_equinox_lstm_scanned_like_its_docstring_equals_scan_over_axis():
    m = eqx.nn.LSTMCell(2, 3, key=jax.random.key(4))
    xs = random_data(5, (6, 2))
    init = (jnp.zeros(3), jnp.zeros(3))
    (exp_h, exp_c), _ = jax.lax.scan(lambda s, x: (m(x, s), None), init, xs)
    (h, c), _ = ScanOverAxis(eqx_lstm_to_cell(m), return_carry=True)(nx.wrap(xs, "seq", "features"))
    np.testing.assert_allclose(h.unwrap("features"), exp_h, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(c.unwrap("features"), exp_c, rtol=1e-6, atol=1e-6)


# Flax NNX: weights copied over, exact semantics. --------------------------------------


def _randomize(module, seed):
    """Gives every NNX parameter (biases included) a random value so placement matters."""
    graphdef, state = nnx.split(module)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [jax.random.normal(k, leaf.shape, leaf.dtype) * 0.5 for k, leaf in zip(keys, leaves)]
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))


def nnx_lstm_to_cell(m: nnx.LSTMCell) -> LSTMCell:
    def per_gate(names):
        return tuple(P(_w(getattr(m, n).kernel[...], "features", "features_out"), n) for n in names)

    hidden = ("hi", "hf", "hg", "ho")
    return LSTMCell(
        per_gate(("ii", "if_", "ig", "io")), per_gate(hidden),
        tuple(P(_w(getattr(m, n).bias[...], "features"), n + ".bias") for n in hidden),
        carry_order=("c", "h"), bias_placement="recurrent", gate_fn=m.gate_fn, activation_fn=m.activation_fn,
    )


def nnx_optimized_lstm_to_cell(m: nnx.OptimizedLSTMCell) -> LSTMCell:
    return LSTMCell(
        P(_w(m.dense_i.kernel[...], "features", "gates"), "dense_i.kernel"),
        P(_w(m.dense_h.kernel[...], "features", "gates"), "dense_h.kernel"),
        P(_w(m.dense_h.bias[...], "gates"), "dense_h.bias"),
        carry_order=("c", "h"), bias_placement="recurrent", gate_fn=m.gate_fn, activation_fn=m.activation_fn,
    )


def nnx_gru_to_cell(m: nnx.GRUCell) -> GRUCell:
    return GRUCell(
        P(_w(m.dense_i.kernel[...], "features", "gates"), "dense_i.kernel"),
        P(_w(m.dense_h.kernel[...], "features", "gates"), "dense_h.kernel"),
        P(_w(m.dense_i.bias[...], "gates"), "dense_i.bias"),
        update="interpolate", gate_fn=m.gate_fn, activation_fn=m.activation_fn,
    )


def nnx_simple_to_cell(m: nnx.SimpleCell) -> SimpleCell:
    return SimpleCell(
        P(_w(m.dense_i.kernel[...], "features", "features_out"), "dense_i.kernel"),
        P(_w(m.dense_h.kernel[...], "features", "features_out"), "dense_h.kernel"),
        P(_w(m.dense_i.bias[...], "features"), "dense_i.bias"),
        bias_placement="input", residual=m.residual, activation_fn=m.activation_fn,
    )


NNX_CASES = {
    "LSTMCell": (lambda **kw: nnx.LSTMCell(3, 4, rngs=nnx.Rngs(0), **kw), nnx_lstm_to_cell),
    "OptimizedLSTMCell": (lambda **kw: nnx.OptimizedLSTMCell(3, 4, rngs=nnx.Rngs(0), **kw), nnx_optimized_lstm_to_cell),
    "GRUCell": (lambda **kw: nnx.GRUCell(3, 4, rngs=nnx.Rngs(0), **kw), nnx_gru_to_cell),
    "SimpleCell": (lambda **kw: nnx.SimpleCell(3, 4, rngs=nnx.Rngs(0), **kw), nnx_simple_to_cell),
    "SimpleCell-residual": (lambda **kw: nnx.SimpleCell(3, 4, rngs=nnx.Rngs(0), residual=True, **kw),
                            nnx_simple_to_cell),
    "LSTMCell-custom-activations": (
        lambda **kw: nnx.LSTMCell(3, 4, rngs=nnx.Rngs(0), gate_fn=jax.nn.hard_sigmoid, activation_fn=jax.nn.relu,
                                  **kw),
        nnx_lstm_to_cell),
    "GRUCell-custom-activations": (
        lambda **kw: nnx.GRUCell(3, 4, rngs=nnx.Rngs(0), gate_fn=jax.nn.hard_sigmoid, activation_fn=jax.nn.silu,
                                 **kw),
        nnx_gru_to_cell),
}


def _named_carry(carry):
    return jax.tree_util.tree_map(lambda a: nx.wrap(a, "batch", "features"), carry)


def _unwrapped(carry):
    return jax.tree_util.tree_map(lambda a: a.unwrap("batch", "features"), carry, is_leaf=nx.is_namedarray)


@pytest.mark.parametrize("case", sorted(NNX_CASES))
def test_nnx_cells_lift_exactly_with_batched_inputs(case):
    make, lift = NNX_CASES[case]
    m = _randomize(make(), 7)
    cell = lift(m)
    x = random_data(1, (2, 3))
    carry = jax.tree_util.tree_map(lambda a: random_data(2, a.shape), m.initialize_carry((2, 3), nnx.Rngs(0)))
    exp_carry, exp_y = m(carry, x)
    got_carry, y = cell((_named_carry(carry), nx.wrap(x, "batch", "features")))
    np.testing.assert_allclose(y.unwrap("batch", "features"), exp_y, rtol=1e-6, atol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
                           _unwrapped(got_carry), exp_carry)


@pytest.mark.parametrize("case", ["LSTMCell", "GRUCell", "SimpleCell"])
def test_initialize_carry_matches_nnx_zero_carry(case):
    make, lift = NNX_CASES[case]
    m = make()
    expected = m.initialize_carry((2, 5, 3), nnx.Rngs(0))
    got = lift(m).initialize_carry({"batch": 2, "b2": 5, "features": 3})
    got = jax.tree_util.tree_map(lambda a: a.unwrap("batch", "b2", "features"), got, is_leaf=nx.is_namedarray)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, expected)


@pytest.mark.parametrize(
    "reverse,keep_order,return_carry,use_lengths",
    [cfg for cfg in itertools.product([False, True], repeat=4)],
)
def test_nnx_rnn_options_are_reproduced_by_scan_over_axis(reverse, keep_order, return_carry, use_lengths):
    m = _randomize(nnx.LSTMCell(3, 4, rngs=nnx.Rngs(0)), 3)
    rnn = nnx.RNN(m, reverse=reverse, keep_order=keep_order, return_carry=return_carry)
    xs = random_data(4, (3, 5, 3))
    lengths = jnp.array([5, 2, 3]) if use_lengths else None
    expected = rnn(xs, seq_lengths=lengths)
    layer = ScanOverAxis(nnx_lstm_to_cell(m), axis="seq", reverse=reverse, keep_order=keep_order,
                         return_carry=return_carry)
    side = {"seq_lengths": nx.wrap(lengths, "batch")} if use_lengths else {}
    got = layer(nx.wrap(xs, "batch", "seq", "features"), **side)
    got_carry, got_ys = got if return_carry else (None, got)
    exp_carry, exp_ys = expected if return_carry else (None, expected)
    np.testing.assert_allclose(got_ys.unwrap("batch", "seq", "features"), exp_ys, rtol=1e-5, atol=1e-6)
    if return_carry:
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                               _unwrapped(got_carry), exp_carry)


@pytest.mark.parametrize("use_lengths", [False, True])
def test_nnx_bidirectional_is_reproduced(use_lengths):
    fwd = _randomize(nnx.GRUCell(3, 4, rngs=nnx.Rngs(0)), 1)
    bwd = _randomize(nnx.GRUCell(3, 4, rngs=nnx.Rngs(1)), 2)
    bi = nnx.Bidirectional(nnx.RNN(fwd), nnx.RNN(bwd), return_carry=True)
    xs = random_data(4, (2, 5, 3))
    lengths = jnp.array([5, 3]) if use_lengths else None
    (exp_f, exp_b), exp_ys = bi(xs, seq_lengths=lengths)
    layer = Bidirectional(ScanOverAxis(nnx_gru_to_cell(fwd)), ScanOverAxis(nnx_gru_to_cell(bwd)), return_carry=True)
    side = {"seq_lengths": nx.wrap(lengths, "batch")} if use_lengths else {}
    (got_f, got_b), ys = layer(nx.wrap(xs, "batch", "seq", "features"), **side)
    np.testing.assert_allclose(ys.unwrap("batch", "seq", "features"), exp_ys, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_f.unwrap("batch", "features"), exp_f, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_b.unwrap("batch", "features"), exp_b, rtol=1e-5, atol=1e-6)


# from_config, slots, jit and grad. -----------------------------------------------------


@pytest.mark.parametrize("cls", [SimpleCell, GRUCell, LSTMCell])
@pytest.mark.parametrize("separate", [False, True])
def test_from_config_is_deterministic_in_name_and_key(cls, separate):
    kw = {} if cls is SimpleCell else {"separate_gates": separate}
    a = cls.from_config("rnn", jax.random.key(0), 3, 4, **kw)
    b = cls.from_config("rnn", jax.random.key(0), 3, 4, **kw)
    c = cls.from_config("other", jax.random.key(0), 3, 4, **kw)
    values = lambda layer: [v.value for v in pzb.unbind_params(layer, freeze=True)[1]]  # noqa: E731
    for va, vb in zip(values(a), values(b)):
        np.testing.assert_array_equal(va.unwrap(*va.named_shape), vb.unwrap(*va.named_shape))
    first = values(a)[0]
    assert not np.array_equal(first.unwrap(*first.named_shape), values(c)[0].unwrap(*first.named_shape))


def test_from_config_without_key_gives_labelled_slots():
    cell = LSTMCell.from_config("enc", None, 3, 4, separate_gates=True)
    leaves = jax.tree_util.tree_leaves(cell, is_leaf=lambda v: isinstance(v, pzb.ParameterSlot))
    assert all(isinstance(v, pzb.ParameterSlot) for v in leaves)
    assert [v.label for v in leaves] == [
        f"enc.{f}.{g}" for f in ("input_weights", "recurrent_weights", "bias") for g in "ifgo"
    ]
    gru = GRUCell.from_config("g", None, 3, 4, use_recurrent_bias=True)
    assert (gru.input_bias.label, gru.recurrent_bias.label) == ("g.input_bias", "g.recurrent_bias")


def test_from_config_cell_runs_with_named_shapes_from_config():
    cell = GRUCell.from_config("g", jax.random.key(1), 3, 5, hidden_axis="hidden", separate_gates=True)
    assert dict(cell.input_weights[0].value.named_shape) == {"features": 3, "hidden": 5}
    assert dict(cell.recurrent_weights[0].value.named_shape) == {"hidden": 5, "hidden_out": 5}
    ys = ScanOverAxis(cell)(nx.ones({"batch": 2, "seq": 3, "features": 3}))
    assert dict(ys.named_shape) == {"seq": 3, "batch": 2, "hidden": 5}


def test_scan_runs_under_jit_and_stateless_call_with_frozen_params():
    layer = ScanOverAxis(LSTMCell.from_config("lstm", jax.random.key(0), 3, 4))
    xs = nx.wrap(random_data(0, (2, 5, 3)), "batch", "seq", "features")
    eager = layer(xs).unwrap("batch", "seq", "features")
    slots, values = pzb.unbind_params(layer, freeze=True)
    jitted = jax.jit(lambda values, xs: slots.stateless_call(values, xs)[0])(values, xs)
    np.testing.assert_allclose(jitted.unwrap("batch", "seq", "features"), eager, rtol=1e-6, atol=1e-6)


def test_grad_through_scan_matches_reference_grad():
    p = random_params(0, "simple", 2, 3)
    layer = ScanOverAxis(simple_cell(p, Layout()), return_carry=True)
    xs = random_data(1, (4, 2))
    slots, values = pzb.unbind_params(layer, freeze=True)

    def loss(values, xs):
        carry, _ = slots.stateless_call(values, nx.wrap(xs, "seq", "features"))[0]
        return carry.unwrap("features").sum()

    def ref_loss(W, xs):
        q = {**p, "W": {"h": W}}
        carry, _ = ref_scan(lambda h, x: (ref_simple(q, h, x),) * 2, jnp.zeros(3), xs)
        return carry.sum()

    g_values, g_xs = jax.grad(loss, argnums=(0, 1))(values, xs)
    ref_w, ref_xs = jax.grad(ref_loss, argnums=(0, 1))(p["W"]["h"], xs)
    np.testing.assert_allclose(g_xs, ref_xs, **TOL)
    g_w = next(v.value for v in g_values if v.label == "w.h")
    np.testing.assert_allclose(g_w.unwrap("features_out", "features"), ref_w, **TOL)


# Errors. ----------------------------------------------------------------------------------


def test_missing_input_axis_error_names_the_cell_and_fix():
    cell = GRUCell.from_config("gru", jax.random.key(0), 3, 4)
    x = nx.ones({"batch": 2, "channels": 3})
    with pytest.raises(NamedAxisError, match=r"GRUCell 'gru.input_weights'.*lacks axis 'features'.*Fix"):
        cell((cell.initialize_carry({"batch": 2}), x))


def test_missing_time_axis_error_suggests_tagging():
    layer = ScanOverAxis(SimpleCell.from_config("rnn", jax.random.key(0), 3, 4))
    with pytest.raises(NamedAxisError, match=r"lacks the time axis 'seq'.*'batch': 2.*Fix"):
        layer(nx.ones({"batch": 2, "features": 3}))


def test_wrong_carry_size_is_reported_with_expected_size():
    cell = LSTMCell.from_config("lstm", jax.random.key(0), 3, 4)
    bad = (nx.zeros({"features": 5}), nx.zeros({"features": 4}))
    with pytest.raises(NamedAxisError, match=r"carry's h.*'features' of size 4.*found \{'features': 5\}"):
        cell((bad, nx.ones({"features": 3})))


def test_calling_a_cell_on_a_bare_array_explains_the_pair_protocol():
    cell = SimpleCell.from_config("rnn", jax.random.key(0), 3, 4)
    with pytest.raises(NamedAxisError, match=r"expected a pair \(carry, x\).*ScanOverAxis"):
        cell(nx.ones({"features": 3}))


def test_invalid_static_config_is_rejected():
    cell = GRUCell.from_config("gru", jax.random.key(0), 3, 4)
    with pytest.raises(StructError, match=r"permutation of \('r', 'z', 'n'\), found \('r', 'z', 'z'\)"):
        dataclasses.replace(cell, gate_order=("r", "z", "z"))
    with pytest.raises(StructError, match=r"bias_placement.*'middle'"):
        LSTMCell.from_config("l", None, 3, 4, bias_placement="middle")


def test_wrong_gate_count_and_fused_size_are_reported():
    cell = LSTMCell.from_config("lstm", jax.random.key(0), 3, 4, separate_gates=True)
    short = dataclasses.replace(cell, input_weights=cell.input_weights[:3])
    x = (cell.initialize_carry({}), nx.ones({"features": 3}))
    with pytest.raises(NamedAxisError, match=r"expected 4 parameters \(one per gate\), found 3"):
        short(x)
    fused = LSTMCell.from_config("lstm", jax.random.key(0), 3, 4)
    bad = dataclasses.replace(fused, bias=P(nx.zeros({"gates": 15}), "b"))
    with pytest.raises(NamedAxisError, match=r"fused gate axis 'gates' of size 4 \* hidden.*'gates': 15"):
        bad(x)
