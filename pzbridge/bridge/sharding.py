"""Lowering a sharded lifted model: placed Equinox arrays, NNX Variables with partitioning metadata.

``pzb.lower`` already keeps placement: a lowered module holds the very
buffers of the lifted model's variables (or, where a layout is converted,
arrays computed from them, which XLA keeps sharded). So the smallest design
is one function on top of it rather than a second lowering:
:func:`lower_sharded` optionally places the model first
(:func:`~pzbridge.toolshed.sharding.shard_model`), lowers it, and for NNX
writes each Variable's ``out_sharding`` / ``mesh`` metadata from where its
array actually is (:func:`pzbridge.bridge.nnx.sharding.annotate_sharding`),
so ``nnx.get_partition_spec`` / ``nnx.get_named_sharding`` and NNX
optimizers see the layout. An Equinox module has no sharding metadata: its
arrays are the placed ones. See docs/sharding.md.

Example:
    >>> import jax, numpy as np, pzbridge as pzb
    >>> from pzbridge.models.gpt import build_gpt
    >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    >>> gpt = build_gpt("g", jax.random.key(0), 8, 1, 2, 4, 8, 4)
    >>> module = lower_sharded(gpt, mesh, {"heads": "model"}, framework="equinox")
    >>> sorted({str(leaf.sharding.spec) for leaf in jax.tree.leaves(module) if getattr(leaf, "ndim", 0) == 3})
    ["P('model', None, None)", "P(None, 'model', None)"]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jax.sharding import Mesh

from pzbridge.bridge.api import lower
from pzbridge.bridge.frameworks import framework_of
from pzbridge.bridge.lifted import CallingConvention
from pzbridge.toolshed.sharding import ShardingError, ShardingRules, shard_model

__all__ = ["lower_sharded"]


def lower_sharded(lifted: Any, mesh: Mesh | None = None, rules: ShardingRules | Mapping[str, Any] | None = None,
                  *, framework: str | None = None, convention: CallingConvention | None = None) -> Any:
    """Lowers ``lifted`` keeping its sharding: placed arrays, and NNX partitioning metadata.

    Args:
      lifted: A lifted model, already placed with ``shard_model`` or not.
      mesh: With ``rules``: place the model first (on a copy; ``lifted`` is
        not changed). Both None: lower the model as placed.
      rules: The sharding rules (a mapping is converted).
      framework: As for ``pzb.lower`` (``"equinox"`` / ``"nnx"``).
      convention: As for ``pzb.lower``.

    Returns:
      The lowered module. For NNX, every Variable whose array is placed with
      a ``NamedSharding`` carries ``out_sharding`` (one mesh axis entry per
      dimension) and ``mesh`` metadata.

    Raises:
      ShardingError: If only one of ``mesh`` and ``rules`` is given, or the
        rules do not fit a variable.
      LowerError: As ``pzb.lower``.

    Example:
        >>> import jax, numpy as np, pzbridge as pzb
        >>> from flax import nnx
        >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
        >>> lifted = pzb.lift(nnx.Linear(4, 6, rngs=nnx.Rngs(0)))
        >>> lowered = lower_sharded(lifted, mesh, {"features_out": "model"})
        >>> lowered.kernel.get_metadata()["out_sharding"]
        (None, 'model')
    """
    if (mesh is None) != (rules is None):
        raise ShardingError(
            f"lower_sharded: give both mesh and rules to place the model, or neither to lower it as placed "
            f"(found mesh={'set' if mesh is not None else None}, rules={'set' if rules is not None else None}). "
            "Fix: lower_sharded(model, mesh, {'heads': 'model'}) or lower_sharded(shard_model(model, mesh, rules))."
        )
    if mesh is not None and rules is not None:
        lifted = shard_model(lifted, mesh, rules)
    lowered = lower(lifted, framework=framework, convention=convention)
    if framework_of(lowered) == "nnx":
        from pzbridge.bridge.nnx.sharding import annotate_sharding

        annotate_sharding(lowered)
    return lowered
