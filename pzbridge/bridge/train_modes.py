"""The train / eval switches of a framework, applied to the layers an adapter runs; keys for its random streams.

NNX switches a model with ``model.eval()`` / ``model.train()`` (they set
``use_running_average`` and ``deterministic`` on every module that has
them); Equinox with ``eqx.nn.inference_mode(model)`` (it sets every
``inference`` field). An adapter holds lifted layers, so it carries the
switch itself and applies it to the BatchNorms and Dropouts it runs. Equinox
also takes randomness per call (``key=``): an adapter given a key draws its
random streams from it.

Example:
    >>> import pzbridge as pzb
    >>> drop = pzb.nn.Dropout(0.5, None)
    >>> with_modes(drop, deterministic=True).deterministic
    True
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from pzbridge.core.random_stream import RandomStream
from pzbridge.core.selectors import select
from pzbridge.nn.dropout import Dropout
from pzbridge.nn.normalization import BatchNorm

__all__ = ["evaluating", "keyed_streams", "switchable", "with_modes"]


def with_modes(layer: Any, use_running_average: bool | None = None, deterministic: bool | None = None) -> Any:
    """``layer`` with every BatchNorm's ``use_running_average`` / every Dropout's ``deterministic`` set (None: kept).

    Example:
        >>> import jax.numpy as jnp
        >>> import pzbridge as pzb
        >>> bn = pzb.nn.BatchNorm.from_config("bn", jax.random.key(0), {"features": 2})
        >>> with_modes(pzb.nn.Sequential([bn]), use_running_average=True).sublayers[0].use_running_average
        True
    """
    if use_running_average is not None:
        layer = select(layer).at_instances_of(BatchNorm).apply(
            lambda norm: dataclasses.replace(norm, use_running_average=use_running_average))
    if deterministic is not None:
        layer = select(layer).at_instances_of(Dropout).apply(
            lambda drop: dataclasses.replace(drop, deterministic=deterministic))
    return layer


def switchable(layer: Any) -> bool:
    """Whether ``layer`` holds a BatchNorm or a Dropout (something a train / eval switch changes).

    Example:
        >>> import pzbridge as pzb
        >>> switchable(pzb.nn.Dropout(0.5, None)), switchable(pzb.nn.Identity())
        (True, False)
    """
    return bool(select(layer).at_instances_of((BatchNorm, Dropout)).count())


def evaluating(layer: Any) -> bool:
    """Whether every BatchNorm and Dropout in ``layer`` is in evaluation mode (False when it has none).

    Example:
        >>> import pzbridge as pzb
        >>> evaluating(pzb.nn.Dropout(0.5, None, deterministic=True)), evaluating(pzb.nn.Identity())
        (True, False)
    """
    norms = select(layer).at_instances_of(BatchNorm).get_sequence()
    drops = select(layer).at_instances_of(Dropout).get_sequence()
    if not norms and not drops:
        return False
    return all(n.use_running_average for n in norms) and all(d.deterministic for d in drops)


def keyed_streams(layer: Any, key: jax.Array) -> Any:
    """``layer`` whose random streams draw from ``key`` (stream ``i`` from ``fold_in(key, i)``), as Equinox's ``key=``.

    Example:
        >>> import pzbridge as pzb
        >>> stream = pzb.RandomStream.from_base_key(jax.random.key(0))
        >>> drop = pzb.nn.Dropout(0.5, stream)
        >>> keyed = keyed_streams(drop, jax.random.key(7))
        >>> bool((jax.random.key_data(keyed.random_stream.base_key) != jax.random.key_data(stream.base_key)).any())
        True
    """
    typed = jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key)

    def rekeyed(index: int, stream: RandomStream) -> RandomStream:
        new = jax.random.fold_in(key, index)
        wants_typed = jax.dtypes.issubdtype(stream.base_key.dtype, jax.dtypes.prng_key)
        if wants_typed and not typed:
            new = jax.random.wrap_key_data(new)
        elif typed and not wants_typed:
            new = jax.random.key_data(new)
        return dataclasses.replace(stream, base_key=new)

    return select(layer).at_instances_of(RandomStream).apply_with_selected_index(rekeyed)
