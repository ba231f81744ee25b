"""NativeCall: named arrays in and out of positional native modules (the bridge a converted model runs on)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.bridge.lifted import CallingConvention, name_trailing_axes
from pzbridge.bridge.native_calls import NativeCall, NativeSlot, conventions_chain, split_natives
from pzbridge.core.errors import LowerError, NamedAxisError

CONV = CallingConvention((("f",),), ("g",))
W = jnp.arange(6.0).reshape(3, 2)  # f=3 -> g=2


@settings(max_examples=10, database=None, derandomize=True, deadline=None)
@given(batch=st.integers(1, 3), worlds=st.integers(1, 3), lead=st.integers(0, 1), batched=st.booleans())
def test_extra_axes_are_mapped_over_and_come_back_named(batch, worlds, lead, batched):
    # A per-example matmul: batched natives get the extra axes leading, per-example ones are mapped.
    fn = (lambda x: x @ W) if batched else (lambda x: W.T @ x)
    call = NativeCall(fn, CONV, batched=batched)
    data = jax.random.normal(jax.random.key(batch * 7 + worlds), (1,) * lead + (batch, worlds, 3))
    # Leading positional axes (an NNX model's unnamed batch) stay positional and in front.
    x = name_trailing_axes(pzb.nx.wrap(data), ("b", "w", "f"))
    out = call(x)
    assert dict(out.named_shape) == {"b": batch, "w": worlds, "g": 2}
    assert out.positional_shape == (1,) * lead
    expected = data @ W
    got = out.unwrap("b", "w", "g") if not lead else out.untag("b", "w", "g").unwrap()
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_a_missing_axis_is_an_error_naming_the_module_and_the_fix():
    call = NativeCall(lambda x: x, CONV, batched=True, path="blocks.0.mlp")
    with pytest.raises(NamedAxisError, match="blocks.0.mlp.*Fix"):
        call(pzb.nx.wrap(jnp.ones(3), "h"))


def test_an_unbound_slot_says_how_to_run_it():
    with pytest.raises(LowerError, match="Fix"):
        NativeSlot(0, CONV, "a")(pzb.nx.wrap(jnp.ones(3), "f"))


def test_split_natives_opens_glue_but_keeps_rule_made_layers_whole():
    softmax = pzb.nn.Softmax("f")
    inner = pzb.nn.Sequential([softmax, pzb.nn.Identity()])
    model = pzb.nn.Residual(inner)
    seen = []

    def lower_native(layer, where):
        seen.append(type(layer).__name__)
        return ("native", CallingConvention((("f",),), ("f",))) if isinstance(layer, pzb.nn.Softmax) else None

    structure, natives = split_natives(model, lower_native)
    assert natives == ["native"] and isinstance(structure.delta.sublayers[0], NativeSlot)
    assert structure.delta.sublayers[0].path == "delta.sublayers.0"
    assert seen == ["Sequential", "Softmax", "Identity"]


def test_conventions_chain_only_when_names_line_up():
    f, g = CallingConvention((("f",),), ("f",)), CallingConvention((("f",),), ("g",))
    assert conventions_chain([f, None, g]) and not conventions_chain([g, f])
    assert not conventions_chain([CallingConvention((("f",), ("f",)), ("f",))])
