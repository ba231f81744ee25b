"""Training only the LoRA adapters of a lowered Equinox model, shared by the tracing tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import optax

from pzbridge.bridge.equinox import EquinoxAdapter, LoRALinear, lora_filter
from pzbridge.toolshed.lora import is_lora_parameter


def lora_trainable(tree: Any) -> Any:
    """The ``eqx.partition`` filter of a lowered, LoRA-edited model: True exactly at the LoRA factors."""

    def mark(node: Any) -> Any:
        if isinstance(node, EquinoxAdapter):
            falses = jax.tree_util.tree_map(lambda _: False, node)
            flags = tuple(jax.tree_util.tree_map(lambda _, v=v: is_lora_parameter(v), v) for v in node.values)
            return eqx.tree_at(lambda n: n.values, falses, flags)
        if isinstance(node, LoRALinear):
            return lora_filter(node)
        return jax.tree_util.tree_map(lambda _: False, node)

    return jax.tree_util.tree_map(mark, tree, is_leaf=lambda n: isinstance(n, (EquinoxAdapter, LoRALinear)))


def train_adapters(model: Any, loss_fn: Callable[[Any], jax.Array], steps: int = 20) -> tuple[Any, list[float]]:
    """``steps`` of Adam on the LoRA factors of ``model`` (eqx.partition + filter_value_and_grad + optax)."""
    params, static = eqx.partition(model, lora_trainable(model))
    assert jax.tree_util.tree_leaves(params), "no LoRA adapter to train"
    opt = optax.adam(1e-2)
    state = opt.init(params)

    @eqx.filter_jit
    def step(params: Any, state: Any) -> tuple[Any, Any, jax.Array]:
        loss, grads = eqx.filter_value_and_grad(lambda p: loss_fn(eqx.combine(p, static)))(params)
        updates, state = opt.update(grads, state)
        return eqx.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(steps):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    return eqx.combine(params, static), losses
