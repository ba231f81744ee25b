"""Lifted forms of Flax NNX layers that need NNX-specific configuration.

Most of a lifted NNX layer is framework-neutral pzbridge vocabulary
(``pzb.nn.Linear``, ``AddBias``, ``NamedEinsum`` ...). What has no neutral
counterpart but must survive the round trip exactly is the module's static
configuration (``dtype``, ``precision``, ``dot_general``, ``promote_dtype``,
the attribute order that ``nnx.graphdef`` records). Those layers lift to a
named ``Sequential`` subclass defined here whose static ``config`` carries the
NNX statics back; selectors still reach the primitives inside
(``at_instances_of(pzb.nn.Linear)``).

NNX containers (``nnx.List``, ``nnx.Dict``) are not layers (nothing calls
them as a whole); they lift to :class:`LayerList` / :class:`LayerDict`
structs so their items stay reachable. Plain functions inside an
``nnx.Sequential`` lift to ``Elementwise`` (known activations) or
:class:`NnxFunction` (anything else, called on batched positional arrays).

This module imports no framework: the classes are plain pzbridge layers.

Example:
    >>> import jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> f = NnxFunction(lambda a: a.sum(-1), input_names=("features",))
    >>> dict(f(pzb.nx.wrap(jnp.ones((2, 3)), "batch", "features")).named_shape)
    {'batch': 2}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from pzbridge.core import named_axes as nx
from pzbridge.core.struct import Struct, pytree_dataclass, static_field
from pzbridge.nn.combinators import Sequential
from pzbridge.nn.layer import Layer


def call_batched(fn: Callable[..., Any], x: Any, kwargs: Mapping[str, Any],
                 input_names: Sequence[str] = (), output_names: Sequence[str] = ()) -> Any:
    """Calls a batched (NNX-style) function on named inputs.

    Named axes listed in ``input_names`` become the trailing positional dims
    (in that order); every other named axis becomes a leading dim, in the
    order of the first named input; positional axes stay in between. The
    output's leading dims get those batch names back and its trailing dims
    ``output_names`` (when its rank allows).

    Args:
      fn: The positional function, e.g. an NNX module.
      x: A named array, or a tuple of arguments (named arrays or anything else).
      kwargs: Keyword arguments for ``fn``.
      input_names: Names the function consumes as trailing axes.
      output_names: Names for the output's trailing axes.

    Returns:
      ``fn``'s output with every array leaf wrapped as a named array.

    Example:
        >>> import numpy as np
        >>> x = nx.wrap(np.ones((2, 3), np.float32), "batch", "features")
        >>> y = call_batched(lambda a: a.sum(-1, keepdims=True), x, {}, ("features",), ("features",))
        >>> dict(y.named_shape)
        {'batch': 2, 'features': 1}
    """
    args = x if isinstance(x, tuple) else (x,)
    first = next((a for a in args if nx.is_namedarray(a)), None)
    lead = [n for n in (first.named_shape if first is not None else ()) if n not in input_names]
    positional = []
    for arg in args:
        if not nx.is_namedarray(arg):
            positional.append(arg)
            continue
        heads = [n for n in lead if n in arg.named_shape]
        heads += [n for n in arg.named_shape if n not in heads and n not in input_names]
        tails = [n for n in input_names if n in arg.named_shape]
        arranged = arg.untag_prefix(*heads) if heads else arg
        arranged = arranged.untag(*tails) if tails else arranged
        positional.append(arranged.unwrap())
    out = fn(*positional, **kwargs)

    def name(leaf: Any) -> Any:
        if not isinstance(leaf, jax.Array):
            return leaf
        rank = leaf.ndim
        heads = list(lead) if rank >= len(lead) else []
        tails = list(output_names) if rank - len(heads) >= len(output_names) else []
        if not heads and not tails:
            return nx.wrap(leaf)
        temp = [f"__pos{i}" for i in range(rank - len(heads) - len(tails))]
        named = nx.wrap(leaf).tag(*heads, *temp, *tails)
        return named.untag(*temp) if temp else named

    return jax.tree_util.tree_map(name, out)


@pytree_dataclass
class NnxFunction(Layer):
    """A plain function from an ``nnx.Sequential`` (not known to be elementwise).

    It is called like NNX calls it: on batched positional arrays (see
    :func:`call_batched`).

    Attributes:
      fn: The function (static; compared by identity).
      input_names: Named axes it consumes, moved to the trailing dims (static).
      output_names: Names for its output's trailing dims (static).

    Example:
        >>> import jax.numpy as jnp
        >>> NnxFunction(jnp.flip)(nx.wrap(jnp.arange(3))).unwrap().tolist()
        [2, 1, 0]
    """

    fn: Callable[..., Any] = static_field()
    input_names: tuple[str, ...] = static_field(default=())
    output_names: tuple[str, ...] = static_field(default=())

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        return call_batched(self.fn, x, {}, self.input_names, self.output_names)


@pytree_dataclass
class NnxLinear(Sequential):
    """``nnx.Linear`` lifted: ``[Linear]`` or ``[Linear, AddBias]`` plus the NNX statics.

    Attributes:
      config: The original module's static attributes (static; ``None`` for
        layers created in pzbridge).

    Example:
        >>> NnxLinear([]).config is None
        True
    """

    config: Any = static_field(default=None)


@pytree_dataclass
class NnxLinearGeneral(Sequential):
    """``nnx.LinearGeneral`` lifted: ``[Linear, AddBias?]`` over several input / output axes.

    Attributes:
      config: The original module's static attributes (static).

    Example:
        >>> NnxLinearGeneral([]).sublayers
        []
    """

    config: Any = static_field(default=None)


@pytree_dataclass
class NnxEinsum(Sequential):
    """``nnx.Einsum`` lifted: ``[NamedEinsum, AddBias?]`` with one axis name per einsum letter.

    Attributes:
      config: The original module's static attributes (static).

    Example:
        >>> NnxEinsum([]).config is None
        True
    """

    config: Any = static_field(default=None)


@pytree_dataclass
class NnxSequential(Sequential):
    """``nnx.Sequential`` lifted: its layers in order (functions as ``Elementwise`` / ``NnxFunction``).

    NNX passes the previous output as the only positional argument and no
    keyword arguments, so side inputs are forwarded but unused by NNX code.

    Attributes:
      config: The original module's static attributes (static).

    Example:
        >>> NnxSequential([]).sublayers
        []
    """

    config: Any = static_field(default=None)


@pytree_dataclass
class LayerList(Struct):
    """An ``nnx.List`` lifted: a list of lifted items (layers, variables, or kept values).

    Not a layer: code calls the items, never the list. Selectors reach the
    items (``select(model).at_instances_of(LayerList)``).

    Attributes:
      items: The items in order.

    Example:
        >>> len(LayerList([1, 2]).items)
        2
    """

    items: list[Any]


@pytree_dataclass
class LayerDict(Struct):
    """An ``nnx.Dict`` lifted: a dict of lifted items by attribute name.

    Attributes:
      items: The items.

    Example:
        >>> sorted(LayerDict({"b": 1, "a": 2}).items)
        ['a', 'b']
    """

    items: dict[str, Any]
