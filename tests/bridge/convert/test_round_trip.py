"""Equinox -> NNX -> Equinox and NNX -> Equinox -> NNX round trips over the random-model strategies.

Every drawn model either converts, and then comes back home with the outputs
of the original and its structure (module classes, static fields, array
shapes), or is refused (either way) with a pzbridge error that names a fix. The known
structural gaps are listed in ``KNOWN_STRUCTURE_GAPS`` below; each is
recognised by what it changes, never skipped by model name.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from hypothesis import HealthCheck, event, given, settings

from pzbridge.bridge.convert import convert
from pzbridge.core.errors import PzbridgeError
from pzbridge.testing.equinox_strategies import equinox_models
from pzbridge.testing.nnx_strategies import nnx_models

ROUND_TRIPS = settings(max_examples=100, database=None, derandomize=True, deadline=None,
                       suppress_health_check=list(HealthCheck))

KNOWN_STRUCTURE_GAPS = {
    # Equinox has no LinearGeneral: a one-axis-to-one-axis nnx.LinearGeneral becomes eqx.nn.Linear, which comes
    # back as nnx.Linear (same kernel, same outputs).
    ("LinearGeneral", "Linear"),
}


def _batched(x: jax.Array) -> jax.Array:
    """A batch of two different examples (integer and boolean inputs repeat: ids and masks stay valid)."""
    return jnp.stack([x, x if x.dtype.kind in "iub" else x * 0.5 - 0.25])


def _refused(error: PzbridgeError, way: str) -> None:
    event(f"refused {way}")  # Shown by pytest --hypothesis-show-statistics.
    assert "Fix" in str(error) or "fix" in str(error), f"a refusal must name a fix: {error}"


def _equinox_structure(node: Any) -> Any:
    """Module classes, every field (static ones included) and array shapes, as a comparable value."""
    if isinstance(node, eqx.Module):
        # eqx.nn.Conv1d/2d/3d only fix num_spatial_dims of eqx.nn.Conv (same fields, same computation); NNX has
        # one Conv, so a model built with the generic class comes back with the dimension-specific one.
        name = re.sub(r"^(Conv|ConvTranspose)[123]d$", r"\1", type(node).__name__)
        # Padding written as "SAME" / "VALID" comes back as the equal explicit pairs (the outputs are compared).
        skip = {"padding"} if name in ("Conv", "ConvTranspose") else set()
        return name, tuple((f.name, _equinox_structure(getattr(node, f.name)))
                           for f in dataclasses.fields(node) if f.name not in skip)
    if isinstance(node, (list, tuple)):
        return type(node).__name__, tuple(_equinox_structure(item) for item in node)
    if eqx.is_array(node):
        return "array", tuple(node.shape), str(node.dtype)
    return node


def _nnx_structure(model: nnx.Module) -> list[tuple[Any, str, Any]]:
    return [(path, type(node).__name__, getattr(node, "shape", None)) for path, node in nnx.iter_graph(model)
            if isinstance(node, (nnx.Module, nnx.Variable))]


def _only_known_gaps(got: list[tuple[Any, str, Any]], want: list[tuple[Any, str, Any]]) -> bool:
    if len(got) != len(want):
        return False
    return all(g == w or (g[0] == w[0] and g[2] == w[2] and (w[1], g[1]) in KNOWN_STRUCTURE_GAPS)
               for g, w in zip(got, want))


@ROUND_TRIPS
@given(equinox_models())
def test_equinox_models_come_back_from_nnx_with_their_outputs_and_structure(example):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            converted = convert(example.model, *example.args, to="nnx", example_kwargs=example.kwargs or None)
        except PzbridgeError as error:
            return _refused(error, "to")
        batched = [_batched(a) for a in example.args]
        try:
            back = convert(converted, *batched, to="equinox", example_kwargs=example.kwargs or None)
        except PzbridgeError as error:  # e.g. a size-1 axis in the examples the way back cannot name.
            return _refused(error, "back")
    event("round trip")
    assert isinstance(back, eqx.Module)
    assert _equinox_structure(back) == _equinox_structure(example.model)
    np.testing.assert_allclose(back(*example.args, **example.kwargs), example.model(*example.args, **example.kwargs),
                               atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(jax.vmap(lambda *a: back(*a, **example.kwargs))(*batched),
                               jax.vmap(lambda *a: example.model(*a, **example.kwargs))(*batched), atol=1e-5, rtol=1e-5)


@ROUND_TRIPS
@given(nnx_models())
def test_nnx_models_come_back_from_equinox_with_their_outputs_and_structure(case):
    model, x = case
    model = nnx.clone(model)
    model.eval()  # Dropout deterministic: the two frameworks draw different random masks.
    try:
        converted = convert(model, x, to="equinox")
    except PzbridgeError as error:
        return _refused(error, "to")
    # A traced module writing its Variables became stateful the Equinox way: its values travel in an eqx.nn.State.
    stateful = isinstance(converted, eqx.nn.StatefulLayer) and converted.is_stateful()
    state = eqx.nn.State(converted) if stateful else None
    try:
        back = convert(converted, x[0], to="nnx", state=state)
    except PzbridgeError as error:
        return _refused(error, "back")
    event("round trip")
    assert isinstance(back, nnx.Module)
    back.eval()
    assert _only_known_gaps(_nnx_structure(back), _nnx_structure(model)), (
        f"{_nnx_structure(back)}\nvs\n{_nnx_structure(model)}")
    np.testing.assert_allclose(back(x), model(x), atol=1e-5, rtol=1e-5)

