"""Sharding on 8 forced CPU devices (a 2x4 "data" x "model" mesh), in a subprocess.

The device count is fixed when jax starts, so the checks live in
``sharding_devices_script.py`` and run in a fresh interpreter with
``XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu``:
a pzb.nn GPT, a traced custom Equinox block and a traced custom NNX block
are placed by axis names; sharded outputs equal unsharded ones (atol 1e-5),
parameter specs follow the names (heads -> model, batch -> data), a LoRA
training step runs under jit on the sharded model and keeps the placement,
and lowering keeps it (placed Equinox arrays, NNX ``out_sharding`` that
``nnx.get_partition_spec`` / ``nnx.get_named_sharding`` agree with).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("sharding_devices_script.py")


@pytest.mark.slow  # one interpreter start and a few compiles: ~40 s of CPU on 2 cores
def test_sharded_models_on_eight_cpu_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    lines = done.stdout.splitlines()
    assert sum(line.startswith("OK ") for line in lines) == 7, done.stdout
    assert lines[-1].startswith("ALL OK"), done.stdout


def test_script_refuses_to_run_without_eight_devices():
    # The script must fail, not pass vacuously, when the device flag is missing.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run([sys.executable, "-c", f"import runpy; runpy.run_path({str(SCRIPT)!r})"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "needs 8 devices" in done.stderr
