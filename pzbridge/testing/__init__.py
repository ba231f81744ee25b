"""Public hypothesis strategies and property assertions for pzbridge users.

Libraries that transform models test their transforms with these strategies:
random named arrays (:mod:`pzbridge.testing.named_arrays`), random pytrees of
structs (:mod:`pzbridge.testing.trees`), numerical comparisons that are bitwise
only where two programs are the same and within a few ulps otherwise
(:mod:`pzbridge.testing.numerics`), and random Equinox / NNX models
(:mod:`pzbridge.testing.equinox_strategies`, :mod:`pzbridge.testing.nnx_strategies`,
stateful Equinox models with BatchNorm in :mod:`pzbridge.testing.stateful_equinox`;
imported on first use because they load the frameworks), and deeply nested
models for depth tests (:mod:`pzbridge.testing.deep_models`).

Example:
    >>> from hypothesis import given
    >>> import pzbridge.testing as pzt
    >>> @given(pzt.named_arrays())
    ... def test_untag_prefix_then_tag_prefix(x):
    ...     names = tuple(x.named_shape)
    ...     back = x.untag_prefix(*names).tag_prefix(*names)
    ...     assert pzb.tree_equal(back.canonicalize(), x.canonicalize())
    >>> test_untag_prefix_then_tag_prefix()
"""

from __future__ import annotations

import importlib
from typing import Any

try:
    import hypothesis  # noqa: F401 - every strategy below is built on it
except ImportError as error:  # An optional dependency: say which extra brings it.
    raise ImportError(
        "pzbridge.testing needs hypothesis, which is installed with pzbridge's test extra. "
        "Fix: pip install 'pzbridge[test]' (in a clone: pip install -e '.[test]'), or pip install hypothesis."
    ) from error

from pzbridge.testing.named_arrays import (
    axis_names,
    broadcastable_named_array_cases,
    build_named_array,
    named_array_cases,
    named_arrays,
    named_shapes,
    positional_shapes,
)
from pzbridge.testing.numerics import (
    assert_bitwise_reproducible,
    assert_outputs_match,
    assert_same_computation,
    assert_same_outputs,
    exact_computation,
    jaxpr_difference,
    same_computation,
    ulps_difference,
)
from pzbridge.testing.trees import array_leaves, random_struct_trees, sequential_like_trees

_LAZY = {
    "equinox_models": "pzbridge.testing.equinox_strategies",
    "EquinoxExample": "pzbridge.testing.equinox_strategies",
    "assert_round_trip": "pzbridge.testing.equinox_strategies",
    "assert_same_buffers": "pzbridge.testing.equinox_strategies",
    "assert_outputs_close": "pzbridge.testing.equinox_strategies",
    "nnx_models": "pzbridge.testing.nnx_strategies",
    "stateful_equinox_models": "pzbridge.testing.stateful_equinox",
    "StatefulEquinoxExample": "pzbridge.testing.stateful_equinox",
    "run_batch": "pzbridge.testing.stateful_equinox",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'pzbridge.testing' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "array_leaves",
    "assert_bitwise_reproducible",
    "assert_outputs_match",
    "assert_same_computation",
    "assert_same_outputs",
    "axis_names",
    "broadcastable_named_array_cases",
    "build_named_array",
    "EquinoxExample",
    "assert_outputs_close",
    "assert_round_trip",
    "assert_same_buffers",
    "equinox_models",
    "exact_computation",
    "jaxpr_difference",
    "named_array_cases",
    "named_arrays",
    "named_shapes",
    "nnx_models",
    "positional_shapes",
    "random_struct_trees",
    "same_computation",
    "run_batch",
    "sequential_like_trees",
    "stateful_equinox_models",
    "StatefulEquinoxExample",
    "ulps_difference",
]
