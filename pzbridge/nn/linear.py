"""Linear maps over named axes: ``Linear``, ``AddBias`` and ``Affine``.

``Linear`` contracts its input over ``in_axis_names`` with a weight named
array and produces ``out_axis_names``; every other named axis of the input
passes through (batch, sequence, ...) and axes the weight shares with the
input without contracting them are *parallel* (one independent map per
head, say). The weight may store its axes in any order: lifted weights keep
the original framework's buffer (``(out, in)`` for Equinox, ``(in, out)``
for NNX) and are never transposed or copied.

When an output name equals an input name (``features -> features``) the
weight stores that output axis as ``features_out`` and the result is renamed
back, so the weight's named shape is always unambiguous.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> dense = Affine.from_config("dense", jax.random.key(0), {"features": 3}, {"features": 5})
    >>> y = dense(pzb.nx.wrap(jnp.ones((2, 3)), "batch", "features"))
    >>> dict(y.named_shape)
    {'batch': 2, 'features': 5}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.combinators import Sequential
from pzbridge.nn.contraction import contract
from pzbridge.nn.initializers import constant, make_parameter, variance_scaling
from pzbridge.nn.layer import Layer

OUT_SUFFIX = "_out"


def weight_output_name(name: str, in_axis_names: tuple[str, ...]) -> str:
    """The name an output axis has inside the weight (suffixed if it clashes).

    Example:
        >>> weight_output_name("features", ("features",)), weight_output_name("heads", ("features",))
        ('features_out', 'heads')
    """
    return name + OUT_SUFFIX if name in in_axis_names else name


def _check_axis_groups(name: str, groups: Mapping[str, Mapping[str, int]], rename: bool) -> None:
    """One axis name may appear in one group only (except an output sharing an input's name, when renamed)."""
    seen: dict[str, str] = {}
    for group, axes in groups.items():
        for axis in axes:
            if axis in seen and not (rename and {seen[axis], group} == {"input_axes", "output_axes"}):
                if {seen[axis], group} == {"input_axes", "output_axes"}:
                    raise NamedAxisError(
                        f"Linear {name!r}: output axis {axis!r} is also an input axis and "
                        "rename_outputs_if_necessary=False. Fix: give the output another name, or allow the "
                        f"rename (the weight then stores it as {axis + OUT_SUFFIX!r})."
                    )
                raise NamedAxisError(
                    f"Linear {name!r}: axis {axis!r} is listed in both {seen[axis]} and {group}. "
                    "Fix: list each axis in one group."
                )
            seen.setdefault(axis, group)


@pytree_dataclass
class Linear(Layer):
    """A linear map contracting ``in_axis_names`` into ``out_axis_names``.

    Attributes:
      weights: A ``Parameter`` (or frozen value / slot) holding a NamedArray
        with the input axes, the output axes (suffixed ``_out`` where they
        clash with an input name) and any parallel axes.
      in_axis_names: Axes summed over (static).
      out_axis_names: Axes produced, as seen by the next layer (static).

    Example:
        >>> w = pzb.Parameter(pzb.nx.wrap(jnp.eye(2), "features_out", "features"), "w")
        >>> Linear(w, ("features",), ("features",))(pzb.nx.wrap(jnp.array([1.0, 2.0]), "features")).unwrap("features")
        Array([1., 2.], dtype=float32)
    """

    weights: Any
    in_axis_names: tuple[str, ...] = static_field()
    out_axis_names: tuple[str, ...] = static_field()

    def __post_init__(self) -> None:
        object.__setattr__(self, "in_axis_names", tuple(self.in_axis_names))
        object.__setattr__(self, "out_axis_names", tuple(self.out_axis_names))

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArray:
        weights = self.weights.value
        self._check_input(x, weights)
        return contract([x, weights], self.in_axis_names, self._output_rename())

    def _check_input(self, x: nx.NamedArrayBase, weights: nx.NamedArrayBase) -> None:
        """Raises a ``NamedAxisError`` naming the layer if ``x`` cannot be contracted with ``weights``."""
        missing = [name for name in self.in_axis_names if name not in x.named_shape]
        if missing:
            raise NamedAxisError(
                f"Linear {self._label()}: input lacks axes {missing} (expects {list(self.in_axis_names)} among "
                f"its named axes; found named shape {dict(x.named_shape)}). "
                "Fix: tag the input, e.g. pzb.nx.wrap(x, 'batch', 'features'), or rename its axes."
            )
        wrong = {n: (x.named_shape[n], weights.named_shape[n]) for n in self.in_axis_names
                 if n in weights.named_shape and x.named_shape[n] != weights.named_shape[n]}
        if wrong:
            raise NamedAxisError(
                f"Linear {self._label()}: input axis sizes do not match the weights' (input, weights): {wrong} "
                f"(input named shape {dict(x.named_shape)}, weights {dict(weights.named_shape)}). "
                "Fix: feed an input with those sizes, or rebuild the layer for the input's sizes."
            )

    def _output_rename(self) -> dict[str, str]:
        """Maps each output axis's name inside the weight to the name the layer produces."""
        return {weight_output_name(n, self.in_axis_names): n for n in self.out_axis_names}

    def _label(self) -> str:
        return repr(getattr(self.weights, "label", "?"))

    @classmethod
    def from_config(
        cls,
        name: str,
        init_base_rng: jax.Array | None,
        input_axes: Mapping[str, int],
        output_axes: Mapping[str, int],
        parallel_axes: Mapping[str, int] | None = None,
        initializer: Callable[..., nx.NamedArray] = variance_scaling,
        dtype: Any = jnp.float32,
        *,
        parallel_broadcast_axes: Mapping[str, int] | None = None,
        rename_outputs_if_necessary: bool = True,
    ) -> Linear:
        """Builds a Linear layer with a deterministically initialised weight.

        Args:
          name: Layer name; the weight is labelled ``f"{name}.weights"``.
          init_base_rng: Base key, or None for a ``ParameterSlot``.
          input_axes: Names and sizes contracted over.
          output_axes: Names and sizes produced.
          parallel_axes: Names and sizes mapped independently (e.g. heads);
            the input has them.
          initializer: ``f(key, named_shape, fan_in_axes, dtype)``.
          dtype: Weight dtype.
          parallel_broadcast_axes: Names and sizes of independent maps the
            input does *not* have: the weight carries them and the output
            gains them (one projection per entry, e.g. per head from a shared
            input).
          rename_outputs_if_necessary: Store an output axis that has an input
            axis's name as ``name + "_out"`` inside the weight and rename it
            back (default). With False, such a clash is an error.

        Returns:
          The layer.

        Raises:
          NamedAxisError: If an axis is listed twice across the axis groups,
            or an output name clashes with an input name and
            ``rename_outputs_if_necessary`` is False.

        Example:
            >>> Linear.from_config("q", None, {"features": 4}, {"heads": 2, "projection": 3}).weights
            ParameterSlot(label='q.weights')
            >>> q = Linear.from_config("q", jax.random.key(0), {"features": 4}, {"projection": 3},
            ...                        parallel_broadcast_axes={"heads": 2})
            >>> sorted(q(pzb.nx.ones({"seq": 5, "features": 4})).named_shape.items())
            [('heads', 2), ('projection', 3), ('seq', 5)]
        """
        in_names = tuple(input_axes)
        groups = {"input_axes": dict(input_axes), "output_axes": dict(output_axes),
                  "parallel_axes": dict(parallel_axes or {}), "parallel_broadcast_axes": dict(parallel_broadcast_axes or {})}
        _check_axis_groups(name, groups, rename_outputs_if_necessary)
        weight_shape = dict(input_axes)
        weight_shape.update({weight_output_name(n, in_names): s for n, s in output_axes.items()})
        weight_shape.update(groups["parallel_axes"])
        weight_shape.update(groups["parallel_broadcast_axes"])
        weights = make_parameter(
            f"{name}.weights", init_base_rng, lambda key: initializer(key, weight_shape, in_names, dtype)
        )
        return cls(weights, in_names, tuple(output_axes))


@pytree_dataclass
class AddBias(Layer):
    """Adds a learned bias, broadcast by name over every other axis.

    Attributes:
      bias: A ``Parameter`` (or frozen value / slot) holding a NamedArray.

    Example:
        >>> b = pzb.Parameter(pzb.nx.wrap(jnp.array([1.0, 2.0]), "features"), "b")
        >>> AddBias(b)(pzb.nx.zeros({"batch": 1, "features": 2})).untag("batch", "features").unwrap()
        Array([[1., 2.]], dtype=float32)
    """

    bias: Any

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        return x + self.bias.value

    @classmethod
    def from_config(
        cls,
        name: str,
        init_base_rng: jax.Array | None,
        biased_axes: Mapping[str, int],
        dtype: Any = jnp.float32,
        *,
        new_output_axes: Mapping[str, int] | None = None,
    ) -> AddBias:
        """Builds a zero-initialised bias labelled ``f"{name}.bias"``.

        Args:
          name: Layer name.
          init_base_rng: Base key, or None for a ``ParameterSlot``.
          biased_axes: Axes of the input the bias varies along.
          dtype: Bias dtype.
          new_output_axes: Axes the input lacks; the bias carries them, so
            the output gains them (broadcast by name).

        Raises:
          NamedAxisError: If an axis is in both ``biased_axes`` and ``new_output_axes``.

        Example:
            >>> AddBias.from_config("b", jax.random.key(0), {"features": 3}).bias.value.named_shape["features"]
            3
            >>> b = AddBias.from_config("b", jax.random.key(0), {"features": 3}, new_output_axes={"heads": 2})
            >>> sorted(b(pzb.nx.ones({"features": 3})).named_shape.items())
            [('features', 3), ('heads', 2)]
        """
        new_axes = dict(new_output_axes or {})
        both = sorted(set(new_axes) & set(biased_axes))
        if both:
            raise NamedAxisError(
                f"AddBias {name!r}: axes {both} are in both biased_axes and new_output_axes. "
                "Fix: list an axis the input has in biased_axes, a new one in new_output_axes."
            )
        shape = {**dict(biased_axes), **new_axes}
        return cls(make_parameter(f"{name}.bias", init_base_rng, lambda _: constant(shape, 0.0, dtype)))


@pytree_dataclass
class Affine(Sequential):
    """``Linear`` followed by ``AddBias`` (a named ``Sequential`` group).

    Example:
        >>> a = Affine.from_config("a", jax.random.key(0), {"features": 2}, {"features": 3})
        >>> [type(layer).__name__ for layer in a.sublayers]
        ['Linear', 'AddBias']
    """

    @classmethod
    def from_config(
        cls,
        name: str,
        init_base_rng: jax.Array | None,
        input_axes: Mapping[str, int],
        output_axes: Mapping[str, int],
        parallel_axes: Mapping[str, int] | None = None,
        initializer: Callable[..., nx.NamedArray] = variance_scaling,
        dtype: Any = jnp.float32,
        *,
        parallel_broadcast_axes: Mapping[str, int] | None = None,
        rename_outputs_if_necessary: bool = True,
    ) -> Affine:
        """Builds ``Linear`` (labelled ``f"{name}.weights"``) and ``AddBias`` (``f"{name}.bias"``).

        The options are :meth:`Linear.from_config`'s; the bias spans the
        output, parallel and parallel-broadcast axes.

        Example:
            >>> Affine.from_config("a", None, {"features": 2}, {"features": 3}).sublayers[1].bias
            ParameterSlot(label='a.bias')
        """
        linear = Linear.from_config(name, init_base_rng, input_axes, output_axes, parallel_axes, initializer, dtype,
                                    parallel_broadcast_axes=parallel_broadcast_axes,
                                    rename_outputs_if_necessary=rename_outputs_if_necessary)
        biased = {**dict(output_axes), **dict(parallel_axes or {}), **dict(parallel_broadcast_axes or {})}
        bias = AddBias.from_config(name, init_base_rng, biased, dtype)
        return cls([linear, bias])
