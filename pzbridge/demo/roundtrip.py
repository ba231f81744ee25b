"""Shared steps of the framework demo sections: summarise, capture, ablate, LoRA, checkpoint.

Each framework section (:mod:`pzbridge.demo.equinox_demo`,
:mod:`pzbridge.demo.nnx_demo`) drives the same researcher workflow through
these helpers, and only the training loop is written in the framework's own
user-side API.

Example:
    >>> import jax, equinox as eqx
    >>> summary = structure_summary(pzb.lift(eqx.nn.Linear(2, 3, key=jax.random.key(0))))
    >>> summary.splitlines()[0]
    'layers: AddBias x1, EqxLinear x1, LiftedModel x1, Linear x1'
"""

from __future__ import annotations

import collections
import pathlib
from typing import Any

import jax
import numpy as np
import treescope

import pzbridge as pzb
from pzbridge.demo.report import Report
from pzbridge.nn.layer import Layer
from pzbridge.toolshed.checkpointing import restore, save
from pzbridge.toolshed.lora import LowRankAdapter, loraify_linears_in_selection


def structure_summary(lifted: Any) -> str:
    """A short text summary: layer counts by class and the parameter labels with shapes.

    Args:
      lifted: A lifted model.

    Returns:
      A few lines of text.
    """
    counts: collections.Counter = collections.Counter()
    _count_layers(lifted, counts)
    params = pzb.select(lifted).at_instances_of(pzb.Parameter).get_sequence()
    total = sum(int(np.prod(_shape(p.value))) for p in params)
    lines = ["layers: " + ", ".join(f"{name} x{n}" for name, n in sorted(counts.items()))]
    lines.append(f"parameters: {len(params)} variables, {total} numbers")
    for p in params[:6]:
        lines.append(f"  {p.label}: {_describe_value(p.value)}")
    if len(params) > 6:
        lines.append(f"  ... and {len(params) - 6} more")
    return "\n".join(lines)


def _count_layers(node: Any, counts: collections.Counter) -> None:
    if isinstance(node, Layer):
        counts[type(node).__name__] += 1
    children = jax.tree_util.tree_flatten(node, is_leaf=lambda n: n is not node and isinstance(n, Layer))[0]
    for child in children:
        if child is not node and isinstance(child, Layer):
            _count_layers(child, counts)


def _shape(value: Any) -> tuple[int, ...]:
    if pzb.nx.is_namedarray(value):
        return (*value.positional_shape, *value.named_shape.values())
    return tuple(getattr(value, "shape", ()))


def _describe_value(value: Any) -> str:
    if pzb.nx.is_namedarray(value):
        return "{" + ", ".join(f"{n}: {s}" for n, s in value.named_shape.items()) + "}"
    return str(tuple(getattr(value, "shape", ())))


def write_html(obj: Any, path: pathlib.Path) -> pathlib.Path:
    """Writes a treescope HTML rendering of ``obj`` and returns its path."""
    path.write_text(treescope.render_to_html(obj))
    return path


def add_lora(lifted: Any, rank: int = 2) -> tuple[Any, int]:
    """Adds LoRA adapters to every ``Linear`` in ``lifted``; returns the model and the adapter count."""
    adapted = loraify_linears_in_selection(
        pzb.select(lifted).at_instances_of(pzb.nn.Linear), rank=rank, init_base_rng=jax.random.key(42)
    )
    return adapted, pzb.select(adapted).at_instances_of(LowRankAdapter).count()


def checkpoint_round_trip(report: Report, lifted: Any, fresh: Any, out_dir: pathlib.Path) -> None:
    """Saves ``lifted``'s variables with orbax and restores them into ``fresh`` (same architecture)."""
    directory = out_dir / f"checkpoint_{lifted.framework}"
    save(directory, lifted)
    restore(directory, fresh)
    saved = {p.label: p.value for p in pzb.select(lifted).at_instances_of(pzb.Parameter).get_sequence()}
    loaded = {p.label: p.value for p in pzb.select(fresh).at_instances_of(pzb.Parameter).get_sequence()}
    report.check("orbax save + restore into a freshly lifted model is bitwise",
                 saved.keys() == loaded.keys() and all(pzb.tree_equal(saved[k], loaded[k]) for k in saved),
                 f"{len(saved)} parameters, {directory}")


def progress_printer(report: Report, every: int) -> Any:
    """A callback printing ``step k  loss x`` every ``every`` steps through the report."""

    def show(step: int, loss: float) -> None:
        if step % every == 0:
            report.note(f"step {step:3d}  loss {loss:.4f}")

    return show
