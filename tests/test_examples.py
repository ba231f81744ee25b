"""Every script in examples/ runs to completion (each checks its own results with asserts)."""

from __future__ import annotations

import functools
import pathlib
import re
import subprocess
import sys

import pytest

EXAMPLES = sorted((pathlib.Path(__file__).resolve().parent.parent / "examples").glob("*.py"))


def test_examples_folder_has_the_documented_scripts() -> None:
    names = {path.name for path in EXAMPLES}
    assert {"inspect_equinox_model.py", "ablate_and_patch.py"} <= names


@functools.cache
def run_example(script: pathlib.Path) -> subprocess.CompletedProcess:
    """Runs one example once per test session (the RESULT checks below reuse the run)."""
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=script.parent.parent,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLES, ids=[path.stem for path in EXAMPLES])
def test_example_runs_and_reports_ok(script: pathlib.Path) -> None:
    result = run_example(script)
    assert result.returncode == 0, f"{script.name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    assert "OK" in result.stdout


def result_line(script_name: str) -> dict[str, float]:
    """The figures of an example's last line, ``RESULT name: key=value key=value``."""
    script = next(path for path in EXAMPLES if path.name == script_name)
    result = run_example(script)
    assert result.returncode == 0, f"{script_name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    last = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(rf"RESULT {script.stem}: ((?:\w+=\S+ ?)+)", last)
    assert match, f"{script_name}: the last line is not a RESULT line: {last!r}"
    return {key: _figure(value) for key, value in (pair.split("=") for pair in match.group(1).split())}


def _figure(value: str) -> float:
    """A RESULT value as a number: ``true`` / ``false`` read as 1.0 / 0.0."""
    booleans = {"true": 1.0, "false": 0.0}
    return booleans[value] if value in booleans else float(value)


@pytest.mark.slow
def test_induction_heads_knockout_meets_the_targets() -> None:
    figures = result_line("induction_heads.py")
    assert set(figures) == {"knockout_fraction", "other_heads_max_fraction"}
    assert figures["knockout_fraction"] >= 0.7
    assert figures["other_heads_max_fraction"] <= 0.3


@pytest.mark.slow
def test_das_equality_meets_the_targets() -> None:
    figures = result_line("das_equality.py")
    assert set(figures) == {"iia", "baseline_iia"}
    assert figures["iia"] >= 0.9
    assert figures["iia"] - figures["baseline_iia"] >= 0.15


@pytest.mark.slow
def test_causal_tracing_meets_the_target() -> None:
    figures = result_line("causal_tracing.py")
    assert set(figures) == {"recovered_fraction"}
    assert figures["recovered_fraction"] >= 0.5


@pytest.mark.slow
def test_steering_decode_changes_tokens_and_cached_equals_recompute() -> None:
    figures = result_line("steering_decode.py")
    assert set(figures) == {"changed_tokens", "cached_equals_recompute"}
    assert figures["changed_tokens"] >= 1
    assert figures["cached_equals_recompute"] == 1.0
