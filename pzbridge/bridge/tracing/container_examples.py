"""Examples for the items of a stock container (``eqx.nn.Sequential``, ``nnx.Sequential``).

A container's own rule lifts its items; with an example input for the
container, each item gets the abstract value reaching it (the original items
evaluated one after another with ``jax.eval_shape``: nothing is computed), so
a custom module inside a container is traced like one at the root instead of
staying ``Foreign``.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from pzbridge.bridge.tracing.example import Example
    >>> examples = item_examples([jnp.tanh, lambda x: x[:2]], Example.of((jnp.ones(4),)), lambda f, x: f(x))
    >>> [e.args[0].shape for e in examples]
    [(4,), (4,)]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

from pzbridge.bridge.tracing.example import Example

__all__ = ["item_examples"]


def item_examples(items: Sequence[Any], example: Example | None, run_item: Callable[[Any, Any], Any]
                  ) -> list[Example | None]:
    """The example input of each item of a container called with ``example``.

    Args:
      items: The container's items, in call order.
      example: The container's example (one positional array), or None.
      run_item: ``(item, abstract_input) -> output``, called under
        ``jax.eval_shape`` (it must not change the item: NNX callers split
        and merge a copy).

    Returns:
      One :class:`Example` per item, None from the first item whose input is
      unknown (no example, several inputs, or an earlier item failing to
      evaluate: such items lift as they would without an example).
    """
    if example is None or len(example.args) != 1 or not isinstance(example.args[0], jax.ShapeDtypeStruct):
        return [None] * len(items)
    current: Any = example.args[0]
    names = example.input_names[0] if example.input_names else None
    found: list[Example | None] = []
    for item in items:
        if not isinstance(current, jax.ShapeDtypeStruct):
            found.append(None)
            continue
        found.append(Example((current,), {}, (names,) if names else ()))
        names = None  # Later items are named by their neighbours, not by the container's input.
        try:
            current = jax.eval_shape(lambda x, item=item: run_item(item, x), current)
        except Exception:  # noqa: BLE001 - an item that cannot be evaluated ends the chain; it lifts untraced
            current = None
    return found
