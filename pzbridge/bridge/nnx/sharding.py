"""NNX partitioning metadata from placed arrays: ``out_sharding`` that matches where each array is.

Flax NNX reads a Variable's layout from its metadata (``out_sharding``, the
mesh axis of each dimension, and optionally ``mesh``): ``nnx.get_partition_spec``,
``nnx.get_named_sharding`` and the optimizers' state follow it. A lowered
module holds the very buffers its lifted model held, so after
:func:`pzbridge.toolshed.sharding.shard_model` each buffer already *is*
placed; the metadata is written from that placement (``array.sharding``),
not recomputed from rules, so it is right whatever storage order the NNX
class uses (a kernel the lowering transposed carries the transposed spec).
Only Variables of a freshly lowered module are annotated (lowering builds new
Variables, never the user's). See docs/architecture.md ("The lift / lower
contract") and docs/sharding.md.

Example:
    >>> import jax, numpy as np
    >>> from flax import nnx
    >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    >>> lin = nnx.Linear(2, 4, rngs=nnx.Rngs(0))
    >>> lin.kernel.set_value(jax.device_put(lin.kernel.get_raw_value(),
    ...                      jax.sharding.NamedSharding(mesh, jax.P(None, "model"))))
    >>> annotate_sharding(lin)
    1
    >>> nnx.get_partition_spec(nnx.state(lin))["kernel"].get_value()
    P(None, 'model')
"""

from __future__ import annotations

from typing import Any

from flax import nnx
from jax.sharding import NamedSharding

__all__ = ["annotate_sharding"]


def annotate_sharding(module: nnx.Module) -> int:
    """Writes ``out_sharding`` / ``mesh`` metadata on every Variable whose array is placed with a ``NamedSharding``.

    The spec is padded to the array's rank (one entry per dimension, as
    ``nnx.with_partitioning`` writes it). A Variable's ``sharding_rules``
    metadata (logical-name rules) is dropped, since the new entries are mesh
    axis names. Variables holding unplaced arrays are left as they are.

    Args:
      module: An NNX module, modified in place (call it on modules built by
        ``pzb.lower``, whose Variables are new).

    Returns:
      How many Variables were annotated.

    Example:
        >>> annotate_sharding(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))   # nothing placed
        0
    """
    count = 0
    for _, node in nnx.iter_graph(module):
        if not isinstance(node, nnx.Variable):
            continue
        raw: Any = node.get_raw_value()
        sharding = getattr(raw, "sharding", None)
        if not isinstance(sharding, NamedSharding):
            continue
        spec = tuple(sharding.spec)
        spec += (None,) * (raw.ndim - len(spec))
        if node.has_metadata("sharding_rules"):
            node.del_metadata("sharding_rules")
        node.set_metadata(out_sharding=spec, mesh=sharding.mesh)
        count += 1
    return count
