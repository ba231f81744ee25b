"""Dropout driven by a :class:`~pzbridge.core.random_stream.RandomStream`, and its disabled form.

Why the stream can live in two places: NNX ``Dropout`` owns its random
stream (a forked ``RngStream`` per layer) while Equinox ``Dropout`` is given
a key at call time. ``Dropout.random_stream`` holds a stream for the first
style (the stream's counter is a ``StateVariable``, so it advances through
``stateless_call`` / ``variable_jit`` like NNX's ``RngCount``); a
``random_stream=`` side input supplies one for the second style and takes
precedence, as NNX's call-time ``rngs`` do.

Train / eval: the static ``deterministic`` flag is the default; a
``train=True/False`` side input overrides it for one call (the same switch
``BatchNorm`` reads). ``DisabledDropout`` is the permanently-off form that
keeps the rate, for models edited for inference.

The mask is drawn over the input's *data layout* (with ``broadcast_axes``
at size 1), which for a lifted layer is the original framework's layout, so
the same key gives the same mask as NNX / Equinox, bit for bit.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> stream = pzb.RandomStream.from_base_key(jax.random.key(0), "dropout")
    >>> drop = Dropout(0.5, stream)
    >>> y = drop(pzb.nx.ones({"features": 1000}))
    >>> sorted(set(y.unwrap("features").tolist()))
    [0.0, 2.0]
    >>> drop(pzb.nx.ones({"features": 3}), train=False).unwrap("features")
    Array([1., 1., 1.], dtype=float32)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError, PzbridgeError
from pzbridge.core.named_axes_core import make_named
from pzbridge.core.random_stream import RandomStream
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.contraction import data_layout
from pzbridge.nn.layer import Layer


@pytree_dataclass
class Dropout(Layer):
    """Zeroes each element with probability ``rate`` and scales the rest by ``1 / (1 - rate)``.

    Attributes:
      rate: Drop probability, in ``[0, 1]`` (static).
      random_stream: The layer's own :class:`RandomStream` (NNX style), or None
        when the stream comes as a ``random_stream=`` side input (Equinox style).
      broadcast_axes: Names that share one mask value (NNX ``broadcast_dims``; static).
      deterministic: Default switch, True = no dropout (static); the
        ``train`` side input overrides it.

    Raises:
      PzbridgeError: When dropping with no stream (neither held nor passed).

    Example:
        >>> Dropout(0.1, None, deterministic=True)(pzb.nx.ones({"a": 2})).unwrap("a")
        Array([1., 1.], dtype=float32)
    """

    rate: float = static_field()
    random_stream: Any = None
    broadcast_axes: tuple[str, ...] = static_field(default=())
    deterministic: bool = static_field(default=False)

    def __post_init__(self) -> None:
        axes = (self.broadcast_axes,) if isinstance(self.broadcast_axes, str) else tuple(self.broadcast_axes)
        object.__setattr__(self, "broadcast_axes", axes)
        if not 0.0 <= float(self.rate) <= 1.0:
            raise PzbridgeError(f"Dropout: rate must be in [0, 1], found {self.rate!r}. Fix: pass a probability.")

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        train = side_inputs.get("train")
        deterministic = self.deterministic if train is None else not train
        if deterministic or self.rate == 0:
            return x
        if self.rate == 1:
            return nx.zeros_like(x)
        stream = side_inputs.get("random_stream")
        if stream is None:
            stream = self.random_stream
        if not isinstance(stream, RandomStream):
            raise PzbridgeError(
                f"Dropout(rate={self.rate}): dropping needs a RandomStream, but the layer holds "
                f"{type(self.random_stream).__name__} and no `random_stream=` side input was given. Fix: call "
                "model(x, random_stream=pzb.RandomStream.from_base_key(key)), set Dropout.random_stream, or "
                "pass train=False."
            )
        missing = [n for n in self.broadcast_axes if n not in x.named_shape]
        if missing:
            raise NamedAxisError(
                f"Dropout(rate={self.rate}): broadcast_axes {missing} are not axes of the input "
                f"(named shape {dict(x.named_shape)}). Fix: use names the input has."
            )
        data, positional, name_axes = data_layout(x)
        mask_shape = list(data.shape)
        for name in self.broadcast_axes:
            mask_shape[name_axes[name]] = 1
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(stream.next_key(), p=keep, shape=tuple(mask_shape))
        mask = jnp.broadcast_to(mask, data.shape)
        return make_named(jax.lax.select(mask, data / keep, jnp.zeros_like(data)), positional, name_axes)

    def disabled(self) -> DisabledDropout:
        """Returns the permanently-off form, keeping the rate and broadcast axes.

        Example:
            >>> Dropout(0.3).disabled()
            DisabledDropout(rate=0.3, broadcast_axes=())
        """
        return DisabledDropout(self.rate, self.broadcast_axes)


@pytree_dataclass
class DisabledDropout(Layer):
    """Dropout switched off for good: returns its input; keeps the configuration.

    Attributes:
      rate: The rate the dropout had (static; unused).
      broadcast_axes: As in :class:`Dropout` (static; unused).

    Example:
        >>> DisabledDropout(0.5)(pzb.nx.ones({"a": 2}), train=True).unwrap("a")
        Array([1., 1.], dtype=float32)
    """

    rate: float = static_field()
    broadcast_axes: tuple[str, ...] = static_field(default=())

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        return x
