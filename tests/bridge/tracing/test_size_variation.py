"""Constants that are input sizes: a traced model must not freeze them at the example's shape.

``x[-1]`` traces to ``slice(5, 6)`` at length 6; lifting traces the module a
second time at other sizes and keeps such bounds counting from the end, turns
a size used as a number into a call-time size, and keeps code whose
operations depend on shapes ``Foreign`` (which runs the original code).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.core.errors import LiftError
from pzbridge.nn.named_ops import AxisSize
from pzbridge.testing.numerics import assert_outputs_match


class Reads(eqx.Module):
    """``x @ w``, then one way of reading the sequence that depends on its length."""

    w: jax.Array
    pos: jax.Array  # a positional table longer than any sequence
    how: str = eqx.field(static=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        return READS[self.how](self, x @ self.w)


READS = {
    "last_token": lambda m, h: h[-1],
    "shifted_difference": lambda m, h: h[1:] - h[:-1],
    "drop_last_two": lambda m, h: h[:-2],
    "first_three": lambda m, h: h[:3],
    "mean_by_shape": lambda m, h: h.sum(axis=0) / h.shape[0],
    "scaled_by_length": lambda m, h: h * jnp.sqrt(h.shape[0]).astype(h.dtype),
    "positions": lambda m, h: h + m.pos[: h.shape[0]],
    "middle": lambda m, h: h[1:-1],
}


def _model(how: str) -> Reads:
    k1, k2 = jax.random.split(jax.random.key(0))
    return Reads(jax.random.normal(k1, (4, 4)), jax.random.normal(k2, (32, 4)), how)


@settings(max_examples=20, deadline=None)
@given(how=st.sampled_from(sorted(READS)), length=st.integers(5, 8), other=st.integers(4, 14))
def test_reads_that_depend_on_the_length_follow_every_call_s_length(how, length, other):
    model = _model(how)
    lifted = pzb.lift(model, jnp.ones((length, 4)), strict=True)
    for size in (length, other):
        x = jax.random.normal(jax.random.key(size), (size, 4))
        assert_outputs_match(lifted.positional(x), model(x), same_computation=False)


def test_a_size_used_as_a_number_is_read_at_call_time():
    lifted = pzb.lift(_model("scaled_by_length"), jnp.ones((6, 4)), strict=True)
    sizes = [c for layer in pzb.select(lifted).at_instances_of(pzb.nn.named_ops.ApplyPrimitive).get_sequence()
             for c in layer.constants if isinstance(c, AxisSize)]
    assert [(s.name, s.example) for s in sizes] == [("seq", 6)]


class PythonLoop(eqx.Module):
    w: jax.Array

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x[0]
        for t in range(1, x.shape[0]):  # unrolled by the trace: as many steps as the example has
            h = jnp.tanh(h @ self.w + x[t])
        return h


def test_code_whose_operations_follow_the_shape_stays_foreign_and_stays_correct():
    model, x = PythonLoop(0.5 * jnp.eye(4)), jnp.ones((5, 4))
    lifted = pzb.lift(model, x)
    assert isinstance(lifted.body, pzb.nn.Foreign)
    longer = jax.random.normal(jax.random.key(1), (8, 4))
    assert_outputs_match(lifted.positional(longer), model(longer), same_computation=False)
    with pytest.raises(LiftError, match="change with the size of seq"):
        pzb.lift(model, x, strict=True)


class NnxLastToken(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.proj = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # (batch, seq, features)
        return self.proj(x[:, -1]) + x[:, 1:].mean(axis=1)[:, :3]


def test_nnx_last_token_and_shifted_mean_follow_the_length():
    model = NnxLastToken(nnx.Rngs(0))
    lifted = pzb.lift(model, jnp.ones((2, 5, 4)), strict=True)
    for shape in ((2, 5, 4), (3, 9, 4)):
        x = jax.random.normal(jax.random.key(shape[1]), shape)
        assert_outputs_match(lifted.positional(x), model(x), same_computation=False)


class EveryOther(eqx.Module):
    w: jax.Array

    def __call__(self, x: jax.Array) -> jax.Array:
        return (x @ self.w)[1::2]  # its stop is the length: moves with it, and a stride has no "from the end"


def test_a_strided_slice_that_moves_with_the_length_keeps_the_module_foreign_and_correct():
    model = EveryOther(jnp.eye(4))
    lifted = pzb.lift(model, jnp.ones((6, 4)))
    assert isinstance(lifted.body, pzb.nn.Foreign)
    x = jax.random.normal(jax.random.key(3), (11, 4))
    assert_outputs_match(lifted.positional(x), model(x), same_computation=False)
