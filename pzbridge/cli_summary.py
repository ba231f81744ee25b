"""The text summary ``python -m pzbridge show`` prints for a lifted model.

Three questions a user asks first about a model they just lifted: what is it
made of (layers counted by class), where are its parameters (per top-level
block), and what stayed ``Foreign`` (kept as the original code, its children
lifted) and why. The summary walks the lifted tree directly (struct fields,
lists, tuples, dicts and ``Foreign`` children) so it works for any lifted
layer, not only for a :class:`~pzbridge.bridge.lifted.LiftedModel`.

Parameters shared between two places (tied embeddings) are counted once:
a ``Parameter`` object is one parameter wherever it appears.

Example:
    >>> import jax, equinox as eqx
    >>> import pzbridge as pzb
    >>> lifted = pzb.lift(eqx.nn.MLP(4, 2, width_size=8, depth=1, key=jax.random.key(0)))
    >>> summary = summarize(lifted)
    >>> summary.parameter_count, summary.layer_counts["EqxLinear"]
    (58, 2)
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator
from typing import Any

from pzbridge.bridge.lifted import LiftedModel
from pzbridge.core.struct import Struct
from pzbridge.core.variable_base import AbstractVariable
from pzbridge.core.variables import Parameter
from pzbridge.nn.dataflow import CallChild, Traced
from pzbridge.nn.foreign import Foreign
from pzbridge.nn.layer import Layer

Path = str


def children(node: Any) -> Iterator[tuple[str, Any]]:
    """The direct children of ``node`` in a lifted tree, with their path suffixes.

    Variables are leaves (their values are not walked); structs give their
    pytree fields, containers their items.

    Example:
        >>> import pzbridge as pzb
        >>> [suffix for suffix, _ in children(pzb.nn.Sequential([pzb.nn.Identity()]))]
        ['.sublayers']
    """
    if isinstance(node, AbstractVariable):
        return
    if isinstance(node, Struct) and dataclasses.is_dataclass(node):
        for field in dataclasses.fields(node):
            if field.metadata.get("pytree_node", True):
                yield f".{field.name}", getattr(node, field.name)
    elif isinstance(node, (list, tuple)):
        for index, item in enumerate(node):
            yield f"[{index}]", item
    elif isinstance(node, dict):
        for key, item in node.items():
            yield f"[{key!r}]", item


def walk(node: Any, path: Path = "") -> Iterator[tuple[Path, Any]]:
    """Every node of a lifted tree (depth first, parents first), with its path.

    Example:
        >>> import pzbridge as pzb
        >>> [p for p, _ in walk(pzb.nn.Sequential([pzb.nn.Identity()]))]
        ['', '.sublayers', '.sublayers[0]']
    """
    stack = [(path, node)]
    while stack:  # Iterative: lifted trees of deep models exceed Python's recursion limit.
        here, current = stack.pop()
        yield here, current
        stack.extend(reversed([(here + suffix, child) for suffix, child in children(current)]))


def _join(parent: str, key: str) -> str:
    return key if not parent else (parent + key if key.startswith("[") else f"{parent}.{key}")


def walk_modules(root: Any) -> Iterator[tuple[str, Any]]:
    """Like :func:`walk`, but each node comes with the path of the original module it belongs to.

    The original path is the one the lifter's errors use (``blocks[0].attn``):
    ``Foreign`` children keys and the child names that ``CallChild`` records
    (traced lifting), joined; array fields of layers add nothing.

    Example:
        >>> import jax, equinox as eqx
        >>> import pzbridge as pzb
        >>> mlp = eqx.nn.MLP(2, 2, width_size=2, depth=1, key=jax.random.key(0))
        >>> sorted({path for path, _ in walk_modules(pzb.lift(mlp))})
        ['']
    """
    stack: list[tuple[str, Any]] = [("", root)]
    while stack:
        origin, current = stack.pop()
        yield origin, current
        if isinstance(current, CallChild) and current.name:
            origin = _join(origin, current.name)
        if isinstance(current, Foreign):
            pairs = [(_join(origin, str(key)), child) for key, child in current.children.items()]
        else:
            pairs = [(origin, child) for _, child in children(current)]
        stack.extend(reversed(pairs))


def layer_name(layer: Any) -> str:
    """A short display name: the class, with the original class for ``Foreign`` / ``Traced``.

    Example:
        >>> import pzbridge as pzb
        >>> layer_name(pzb.nn.Identity())
        'Identity'
    """
    if isinstance(layer, CallChild):
        return layer_name(layer.layer)
    template = getattr(layer, "template", None)
    if isinstance(layer, (Foreign, Traced)) and template is not None:
        return f"{type(layer).__name__}({template.class_name})"
    return type(layer).__name__


def parameter_size(variable: AbstractVariable) -> int:
    """The number of scalars a variable holds (summed over its value's array leaves).

    Example:
        >>> import jax.numpy as jnp
        >>> parameter_size(Parameter(jnp.ones((2, 3)), "w"))
        6
    """
    import jax

    return sum(int(getattr(leaf, "size", 1)) for leaf in jax.tree_util.tree_leaves(variable.value))


@dataclasses.dataclass(frozen=True)
class Block:
    """One top-level block: where it is, what it is, and how many parameters it holds.

    Example:
        >>> Block(".sublayers[0]", "blocks.0", "Linear", 12, 2).parameter_count
        12
    """

    path: Path
    name: str
    kind: str
    parameter_count: int
    variable_count: int


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    """What :func:`summarize` found in a lifted tree.

    Attributes:
      layer_counts: Layer class name -> number of instances (most frequent first).
      parameter_count: Scalars in distinct ``Parameter`` objects.
      parameter_objects: Number of distinct ``Parameter`` objects.
      state_count: Scalars in distinct non-parameter variables (``StateVariable`` s).
      blocks: The top-level blocks (see :func:`top_level_blocks`).
      foreign: ``(path, original class name, child keys)`` per ``Foreign`` layer.

    Example:
        >>> import pzbridge as pzb
        >>> summarize(pzb.nn.Identity()).layer_counts
        {'Identity': 1}
    """

    layer_counts: dict[str, int]
    parameter_count: int
    parameter_objects: int
    state_count: int
    blocks: tuple[Block, ...]
    foreign: tuple[tuple[Path, str, tuple[str, ...]], ...]


def _variables(node: Any) -> dict[int, AbstractVariable]:
    return {id(v): v for _, v in walk(node) if isinstance(v, AbstractVariable)}


def _label_prefix(variables: list[AbstractVariable]) -> str:
    """The longest dotted prefix shared by the labels (the original module path of a block)."""
    parts = [str(getattr(v, "label", "")).split(".") for v in variables]
    common: list[str] = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    if parts and len(common) == min(len(p) for p in parts):
        common = common[:-1]  # One variable: its own name is not the block's name.
    return ".".join(common)


def top_level_blocks(root: Any) -> list[tuple[Path, Any]]:
    """The children of the first node below ``root`` that has more than one layer child.

    Single-child wrappers (the ``LiftedModel`` root, ``Traced``, ``CallChild``)
    are looked through, so an Equinox ``MLP`` gives its layers and a GPT its
    embedding, blocks and head.

    Example:
        >>> import pzbridge as pzb
        >>> [p for p, _ in top_level_blocks(pzb.nn.Sequential([pzb.nn.Identity(), pzb.nn.Identity()]))]
        ['.sublayers[0]', '.sublayers[1]']
    """
    path, node = "", root
    for _ in range(10_000):  # Bounded: a tree is finite, but never loop on a malformed one.
        layers = _layer_children(node, path)
        if len(layers) != 1:
            return layers or [(path, node)]
        path, node = layers[0]
    return [(path, node)]


def _layer_children(node: Any, path: Path) -> list[tuple[Path, Any]]:
    """The nearest layers (or variables) below ``node``, looking through containers."""
    found: list[tuple[Path, Any]] = []
    pending = [(path + suffix, child) for suffix, child in children(node)]
    while pending:
        here, child = pending.pop(0)
        if isinstance(child, (Layer, AbstractVariable)):
            found.append((here, child))
        elif isinstance(child, (list, tuple, dict)):
            pending[:0] = [(here + suffix, item) for suffix, item in children(child)]
    return found


def summarize(root: Any) -> ModelSummary:
    """Counts layers by class and parameters per top-level block; lists the ``Foreign`` layers.

    Args:
      root: A lifted model or any lifted layer tree.

    Returns:
      A :class:`ModelSummary`.

    Example:
        >>> import jax, equinox as eqx
        >>> import pzbridge as pzb
        >>> s = summarize(pzb.lift(eqx.nn.Linear(3, 2, key=jax.random.key(0))))
        >>> s.parameter_count, s.parameter_objects, s.foreign
        (8, 2, ())
    """
    counts: collections.Counter[str] = collections.Counter()
    foreign: list[tuple[Path, str, tuple[str, ...]]] = []
    for path, node in walk_modules(root):
        if isinstance(node, Layer) and not isinstance(node, (CallChild, LiftedModel)):
            counts[type(node).__name__] += 1
        if isinstance(node, Foreign):
            foreign.append((path or "<root>", node.template.class_name, tuple(node.children)))
    variables = list(_variables(root).values())
    params = [v for v in variables if isinstance(v, Parameter)]
    blocks = []
    for path, block in top_level_blocks(root):
        inside = list(_variables(block).values())
        name = block.name if isinstance(block, CallChild) and block.name else _label_prefix(inside)
        block_params = [v for v in inside if isinstance(v, Parameter)]
        blocks.append(Block(path or "<root>", name, layer_name(block), sum(map(parameter_size, block_params)),
                            len(inside)))
    return ModelSummary(
        layer_counts=dict(counts.most_common()),
        parameter_count=sum(map(parameter_size, params)),
        parameter_objects=len(params),
        state_count=sum(parameter_size(v) for v in variables if not isinstance(v, Parameter)),
        blocks=tuple(blocks),
        foreign=tuple(foreign),
    )


def format_summary(summary: ModelSummary, foreign_reasons: dict[Path, str] | None = None) -> str:
    """The summary as text: totals, layers by class, parameters per block, Foreign layers.

    Args:
      summary: From :func:`summarize`.
      foreign_reasons: Why each ``Foreign`` path (a key of the mapping) stayed
        Foreign; a ``""`` key gives a reason for all the others.

    Returns:
      Lines of text, without a trailing newline.

    Example:
        >>> import pzbridge as pzb
        >>> print(format_summary(summarize(pzb.nn.Identity())).splitlines()[0])
        parameters: 0 in 0 Parameter objects; state: 0
    """
    reasons = foreign_reasons or {}
    totals = (f"parameters: {summary.parameter_count:,} in {summary.parameter_objects} Parameter objects; "
              f"state: {summary.state_count:,}")
    lines = [totals, "", "layers by class:"]
    width = max((len(name) for name in summary.layer_counts), default=0)
    lines += [f"  {name:<{width}}  {count}" for name, count in summary.layer_counts.items()]
    lines += ["", "parameters per top-level block:"]
    rows = [(b.name or b.path, b.kind, f"{b.parameter_count:,}") for b in summary.blocks]
    widths = [max((len(row[i]) for row in rows), default=0) for i in range(2)]
    lines += [f"  {name:<{widths[0]}}  {kind:<{widths[1]}}  {count}" for name, kind, count in rows]
    if not summary.foreign:
        lines += ["", "Foreign: none (every module was lifted into pzbridge layers)"]
        return "\n".join(lines)
    lines += ["", f"Foreign ({len(summary.foreign)}; the original code runs, its children are lifted):"]
    for path, class_name, keys in summary.foreign:
        inside = f" children: {', '.join(keys)}" if keys else " no children"
        lines.append(f"  {path}: {class_name} ({inside.strip()})")
        if path in reasons:
            lines.append(f"    why: {reasons[path]}")
    if "" in reasons:
        lines.append(f"  why{' (the others)' if len(reasons) > 1 else ''}: {reasons['']}")
    return "\n".join(lines)
