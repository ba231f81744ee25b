"""Selector cost relative to ``jax.tree_util.tree_flatten``: pzbridge vs Penzai.

Builds the same sequential-like model (a struct holding a list of blocks,
each block holding a linear struct with two small arrays and a ``None``) as
pzbridge structs and as Penzai 0.2.5 structs, at about 65 / 257 / 1k / 4k
pytree nodes, and times, interleaved and taking medians:

* ``select(t).at_instances_of(Linear).apply(f)``
* ``select(t).at_instances_of(Block).insert_after(new_block)``

Each is reported as a ratio to ``tree_flatten`` of the same tree in the same
library, so the two libraries are compared by how many flattens an edit costs.
Run ``python benchmarks/selector_bench.py``; ``selector_rows()`` returns the rows.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax
import numpy as np

from pzbridge.core.selectors import select
from pzbridge.core.struct import Struct, pytree_dataclass

TARGET_NODES = (65, 257, 1000, 4000)


@pytree_dataclass
class PzbLinear(Struct):
    weight: Any
    bias: Any


@pytree_dataclass
class PzbBlock(Struct):
    linear: Any
    extra: Any


@pytree_dataclass
class PzbSequential(Struct):
    sublayers: list


def _penzai_classes() -> tuple[type, type, type]:
    import penzai.core.struct as pz_struct  # Only the benchmark imports penzai.

    @pz_struct.pytree_dataclass
    class PzLinear(pz_struct.Struct):
        weight: Any
        bias: Any

    @pz_struct.pytree_dataclass
    class PzBlock(pz_struct.Struct):
        linear: Any
        extra: Any

    @pz_struct.pytree_dataclass
    class PzSequential(pz_struct.Struct):
        sublayers: list

    return PzLinear, PzBlock, PzSequential


def _build(classes: tuple[type, type, type], n_blocks: int) -> Any:
    linear, block, sequential = classes
    w = np.zeros((2, 2), np.float32)
    b = np.zeros((2,), np.float32)
    return sequential([block(linear(w, b), None) for _ in range(n_blocks)])


def _identity(x: Any) -> Any:
    return x


def _median_times(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # Warm up caches and registries.
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():  # Interleaved, so drift hits all alike.
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}


def selector_rows(repeats: int = 31) -> list[dict]:
    """Measures the selector ratios; one row per tree size.

    Args:
      repeats: Interleaved repetitions per operation (the median is kept).

    Returns:
      Dicts with ``nodes``, ``flatten_us`` / ``penzai_flatten_us`` (median
      ``tree_flatten`` time of each library's tree), and for ``lib`` in
      ``pzb``/``penzai`` and ``op`` in ``apply`` (identity ``fn``: the
      selector's own cost), ``apply_new`` (``fn`` builds a new linear struct)
      and ``insert`` (``insert_after`` of a block): ``{lib}_{op}`` (median
      time divided by the same library's median flatten time) and
      ``{lib}_{op}_us`` (median time).
    """
    import penzai.core.selectors as pz_selectors

    pz_classes = _penzai_classes()
    pzb_classes = (PzbLinear, PzbBlock, PzbSequential)
    rows = []
    for target in TARGET_NODES:
        n_blocks = max(1, round((target - 2) / 5))
        ours = _build(pzb_classes, n_blocks)
        theirs = _build(pz_classes, n_blocks)
        nodes = jax.tree_util.tree_structure(ours).num_nodes
        new_ours = _build(pzb_classes, 1).sublayers[0]
        new_theirs = _build(pz_classes, 1).sublayers[0]
        f_ours = lambda l: PzbLinear(l.bias, l.weight)  # noqa: E731
        f_theirs = lambda l: pz_classes[0](l.bias, l.weight)  # noqa: E731
        times = _median_times(
            {
                "pzb_flatten": lambda: jax.tree_util.tree_flatten(ours),
                "pzb_apply": lambda: select(ours).at_instances_of(PzbLinear).apply(_identity),
                "pzb_apply_new": lambda: select(ours).at_instances_of(PzbLinear).apply(f_ours),
                "pzb_insert": lambda: select(ours).at_instances_of(PzbBlock).insert_after(new_ours),
                "penzai_flatten": lambda: jax.tree_util.tree_flatten(theirs),
                "penzai_apply": lambda: pz_selectors.select(theirs).at_instances_of(pz_classes[0]).apply(_identity),
                "penzai_apply_new": lambda: pz_selectors.select(theirs).at_instances_of(pz_classes[0]).apply(f_theirs),
                "penzai_insert": lambda: pz_selectors.select(theirs)
                .at_instances_of(pz_classes[1])
                .insert_after(new_theirs),
            },
            repeats,
        )
        row = {"nodes": nodes, "flatten_us": times["pzb_flatten"] * 1e6, "penzai_flatten_us": times["penzai_flatten"] * 1e6}
        for lib in ("pzb", "penzai"):
            for op in ("apply", "apply_new", "insert"):
                row[f"{lib}_{op}"] = times[f"{lib}_{op}"] / times[f"{lib}_flatten"]
                row[f"{lib}_{op}_us"] = times[f"{lib}_{op}"] * 1e6
        rows.append(row)
    return rows


def main() -> None:
    rows = selector_rows()
    print("time / (tree_flatten time of the same library's tree); median of interleaved runs")
    print(
        f"{'nodes':>6} {'flatten':>9} | {'pzb apply':>9} {'apply+new':>9} {'insert':>7} | "
        f"{'penzai flatten':>14} {'apply':>7} {'apply+new':>9} {'insert':>7}"
    )
    for r in rows:
        print(
            f"{r['nodes']:>6} {r['flatten_us']:>7.0f}us | {r['pzb_apply']:>8.2f}x {r['pzb_apply_new']:>8.2f}x "
            f"{r['pzb_insert']:>6.2f}x | {r['penzai_flatten_us']:>12.0f}us {r['penzai_apply']:>6.2f}x "
            f"{r['penzai_apply_new']:>8.2f}x {r['penzai_insert']:>6.2f}x"
        )
    print("absolute, 4k-node tree (us):", {k: round(v) for k, v in rows[-1].items() if k.endswith("_us")})


if __name__ == "__main__":
    main()
