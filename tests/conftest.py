"""Shared test configuration: deterministic hypothesis settings for CI."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=50,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("dev", deadline=None, max_examples=25)
settings.load_profile(os.environ.get("PZBRIDGE_HYPOTHESIS_PROFILE", "ci"))
