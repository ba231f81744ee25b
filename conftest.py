"""Shared test configuration: deterministic hypothesis settings for CI, doctest names."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=20,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("dev", deadline=None, max_examples=25)
settings.load_profile(os.environ.get("PZBRIDGE_HYPOTHESIS_PROFILE", "ci"))


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    """Docstring examples may use the names a user would have imported."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import pzbridge as pzb

    doctest_namespace.update(jax=jax, jnp=jnp, np=np, pzb=pzb)
