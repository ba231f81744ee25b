"""A small report of what the demo verified: each check with its outcome and figures.

Example:
    >>> report = Report(verbose=False)
    >>> report.check("one plus one", 1 + 1 == 2, "2")
    True
    >>> report.ok
    True
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager


@dataclasses.dataclass
class Check:
    """One verified claim.

    Example:
        >>> Check("core", "x", True, "").passed
        True
    """

    section: str
    claim: str
    passed: bool
    detail: str


@dataclasses.dataclass
class Report:
    """Collects checks by section and prints them as progress and as a summary.

    Example:
        >>> r = Report(verbose=False)
        >>> with r.section("core"):
        ...     _ = r.check("works", True)
        >>> r.summary().splitlines()[0]
        'pzbridge demo: 1/1 checks passed'
    """

    verbose: bool = True
    checks: list[Check] = dataclasses.field(default_factory=list)
    current: str = ""
    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Groups the checks made inside the ``with`` block under ``name``."""
        self.current = name
        if self.verbose:
            print(f"\n== {name} ==", flush=True)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = time.perf_counter() - start

    def note(self, text: str) -> None:
        """Prints a progress line (no check)."""
        if self.verbose:
            print(f"   {text}", flush=True)

    def check(self, claim: str, passed: bool, detail: str = "") -> bool:
        """Records a claim and whether it held; returns ``passed``."""
        self.checks.append(Check(self.current, claim, bool(passed), detail))
        if self.verbose:
            mark = "ok  " if passed else "FAIL"
            print(f"  [{mark}] {claim}" + (f"  ({detail})" if detail else ""), flush=True)
        return bool(passed)

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return all(c.passed for c in self.checks)

    def summary(self) -> str:
        """A short text report: totals, failures, and time per section."""
        passed = sum(c.passed for c in self.checks)
        lines = [f"pzbridge demo: {passed}/{len(self.checks)} checks passed"]
        lines += [f"  FAILED [{c.section}] {c.claim} {c.detail}" for c in self.checks if not c.passed]
        lines += [f"  {name}: {seconds:.1f} s" for name, seconds in self.timings.items()]
        return "\n".join(lines)
