"""The treescope rendering of a Selection shows the tree with selected parts marked."""

from __future__ import annotations

import jax.numpy as jnp
import treescope

from pzbridge.core.selectors import select
from pzbridge.core.selectors_treescope import render_selection_to_html, render_selection_to_text
from pzbridge.testing.trees import Layer, Sequential


def tiny_model() -> Sequential:
    return Sequential([Layer(jnp.ones(2), jnp.zeros(2), name="first"), Layer(jnp.ones(3), jnp.zeros(3), name="second")])


def test_text_rendering_marks_each_selected_part_with_its_path():
    sel = select(tiny_model()).at_instances_of(Layer).where(lambda l: l.name == "second")
    text = render_selection_to_text(sel)
    assert text.startswith("pzb.select(...) with 1 selected node:")
    assert "selected [0] at sublayers[1]" in text
    assert "selected [1]" not in text
    assert "first" in text and "second" in text  # The whole tree is shown.


def test_text_rendering_of_several_selected_nodes():
    text = render_selection_to_text(select([1, [2, 3]]).at_pytree_leaves())
    assert "with 3 selected nodes" in text
    for i in range(3):
        assert f"selected [{i}]" in text


def test_html_rendering_mentions_selected_parts():
    html = render_selection_to_html(select(tiny_model()).at(lambda m: m.sublayers[0].weight))
    assert "<" in html and "selected [0] at sublayers[0].weight" in html


def test_treescope_renders_a_selection_directly():
    text = treescope.render_to_text(select({"w": 1}).at(lambda t: t["w"]))
    assert "selected [0] at ['w']" in text


def test_show_selection_prints_text_outside_ipython(capsys):
    select([7, 8]).at(lambda t: t[1]).show_selection()
    out = capsys.readouterr().out
    assert "with 1 selected node" in out and "selected [0]" in out
