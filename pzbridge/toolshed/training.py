"""Training lifted models with optax: a step builder, a loop, and ``Checkpointed``.

A lifted model keeps its trainable arrays in mutable ``Parameter`` objects,
so training can update them *in place*: the caller's model object is the
trained model, with no state tree to thread around. One compiled step
(:func:`build_train_step`) runs under
:func:`~pzbridge.core.variable_jit.variable_jit`: inside, the variables are
unbound to frozen values, the loss is differentiated with respect to the
trainable ones (fresh mutable copies are bound for the forward pass, so
layers that update state, such as batch statistics, work as usual), optax
computes the update, and the new values are assigned to the variables, which
``variable_jit`` writes back to the originals.

:class:`Trainer` adds the loop and a progress display (a printed line every
``log_every`` steps, or a callback). :class:`Checkpointed` is gradient
checkpointing as a combinator: its sublayer's activations are recomputed in
the backward pass (``jax.checkpoint``) instead of being stored.

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import pzbridge as pzb
    >>> from pzbridge.nn.linear import Linear
    >>> model = Linear.from_config("d", jax.random.key(0), {"features": 2}, {"features": 1})
    >>> x = pzb.nx.wrap(jnp.ones((8, 2)), "batch", "features")
    >>> def loss_fn(m, x):
    ...     return jnp.mean(m(x).unwrap("batch", "features") ** 2)
    >>> trainer = Trainer(model, loss_fn, optax.sgd(0.1))
    >>> losses = trainer.fit([(x,)] * 20, log_every=0)
    >>> bool(losses[-1] < losses[0])
    True
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import PzbridgeError
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.core.variable_jit import variable_jit
from pzbridge.core.variables import (
    LabeledVariable,
    Parameter,
    StateVariable,
    bind_variables,
    unbind_variables,
)
from pzbridge.nn.layer import Layer

Predicate = Callable[[LabeledVariable], bool]
LossFn = Callable[..., Any]


class TrainingError(PzbridgeError, ValueError):
    """A training step cannot run (no trainable parameters, a bad loss value).

    Example:
        >>> isinstance(TrainingError("no parameters"), PzbridgeError)
        True
    """


def _is_trainable(predicate: Predicate | None) -> Predicate:
    if predicate is None:
        return lambda v: isinstance(v, Parameter)
    return lambda v: isinstance(v, Parameter) and bool(predicate(v))


def _split_loss(result: Any) -> tuple[Any, Any]:
    if isinstance(result, tuple) and len(result) == 2:
        return result
    return result, None


def _check_loss(loss: Any) -> None:
    """``jax.grad`` needs one real number: say which part of the loss is wrong, and how to reduce it."""
    if nx.is_namedarray(loss):
        raise TrainingError(
            f"build_train_step: loss_fn must return a scalar loss (or (loss, aux)), expected a scalar array, found "
            f"a NamedArray with named axes {dict(loss.named_shape)} and positional shape {loss.positional_shape}. "
            "Fix: reduce it and unwrap it, e.g. jnp.mean(y.unwrap(*y.named_shape)) (or y.unwrap() when it has "
            "no axes)."
        )
    try:
        shape, dtype = jnp.shape(loss), jnp.result_type(loss)
    except TypeError:
        shape = dtype = None
    if shape is None or shape != () or not jnp.issubdtype(dtype, jnp.floating):
        found = f"shape {shape} and dtype {dtype}" if shape is not None else f"{type(loss).__name__} {loss!r:.60}"
        raise TrainingError(
            f"build_train_step: loss_fn must return a scalar loss (or (loss, aux)), expected a float array of "
            f"shape (), found {found}. Fix: reduce it to one number, e.g. jnp.mean(...) or jnp.sum(...), in "
            "floating point."
        )


def trainable_values(model: Any, trainable: Predicate | None = None) -> tuple[Any, ...]:
    """The current values of the trainable parameters, in unbinding order.

    This is the pytree optax optimizer states are built for
    (``optimizer.init(trainable_values(model))``).

    Args:
      model: A lifted model with bound ``Parameter`` objects.
      trainable: Optional predicate restricting which parameters train.

    Returns:
      A tuple of values (named arrays), one per distinct parameter.

    Example:
        >>> import jax.numpy as jnp
        >>> len(trainable_values([Parameter(jnp.ones(2), "a"), StateVariable(0, "n")]))
        1
    """
    _, variables = unbind_variables(model, _is_trainable(trainable))
    return tuple(v.value for v in variables)


def build_train_step(
    loss_fn: LossFn, optimizer: optax.GradientTransformation, trainable: Predicate | None = None
) -> Callable[..., tuple[Any, Any, Any]]:
    """Builds a compiled step ``step(model, opt_state, *batch) -> (loss, aux, opt_state)``.

    The step updates the model's trainable ``Parameter``s (and any
    ``StateVariable`` the forward pass assigns) in place and returns the new
    optimizer state. ``loss_fn(model, *batch)`` returns a scalar loss or
    ``(loss, aux)``.

    Args:
      loss_fn: The loss as a function of the model and a batch.
      optimizer: An optax gradient transformation.
      trainable: Which parameters train (default: every ``Parameter``), e.g.
        :func:`pzbridge.toolshed.lora.is_lora_parameter`.

    Returns:
      The step function (a :class:`~pzbridge.core.variable_jit.VariableJitFunction`).

    Raises:
      TrainingError: (when called) if no parameter is trainable, or the
        loss is not a floating-point scalar.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> w = Parameter(jnp.float32(2.0), "w")
        >>> step = build_train_step(lambda m: m.value ** 2, optax.sgd(0.25))
        >>> loss, _, state = step(w, optax.sgd(0.25).init((w.value,)))
        >>> float(loss), float(w.value)
        (4.0, 1.0)
    """
    is_trainable = _is_trainable(trainable)

    def step(model: Any, opt_state: Any, *batch: Any) -> tuple[Any, Any, Any]:
        slots, variables = unbind_variables(model)
        chosen = [i for i, v in enumerate(variables) if is_trainable(v)]
        if not chosen:
            raise TrainingError(
                "build_train_step: the model has no trainable Parameter (checked "
                f"{[v.label for v in variables][:8]}). Fix: pass trainable=None or a predicate that selects "
                "some parameters."
            )
        frozen = [v.freeze() for v in variables]

        def loss_of(params: tuple[Any, ...]) -> tuple[Any, tuple[Any, list[Any]]]:
            values = list(frozen)
            for i, value in zip(chosen, params):
                values[i] = dataclasses.replace(values[i], value=value)
            fresh = bind_variables(slots, values, unfreeze_as_copy=True)
            _, copies = unbind_variables(fresh)
            loss, aux = _split_loss(loss_fn(fresh, *batch))
            _check_loss(loss)
            states = [c.value if isinstance(c, StateVariable) else None for c in copies]
            return loss, (aux, states)

        params = tuple(variables[i].value for i in chosen)
        (loss, (aux, states)), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        for i, value in zip(chosen, new_params):
            variables[i].value = value
        for variable, state in zip(variables, states):
            if isinstance(variable, StateVariable):
                variable.value = state
        return loss, aux, new_opt_state

    return variable_jit(step)


@dataclasses.dataclass
class Trainer:
    """An optax training loop that updates a lifted model's parameters in place.

    Attributes:
      model: The lifted model (its ``Parameter`` objects are updated).
      loss_fn: ``loss_fn(model, *batch)`` returning a scalar or ``(loss, aux)``.
      optimizer: An optax gradient transformation.
      trainable: Which parameters train (default: all ``Parameter``s).
      opt_state: The optimizer state (initialised from the model when omitted).
      step_count: Steps taken so far.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> w = Parameter(jnp.float32(1.0), "w")
        >>> trainer = Trainer(w, lambda m: (m.value - 3.0) ** 2, optax.sgd(0.5))
        >>> _ = trainer.step(); float(w.value), trainer.step_count
        (3.0, 1)
    """

    model: Any
    loss_fn: LossFn
    optimizer: optax.GradientTransformation
    trainable: Predicate | None = None
    opt_state: Any = None
    step_count: int = 0

    def __post_init__(self) -> None:
        self._step = build_train_step(self.loss_fn, self.optimizer, self.trainable)
        if self.opt_state is None:
            self.opt_state = self.optimizer.init(trainable_values(self.model, self.trainable))

    def step(self, *batch: Any) -> tuple[Any, Any]:
        """Runs one training step on ``batch``; returns ``(loss, aux)``.

        Example:
            >>> import jax.numpy as jnp, optax
            >>> t = Trainer(Parameter(jnp.float32(0.0), "w"), lambda m: m.value ** 2 + 1.0, optax.sgd(0.1))
            >>> float(t.step()[0])
            1.0
        """
        loss, aux, self.opt_state = self._step(self.model, self.opt_state, *batch)
        self.step_count += 1
        return loss, aux

    def fit(
        self,
        batches: Iterable[Sequence[Any]],
        *,
        log_every: int = 10,
        callback: Callable[[int, float, Any], None] | None = None,
        printer: Callable[[str], None] = print,
    ) -> list[float]:
        """Runs one step per batch, showing progress; returns the losses.

        Every ``log_every`` steps (and at the last step) a line
        ``step 20/50  loss 0.1234  3.2 ms/step`` is printed with ``printer``
        (``log_every=0`` disables it). ``callback(step, loss, aux)`` is called
        after every step.

        Args:
          batches: Each item is a tuple of arguments after the model in ``loss_fn``.
          log_every: Print a progress line every this many steps (0: never).
          callback: Optional per-step callback.
          printer: Where progress lines go (default ``print``).

        Returns:
          The loss of every step, as Python floats.

        Raises:
          TrainingError: If the loss becomes NaN or infinite (the step and the
            last finite loss are named).

        Example:
            >>> import jax.numpy as jnp, optax
            >>> t = Trainer(Parameter(jnp.float32(4.0), "w"), lambda m: m.value ** 2, optax.sgd(0.25))
            >>> [round(l, 2) for l in t.fit([()] * 2, log_every=1)]
            step 1/2  loss 16  ...
            step 2/2  loss 4  ...
            [16.0, 4.0]
        """
        batches = list(batches)
        total = len(batches)
        losses: list[float] = []
        start = time.perf_counter()
        for index, batch in enumerate(batches, start=1):
            loss, aux = self.step(*(batch if isinstance(batch, (tuple, list)) else (batch,)))
            value = float(loss)
            if not jnp.isfinite(value):
                raise TrainingError(
                    f"Trainer.fit: the loss became {value} at step {self.step_count} (batch {index}/{total}); "
                    f"last finite loss {losses[-1] if losses else 'none'}. The parameters hold the diverged "
                    "values. Fix: lower the learning rate or clip gradients (optax.clip_by_global_norm)."
                )
            losses.append(value)
            if callback is not None:
                callback(self.step_count, value, aux)
            if log_every and (index % log_every == 0 or index == total):
                per_step = (time.perf_counter() - start) / index * 1e3
                printer(f"step {index}/{total}  loss {value:.4g}  {per_step:.1f} ms/step")
        return losses


@pytree_dataclass
class Checkpointed(Layer):
    """Runs ``layer`` under ``jax.checkpoint`` (gradient checkpointing).

    The forward result is identical; under differentiation the sublayer's
    intermediate activations are recomputed in the backward pass instead of
    being kept, trading compute for memory. The sublayer's variables enter
    the checkpointed function as values, and state it updates is written
    back to its (mutable) state variables.

    Attributes:
      layer: The wrapped layer.
      policy: An optional ``jax.checkpoint_policies`` policy (static).

    Example:
        >>> import jax, jax.numpy as jnp, pzbridge as pzb
        >>> from pzbridge.nn.linear import Linear
        >>> lin = Linear.from_config("d", jax.random.key(0), {"features": 2}, {"features": 2})
        >>> x = pzb.nx.wrap(jnp.ones(2), "features")
        >>> bool(jnp.all(Checkpointed(lin)(x).unwrap("features") == lin(x).unwrap("features")))
        True
        >>> from pzbridge.testing.numerics import same_computation
        >>> same_computation(Checkpointed(lin), lin, x)  # why that holds bitwise on any machine
        True
    """

    layer: Any
    policy: Any = static_field(default=None)

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        slots, variables = unbind_variables(self.layer)
        frozen = tuple(v.freeze() if isinstance(v, LabeledVariable) else v for v in variables)

        def run(values: tuple[Any, ...], x: Any) -> tuple[Any, list[Any]]:
            fresh = bind_variables(slots, values, unfreeze_as_copy=True)
            _, copies = unbind_variables(fresh)
            out = fresh(x, **side_inputs)
            return out, [c.value if isinstance(c, StateVariable) else None for c in copies]

        out, states = jax.checkpoint(run, policy=self.policy)(frozen, x)
        for variable, state in zip(variables, states):
            if isinstance(variable, StateVariable):
                variable.value = state
        return out


def lora_trainable(variable: LabeledVariable) -> bool:
    """Predicate training only LoRA adapters (see :func:`pzbridge.toolshed.lora.is_lora_parameter`).

    Example:
        >>> lora_trainable(Parameter(1.0, "x.lora_b")), lora_trainable(Parameter(1.0, "x.kernel"))
        (True, False)
    """
    from pzbridge.toolshed.lora import is_lora_parameter

    return is_lora_parameter(variable)


__all__ = [
    "Checkpointed",
    "Trainer",
    "TrainingError",
    "build_train_step",
    "lora_trainable",
    "trainable_values",
]
