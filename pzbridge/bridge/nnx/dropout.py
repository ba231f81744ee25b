"""Flax NNX ``Dropout`` rule: the layer's ``RngStream`` becomes a ``RandomStream``.

An ``nnx.Dropout`` built with ``rngs`` owns a forked ``RngStream``: a key
(``RngKey``) and a counter (``RngCount``); each call draws
``fold_in(key, count)`` and increments the count. A pzbridge
:class:`~pzbridge.RandomStream` draws exactly the same keys
(``fold_in(base_key, offset)``), so the stream lifts to one whose
``base_key`` is the very same key array and whose ``offset`` is a
``StateVariable`` lifted from the ``RngCount`` Variable. Lowering builds a
new ``RngStream`` with the same key, the (possibly advanced) count and the
original Variable metadata (``tag``), so masks continue where they left off.

The mask is drawn over NNX's layout (positional batch axes first, then the
named axes in their data order; the input is relaid out that way when it is
not), so the same key gives the same mask bit for bit. The NNX call
argument ``deterministic`` is accepted as a side input (pzbridge's ``train``
wins). Kept ``Foreign``: ``broadcast_dims`` (positional dims have no name).

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import pzbridge as pzb
    >>> drop = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=3))
    >>> lifted = pzb.lift(drop)
    >>> x = jnp.ones((2, 4))
    >>> bool(jnp.all(lifted.positional(x) == nnx.clone(drop)(x)))
    True
    >>> int(lifted.body.random_stream.offset.value)  # the lifted counter advanced
    1
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.lifted import CallingConvention
from pzbridge.bridge.naming import AxisNaming
from pzbridge.bridge.nnx.adapter import NnxAdapter
from pzbridge.bridge.nnx.statics import NnxStatics, build_module, has_data
from pzbridge.bridge.nnx.traversal import lift_foreign, nnx_rule
from pzbridge.bridge.nnx.variables import lift_variable, nnx_variable, variable_metadata
from pzbridge.core import named_axes as nx
from pzbridge.core.random_stream import RandomStream
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.dropout import Dropout


@pytree_dataclass
class NnxDropout(Dropout):
    """``nnx.Dropout`` lifted: a pzbridge ``Dropout`` plus what rebuilds the NNX stream.

    Attributes:
      config: The Dropout module's statics (static).
      stream_config: ``(RngStream statics, RngKey metadata items)`` (static;
        None when the module holds no stream).

    Example:
        >>> NnxDropout(0.1, None, deterministic=True).stream_config is None
        True
    """

    config: Any = static_field(default=None)
    stream_config: Any = static_field(default=None)

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        flag = side_inputs.get("deterministic")
        if flag is not None and side_inputs.get("train") is None:
            side_inputs = {**side_inputs, "train": not flag}
        train = side_inputs.get("train")
        if nx.is_namedarray(x) and not (self.deterministic if train is None else not train):
            # NNX draws the mask over its positional layout: batch axes first, then the trailing
            # named axes (in their relative data order). Lay the input out that way so the same
            # key gives the same mask.
            x = x.with_positional_prefix()
        return super().__call__(x, **side_inputs)


def _lift_stream(stream: nnx.RngStream, ctx: LiftContext) -> tuple[RandomStream, Any]:
    key = ("nnx-stream", id(stream))
    done = ctx.shared.by_identity.get(key)
    if done is None:
        offset = lift_variable(stream.count, ctx.child("count"))
        lifted = RandomStream(stream.key.get_raw_value(), offset)
        done = (lifted, (NnxStatics.of(stream), tuple(variable_metadata(stream.key).items())))
        ctx.shared.by_identity[key] = done
        ctx.shared.keep_alive.append(stream)
    return done


def _lower_stream(stream: RandomStream, stream_config: Any, ctx: LowerContext) -> nnx.RngStream:
    statics, key_items = stream_config

    def make() -> nnx.RngStream:
        metadata = dict(key_items)
        key_type = metadata.pop("nnx_type")
        key = key_type.from_metadata(stream.base_key, metadata)
        count = nnx_variable(stream.offset, ctx.child("count"))
        return build_module(nnx.RngStream, statics, {"key": key, "count": count})

    return ctx.cached(stream, make)


@nnx_rule(source=nnx.Dropout, lifted=(NnxDropout,))
class DropoutRule:
    """``nnx.Dropout`` <-> ``NnxDropout``; ``rngs`` (``RngStream``) <-> ``RandomStream``.

    ``rate`` and ``deterministic`` (``model.eval()``) round-trip through the
    lifted fields. Acts elementwise: names pass through it in a sequence.
    """

    elementwise = True

    def _supported(self, module: nnx.Dropout) -> bool:
        rngs = module.rngs
        return (has_data(module, ("rngs",)) and not tuple(module.broadcast_dims)
                and module.deterministic is not None
                and (rngs is None or (isinstance(rngs, nnx.RngStream) and has_data(rngs, ("key", "count")))))

    def lift(self, module: nnx.Dropout, ctx: LiftContext) -> Any:
        if not self._supported(module):
            return lift_foreign(module, ctx)
        stream, stream_config = (None, None) if module.rngs is None else _lift_stream(module.rngs, ctx.child("rngs"))
        return NnxDropout(module.rate, stream, deterministic=bool(module.deterministic),
                          config=NnxStatics.of(module), stream_config=stream_config)

    def convention(self, module: nnx.Dropout, naming: AxisNaming) -> CallingConvention | None:
        return CallingConvention(((),), ()) if self._supported(module) else None

    def lower(self, layer: NnxDropout, ctx: LowerContext) -> Any:
        stream = layer.random_stream
        if layer.config is None or layer.broadcast_axes or (stream is not None and layer.stream_config is None):
            return NnxAdapter.wrap(layer, ctx)
        rngs = None if stream is None else _lower_stream(stream, layer.stream_config, ctx.child("rngs"))
        config = layer.config.replace(rate=layer.rate, deterministic=layer.deterministic)
        return build_module(nnx.Dropout, config, {"rngs": rngs})


def stream_keys_equal(a: nnx.RngStream, b: nnx.RngStream) -> bool:
    """True if two NNX streams have the same key data and count (test helper).

    Example:
        >>> s = nnx.Rngs(0).params
        >>> stream_keys_equal(s, nnx.clone(s))
        True
    """
    same_key = bool((jax.random.key_data(a.key.get_raw_value()) == jax.random.key_data(b.key.get_raw_value())).all())
    return same_key and bool(a.count.get_raw_value() == b.count.get_raw_value())
