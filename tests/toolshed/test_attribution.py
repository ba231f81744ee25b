"""Attribution: activation gradients and attribution patching against true patching effects."""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.core.errors import PzbridgeError
from pzbridge.toolshed.attribution import activation_gradients, attribution_patching
from pzbridge.toolshed.interventions import patch_activations
from pzbridge.toolshed.where import Where

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from intervention_models import HEADS, lifted_tiny_lm, tokens


def linear_model(seed: int) -> pzb.nn.Sequential:
    ks = jax.random.split(jax.random.key(seed), 3)
    return pzb.nn.Sequential([
        pzb.nn.Linear.from_config("a", ks[0], {"features": 3}, {"hidden": 4}),
        pzb.nn.AddBias.from_config("b", ks[1], {"hidden": 4}),
        pzb.nn.Linear.from_config("c", ks[2], {"hidden": 4}, {"features": 3}),
    ])


def linear_metric(y: pzb.nx.NamedArray) -> jax.Array:
    return (y.unwrap("batch", "features") * jnp.arange(1.0, 4.0)).sum()


@settings(max_examples=8, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16))
def test_attribution_patching_equals_true_patching_on_a_linear_model(seed: int) -> None:
    model = linear_model(seed)
    clean, corrupt = (pzb.nx.wrap(jax.random.normal(jax.random.key(seed + w), (2, 3)), "batch", "features")
                      for w in (1, 2))
    base = float(linear_metric(model(clean)))
    estimates = attribution_patching(model, Where(layer="Linear"), linear_metric, clean, corrupt, keep=("batch",))
    assert list(estimates) == ["sublayers[0]", "sublayers[2]"]
    for path, estimate in estimates.items():
        for b in range(2):
            at = Where(path=path, index={"batch": b})
            true = float(linear_metric(patch_activations(model, corrupt, clean, at=at))) - base
            np.testing.assert_allclose(float(estimate.unwrap("batch")[b]), true, rtol=1e-4, atol=1e-4)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16))
def test_activation_gradients_match_a_jax_reference(seed: int) -> None:
    model = linear_model(seed)
    x = pzb.nx.wrap(jax.random.normal(jax.random.key(seed), (2, 3)), "batch", "features")
    value, grads = activation_gradients(model, Where(path="sublayers[2]", side="before"), linear_metric, x)
    w = model.sublayers[2].weights.value.unwrap("hidden", "features")
    np.testing.assert_allclose(grads["sublayers[2]"].unwrap("batch", "hidden"),
                               np.broadcast_to(w @ np.arange(1.0, 4.0), (2, 4)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(value), float(linear_metric(model(x))), rtol=1e-6)
    _, part = activation_gradients(model, Where(path="sublayers[2]", side="before", index={"hidden": 1}),
                                   linear_metric, x)
    np.testing.assert_allclose(part["sublayers[2]"].unwrap("batch"), grads["sublayers[2]"].unwrap("batch", "hidden")[:, 1])


def lm_metric(y: pzb.nx.NamedArray) -> jax.Array:
    logits = y.unwrap("batch", "seq", "features")[:, -1]
    return jax.nn.log_softmax(logits)[:, 0].mean()


def head_correlation(seed: int) -> float:
    _, lifted = lifted_tiny_lm(seed)
    clean, corrupt = (pzb.nx.wrap(tokens(seed + w, 4, 5), "batch", "seq") for w in (0, 1))
    base = float(lm_metric(lifted(clean)))
    estimates, truths = [], []
    for layer in range(2):
        site = Where(label=f"attns.{layer}.W_O", side="before")
        (estimate,) = attribution_patching(lifted, site, lm_metric, clean, corrupt, keep=("heads",)).values()
        for head in range(HEADS):
            at = Where(label=f"attns.{layer}.W_O", side="before", index={"heads": head})
            truths.append(float(lm_metric(patch_activations(lifted, corrupt, clean, at=at))) - base)
            estimates.append(float(estimate.unwrap("heads")[head]))
    return float(np.corrcoef(estimates, truths)[0, 1])


def test_attribution_patching_correlates_with_per_head_patching_on_a_traced_transformer() -> None:
    correlations = [head_correlation(seed) for seed in (0, 1, 2)]
    print("pearson per seed:", correlations)
    assert min(correlations) >= 0.6, correlations


def test_attribution_errors_name_the_fix() -> None:
    model = linear_model(0)
    x = pzb.nx.wrap(jnp.ones((2, 3)), "batch", "features")
    with pytest.raises(PzbridgeError, match="float scalar"):
        activation_gradients(model, Where(layer="Linear"), lambda y: y.unwrap("batch", "features"), x)
    with pytest.raises(PzbridgeError, match="lacks the keep axes"):
        attribution_patching(model, Where(layer="Linear"), linear_metric, x, x, keep=("heads",))
    _, lifted = lifted_tiny_lm(0)
    with pytest.raises(PzbridgeError, match="expected a float"):
        activation_gradients(lifted, Where(layer="TakeAlongAxis", side="before"), lm_metric,
                             pzb.nx.wrap(tokens(0, 2, 5), "batch", "seq"))
