"""Dataflow combinators of traced modules: branches, tuple picks, side inputs, child calls.

A traced ``__call__`` is a graph: values flow from the module's input
through child calls and glue operations. pzbridge recovers that graph as
ordinary combinators (``Sequential``, ``Residual``, ``BranchAndAddTogether``)
wherever it is a series-parallel shape, and uses the few layers here for the
rest: :class:`Branch` runs several paths on one input and returns their
outputs as a tuple for a layer that takes several operands; :class:`Pick`
takes one element of a tuple; :class:`SideInput` reads an argument the
module received besides its main input (a mask, positions, a key);
:class:`CallChild` calls a child layer with exactly the arguments the
original code passed it; :class:`BindSideInputs` computes values once and
passes them on as side inputs (a value used at several places that does not
depend on the main input). :class:`Traced` is the root of one traced module.

Example:
    >>> import jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> both = pzb.nn.Sequential([Branch([pzb.nn.Identity(), pzb.nn.Elementwise(jnp.negative)]), Pick(1)])
    >>> both(pzb.nx.wrap(jnp.ones(2), "features")).unwrap("features").tolist()
    [-1.0, -1.0]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.basic import rename_axes
from pzbridge.nn.foreign import ForeignTemplate
from pzbridge.nn.layer import Layer
from pzbridge.nn.named_ops import AXIS_SIZES


@pytree_dataclass
class Branch(Layer):
    """Runs every branch on the same input and returns the tuple of their outputs.

    Example:
        >>> Branch([pzb.nn.Identity(), pzb.nn.Identity()])(3)
        (3, 3)
    """

    branches: list[Layer]

    def __call__(self, x: Any, /, **side_inputs: Any) -> tuple[Any, ...]:
        return tuple(branch(x, **side_inputs) for branch in self.branches)


@pytree_dataclass
class Pick(Layer):
    """Returns element ``index`` of a tuple input.

    Example:
        >>> Pick(1)((4, 5))
        5
    """

    index: int = static_field()

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        return x[self.index]


@pytree_dataclass
class SideInput(Layer):
    """Returns the side input ``name`` (an argument the module got besides its main input); ignores ``x``.

    Example:
        >>> SideInput("mask")(None, mask=7)
        7
    """

    name: str = static_field()

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        if self.name not in side_inputs:
            raise NamedAxisError(
                f"SideInput: the traced module reads its argument {self.name!r}, but the call passed only "
                f"{sorted(k for k in side_inputs if k != AXIS_SIZES)}. Fix: pass {self.name}=... when calling."
            )
        return side_inputs[self.name]


@pytree_dataclass
class BindSideInputs(Layer):
    """Computes ``values`` once, then calls ``body`` with them as extra side inputs named ``names``.

    Each value layer runs on the same input and side inputs as the whole
    layer (in a traced module they read only side inputs, constants and
    axis sizes), in order: a later value may read an earlier one by its
    name. ``body`` then gets every side input the call got plus
    ``{name: value}`` and reads the values through :class:`SideInput`
    layers. Traced lifting uses it for a value that does not depend on the
    main input but is used at several places (a UNet's time embedding fed
    to every block): it is computed exactly once, as in the original code,
    instead of once per use.

    Attributes:
      values: The layers computing the bound values, in order.
      names: The side-input name of each value (static; traced lifting
        uses the reserved prefix ``__pzb_shared_``).
      body: The layer that reads them.

    Example:
        >>> emb = pzb.nn.Sequential([SideInput("t"), pzb.nn.Elementwise(jnp.exp)])
        >>> layer = BindSideInputs((emb,), ("emb",), Branch([SideInput("emb"), SideInput("emb")]))
        >>> first, second = layer(None, t=pzb.nx.wrap(jnp.zeros(2), "features"))
        >>> first is second, first.unwrap("features").tolist()
        (True, [1.0, 1.0])
    """

    values: tuple[Layer, ...]
    names: tuple[str, ...] = static_field()
    body: Layer

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        if len(self.values) != len(self.names):
            raise NamedAxisError(
                f"BindSideInputs: {len(self.values)} value layers but {len(self.names)} names {self.names}. "
                "Fix: give exactly one name per value."
            )
        side = dict(side_inputs)
        for name, value in zip(self.names, self.values):
            side[name] = value(x, **side)
        return self.body(x, **side)


def _rename_all(value: Any, renames: Mapping[str, str]) -> Any:
    if not renames:
        return value

    def one(leaf: Any) -> Any:
        present = {a: b for a, b in renames.items() if a in leaf.named_shape and a != b}
        return rename_axes(leaf, present) if present else leaf

    return jax.tree_util.tree_map(lambda leaf: one(leaf) if nx.is_namedarray(leaf) else leaf, value,
                                  is_leaf=nx.is_namedarray)


@pytree_dataclass
class CallChild(Layer):
    """Calls ``layer`` the way the original code called the child module.

    The input is the tuple of the call's array arguments: the first
    ``data_count`` are the child's positional inputs (a tuple when more
    than one), the rest are keyword arguments passed as side inputs named
    ``side_names``. ``static_side`` holds the call's non-array keyword
    arguments. The child gets exactly these side inputs, as in the original
    call. Axis renames align the caller's names with the child's own.

    Attributes:
      layer: The lifted child.
      data_count: Number of positional array arguments (static).
      side_names: Names of the array keyword arguments (static).
      static_side: ``((name, value), ...)`` non-array keyword arguments (static).
      in_renames: Per argument, renames applied before the call (static).
      out_renames: Renames applied to the result (static).
      name: The child's key in the traced module, e.g. ``"attn"`` (static).
      stack_axis: Set when the child is one block of a layer stack: its
        parameters carry this axis and the enclosing
        :class:`~pzbridge.nn.LayerStack` slices them per step (static).

    Example:
        >>> call = CallChild(pzb.nn.Identity(), 1, ("mask",))
        >>> call((1, 2))
        1
    """

    layer: Layer
    data_count: int = static_field(default=1)
    side_names: tuple[str, ...] = static_field(default=())
    static_side: tuple[tuple[str, Any], ...] = static_field(default=())
    in_renames: tuple[tuple[tuple[str, str], ...], ...] = static_field(default=())
    out_renames: tuple[tuple[str, str], ...] = static_field(default=())
    name: str = static_field(default="")
    stack_axis: str = static_field(default="")

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        values = x if self.data_count + len(self.side_names) > 1 else (x,)
        values = tuple(_rename_all(v, dict(self.in_renames[i]) if i < len(self.in_renames) else {})
                       for i, v in enumerate(values))
        data = values[: self.data_count]
        side = {**dict(self.static_side), **dict(zip(self.side_names, values[self.data_count :]))}
        out = self.layer(data[0] if self.data_count == 1 else tuple(data), **side)
        return _rename_all(out, dict(self.out_renames))


@pytree_dataclass
class Traced(Layer):
    """A custom module opened up by tracing its ``__call__``: the recovered graph plus the original's template.

    ``body`` is the module's computation as pzbridge layers (child layers,
    glue, combinators): selectors, capture, patching and LoRA reach all of
    it. ``template`` rebuilds the original module when lowering; as long as
    the glue is unchanged, lowering gives the original class back with the
    (possibly edited) children taken from ``body``; an edited graph lowers to
    an adapter running ``body``.

    Attributes:
      body: The traced computation.
      template: The framework's rebuild recipe (static).
      extras: Children the traced call does not use (kept for lowering).
      child_keys: Keys of the children ``body`` calls (static).
      labels: ``((key, label), ...)`` of the module's arrays used in ``body`` (static).
      signature: The glue's structure at lift time (static).
      convention: How the module is called positionally (static).

    Example:
        >>> traced = Traced(pzb.nn.Identity(), None)
        >>> traced(pzb.nx.wrap(jnp.ones(2), "seq")).named_shape["seq"]
        2
    """

    body: Layer
    template: ForeignTemplate | None = static_field()
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)
    child_keys: tuple[str, ...] = static_field(default=())
    labels: tuple[tuple[str, str], ...] = static_field(default=())
    signature: Any = static_field(default=None)
    convention: Any = static_field(default=None)

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        sizes: dict[str, int] = {}
        for leaf in jax.tree_util.tree_leaves(x, is_leaf=nx.is_namedarray):
            if nx.is_namedarray(leaf):
                sizes.update(leaf.named_shape)
        # A side input's axes count too (a cache's length), where the main input has no axis of that name.
        others = {k: v for k, v in side_inputs.items() if k != AXIS_SIZES}
        for leaf in jax.tree_util.tree_leaves(others, is_leaf=nx.is_namedarray):
            if nx.is_namedarray(leaf):
                for name, size in leaf.named_shape.items():
                    sizes.setdefault(name, size)
        return self.body(x, **{**side_inputs, AXIS_SIZES: tuple(sizes.items())})

    def __treescope_repr__(self, path: str | None, subtree_renderer: Any) -> Any:
        from treescope import repr_lib

        return repr_lib.render_object_constructor(
            object_type=type(self),
            attributes={"original": getattr(self.template, "class_name", None), "body": self.body},
            path=path,
            subtree_renderer=subtree_renderer,
            roundtrippable=False,
        )
