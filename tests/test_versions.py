"""The declared dependency ranges: both ends stated, the lower ends proven.

pyproject.toml gives every runtime dependency a range ``>=LOW,<HIGH``; .ci/oldest-constraints.txt
pins each ``LOW`` exactly, and .ci/run installs pzbridge against those pins in a second virtual
environment and runs the tests marked ``oldest`` there. These tests keep the two files equal and
check that whatever is installed lies in the declared ranges (and, in that second environment,
``PZBRIDGE_OLDEST=1``, is exactly the oldest set).
"""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import re
import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

pytestmark = pytest.mark.oldest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / ".ci" / "oldest-constraints.txt"


def read_constraints(text: str) -> dict[str, Version]:
    """``name==version`` lines (comments and blank lines ignored) as canonical name -> version."""
    pins: dict[str, Version] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*(\S+)", line)
        assert match, f"line {number} of the constraints is not an exact pin NAME==VERSION: {raw!r}"
        name = canonicalize_name(match.group(1))
        assert name not in pins, f"{name} is pinned twice"
        pins[name] = Version(match.group(2))
    return pins


def declared_ranges() -> dict[str, Requirement]:
    """pyproject.toml's runtime dependencies by canonical name."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {canonicalize_name(req.name): req for req in map(Requirement, project["dependencies"])}


def bounds(req: Requirement) -> tuple[Version, Version]:
    """The ``(low, high)`` of a ``>=low,<high`` requirement; anything else fails with the reason."""
    ops = {spec.operator: Version(spec.version) for spec in req.specifier}
    assert set(ops) == {">=", "<"} and len(req.specifier) == 2, (
        f"{req}: expected a range '>=LOW,<HIGH' (an exact pin makes pzbridge uninstallable next to other releases)")
    return ops[">="], ops["<"]


def test_every_dependency_is_a_range_with_both_ends() -> None:
    for name, req in declared_ranges().items():
        low, high = bounds(req)
        assert low < high, f"{name}: empty range {req.specifier}"


def test_oldest_constraints_pin_exactly_the_lower_bounds() -> None:
    pins = read_constraints(CONSTRAINTS.read_text())
    ranges = declared_ranges()
    # jaxlib sits next to jax in both; every dependency has a pin and nothing else is pinned.
    assert sorted(pins) == sorted(ranges), "pyproject.toml's dependencies and .ci/oldest-constraints.txt differ"
    for name, req in ranges.items():
        assert pins[name] == bounds(req)[0], f"{name}: pyproject says {req.specifier}, the constraints pin {pins[name]}"


def test_installed_versions_lie_in_the_declared_ranges() -> None:
    for name, req in declared_ranges().items():
        installed = importlib.metadata.version(name)
        assert req.specifier.contains(installed, prereleases=True), (
            f"{name} {installed} is installed but pyproject.toml declares {req.specifier}")


@pytest.mark.skipif(os.environ.get("PZBRIDGE_OLDEST") != "1",
                    reason="only in .ci/run's oldest-versions environment (PZBRIDGE_OLDEST=1)")
def test_the_oldest_environment_holds_exactly_the_pinned_releases() -> None:
    for name, pinned in read_constraints(CONSTRAINTS.read_text()).items():
        assert Version(importlib.metadata.version(name)) == pinned, name


_names = st.from_regex(r"[a-z][a-z0-9]{0,6}(-[a-z0-9]{1,4})?", fullmatch=True)
_versions = st.lists(st.integers(0, 40), min_size=1, max_size=4).map(lambda parts: ".".join(map(str, parts)))
_comments = st.sampled_from(["", "  # why", "\t#", " "])


@settings(max_examples=60, derandomize=True, deadline=None)
@given(st.dictionaries(_names, _versions, max_size=8), st.lists(_comments, min_size=8, max_size=8))
def test_read_constraints_returns_what_was_written(pins: dict[str, str], comments: list[str]) -> None:
    lines = ["# header"]
    for (name, version), comment in zip(pins.items(), comments):
        lines += [f"{name}=={version}{comment}", ""]
    parsed = read_constraints("\n".join(lines))
    assert parsed == {canonicalize_name(name): Version(version) for name, version in pins.items()}


@given(st.sampled_from([">=1.0", "==1.0", ">=1.0,<=2.0", "<2", ">1,<2"]))
def test_bounds_refuses_anything_but_a_closed_open_range(spec: str) -> None:
    with pytest.raises(AssertionError, match="expected a range"):
        bounds(Requirement(f"pkg{spec}"))
