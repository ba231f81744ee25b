"""No leaks: many lift / lower cycles do not grow the process's memory (issue 13).

Each test warms up (JAX compiles and caches what the first cycles need),
reads the resident set size, runs the cycles and reads it again; growth must
stay under 5 % of the size before. A leak of what one cycle builds (a lifted
model holds every parameter's buffer reference and a traced graph) would
exceed that well before 1,000 cycles.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import pzbridge as pzb

pytestmark = pytest.mark.slow


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no /proc/self/status on this system")


def _growth(cycle: Callable[[], Any], cycles: int, warmup: int = 50) -> float:
    for _ in range(warmup):
        cycle()
    gc.collect()
    before = _rss_bytes()
    for _ in range(cycles):
        cycle()
    gc.collect()
    return (_rss_bytes() - before) / before


class Block(eqx.Module):
    """A custom block lifted by tracing (einsum on a raw array, a residual, a vmapped child)."""

    w: jax.Array
    mlp: eqx.nn.MLP

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + jax.vmap(self.mlp)(jnp.einsum("sd,de->se", x, self.w))


def test_a_thousand_equinox_lift_lower_cycles_do_not_grow_memory():
    model = eqx.nn.MLP(8, 8, 16, 2, key=jax.random.key(0))
    assert _growth(lambda: pzb.lower(pzb.lift(model)), 1_000) < 0.05


def test_a_thousand_nnx_lift_lower_cycles_do_not_grow_memory():
    model = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(16, 8, rngs=nnx.Rngs(1)))
    assert _growth(lambda: pzb.lower(pzb.lift(model)), 1_000) < 0.05


def test_traced_lifts_do_not_grow_memory():
    k1, k2 = jax.random.split(jax.random.key(1))
    model = Block(jax.random.normal(k1, (8, 8)), eqx.nn.MLP(8, 8, 16, 1, key=k2))
    x = jnp.ones((5, 8))
    assert _growth(lambda: pzb.lower(pzb.lift(model, x)), 300, warmup=30) < 0.05
