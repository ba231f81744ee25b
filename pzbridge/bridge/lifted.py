"""The root of a lifted model: the body plus the original calling convention.

Lifted layers speak named arrays; the original module spoke positional
arrays (unbatched for Equinox, batched for NNX). ``LiftedModel`` records, for
each positional argument and output, which names its trailing axes get, so
``lifted.positional(x)`` accepts exactly what the original took and returns
what it returned, while ``lifted(named_x)`` is the named form (extra named
axes, such as ``batch``, pass through: no vmap).

Example:
    >>> import jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> model = LiftedModel(pzb.nn.Identity(), "toy", CallingConvention((("features",),), ("features",)))
    >>> model.positional(jnp.ones(3)).shape
    (3,)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax

from pzbridge.bridge.call_errors import explain_call_failure
from pzbridge.bridge.context import recursion_headroom
from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError, PzbridgeError
from pzbridge.core.struct import Struct, pytree_dataclass, static_field
from pzbridge.nn.foreign import Foreign
from pzbridge.nn.layer import Layer


@pytree_dataclass
class CallingConvention(Struct):
    """Names for the trailing axes of each positional input and of the output.

    ``inputs[i]`` names the last ``len(inputs[i])`` axes of positional
    argument ``i``; leading axes stay positional. ``output`` names the output's
    trailing axes (``None`` when the output is not one array, e.g. a tuple:
    then outputs are returned as the body produced them, unwrapped leaf-wise).

    Example:
        >>> CallingConvention((("seq", "features"),), ("seq", "features")).output
        ('seq', 'features')
    """

    inputs: tuple[tuple[str, ...], ...] = static_field(default=())
    output: tuple[str, ...] | None = static_field(default=None)
    side_names: tuple[str, ...] = static_field(default=())
    # Set on a converted model's root (an Equinox model called on a batch): array keyword arguments
    # and extra positional ones carry a leading batch axis of this name, the rest stay as the model takes them.
    batched_keywords: str = static_field(default="")

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(tuple(names) for names in self.inputs))
        if self.output is not None:
            object.__setattr__(self, "output", tuple(self.output))
        object.__setattr__(self, "side_names", tuple(self.side_names))

    def split_call(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
        """The body's input and side inputs for a positional call ``(*args, **kwargs)``.

        Positional arguments are named by :meth:`name_inputs`. With
        ``side_names`` (a traced module's extra arguments, such as a mask) the
        first argument is the input and argument ``i + 1`` becomes the side
        input ``side_names[i]``; otherwise several arguments form a tuple.

        Example:
            >>> import jax.numpy as jnp
            >>> conv = CallingConvention((("f",), ("f",)), ("f",), side_names=("mask",))
            >>> x, side = conv.split_call([jnp.ones(2), jnp.zeros(2)], {})
            >>> dict(x.named_shape), sorted(side)
            ({'f': 2}, ['mask'])
        """
        named = self.name_inputs(list(args))
        side = dict(kwargs)
        if self.batched_keywords:
            side = {k: nx.wrap(v).tag_prefix(self.batched_keywords) if _is_plain_array(v) else v
                    for k, v in side.items()}
        if self.side_names:
            side.update(zip(self.side_names, named[1:]))
            return named[0], side
        return (named[0] if len(named) == 1 else tuple(named)), side

    def name_inputs(self, args: Sequence[Any]) -> list[Any]:
        """Tags each positional argument's trailing axes.

        Example:
            >>> import jax.numpy as jnp
            >>> x, = CallingConvention((("f",),)).name_inputs([jnp.ones((2, 3))])
            >>> x.positional_shape, dict(x.named_shape)
            ((2,), {'f': 3})
        """
        named = []
        for index, arg in enumerate(args):
            names = self.inputs[index] if index < len(self.inputs) else ()
            if not names and self.batched_keywords and _is_plain_array(arg):
                named.append(nx.wrap(arg).tag_prefix(self.batched_keywords))  # An extra argument (a mask).
                continue
            if not names or not hasattr(arg, "shape"):
                named.append(nx.wrap(arg) if hasattr(arg, "shape") else arg)
                continue
            if len(arg.shape) < len(names):
                raise NamedAxisError(
                    f"positional call: argument {index} has shape {tuple(arg.shape)} but the model expects at "
                    f"least {len(names)} axes named {list(names)} (trailing). Fix: pass an array of that rank."
                )
            named.append(_tag_trailing(arg, names))
        return named

    def unname_output(self, out: Any) -> Any:
        """Turns the body's named output back into positional arrays.

        Example:
            >>> import jax.numpy as jnp
            >>> CallingConvention((), ("f",)).unname_output(nx.wrap(jnp.ones(2), "f")).shape
            (2,)
        """
        def unname(leaf: Any) -> Any:
            if not nx.is_namedarray(leaf):
                return leaf
            names = [n for n in (self.output or ()) if n in leaf.named_shape]
            remaining = [n for n in leaf.named_shape if n not in names]
            return leaf.untag(*remaining, *names).unwrap() if (names or remaining) else leaf.unwrap()

        return jax.tree_util.tree_map(unname, out, is_leaf=nx.is_namedarray)


def _is_plain_array(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype") and not nx.is_namedarray(value) and value.ndim > 0


def _tag_trailing(arg: Any, names: Sequence[str]) -> nx.NamedArrayBase:
    return name_trailing_axes(nx.wrap(arg), names)


def name_trailing_axes(x: nx.NamedArrayBase, names: Sequence[str]) -> nx.NamedArrayBase:
    """Names the last ``len(names)`` positional axes of ``x``; leading ones stay positional.

    Example:
        >>> import jax.numpy as jnp
        >>> y = name_trailing_axes(nx.wrap(jnp.ones((2, 3, 4))), ("seq", "features"))
        >>> y.positional_shape, dict(y.named_shape)
        ((2,), {'seq': 3, 'features': 4})
    """
    lead = len(x.positional_shape) - len(names)
    if lead < 0:
        raise NamedAxisError(
            f"cannot name the trailing axes {list(names)}: the array has only positional shape "
            f"{x.positional_shape} (named {dict(x.named_shape)}). Fix: check the module's input and output ranks."
        )
    temp = [f"__lead{i}" for i in range(lead)]
    # A None keeps that axis positional (a mask's size-1 heads axis between named ones), after the leading ones.
    inner = [n if n is not None else f"__inner{i}" for i, n in enumerate(names)]
    temp += [n for n, given in zip(inner, names) if given is None]
    named = x.tag(*temp[:lead], *inner)
    return named.untag(*temp) if temp else named


@pytree_dataclass
class LiftedModel(Layer):
    """A lifted model: ``body`` plus the original calling convention.

    Attributes:
      body: The lifted layer tree.
      framework: ``"equinox"`` or ``"nnx"``: where it was lifted from (static).
      convention: How positional arguments map to named axes (static).

    Example:
        >>> import jax.numpy as jnp
        >>> import pzbridge as pzb
        >>> m = LiftedModel(pzb.nn.Identity(), "toy", CallingConvention((("features",),), ("features",)))
        >>> dict(m(pzb.nx.ones({"batch": 2, "features": 3})).named_shape)
        {'batch': 2, 'features': 3}
    """

    body: Any
    framework: str = static_field()
    convention: CallingConvention = static_field(default=CallingConvention())

    @recursion_headroom()  # A call recurses once per level of nesting (see recursion_headroom).
    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        try:
            return self.body(x, **side_inputs)
        except PzbridgeError:
            raise
        except Exception as exc:  # Explained when recognised, else re-raised as it is.
            _raise_explained(self, (x,), exc, positional=False)
            raise

    @recursion_headroom()
    def positional(self, *args: Any, **kwargs: Any) -> Any:
        """Calls the model exactly as the original module was called.

        Positional arguments are named by the recorded convention, keyword
        arguments become side inputs, and the output is returned positional.

        Example:
            >>> import jax.numpy as jnp
            >>> m = LiftedModel(pzb.nn.Identity(), "toy", CallingConvention((("f",),), ("f",)))
            >>> m.positional(jnp.arange(3)).tolist()
            [0, 1, 2]
        """
        if not isinstance(self.body, Foreign):  # A Foreign root runs the original code, State and all.
            _refuse_state_argument(self.framework, args, kwargs)
        x, side = self.convention.split_call(args, kwargs)
        try:
            out = self.body(x, **side)
        except PzbridgeError:
            raise
        except Exception as exc:  # Explained when recognised, else re-raised as it is.
            _raise_explained(self, args, exc, positional=True)
            raise
        return self.convention.unname_output(out)


def _refuse_state_argument(framework: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """A clear error for ``lifted.positional(x, state)``: the lifted model holds its state itself."""
    if framework != "equinox":
        return
    import equinox as eqx  # An Equinox model was lifted: the framework is loaded.

    if any(isinstance(value, eqx.nn.State) for value in (*args, *kwargs.values())):
        raise NamedAxisError(
            "<root>: positional call: expected the data arguments only, found an eqx.nn.State. The lifted model "
            "keeps the statistics in its BatchNorms' StateVariables and updates them itself. Fix: call "
            "lifted.positional(x) (a training batch: lifted(pzb.nx.wrap(xs, 'batch', ...))); "
            "pzbridge.bridge.equinox.state.lower_with_state(lifted) gives the module and its State back."
        )


def _raise_explained(model: LiftedModel, inputs: Sequence[Any], exc: Exception, *, positional: bool) -> None:
    """Raises the pzbridge error for a recognised calling mistake (see :mod:`pzbridge.bridge.call_errors`)."""
    error = explain_call_failure(model, inputs, exc, positional=positional)
    if error is not None:
        raise error from exc
