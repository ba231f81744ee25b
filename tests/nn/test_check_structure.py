"""pzb.nn.CheckStructure: Penzai's pattern form (a pytree of chk.ArraySpec) and pzbridge's named-shape shorthand."""

import jax
import jax.numpy as jnp
import pytest

import pzbridge as pzb
from pzbridge.core import chk
from pzbridge.core.errors import NamedAxisError, StructureMismatchError
from pzbridge.nn import CheckStructure


def test_pattern_form_returns_input_and_works_under_jit():
    x = pzb.nx.wrap(jnp.ones((2, 3)), "batch", "features")
    layer = CheckStructure({"x": chk.ArraySpec(named_shape={"features": 3, **chk.var("rest")}), "n": 7})
    value = {"x": x, "n": 7}
    assert layer(value) is value
    out = jax.jit(lambda v: CheckStructure(chk.ArraySpec(named_shape={"batch": 2, "features": 3}))(v))(x)
    assert pzb.tree_equal(out, x)
    assert jax.tree_util.tree_leaves(layer) == []


def test_pattern_form_error_names_the_place_and_the_variable_binding():
    spec = chk.ArraySpec(named_shape={"features": chk.var("f")})
    layer = CheckStructure((spec, spec), where="blocks[1].mlp")
    a, b = pzb.nx.zeros({"features": 3}), pzb.nx.zeros({"features": 4})
    with pytest.raises(StructureMismatchError) as info:
        layer((a, b))
    assert str(info.value).startswith("CheckStructure at blocks[1].mlp: chk: [1] named axis 'features' is 4, "
                                      "but variable 'f' was bound to 3 at [0] named axis 'features'")


def test_named_shape_shorthand_is_kept():
    x = pzb.nx.wrap(jnp.ones((2, 3)), "batch", "features")
    assert CheckStructure({"features": 3})(x) is x
    assert CheckStructure({"features": None, "batch": 2}, exact=True)(x) is x
    assert CheckStructure({"features": None}).named_shape == {"features": None}
    assert CheckStructure(chk.ArraySpec()).named_shape is None
    with pytest.raises(NamedAxisError, match=r"CheckStructure at b: expected named axes \{'features': 4\}"):
        CheckStructure({"features": 4}, where="b")(x)
    with pytest.raises(NamedAxisError, match="exact=True applies to a named shape"):
        CheckStructure(chk.ArraySpec(), exact=True)


def test_selectors_find_and_remove_it():
    model = pzb.nn.Sequential([pzb.nn.Identity(), CheckStructure(chk.ArraySpec(named_shape={"f": 2}))])
    assert pzb.select(model).at_instances_of(CheckStructure).count() == 1
    stripped = pzb.select(model).at_instances_of(CheckStructure).remove_from_parent()
    assert [type(layer).__name__ for layer in stripped.sublayers] == ["Identity"]
