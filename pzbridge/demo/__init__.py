"""``python -m pzbridge demo``: a guided run through what pzbridge does, with checks.

Each section builds small models (random initialisation; nothing is
downloaded), does the work a researcher would do, and records what it
verified in a :class:`~pzbridge.demo.report.Report`. The run fails (exit
code 1) if any check fails.

Example:
    >>> callable(run_demo)
    True
"""

from __future__ import annotations

import pathlib

from pzbridge.demo.core_demo import run_core_demo
from pzbridge.demo.report import Report


def run_demo(out_dir: pathlib.Path, verbose: bool = True) -> Report:
    """Runs every demo section, writing renderings into ``out_dir``.

    Args:
      out_dir: Where HTML renderings and checkpoints go (created if needed).
      verbose: Print progress as the checks run.

    Returns:
      The report.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    report = Report(verbose=verbose)
    run_core_demo(report, out_dir)
    from pzbridge.demo.equinox_demo import run_equinox_demo

    run_equinox_demo(report, out_dir)
    from pzbridge.demo.nnx_demo import run_nnx_demo

    run_nnx_demo(report, out_dir)
    return report
