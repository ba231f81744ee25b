"""Linear / Affine / AddBias.from_config options from Penzai 0.2.5: parallel_broadcast_axes,
rename_outputs_if_necessary, new_output_axes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pzbridge as pzb
from pzbridge.core.errors import NamedAxisError
from pzbridge.nn import AddBias, Affine, Linear


def test_parallel_broadcast_axes_give_the_output_new_independent_axes():
    layer = Linear.from_config("q", jax.random.key(0), {"f": 2}, {"p": 3}, parallel_broadcast_axes={"heads": 4})
    assert dict(layer.weights.value.named_shape) == {"f": 2, "p": 3, "heads": 4}
    x = pzb.nx.wrap(jnp.array([1.0, 2.0]), "f")
    out = layer(x)
    assert sorted(out.named_shape.items()) == [("heads", 4), ("p", 3)]
    w = np.asarray(layer.weights.value.unwrap("heads", "p", "f"))
    np.testing.assert_allclose(out.unwrap("heads", "p"), w @ np.array([1.0, 2.0]), rtol=1e-6)
    affine = Affine.from_config("a", jax.random.key(0), {"f": 2}, {"p": 3}, parallel_broadcast_axes={"heads": 4})
    assert dict(affine.sublayers[1].bias.value.named_shape) == {"p": 3, "heads": 4}


def test_rename_outputs_if_necessary():
    renamed = Linear.from_config("d", jax.random.key(0), {"f": 2}, {"f": 3})
    assert set(renamed.weights.value.named_shape) == {"f", "f_out"}
    with pytest.raises(NamedAxisError, match=r"output axis 'f' is also an input axis and rename_outputs_if_necessary=False"):
        Linear.from_config("d", None, {"f": 2}, {"f": 3}, rename_outputs_if_necessary=False)
    with pytest.raises(NamedAxisError, match=r"rename_outputs_if_necessary=False"):
        Affine.from_config("d", None, {"f": 2}, {"f": 3}, rename_outputs_if_necessary=False)
    assert Linear.from_config("d", None, {"f": 2}, {"g": 3}, rename_outputs_if_necessary=False).out_axis_names == ("g",)
    with pytest.raises(NamedAxisError, match="listed in both parallel_axes and parallel_broadcast_axes"):
        Linear.from_config("d", None, {"f": 2}, {"g": 3}, {"h": 2}, parallel_broadcast_axes={"h": 2})


def test_add_bias_new_output_axes():
    bias = AddBias.from_config("b", jax.random.key(0), {"f": 2}, new_output_axes={"heads": 3})
    assert dict(bias.bias.value.named_shape) == {"f": 2, "heads": 3}
    out = bias(pzb.nx.wrap(jnp.array([1.0, 2.0]), "f"))
    assert out.unwrap("heads", "f").tolist() == [[1.0, 2.0]] * 3
    with pytest.raises(NamedAxisError, match=r"axes \['f'\] are in both"):
        AddBias.from_config("b", None, {"f": 2}, new_output_axes={"f": 2})
