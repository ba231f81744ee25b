"""Core benchmark (issue 2): selectors, nmap tracing and variable_jit, side by side with penzai.

Runs the three core benchmarks in one process and prints their tables:

- selector cost (``at_instances_of(...).apply(...)`` and ``insert_after``)
  relative to ``jax.tree_util.tree_flatten`` of the same tree at 65 / 257 /
  1k / 4k nodes, for pzbridge and penzai 0.2.5 (target: <= 3x at 4k);
- trace time of an ``nmap``-ed computation relative to plain jax (target <= 1.3x);
- per-call overhead of ``variable_jit`` vs ``jax.jit`` and penzai's ``variable_jit``.

Usage: ``python benchmarks/core_bench.py`` (needs ``pip install -e ".[bench]"`` for penzai).
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import nmap_bench  # noqa: E402
import selector_bench  # noqa: E402
import variable_jit_bench  # noqa: E402


def main() -> None:
    """Prints every core table, one after the other."""
    for title, module in (
        ("selectors vs tree_flatten", selector_bench),
        ("nmap trace time", nmap_bench),
        ("variable_jit overhead", variable_jit_bench),
    ):
        print(f"\n### {title}")
        module.main()


if __name__ == "__main__":
    main()
