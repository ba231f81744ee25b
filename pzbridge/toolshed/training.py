"""Training lifted models with optax: a step builder, a streaming loop with callbacks, and ``Checkpointed``.

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

:class:`Trainer` adds the loop, written so that the accelerator never waits
for the host:

- batches are *streamed*: any iterable or generator, one item pulled per
  step (``steps=`` bounds an endless one);
- losses stay on the device and are fetched together every ``log_every``
  steps (one transfer), where they are checked for NaN / inf, logged to the
  ``pzbridge.training`` logger and shown on a ``tqdm`` progress bar;
- the first step, which includes compilation, is timed on its own, so
  ``ms/step`` is the steady-state figure;
- callbacks (:class:`Callback`: ``on_step(step, trainer, metrics)``) run
  after every step: :class:`EvaluateEvery` and :class:`CheckpointEvery`
  are the two common ones;
- :meth:`Trainer.save` / :meth:`Trainer.restore` checkpoint the model AND
  the optimizer state and the step count, so a run resumed from a
  checkpoint takes exactly the steps the uninterrupted run would have.

:class:`Checkpointed` is gradient checkpointing as a combinator: its
sublayer's activations are recomputed in the backward pass
(``jax.checkpoint``) instead of being stored.

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import pzbridge as pzb
    >>> from pzbridge.nn.linear import Linear
    >>> model = Linear.from_config("d", jax.random.key(0), {"features": 2}, {"features": 1})
    >>> x = pzb.nx.wrap(jnp.ones((8, 2)), "batch", "features")
    >>> def loss_fn(m, x):
    ...     return jnp.mean(m(x).unwrap("batch", "features") ** 2)
    >>> trainer = Trainer(model, loss_fn, optax.sgd(0.1))
    >>> result = trainer.fit(((x,) for _ in range(20)), log_every=5)
    >>> result.steps, bool(result.losses[-1] < result.losses[0])
    (20, True)
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import pathlib
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sized
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
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
from pzbridge.toolshed import checkpointing
from pzbridge.toolshed.checkpoint_manager import CheckpointManager

logger = logging.getLogger("pzbridge.training")

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
    shape: tuple[int, ...] | None
    dtype: Any
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


@runtime_checkable
class Callback(Protocol):
    """Something the training loop calls after every step.

    ``on_step(step, trainer, metrics)``: ``step`` is the trainer's step
    count after the step, ``trainer`` the :class:`Trainer` (its ``model``,
    ``opt_state``, ``step_count``), ``metrics`` a mapping with the step's
    ``"loss"`` and ``"aux"`` *on the device* (converting them to Python
    numbers waits for the device: do it every N steps, not every step). An
    object may also define ``on_fit_end(trainer)``, called when ``fit``
    returns. A plain function ``f(step, trainer, metrics)`` is accepted too.

    Example:
        >>> class Count:
        ...     calls = 0
        ...     def on_step(self, step, trainer, metrics):
        ...         self.calls += 1
        >>> isinstance(Count(), Callback)
        True
    """

    def on_step(self, step: int, trainer: Trainer, metrics: Mapping[str, Any]) -> None:
        """Called after every step."""


@dataclasses.dataclass
class EvaluateEvery:
    """Calls ``evaluate(model)`` every ``every`` steps (and at the end), logging and keeping the results.

    Attributes:
      every: The interval in steps (``>= 1``).
      evaluate: ``evaluate(model) -> number or mapping of numbers`` (device
        arrays are fetched: an evaluation waits for the device anyway).
      history: ``(step, result)`` of every evaluation so far.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> w = Parameter(jnp.float32(4.0), "w")
        >>> evaluation = EvaluateEvery(2, lambda m: m.value)
        >>> _ = Trainer(w, lambda m: m.value ** 2, optax.sgd(0.25), callbacks=[evaluation]).fit([()] * 4)
        >>> [(step, float(value)) for step, value in evaluation.history]
        [(2, 1.0), (4, 0.25)]
    """

    every: int
    evaluate: Callable[[Any], Any]
    history: list[tuple[int, Any]] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        _check_every("EvaluateEvery", self.every)

    def on_step(self, step: int, trainer: Trainer, metrics: Mapping[str, Any]) -> None:
        """Evaluates when ``step`` is a multiple of ``every``."""
        if step % self.every == 0:
            self._run(step, trainer)

    def on_fit_end(self, trainer: Trainer) -> None:
        """Evaluates the final model unless the last step just did."""
        if not self.history or self.history[-1][0] != trainer.step_count:
            self._run(trainer.step_count, trainer)

    def _run(self, step: int, trainer: Trainer) -> None:
        result = jax.device_get(self.evaluate(trainer.model))
        self.history.append((step, result))
        logger.info("step %d  eval %s", step, result)


@dataclasses.dataclass
class CheckpointEvery:
    """Saves the model, optimizer state and step count every ``every`` steps (and at the end).

    Attributes:
      every: The interval in steps (``>= 1``).
      manager: A :class:`~pzbridge.toolshed.checkpoint_manager.CheckpointManager`,
        or a directory (a manager with ``max_to_keep=3`` and asynchronous
        saves is made for it).

    Example:
        >>> import tempfile, jax.numpy as jnp, optax
        >>> w = Parameter(jnp.float32(4.0), "w")
        >>> saving = CheckpointEvery(2, tempfile.mkdtemp())
        >>> _ = Trainer(w, lambda m: m.value ** 2, optax.sgd(0.25), callbacks=[saving]).fit([()] * 5)
        >>> saving.manager.all_steps()
        [2, 4, 5]
    """

    every: int
    manager: CheckpointManager | str | pathlib.Path

    def __post_init__(self) -> None:
        _check_every("CheckpointEvery", self.every)
        if not isinstance(self.manager, CheckpointManager):
            self.manager = CheckpointManager(self.manager, max_to_keep=3)

    def on_step(self, step: int, trainer: Trainer, metrics: Mapping[str, Any]) -> None:
        """Saves when ``step`` is a multiple of ``every`` (the write runs in the background)."""
        if step % self.every == 0:
            trainer.save(self.manager)

    def on_fit_end(self, trainer: Trainer) -> None:
        """Saves the final step (unless just saved) and waits until every write has committed."""
        assert isinstance(self.manager, CheckpointManager)
        self.manager.wait_until_finished()
        if self.manager.latest_step() != trainer.step_count:
            trainer.save(self.manager)
        self.manager.wait_until_finished()


def _check_every(owner: str, every: Any) -> None:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise TrainingError(f"{owner}: expected every to be an integer >= 1 (steps), found every={every!r}. "
                            f"Fix: pass e.g. {owner}(100, ...).")


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What :meth:`Trainer.fit` did.

    Attributes:
      losses: The loss of every step, as Python floats.
      steps: The number of steps taken.
      first_step_seconds: Wall time of the first step, compilation included.
      ms_per_step: Mean milliseconds of the later steps (``None`` with one step).
      seconds: Total wall time.

    Example:
        >>> FitResult([2.0, 1.0], 2, 0.5, 3.0, 0.503).steps
        2
    """

    losses: list[float]
    steps: int
    first_step_seconds: float
    ms_per_step: float | None
    seconds: float


def _fetch(values: list[Any]) -> list[float]:
    """The one place the loop waits for the device: every pending loss in one transfer."""
    return [float(v) for v in np.asarray(jax.device_get(values), dtype=np.float64).reshape(-1)]


def _as_args(batch: Any) -> tuple[Any, ...]:
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


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
      callbacks: Called after every step of :meth:`fit` (see :class:`Callback`).

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
    callbacks: list[Any] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self._step = build_train_step(self.loss_fn, self.optimizer, self.trainable)
        if self.opt_state is None:
            self.opt_state = self.optimizer.init(trainable_values(self.model, self.trainable))

    def step(self, *batch: Any) -> tuple[Any, Any]:
        """Runs one training step on ``batch``; returns ``(loss, aux)`` on the device (no wait).

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
        batches: Iterable[Any],
        *,
        steps: int | None = None,
        log_every: int = 10,
        callbacks: Iterable[Any] = (),
        progress: bool | None = None,
    ) -> FitResult:
        """Runs one step per batch, streaming the batches; returns the losses and timings.

        Batches are pulled one at a time (a generator is never consumed
        ahead); each is a tuple of the arguments after the model in
        ``loss_fn`` (anything else is one argument). Losses stay on the
        device and are fetched in one transfer every ``log_every`` steps and
        at the end (``log_every=0``: only at the end), then checked, logged
        as ``step 20/50  loss 0.1234  3.2 ms/step`` to the
        ``pzbridge.training`` logger (INFO) and shown on the progress bar.
        The first step, compilation included, is timed and logged on its
        own. Callbacks (the trainer's, then ``callbacks``) run after every
        step.

        Args:
          batches: Any iterable of batches (a list, a generator, a data loader).
          steps: Stop after this many steps (default: when ``batches`` ends).
          log_every: Fetch, check and log the losses every this many steps.
          callbacks: More callbacks for this call.
          progress: Show a ``tqdm`` progress bar (default: when stderr is a terminal).

        Returns:
          A :class:`FitResult`.

        Raises:
          TrainingError: If a loss is NaN or infinite (the first such step is
            named; found when the losses are fetched, so the parameters hold
            the values after the last step run), or ``steps`` / ``log_every``
            is negative.

        Example:
            >>> import jax.numpy as jnp, optax
            >>> t = Trainer(Parameter(jnp.float32(4.0), "w"), lambda m: m.value ** 2, optax.sgd(0.25))
            >>> t.fit(iter([()] * 10), steps=2).losses
            [16.0, 4.0]
        """
        from tqdm.auto import tqdm

        for name, value in (("steps", steps), ("log_every", log_every)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise TrainingError(f"Trainer.fit: expected {name} to be an integer >= 0, found {name}={value!r}. "
                                    f"Fix: pass {name}=100, say.")
        stream = iter(batches) if steps is None else itertools.islice(iter(batches), steps)
        total = steps if steps is not None else (len(batches) if isinstance(batches, Sized) else None)
        hooks = [*self.callbacks, *callbacks]
        show = sys.stderr.isatty() if progress is None else progress
        bar = tqdm(total=total, disable=not show, unit="step", desc="train", dynamic_ncols=True)
        losses: list[float] = []
        pending: list[Any] = []
        start = time.perf_counter()
        first_seconds, steady_start, done = math.nan, start, 0
        try:
            for done, batch in enumerate(stream, start=1):
                loss, aux = self.step(*_as_args(batch))
                if done == 1:
                    jax.block_until_ready(loss)  # The one other wait: it separates compilation from ms/step.
                    first_seconds = time.perf_counter() - start
                    steady_start = time.perf_counter()
                    logger.info("step %d: first step %.2f s (compilation included)", self.step_count, first_seconds)
                pending.append(loss)
                bar.update(1)
                if log_every and done % log_every == 0:
                    self._flush(pending, losses, done, total, steady_start, bar)
                metrics = {"loss": loss, "aux": aux}
                for hook in hooks:
                    (hook.on_step if hasattr(hook, "on_step") else hook)(self.step_count, self, metrics)
            if pending:
                self._flush(pending, losses, done, total, steady_start, bar)
        finally:
            bar.close()
        for hook in hooks:
            if hasattr(hook, "on_fit_end"):
                hook.on_fit_end(self)
        per_step = (time.perf_counter() - steady_start) / (done - 1) * 1e3 if done > 1 else None
        return FitResult(losses, done, first_seconds, per_step, time.perf_counter() - start)

    def _flush(self, pending: list[Any], losses: list[float], done: int, total: int | None, steady_start: float,
               bar: Any) -> None:
        values = _fetch(pending)
        first = done - len(values) + 1
        for offset, value in enumerate(values):
            if not math.isfinite(value):
                step = self.step_count - len(values) + 1 + offset
                raise TrainingError(
                    f"Trainer.fit: the loss became {value} at step {step} (batch {first + offset}"
                    f"{f'/{total}' if total else ''}); last finite loss "
                    f"{(losses + values[:offset])[-1] if losses or offset else 'none'}. The parameters hold the "
                    f"values after step {self.step_count}. Fix: lower the learning rate or clip gradients "
                    "(optax.clip_by_global_norm)."
                )
        losses.extend(values)
        pending.clear()
        per_step = (time.perf_counter() - steady_start) / (done - 1) * 1e3 if done > 1 else math.nan
        logger.info("step %d%s  loss %.4g  %.1f ms/step", done, f"/{total}" if total else "", values[-1], per_step)
        bar.set_postfix_str(f"loss {values[-1]:.4g}", refresh=False)

    def save(
        self,
        target: CheckpointManager | str | pathlib.Path,
        *,
        keep: int | None = 1,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Checkpoints the model, the optimizer state and the step count (as the step number).

        Args:
          target: A checkpoint directory, or a
            :class:`~pzbridge.toolshed.checkpoint_manager.CheckpointManager`
            (its retention and asynchronous saving apply).
          keep: With a directory: how many steps to keep (``None``: all).
          metadata: JSON-serialisable extras stored with the step.

        Example:
            >>> import tempfile, jax.numpy as jnp, optax
            >>> t = Trainer(Parameter(jnp.float32(4.0), "w"), lambda m: m.value ** 2, optax.adam(0.1))
            >>> _ = t.fit([()] * 3); root = tempfile.mkdtemp(); t.save(root)
            >>> checkpointing.all_steps(root)
            [3]
        """
        if isinstance(target, CheckpointManager):
            target.save(self.step_count, self.model, opt_state=self.opt_state, trainable=self.trainable,
                        metadata=metadata, force=True)
            return
        checkpointing.save(target, self.model, step=self.step_count, keep=keep, opt_state=self.opt_state,
                           trainable=self.trainable, metadata=metadata)

    def restore(self, source: CheckpointManager | str | pathlib.Path, *, step: int | None = None) -> int:
        """Restores the model (in place), the optimizer state and the step count from a checkpoint.

        Everything is read and checked before anything changes: on any error
        the model, the optimizer state and the step count are as before.

        Args:
          source: The directory or manager given to :meth:`save`.
          step: Which step (default: the latest).

        Returns:
          The step restored (now ``step_count``).

        Raises:
          CheckpointError: If the step has no optimizer state, or the model
            or optimizer state does not match (every difference listed).

        Example:
            >>> import tempfile, jax.numpy as jnp, optax
            >>> loss = lambda m: m.value ** 2
            >>> t = Trainer(Parameter(jnp.float32(4.0), "w"), loss, optax.adam(0.1))
            >>> _ = t.fit([()] * 3); root = tempfile.mkdtemp(); t.save(root)
            >>> resumed = Trainer(Parameter(jnp.float32(0.0), "w"), loss, optax.adam(0.1))
            >>> resumed.restore(root), float(resumed.model.value) == float(t.model.value)
            (3, True)
        """
        if isinstance(source, CheckpointManager):
            source.wait_until_finished()
            directory = source.directory
        else:
            directory = pathlib.Path(source)
        chosen = checkpointing.read_description(directory, step)["step"]
        opt_state = checkpointing.restore_optimizer_state(directory, self.opt_state, step=chosen, model=self.model,
                                                          trainable=self.trainable)
        checkpointing.restore(directory, self.model, step=chosen)  # all or nothing; the last thing that can fail
        self.opt_state, self.step_count = opt_state, chosen
        return chosen

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
    "Callback",
    "CheckpointEvery",
    "Checkpointed",
    "EvaluateEvery",
    "FitResult",
    "Trainer",
    "TrainingError",
    "build_train_step",
    "lora_trainable",
    "trainable_values",
]
