"""A traced module called positionally returns its output axes in the module's order.

The recorded output names come from the values the code returns, in the
order it returns them: ``jnp.einsum("sf,f->sf", x, w)`` computes a
``dot_general`` whose layout is ``(f, s)`` and transposes it back, and the
convention once took the names before the transpose (``(4, 3)`` for a
``(3, 4)`` output). A lift whose positional output still came back in another
order is refused at lift time, never returned transposed.
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.bridge.output_check import check_output_shapes
from pzbridge.core.errors import LiftError

SPECS = ["sf,f->sf", "sf,f->fs", "sf,fg->sg", "sf,fg->gs", "sf,sf->fs", "sf,g->sfg", "sf,g->gsf", "sf,fg->g"]


class EinsumOnRawWeight(eqx.Module):
    w: jax.Array
    spec: str = eqx.field(static=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.einsum(self.spec, x, self.w)


def _weight(spec: str, seq: int, features: int) -> jax.Array:
    sizes = {"s": seq, "f": features, "g": 5}
    return jax.random.normal(jax.random.key(0), tuple(sizes[c] for c in spec.split(",")[1].split("->")[0]))


@settings(max_examples=16, deadline=None, derandomize=True)
@given(spec=st.sampled_from(SPECS), seq=st.integers(2, 4), features=st.integers(6, 7))
def test_einsum_outputs_come_back_in_the_modules_axis_order(spec, seq, features):
    model = EinsumOnRawWeight(_weight(spec, seq, features), spec)
    x = jax.random.normal(jax.random.key(1), (seq, features))
    lifted = pzb.lift(model, x, strict=True)
    np.testing.assert_allclose(lifted.positional(x), model(x), rtol=1e-5, atol=1e-6)


def test_a_lift_whose_positional_output_is_transposed_is_refused():
    model = EinsumOnRawWeight(_weight("sf,f->sf", 3, 4), "sf,f->sf")
    x = jnp.ones((3, 4))
    lifted = pzb.lift(model, x)
    wrong = dataclasses.replace(lifted, convention=dataclasses.replace(
        lifted.convention, output=tuple(reversed(lifted.convention.output))))
    with pytest.raises(LiftError, match="another order.*Fix"):
        check_output_shapes(model, wrong, "equinox", (x,), {})
