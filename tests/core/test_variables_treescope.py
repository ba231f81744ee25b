"""Tests for treescope rendering of variables (pzbridge.core.variables_treescope)."""

from __future__ import annotations

import jax.numpy as jnp
import treescope

from pzbridge.core.variables import Parameter, StateVariable
from pzbridge.core.variables_treescope import PARAMETER_COLOR, STATE_VARIABLE_COLOR


def test_text_rendering_shows_kind_label_and_value_inline() -> None:
    text = treescope.render_to_text(Parameter(jnp.arange(3.0), "blocks.0.kernel", metadata={"tag": "dense"}))
    assert text.startswith("Parameter(")
    assert "label='blocks.0.kernel'" in text and "[0., 1., 2.]" in text and "'tag': 'dense'" in text


def test_text_rendering_marks_shared_variables_only() -> None:
    w, n = Parameter(jnp.zeros(2), "w"), StateVariable(jnp.zeros(()), "n")
    text = treescope.render_to_text({"a": w, "b": w, "c": n})
    lines = text.splitlines()
    shared = [line for line in lines if "Repeated" in line]
    assert len(shared) == 2 and all(f"{id(w):x}" in line for line in shared)
    assert not any("Repeated" in line and "StateVariable" in line for line in lines)


def test_html_rendering_uses_kind_colors() -> None:
    html = treescope.render_to_html([Parameter(jnp.zeros(2), "w"), StateVariable(jnp.zeros(()), "n")], compressed=False)
    assert "Parameter" in html and "StateVariable" in html and "label=" in html
    assert PARAMETER_COLOR in html and STATE_VARIABLE_COLOR in html
