"""Demo section: the core data model (structs, named axes, selectors, variables).

Builds a small model from pzbridge layers, selects and edits it, unbinds and
rebinds its variables, and writes a treescope rendering.

Example:
    >>> from pzbridge.demo.report import Report
    >>> import tempfile, pathlib
    >>> report = Report(verbose=False)
    >>> run_core_demo(report, pathlib.Path(tempfile.mkdtemp()))
    >>> report.ok
    True
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import treescope

import pzbridge as pzb
from pzbridge.demo.report import Report
from pzbridge.models.gpt import build_gpt


def build_small_model(init_base_rng: jax.Array) -> pzb.nn.Sequential:
    """Two affine layers with a ReLU between them, over a ``features`` axis.

    Example:
        >>> len(build_small_model(jax.random.key(0)).sublayers)
        3
    """
    return pzb.nn.Sequential([
        pzb.nn.Affine.from_config("mlp.in", init_base_rng, {"features": 4}, {"features": 8}),
        pzb.nn.Elementwise(jax.nn.relu),
        pzb.nn.Affine.from_config("mlp.out", init_base_rng, {"features": 8}, {"features": 4}),
    ])


def run_core_demo(report: Report, out_dir: pathlib.Path) -> None:
    """Runs the core section, recording its checks in ``report``."""
    with report.section("core: structs, named axes, selectors, variables"):
        model = build_small_model(jax.random.key(0))
        x = pzb.nx.wrap(jax.random.normal(jax.random.key(1), (3, 4)), "batch", "features")
        y = model(x)
        report.check("a batch is just an extra named axis", dict(y.named_shape) == {"batch": 3, "features": 4},
                     f"output named shape {dict(y.named_shape)}")

        linears = pzb.select(model).at_instances_of(pzb.nn.Linear)
        report.check("selector finds the two Linear layers", linears.count() == 2)

        # Ablate the hidden layer: zero the first Linear's weights in a copy of the model.
        ablated = linears.pick_nth_selected(0).apply(
            lambda layer: layer.replace(weights=pzb.Parameter(pzb.nx.zeros(layer.weights.value.named_shape),
                                                             layer.weights.label))
        )
        bias_only = ablated(x)
        report.check("edits build a new model; the original is untouched",
                     not bool(jnp.all(model(x).data_array == bias_only.data_array)))

        probe = pzb.nn.CheckStructure({"features": 8}, where="after mlp.in")
        checked = pzb.select(model).at_instances_of(pzb.nn.Affine).pick_nth_selected(0).insert_after(probe)
        report.check("insert_after adds a layer to the Sequential", len(checked.sublayers) == 4)
        restored = pzb.select(checked).at_instances_of(pzb.nn.CheckStructure).remove_from_parent()
        report.check("remove_from_parent undoes it", pzb.tree_equal(restored, model))

        slots, values = pzb.unbind_params(model, freeze=True)
        report.check("unbind gives one frozen value per parameter", len(values) == 4,
                     ", ".join(v.label for v in values))
        jitted = jax.jit(lambda vals, inp: slots.stateless_call(vals, inp)[0])
        report.check("the model runs under jax.jit as a pure function of its values",
                     bool(jnp.allclose(jitted(values, x).data_array, y.data_array)))
        rebound = pzb.bind_variables(slots, values, unfreeze_as_copy=True)
        report.check("bind after unbind rebuilds an equal model", bool(jnp.all(rebound(x).data_array == y.data_array)))

        html_path = out_dir / "core_model.html"
        html_path.write_text(treescope.render_to_html(model))
        report.check("treescope rendering written", html_path.stat().st_size > 0, str(html_path))

        gpt = build_gpt(init_base_rng=jax.random.key(0), num_layers=2, d_model=32, d_mlp=64, vocab_size=64)
        tokens = pzb.nx.wrap(jnp.arange(8) % 64, "seq")
        logits = gpt(tokens)
        report.check("a GPT built only from pzb.nn layers runs",
                     dict(logits.named_shape) == {"seq": 8, "vocabulary": 64}, f"{dict(logits.named_shape)}")
        gpt_path = out_dir / "gpt_model.html"
        gpt_path.write_text(treescope.render_to_html(gpt))
        report.check("treescope rendering of the GPT written", gpt_path.stat().st_size > 0, str(gpt_path))
