"""Training and scoring interchange interventions on a frozen model: ``train_intervention``, ``interchange_accuracy``.

:func:`train_intervention` is distributed alignment search as a function:
freeze every variable of the model (its arrays become constants of the loss:
they get no gradient and are never assigned), insert the intervention at the
site, and train only the intervention's own ``Parameter``s with optax, one
compiled step per minibatch (:func:`~pzbridge.toolshed.training.build_train_step`,
so the intervention's variables are updated in place, as every training in
pzbridge does). Each step runs base and source together on the ``worlds``
axis (:func:`~pzbridge.toolshed.worlds.stack_worlds`) and scores the base
world's output against the counterfactual targets: what the model should
output if the site's variable had the source's value.

:func:`interchange_accuracy` (IIA) is the fraction of pairs where the
intervened model's prediction equals the counterfactual label. It takes any
intervention layer that reads the worlds axis, so trained subspaces,
neuron-aligned baselines
(:meth:`~pzbridge.toolshed.trainable.LowRankRotatedInterchange.of_units`) and
whole-site patches (``RouteWorlds((1, 1))``) are scored the same way, under one
cached ``jax.jit``. Only core and nn are imported (docs/architecture.md,
"Layers of the package").

Example:
    >>> import jax, jax.numpy as jnp, optax, pzbridge as pzb
    >>> from pzbridge.toolshed.trainable import LowRankRotatedInterchange
    >>> model = pzb.nn.Sequential([pzb.nn.Identity()])
    >>> base = pzb.nx.wrap(jnp.array([[1.0, 0.0], [0.0, 1.0]]), "batch", "features")
    >>> source = pzb.nx.wrap(jnp.array([[0.0, 1.0], [1.0, 0.0]]), "batch", "features")
    >>> das = LowRankRotatedInterchange.from_config("das", jax.random.key(0), {"features": 2}, k=2)
    >>> fit = train_intervention(model, pzb.nn.Identity, das, base, source, jnp.array([1, 0]),
    ...                          optimizer=optax.adam(0.01), steps=2)
    >>> interchange_accuracy(model, pzb.nn.Identity, das, base, source, jnp.array([1, 0]))
    1.0
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import PzbridgeError
from pzbridge.core.selectors import select
from pzbridge.core.variables import (
    Parameter,
    StateVariable,
    freeze_variables,
    unbind_variables,
)
from pzbridge.nn.layer import Layer
from pzbridge.toolshed.intermediates import LayerSelector, insert_layers
from pzbridge.toolshed.interventions import AtIndex
from pzbridge.toolshed.trainable import BoundlessMask
from pzbridge.toolshed.training import build_train_step
from pzbridge.toolshed.where import Where
from pzbridge.toolshed.worlds import WORLDS, stack_worlds

__all__ = ["InterventionFit", "Sources", "cross_entropy", "interchange_accuracy", "intervened", "train_intervention"]

LossFn = Callable[[Any, Any], Any]


@dataclasses.dataclass(frozen=True)
class InterventionFit:
    """What :func:`train_intervention` returns.

    Attributes:
      intervention: The trained intervention: the very object passed in,
        whose ``Parameter``s now hold the trained values.
      losses: The loss of every step, as a numpy array.
      opt_state: The final optax state.

    Example:
        >>> InterventionFit(None, np.zeros(3), ()).losses.shape
        (3,)
    """

    intervention: Layer
    losses: np.ndarray
    opt_state: Any


def cross_entropy(class_axis: str = "features") -> LossFn:
    """A loss ``loss(logits, labels)``: mean softmax cross-entropy over the named ``class_axis``.

    Example:
        >>> import pzbridge as pzb
        >>> logits = pzb.nx.wrap(jnp.array([[0.0, 0.0]]), "batch", "features")
        >>> round(float(cross_entropy()(logits, jnp.array([1]))), 4)
        0.6931
    """

    def loss(logits: Any, labels: Any) -> Any:
        if not nx.is_namedarray(logits) or class_axis not in logits.named_shape or logits.positional_shape:
            raise PzbridgeError(
                f"cross_entropy: expected logits with the named axis {class_axis!r} and no positional axes, found "
                f"{_describe(logits)}. Fix: pass class_axis= naming the model's output axis, or loss=your_fn."
            )
        log_probs = nx.nmap(jax.nn.log_softmax)(logits.untag(class_axis))
        chosen = nx.nmap(lambda lp, y: lp[y])(log_probs, _named_labels(labels, logits, class_axis))
        return -chosen.mean(*chosen.named_shape).unwrap()

    return loss


def _describe(x: Any) -> str:
    if nx.is_namedarray(x):
        return f"named axes {dict(x.named_shape)}, positional shape {x.positional_shape}"
    return f"{type(x).__name__} of shape {getattr(x, 'shape', None)}"


def _named_labels(labels: Any, like: Any, class_axis: str) -> Any:
    """Labels as a named array on the output's axes other than ``class_axis`` (a plain array: in that order)."""
    if nx.is_namedarray(labels):
        return labels
    names = [name for name in like.named_shape if name != class_axis]
    labels = jnp.asarray(labels)
    if labels.ndim != len(names):
        raise PzbridgeError(
            f"labels: a plain array of shape {labels.shape} cannot be matched to the output's axes {names}. "
            "Fix: pass the labels as a NamedArray, e.g. pzb.nx.wrap(labels, 'batch')."
        )
    return nx.wrap(labels, *names)


def intervened(model: Any, at: LayerSelector, intervention: Layer, *, where: str | None = None) -> Any:
    """``model`` with every variable frozen and ``intervention`` inserted at ``at`` (its variables kept as is).

    The frozen copy holds the model's arrays as constants, so nothing run on
    it can train or assign them; the intervention keeps its own mutable
    variables (the same objects, so training it updates the caller's layer).

    Raises:
      SelectionError: If ``at`` selects nothing.

    Example:
        >>> import pzbridge as pzb
        >>> from pzbridge.toolshed.trainable import LowRankRotatedInterchange
        >>> edited = intervened(pzb.nn.Sequential([pzb.nn.Identity()]), pzb.nn.Identity,
        ...                     LowRankRotatedInterchange.of_units({"features": 2}, [0]))
        >>> [type(l).__name__ for l in edited.sublayers]
        ['Identity', 'LowRankRotatedInterchange']
    """
    if not isinstance(intervention, Layer):
        raise PzbridgeError(f"intervened: the intervention must be a pzbridge layer, found "
                            f"{type(intervention).__name__}. Fix: e.g. RotatedSubspaceInterchange.from_config(...).")
    placed: Layer = AtIndex(intervention, at) if isinstance(at, Where) and at.index else intervention
    # share_state keeps the intervention's StateVariables (a BoundlessMask temperature) the caller's objects;
    # the model itself holds no variables any more once frozen.
    return insert_layers(freeze_variables(model), at, lambda path, node: placed, where=where, share_state=True)


def _world(output: Any, index: int, axis: str) -> Any:
    def pick(leaf: Any) -> Any:
        if not nx.is_namedarray(leaf) or axis not in leaf.named_shape:
            raise PzbridgeError(
                f"interchange: the model's output ({_describe(leaf)}) lost the worlds axis {axis!r}. Fix: the "
                "model must pass named axes it does not own through (every pzbridge layer does); check custom layers."
            )
        return leaf[{axis: index}]

    return jax.tree_util.tree_map(pick, output, is_leaf=nx.is_namedarray)


def _batch_size(tree: Any, batch_axis: str, what: str) -> int:
    sizes = set()
    for leaf in jax.tree_util.tree_leaves(tree, is_leaf=nx.is_namedarray):
        if nx.is_namedarray(leaf):
            if batch_axis not in leaf.named_shape:
                raise PzbridgeError(f"{what}: expected the named axis {batch_axis!r} on every input, found "
                                    f"{_describe(leaf)}. Fix: wrap inputs as pzb.nx.wrap(x, {batch_axis!r}, ...).")
            sizes.add(leaf.named_shape[batch_axis])
        else:
            sizes.add(jnp.shape(leaf)[0] if jnp.ndim(leaf) else None)
    if len(sizes) != 1 or None in sizes:
        raise PzbridgeError(f"{what}: expected one batch size along {batch_axis!r}, found {sorted(map(str, sizes))}. "
                            "Fix: give base inputs, source inputs and targets the same number of examples.")
    return sizes.pop()


def _take(tree: Any, index: jax.Array, batch_axis: str) -> Any:
    named_index = nx.wrap(index, batch_axis)
    return jax.tree_util.tree_map(
        lambda leaf: leaf[{batch_axis: named_index}] if nx.is_namedarray(leaf) else jnp.asarray(leaf)[index],
        tree, is_leaf=nx.is_namedarray)


@dataclasses.dataclass(frozen=True)
class Sources:
    """Several source inputs of one multi-source interchange, in world order (world ``1 + i`` runs ``inputs[i]``).

    Pass it as ``source_inputs`` of :func:`train_intervention` /
    :func:`interchange_accuracy` with a layer built with one block of
    coordinates per source (``k=(k1, k2)``, ``routes=((1, 1, 2), (2, 1, 2))``).

    Attributes:
      inputs: One input pytree per source, each like the base inputs.

    Example:
        >>> len(Sources(1.0, 2.0).inputs)
        2
    """

    inputs: tuple[Any, ...]

    def __init__(self, *inputs: Any) -> None:
        if not inputs:
            raise PzbridgeError("Sources: expected at least one source input. Fix: Sources(source_1, source_2).")
        object.__setattr__(self, "inputs", tuple(inputs))


def _source_list(source_inputs: Any) -> list[Any]:
    return list(source_inputs.inputs) if isinstance(source_inputs, Sources) else [source_inputs]


def _check_worlds(intervention: Layer, sources: int, what: str) -> str:
    """The layer's worlds axis, checked to read world 0 (the base) from the ``sources`` source worlds."""
    routes = getattr(intervention, "routes", None)
    if routes is None:
        return getattr(intervention, "worlds", WORLDS)
    rows = routes if getattr(intervention, "blocks", ()) else (routes,)
    count = len(rows[0])
    if count != 1 + sources or not any(row[0] != 0 for row in rows):
        expected = "routes=(1, 1) (the default)" if sources == 1 else (
            f"one block per source, k=(k_1, ..., k_{sources}) and routes=(r_1, ..., r_{sources}) with "
            f"r_i[0] = i over {1 + sources} worlds")
        more = f", or pass Sources(...) of {count - 1} source inputs" if count > 2 else ""
        raise PzbridgeError(
            f"{what}: the intervention reads {count} worlds (routes {tuple(routes)}); expected 1 + {sources} (the "
            f"base and the {sources} source input(s) given) with world 0 (the base) reading from a source. "
            f"Fix: build the intervention with {expected}{more}."
        )
    return getattr(intervention, "worlds", WORLDS)


def _find_copy(model: Any, intervention: Layer) -> Layer:
    return select(model).at_instances_of(type(intervention)).get_sequence()[0]


def train_intervention(
    model: Any,
    at: LayerSelector,
    intervention: Layer,
    base_inputs: Any,
    source_inputs: Any,
    targets: Any,
    *,
    loss: LossFn | None = None,
    optimizer: optax.GradientTransformation | None = None,
    steps: int = 500,
    batch_size: int | None = None,
    seed: int = 0,
    class_axis: str = "features",
    batch_axis: str = "batch",
    penalty: Callable[[Layer], Any] | None = None,
    temperature_schedule: Callable[[int], float] | None = None,
    where: str | None = None,
) -> InterventionFit:
    """Trains ``intervention``'s parameters at ``at`` so the intervened model predicts ``targets``; the model is frozen.

    Every step draws a minibatch of (base, source, target) triples, runs
    ``stack_worlds([base, source])`` through the model with the intervention
    inserted, takes the base world's output and minimises
    ``loss(output, target)`` (+ ``penalty(intervention)``). The model's
    variables are frozen first: they are constants of the compiled step, get
    no gradient and are never written.

    Args:
      model: A lifted model (pzb.nn, lifted stock layers or a traced custom module); not modified.
      at: The site (a ``Where``, whose index restricts the intervention to those units; a selection, class
        or predicate).
      intervention: A layer reading the worlds axis with trainable ``Parameter``s, e.g.
        :class:`~pzbridge.toolshed.trainable.RotatedSubspaceInterchange`.
      base_inputs: The base inputs, named arrays with ``batch_axis`` (a pytree of them for several inputs).
      source_inputs: The source inputs, same structure and batch size; or :class:`Sources` of several (one
        per block of a multi-source interchange).
      targets: The counterfactual targets (labels for the default loss), a named array with
        ``batch_axis`` or a plain array whose first axis is the batch.
      loss: ``loss(base_world_output, targets) -> scalar``; default :func:`cross_entropy` over ``class_axis``.
      optimizer: An optax transformation; default ``optax.adam(1e-2)``.
      steps: Number of optimizer steps.
      batch_size: Examples per step (default: all, every step).
      seed: Seed of the minibatch order.
      class_axis: The output's class axis, for the default loss.
      batch_axis: The inputs' batch axis.
      penalty: Optional ``penalty(intervention) -> scalar`` added to the loss (e.g.
        ``lambda m: 1e-3 * m.mask_size()`` for a ``BoundlessMask``).
      temperature_schedule: ``step -> temperature`` for a ``BoundlessMask`` (annealing; no recompilation).
      where: ``"after"`` / ``"before"`` the selected layers (default: the ``Where``'s side, else after).

    Returns:
      An :class:`InterventionFit`; its ``intervention`` is the object passed in, trained in place.

    Raises:
      PzbridgeError: If the intervention has no ``Parameter``, the batch sizes disagree, the routes do not
        read world 0 from the source worlds, or a ``temperature_schedule`` is given for a layer without a
        temperature variable.
      SelectionError: If ``at`` selects nothing.
    """
    what = "train_intervention"
    sources = _source_list(source_inputs)
    worlds = _check_worlds(intervention, len(sources), what)
    _, own = unbind_variables(intervention)
    # By label: inside the compiled step the variables are copies, so identity does not carry over.
    trainable_labels = {v.label for v in own if isinstance(v, Parameter)}
    if not trainable_labels:
        raise PzbridgeError(
            f"{what}: {type(intervention).__name__} holds no Parameter to train (found "
            f"{[type(v).__name__ for v in own]}). Fix: build it with from_config(...), which holds its matrices in "
            "Parameters, or wrap an array as pzb.Parameter(value, label)."
        )
    temperature = intervention.temperature if isinstance(intervention, BoundlessMask) else None
    if temperature_schedule is not None and not isinstance(temperature, StateVariable):
        raise PzbridgeError(f"{what}: temperature_schedule needs a BoundlessMask whose temperature is a "
                            f"StateVariable, found {type(intervention).__name__}. Fix: drop temperature_schedule, "
                            "or build the layer with BoundlessMask.from_config(...).")
    if not isinstance(steps, int) or steps < 1:
        raise PzbridgeError(f"{what}: steps must be a positive int, found {steps!r}.")
    n = _batch_size((base_inputs, sources, targets), batch_axis, what)
    size = n if batch_size is None else batch_size
    if not isinstance(size, int) or not 1 <= size <= n:
        raise PzbridgeError(f"{what}: batch_size must be an int in [1, {n}], found {batch_size!r}.")
    loss = cross_entropy(class_axis) if loss is None else loss
    optimizer = optax.adam(1e-2) if optimizer is None else optimizer

    edited = intervened(model, at, intervention, where=where)

    def objective(m: Any, base: Any, source: list[Any], target: Any, index: jax.Array) -> Any:
        output = m(stack_worlds([_take(x, index, batch_axis) for x in (base, *source)], worlds))
        value = loss(_world(output, 0, worlds), _take(target, index, batch_axis))
        if penalty is not None:
            value = value + penalty(_find_copy(m, intervention))
        return value

    step = build_train_step(objective, optimizer, trainable=lambda v: v.label in trainable_labels)
    opt_state = optimizer.init(tuple(v.value for v in own if isinstance(v, Parameter)))
    order = _minibatches(n, size, steps, seed)
    losses = []
    for i in range(steps):
        if temperature_schedule is not None and isinstance(temperature, StateVariable):
            temperature.value = jnp.float32(temperature_schedule(i))
        value, _, opt_state = step(edited, opt_state, base_inputs, sources, targets, order[i])
        losses.append(value)
    return InterventionFit(intervention, np.asarray(jax.device_get(jnp.stack(losses))), opt_state)


def _minibatches(n: int, size: int, steps: int, seed: int) -> np.ndarray:
    """``steps`` index sets of ``size``: consecutive slices of shuffled epochs (every example once per epoch)."""
    rng = np.random.default_rng(seed)
    per_epoch = n // size
    epochs = -(-steps // per_epoch)
    rows = [rng.permutation(n)[: per_epoch * size].reshape(per_epoch, size) for _ in range(epochs)]
    return np.concatenate(rows)[:steps].astype(np.int32)


@jax.jit
def _run(model: Any, inputs: Any) -> Any:
    # One module-level jit: scoring many interventions of one structure (unit sets of one size) compiles once.
    return model(inputs)


def interchange_accuracy(
    model: Any,
    at: LayerSelector,
    intervention: Layer,
    base_inputs: Any,
    source_inputs: Any,
    labels: Any,
    *,
    predict: Callable[[Any], Any] | None = None,
    class_axis: str = "features",
    where: str | None = None,
) -> float:
    """The interchange intervention accuracy: how often the intervened model predicts the counterfactual label.

    Runs ``stack_worlds([base, source])`` through the frozen model with
    ``intervention`` at ``at`` (compiled), takes the base world's output
    and compares ``predict(output)`` (default: argmax over ``class_axis``)
    with ``labels``.

    Args:
      model: The model (not modified).
      at: The site.
      intervention: Any layer reading the worlds axis (an interchange layer, ``RouteWorlds((1, 1))``, ...).
      base_inputs: Base inputs (named arrays with a batch axis).
      source_inputs: Source inputs, same structure; or :class:`Sources` of several.
      labels: Counterfactual labels, a named array or a plain array on the prediction's axes.
      predict: ``predict(output) -> labels`` (named array or plain array).
      class_axis: The output's class axis for the default argmax.
      where: ``"after"`` / ``"before"`` the selected layers.

    Returns:
      The accuracy, a float in ``[0, 1]``.

    Raises:
      PzbridgeError: If the output has no ``class_axis`` (without ``predict``) or the labels do not fit.

    Example:
        >>> import jax.numpy as jnp, pzbridge as pzb
        >>> from pzbridge.toolshed.worlds import RouteWorlds
        >>> model = pzb.nn.Sequential([pzb.nn.Identity()])
        >>> x = pzb.nx.wrap(jnp.array([[1.0, 0.0]]), "batch", "features")
        >>> y = pzb.nx.wrap(jnp.array([[0.0, 1.0]]), "batch", "features")
        >>> interchange_accuracy(model, pzb.nn.Identity, RouteWorlds((1, 1)), x, y, jnp.array([1]))
        1.0
    """
    sources = _source_list(source_inputs)
    worlds = _check_worlds(intervention, len(sources), "interchange_accuracy")
    edited = freeze_variables(intervened(model, at, intervention, where=where))
    output = _world(_run(edited, stack_worlds([base_inputs, *sources], worlds)), 0, worlds)
    if predict is not None:
        predicted = predict(output)
    else:
        if not nx.is_namedarray(output) or class_axis not in output.named_shape:
            raise PzbridgeError(
                f"interchange_accuracy: expected an output with the named axis {class_axis!r}, found "
                f"{_describe(output)}. Fix: pass class_axis= naming the output's class axis, or predict=fn."
            )
        predicted = output.argmax(class_axis)
    if nx.is_namedarray(predicted):
        named = _named_labels(labels, predicted, "")
        hits = nx.nmap(jnp.equal)(predicted, named)
        return float(jnp.mean(hits.unwrap(*hits.named_shape)))
    return float(jnp.mean(jnp.asarray(predicted) == jnp.asarray(labels)))
