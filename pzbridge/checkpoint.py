"""``pzb.checkpoint``: save and restore models (lifted, or lowered Equinox / NNX) and optimizer states with orbax.

The public face of :mod:`pzbridge.toolshed.checkpointing` (the format and
the all-or-nothing restore), :mod:`pzbridge.toolshed.checkpoint_manager`
(orbax-style steps, retention and asynchronous saves) and
:mod:`pzbridge.toolshed.checkpoint_store` (the commit protocol). In short:
one numbered directory per step, only *committed* steps count (a commit
marker, written last, lists every file with its size and sha256), old steps
are renamed to a hidden trash name before they are deleted, so a save
killed at any moment leaves the latest committed step restorable, and
every failure is a :class:`CheckpointError` (also
``pzb.errors.CheckpointError``) naming the directory, what was expected and
found, and the fix.

This module also teaches the checkpoint layer the lowered modules (the
toolshed never imports a framework): an ``eqx.Module`` is saved as its
array leaves under their paths (``layers.0.weight``), an ``nnx.Module`` as
``nnx.state`` under its paths (``layers.0.kernel``, with each variable's
type). Restoring one returns a NEW module built from the target's structure
(the target may be abstract, from ``eqx.filter_eval_shape`` or
``nnx.eval_shape``) and never touches the target.

Example:
    >>> import tempfile, jax.numpy as jnp, pzbridge as pzb
    >>> from pzbridge import checkpoint
    >>> root = tempfile.mkdtemp()
    >>> _ = checkpoint.save(root, [pzb.Parameter(jnp.ones(2), "w")])
    >>> model = checkpoint.restore(root, [pzb.Parameter(jnp.zeros(2), "w")])
    >>> model[0].value.tolist()
    [1.0, 1.0]
    >>> checkpoint.all_steps(root)
    [1]
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import jax

from pzbridge.core.errors import CheckpointError
from pzbridge.toolshed.checkpoint_leaves import path_name
from pzbridge.toolshed.checkpoint_manager import CheckpointManager
from pzbridge.toolshed.checkpointing import (
    all_steps,
    describe,
    latest_step,
    load_variables,
    read_description,
    register_codec,
    restore,
    restore_optimizer_state,
    save,
    structure_of,
    versions,
)


def _is_array_leaf(leaf: Any) -> bool:
    return isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)) or (
        hasattr(leaf, "shape") and hasattr(leaf, "dtype") and not isinstance(leaf, type)
    )


def _labelled(paths: list[tuple[Any, ...]]) -> list[str]:
    """Dotted labels for tree paths; where two collide (a dict key ``"0"`` and an index 0), jax's keystr."""
    labels = [path_name(path) for path in paths]
    repeated = {label for label in labels if labels.count(label) > 1}
    return [jax.tree_util.keystr(path) if label in repeated else label for label, path in zip(labels, paths)]


class EquinoxCodec:
    """Checkpoints an ``eqx.Module`` as its array leaves under their dotted paths.

    Example:
        >>> import equinox as eqx
        >>> codec = EquinoxCodec()
        >>> [label for label, _, _ in codec.leaves(eqx.nn.Linear(2, 3, key=jax.random.key(0)))]
        ['weight', 'bias']
    """

    kind = "equinox"

    def accepts(self, model: Any) -> bool:
        """Whether ``model`` is an ``eqx.Module`` (False whenever equinox was never imported).

        Example:
            >>> import equinox as eqx
            >>> EquinoxCodec().accepts(eqx.nn.Identity()), EquinoxCodec().accepts([1.0])
            (True, False)
        """
        eqx = sys.modules.get("equinox")
        return eqx is not None and isinstance(model, eqx.Module)

    def _flat(self, model: Any) -> tuple[list[tuple[Any, Any]], Any]:
        return jax.tree_util.tree_flatten_with_path(model)

    def leaves(self, model: Any) -> list[tuple[str, str, Any]]:
        """``(label, "array", leaf)`` for every array leaf (non-array leaves stay in the code, not the file).

        Example:
            >>> import equinox as eqx
            >>> [label for label, _, _ in EquinoxCodec().leaves(eqx.nn.Dropout(0.5))]  # p=0.5 is not an array
            []
        """
        flat, _ = self._flat(model)
        arrays = [(path, leaf) for path, leaf in flat if _is_array_leaf(leaf)]
        return [(label, "array", leaf) for label, (_, leaf) in zip(_labelled([p for p, _ in arrays]), arrays)]

    def structure(self, model: Any) -> list[list[str]]:
        """The class of every ``eqx.Module`` in the tree, by path.

        Example:
            >>> import equinox as eqx
            >>> EquinoxCodec().structure(eqx.nn.Sequential([eqx.nn.Identity()]))
            [['<root>', 'Sequential'], ['layers.0', 'Identity']]
        """
        import equinox as eqx

        found: list[list[str]] = []

        def visit(path: tuple[Any, ...], node: Any) -> None:
            found.append([path_name(path), type(node).__qualname__])
            children = jax.tree_util.tree_flatten_with_path(
                node, is_leaf=lambda x: x is not node and isinstance(x, eqx.Module))[0]
            for child_path, child in children:
                if isinstance(child, eqx.Module):
                    visit(path + child_path, child)

        visit((), model)
        return found

    def rebuild(self, model: Any, values: Mapping[str, Any]) -> Any:
        """A new module: ``model``'s tree with every array leaf replaced by its restored value.

        Example:
            >>> import equinox as eqx, jax.numpy as jnp
            >>> lin = eqx.nn.Linear(2, 1, use_bias=False, key=jax.random.key(0))
            >>> EquinoxCodec().rebuild(lin, {"weight": jnp.ones((1, 2))}).weight.tolist()
            [[1.0, 1.0]]
        """
        flat, treedef = self._flat(model)
        labels = iter(label for label, _, _ in self.leaves(model))
        new_leaves = [values[next(labels)] if _is_array_leaf(leaf) else leaf for _, leaf in flat]
        return jax.tree_util.tree_unflatten(treedef, new_leaves)


class NnxCodec:
    """Checkpoints an ``nnx.Module`` as ``nnx.state`` under its dotted paths, with each variable's type.

    Example:
        >>> from flax import nnx
        >>> [(label, kind) for label, kind, _ in NnxCodec().leaves(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))]
        [('bias', 'Param'), ('kernel', 'Param')]
    """

    kind = "nnx"

    def accepts(self, model: Any) -> bool:
        """Whether ``model`` is an ``nnx.Module`` (False whenever flax was never imported).

        Example:
            >>> from flax import nnx
            >>> NnxCodec().accepts(nnx.Linear(2, 3, rngs=nnx.Rngs(0))), NnxCodec().accepts([1.0])
            (True, False)
        """
        nnx = sys.modules.get("flax.nnx")
        return nnx is not None and isinstance(model, nnx.Module)

    def _flat(self, model: Any) -> tuple[Any, list[tuple[tuple[Any, ...], Any]]]:
        from flax import nnx

        graphdef, state = nnx.split(model)
        return graphdef, list(nnx.to_flat_state(state))

    def leaves(self, model: Any) -> list[tuple[str, str, Any]]:
        """``(label, variable type, value)`` for every variable holding a value (``None`` holds nothing).

        Example:
            >>> from flax import nnx
            >>> [label for label, _, _ in NnxCodec().leaves(nnx.Linear(2, 3, use_bias=False, rngs=nnx.Rngs(0)))]
            ['kernel']
        """
        _, flat = self._flat(model)
        kept = [(path, variable) for path, variable in flat if variable.get_value() is not None]
        labels = _labelled([tuple(jax.tree_util.DictKey(p) for p in path) for path, _ in kept])
        return [(label, type(variable).__name__, variable.get_value()) for label, (_, variable) in zip(labels, kept)]

    def structure(self, model: Any) -> list[list[str]]:
        """The class of every ``nnx.Module`` in the graph, by path.

        Example:
            >>> from flax import nnx
            >>> NnxCodec().structure(nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0))))
            [['<root>', 'Sequential'], ['layers', 'List'], ['layers.0', 'Linear']]
        """
        from flax import nnx

        return sorted([".".join(map(str, path)) or "<root>", type(node).__qualname__]
                      for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Module))

    def rebuild(self, model: Any, values: Mapping[str, Any]) -> Any:
        """A new module: ``nnx.merge`` of ``model``'s graph with NEW variables holding the restored values.

        Example:
            >>> from flax import nnx
            >>> import jax.numpy as jnp
            >>> lin = nnx.Linear(2, 1, use_bias=False, rngs=nnx.Rngs(0))
            >>> new = NnxCodec().rebuild(lin, {"kernel": jnp.ones((2, 1))})
            >>> new.kernel[...].tolist(), new.kernel is lin.kernel
            ([[1.0], [1.0]], False)
        """
        from flax import nnx

        graphdef, flat = self._flat(model)
        labels = iter(label for label, _, _ in self.leaves(model))
        # Every variable is replaced, even one holding None: merge would otherwise share it with ``model``.
        fresh = [(path, variable.replace(values[next(labels)] if variable.get_value() is not None else None))
                 for path, variable in flat]
        return nnx.merge(graphdef, nnx.from_flat_state(fresh))


register_codec(EquinoxCodec())
register_codec(NnxCodec())

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "EquinoxCodec",
    "NnxCodec",
    "all_steps",
    "describe",
    "latest_step",
    "load_variables",
    "read_description",
    "restore",
    "restore_optimizer_state",
    "save",
    "structure_of",
    "versions",
]
