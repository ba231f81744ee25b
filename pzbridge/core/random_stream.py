"""A stream of random keys whose position is model state.

Layers that need randomness (dropout, sampling) take a :class:`RandomStream`
and call :meth:`RandomStream.next_key`. The stream is a struct: its
``base_key`` is an ordinary array child and its position is an unsigned
counter held in a :class:`~pzbridge.core.variables.StateVariable`. Key *n*
is ``fold_in(base_key, n)``, so a stream is reproducible from its base key,
and because the counter is a state variable it advances through
``variable_jit`` and comes back as new state from ``stateless_call`` like any
other state.

Design choices: ``fork(label)`` derives an independent child *stream* (its
own counter, its own label — labels must stay unique in a model);
``split(n)`` returns ``n`` keys at once (one step of the stream), for
``jax.vmap``-ed code that needs a key per example.

Example:
    >>> import jax
    >>> stream = RandomStream.from_base_key(jax.random.key(0))
    >>> k0, k1 = stream.next_key(), stream.next_key()
    >>> bool((jax.random.key_data(k0) != jax.random.key_data(k1)).any()), int(stream.offset.value)
    (True, 2)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from pzbridge.core.errors import StructError, VariableError
from pzbridge.core.struct import Struct, pytree_dataclass
from pzbridge.core.variables_kinds import StateVariable


def _is_key(key: Any) -> bool:
    dtype = getattr(key, "dtype", None)
    if dtype is None:
        return False
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return True
    return dtype == jnp.uint32 and getattr(key, "ndim", 0) >= 1


@pytree_dataclass
class RandomStream(Struct):
    """A reproducible sequence of PRNG keys with a state-variable counter.

    Attributes:
      base_key: A new-style typed key (``jax.random.key``) or a raw ``uint32``
        key (``jax.random.PRNGKey``); fixed for the life of the stream.
      offset: A :class:`StateVariable` holding the number of keys drawn
        (a ``uint32`` scalar).

    Raises:
      StructError: If ``base_key`` is not a PRNG key.

    Example:
        >>> import jax
        >>> s = RandomStream.from_base_key(jax.random.PRNGKey(1), label="dropout_rng")
        >>> s.next_key().shape, s.offset.label
        ((2,), 'dropout_rng')
    """

    base_key: jax.Array
    offset: Any

    def __post_init__(self) -> None:
        if not _is_key(self.base_key):
            raise StructError(
                f"RandomStream.base_key must be a JAX PRNG key, found {type(self.base_key).__name__} "
                f"with dtype {getattr(self.base_key, 'dtype', None)} and shape "
                f"{getattr(self.base_key, 'shape', None)}. Fix: pass `jax.random.key(seed)` "
                "(or a raw uint32 key from `jax.random.PRNGKey(seed)`)."
            )

    @classmethod
    def from_base_key(cls, base_key: jax.Array, label: str = "random_stream") -> RandomStream:
        """Starts a stream at offset 0.

        Args:
          base_key: A typed or raw ``uint32`` PRNG key.
          label: The label of the counter's state variable (unique in a model).

        Returns:
          A new stream with its own counter variable.

        Example:
            >>> import jax
            >>> int(RandomStream.from_base_key(jax.random.key(0)).offset.value)
            0
        """
        return cls(base_key, StateVariable(jnp.zeros((), jnp.uint32), label=label))

    def _advance(self) -> jax.Array:
        offset = self.offset
        if not isinstance(offset, StateVariable):
            raise VariableError(
                f"RandomStream '{getattr(offset, 'label', '?')}' cannot advance: its offset is a "
                f"{type(offset).__name__}, not a mutable StateVariable. Fix: bind it with "
                "`bind_variables(..., unfreeze_as_copy=True)` or call the model via "
                "`stateless_call` / `variable_jit`."
            )
        current = offset.value
        offset.value = current + jnp.uint32(1)
        return current

    def next_key(self) -> jax.Array:
        """Returns ``fold_in(base_key, offset)`` and advances the offset by one.

        Raises:
          VariableError: If the offset is frozen or unbound.

        Example:
            >>> import jax
            >>> s = RandomStream.from_base_key(jax.random.key(3))
            >>> k = s.next_key()
            >>> bool(jax.random.key_data(k).tolist() == jax.random.key_data(jax.random.fold_in(jax.random.key(3), 0)).tolist())
            True
        """
        return jax.random.fold_in(self.base_key, self._advance())

    def split(self, n: int) -> jax.Array:
        """Returns ``n`` keys (one step of the stream), e.g. one per example.

        Args:
          n: The number of keys.

        Returns:
          ``jax.random.split(next_key(), n)``.

        Example:
            >>> import jax
            >>> RandomStream.from_base_key(jax.random.key(0)).split(4).shape
            (4,)
        """
        return jax.random.split(self.next_key(), n)

    def fork(self, label: str) -> RandomStream:
        """Returns an independent stream based on the next key (one step of this one).

        Args:
          label: The label of the new stream's counter (must differ from this one's).

        Returns:
          A new stream starting at offset 0.

        Example:
            >>> import jax
            >>> parent = RandomStream.from_base_key(jax.random.key(0), label="a")
            >>> child = parent.fork("b")
            >>> child.offset.label, int(parent.offset.value)
            ('b', 1)
        """
        return RandomStream.from_base_key(self.next_key(), label=label)
