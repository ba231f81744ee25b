"""Equinox ``Dropout``, both directions side by side.

``eqx.nn.Dropout`` lifts to :class:`EqxDropout`, a pzbridge ``Dropout`` that
draws its mask exactly as Equinox does (same key use, same ``inference`` and
``p`` leaves), so a lifted model in training mode reproduces the original's
random masks bit for bit.

Example:
    >>> import jax, jax.numpy as jnp, equinox as eqx
    >>> import pzbridge as pzb
    >>> drop = eqx.nn.Dropout(0.5)
    >>> x, key = jnp.ones(6), jax.random.key(0)
    >>> bool(jnp.all(pzb.lift(drop).positional(x, key=key) == drop(x, key=key)))
    True
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.equinox.traversal import (
    EqxOrigin,
    equinox_rule,
    lift_foreign,
    origin_of,
    rebuild_from_origin,
)
from pzbridge.core import named_axes as nx
from pzbridge.core.errors import PzbridgeError
from pzbridge.core.named_axes_core import make_named
from pzbridge.core.random_stream import RandomStream
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.contraction import data_layout
from pzbridge.nn.dropout import Dropout


def _eqx_dropout(data: jax.Array, key: jax.Array, rate: float) -> jax.Array:
    # Equinox's formula exactly: bernoulli(key, q, shape), then where(mask, x / q, 0).
    q = 1 - jax.lax.stop_gradient(rate)
    mask = jax.random.bernoulli(key, q, data.shape)
    return jnp.where(mask, data / q, 0)


@pytree_dataclass
class EqxDropout(Dropout):
    """``eqx.nn.Dropout`` lifted: a :class:`~pzbridge.nn.dropout.Dropout` that also takes Equinox's ``key``.

    The random key comes from a ``key=`` side input (as Equinox's ``key``) or
    a ``random_stream=`` side input (its next key). ``inference=`` (Equinox)
    or ``train=`` (pzbridge) override the static ``deterministic`` flag.

    The mask is drawn over ``unbatched_axes`` (the axes the original module
    saw) with Equinox's formula and repeated over every other axis, which is
    what ``jax.vmap`` of the original with one shared key does; with
    ``split_axis`` the key is first split along that axis (Equinox attention
    splits it per head). When ``unbatched_axes`` is None one mask spans the
    input's stored layout (for an input the original saw whole, Equinox's
    very mask).

    Attributes:
      unbatched_axes: Names the mask is drawn over, or None for all (static).
      split_axis: Name along which the key is split, or None (static).
      origin: The original class and static fields (static).

    Example:
        >>> drop = EqxDropout(0.5, None, deterministic=False)
        >>> y = drop(nx.ones({"features": 1000}), key=jax.random.key(0))
        >>> sorted(set(y.unwrap("features").tolist()))
        [0.0, 2.0]
    """

    unbatched_axes: tuple[str, ...] | None = static_field(default=None)
    split_axis: str | None = static_field(default=None)
    origin: EqxOrigin | None = static_field(default=None)

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        inference = side_inputs.get("inference")
        train = side_inputs.get("train")
        deterministic = self.deterministic
        if inference is not None:
            deterministic = bool(inference)
        elif train is not None:
            deterministic = not train
        if deterministic or self.rate == 0:
            return x
        key = side_inputs.get("key")
        if key is None and isinstance(side_inputs.get("random_stream"), RandomStream):
            key = side_inputs["random_stream"].next_key()
        if key is None:
            raise PzbridgeError(
                f"EqxDropout(rate={self.rate}): dropping needs a key: pass key=jax.random.key(...) (as for the "
                "Equinox module), random_stream=pzb.RandomStream.from_base_key(key), or inference=True."
            )
        if self.unbatched_axes is None:
            # One mask over the stored layout: for an input the original saw whole, Equinox's very mask.
            data, positional, names = data_layout(x)
            return make_named(_eqx_dropout(data, key, self.rate), positional, names)
        axes = self.unbatched_axes
        if self.split_axis is None:
            return nx.nmap(lambda d: _eqx_dropout(d, key, self.rate))(x.untag(*axes)).tag(*axes)
        keys = nx.wrap(jax.random.split(key, x.named_shape[self.split_axis]), self.split_axis)
        return nx.nmap(lambda d, k: _eqx_dropout(d, k, self.rate))(x.untag(*axes), keys).tag(*axes)


@equinox_rule(source=eqx.nn.Dropout, lifted=(EqxDropout, Dropout))
class DropoutRule:
    """``eqx.nn.Dropout(p, inference)`` <-> ``EqxDropout(rate=p, deterministic=inference)``.

    The Equinox call-time ``key`` becomes the ``key`` side input (or a
    ``random_stream`` side input); a generic ``Dropout`` lowers to
    ``eqx.nn.Dropout`` with its rate and flag (its held stream is dropped:
    Equinox dropout takes a key at call time).
    """

    def lift(self, module: eqx.nn.Dropout, ctx: LiftContext) -> Any:
        if not isinstance(module.p, (int, float)) or not isinstance(module.inference, bool):
            return lift_foreign(module, ctx)
        return EqxDropout(module.p, None, deterministic=module.inference, origin=origin_of(module))

    def lower(self, layer: Dropout, ctx: LowerContext) -> Any:
        return rebuild_from_origin(getattr(layer, "origin", None), eqx.nn.Dropout, p=layer.rate,
                                   inference=layer.deterministic)
