"""``pzb.convert``: an Equinox model as an NNX module, or an NNX module as an Equinox model.

A lifted model is framework-neutral data, so lowering it into the *other*
framework converts it. :func:`convert` lifts the model (traced, with the
example inputs, so custom ``__call__`` code opens up), lowers every layer that
has a counterpart to the target's native class, wraps what has none (glue of
custom modules, pzbridge-only layers) in the target's adapter module, and
converts the calling convention:

- Equinox -> NNX: the model was called per example (batched by the caller's
  ``jax.vmap``); the NNX module is called on a batch,
  ``converted(*batched) == jax.vmap(model)(*batched)``; array keyword
  arguments (a mask) get the batch axis in front too.
- NNX -> Equinox: the module was called on a batch; the Equinox model is
  called per example, ``jax.vmap(converted)(*batch) == model(*batch)``.

The converted model is checked on the examples (outputs equal within 1e-5)
before it is returned, so a conversion that would compute something else is
an error, not a silent difference. :func:`convert_with_report` also says, by
path, what became native and what became an adapter.

Example:
    >>> import jax, jax.numpy as jnp, equinox as eqx
    >>> mlp = eqx.nn.MLP(3, 2, width_size=4, depth=1, key=jax.random.key(0))
    >>> module, report = convert_with_report(mlp, jnp.ones(3), to="nnx")
    >>> [part.module for part in report.natives]
    ['Sequential', 'Linear', 'Linear']
    >>> xs = jax.random.normal(jax.random.key(1), (5, 3))
    >>> bool(jnp.allclose(module(xs), jax.vmap(mlp)(xs), atol=1e-5))
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pzbridge.bridge.api import lift
from pzbridge.bridge.cross_lowering import (
    adapter_runs,
    converted_back,
    lower_converted_back,
    lower_with_convention,
    root_convention,
)
from pzbridge.bridge.example_convention import example_convention
from pzbridge.bridge.frameworks import FRAMEWORKS, framework_of
from pzbridge.bridge.lifted import LiftedModel
from pzbridge.bridge.naming import AxisNaming, checked_naming
from pzbridge.core import named_axes as nx
from pzbridge.core.errors import LowerError
from pzbridge.core.random_stream import RandomStream
from pzbridge.core.selectors import select
from pzbridge.core.variables import StateVariable, stateless_call, unbind_variables

__all__ = ["ConversionReport", "ConvertedPart", "convert", "convert_with_report"]


@dataclasses.dataclass(frozen=True)
class ConvertedPart:
    """One module of a converted model.

    Attributes:
      path: Where it sits in the converted module (``""`` for the root).
      module: The target-framework class name (``Linear``, ``NnxAdapter``, ...).
      kind: ``"native"`` (the target's own class) or ``"adapter"`` (runs
        pzbridge layers that have no counterpart).
      runs: For an adapter, what it runs (e.g. ``Traced(Block)``, ``Elementwise``).

    Example:
        >>> ConvertedPart("layers.0", "Linear", "native").kind
        'native'
    """

    path: str
    module: str
    kind: str
    runs: str = ""


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    """What a conversion made: every module of the result, native or adapter.

    Attributes:
      source: The framework converted from.
      target: The framework converted to.
      parts: One entry per module of the result, root first.

    Example:
        >>> report = ConversionReport("equinox", "nnx", (ConvertedPart("", "Linear", "native"),))
        >>> [p.module for p in report.natives], report.adapters
        (['Linear'], [])
    """

    source: str
    target: str
    parts: tuple[ConvertedPart, ...]

    @property
    def natives(self) -> list[ConvertedPart]:
        """The parts that are the target framework's own classes."""
        return [p for p in self.parts if p.kind == "native"]

    @property
    def adapters(self) -> list[ConvertedPart]:
        """The parts that are adapters (pzbridge layers with no counterpart)."""
        return [p for p in self.parts if p.kind == "adapter"]

    def __str__(self) -> str:
        lines = [f"{self.source} -> {self.target}: {len(self.natives)} native, {len(self.adapters)} adapter"]
        for part in self.parts:
            runs = f" runs {part.runs}" if part.runs else ""
            lines.append(f"  {part.path or '<root>'}: {part.module} ({part.kind}){runs}")
        return "\n".join(lines)


def convert(model: Any, *example_args: Any, to: str, example_kwargs: Mapping[str, Any] | None = None,
            naming: AxisNaming | None = None, verify: bool = True, state: Any = None) -> Any:
    """Converts an Equinox model to an NNX module or an NNX module to an Equinox model.

    Args:
      model: An ``eqx.Module`` or ``nnx.Module`` (never mutated).
      *example_args: Example inputs, as the model is called (Equinox: one
        example; NNX: a batch). Arrays or ``jax.ShapeDtypeStruct`` s; custom
        modules are traced with them.
      to: ``"nnx"`` or ``"equinox"`` (the other framework).
      example_kwargs: Example keyword inputs (passed unbatched to both).
      naming: Axis-naming policy of the lift.
      verify: Check the converted model against the original on the examples
        (when they are concrete arrays).
      state: Equinox only: the model's ``eqx.nn.State`` (a stateful model,
        e.g. an NNX module converted before whose traced code writes its
        Variables).

    Returns:
      The converted module. An NNX module whose traced code updates its own
      Variables becomes a stateful Equinox module: ``state =
      eqx.nn.State(converted)``, then ``y, state = converted(x, state)``,
      batched as ``jax.vmap(converted, axis_name="batch", in_axes=(0, None),
      out_axes=(0, None))`` (it then computes on the whole batch, as NNX does).

    Raises:
      LiftError: A module cannot be traced (the message names it and why).
      LowerError: ``to`` is not the other framework, a part cannot be
        converted, or the converted model computes something else on the examples.

    Example:
        >>> import jax, jax.numpy as jnp, equinox as eqx
        >>> linear = eqx.nn.Linear(3, 2, key=jax.random.key(0))
        >>> type(convert(linear, jnp.ones(3), to="nnx")).__name__
        'Linear'
    """
    return convert_with_report(model, *example_args, to=to, example_kwargs=example_kwargs, naming=naming,
                               verify=verify, state=state)[0]


def convert_with_report(model: Any, *example_args: Any, to: str, example_kwargs: Mapping[str, Any] | None = None,
                        naming: AxisNaming | None = None, verify: bool = True,
                        state: Any = None) -> tuple[Any, ConversionReport]:
    """Like :func:`convert`, also returning the :class:`ConversionReport`.

    Example:
        >>> import jax, jax.numpy as jnp, equinox as eqx
        >>> _, report = convert_with_report(eqx.nn.Linear(3, 2, key=jax.random.key(0)), jnp.ones(3), to="nnx")
        >>> print(report)
        equinox -> nnx: 1 native, 0 adapter
          <root>: Linear (native)
    """
    source = framework_of(model)
    if to not in FRAMEWORKS or to == source:
        other = [f for f in FRAMEWORKS if f != source][0]
        raise LowerError(
            f"<root>: pzb.convert converts between frameworks; the model is a {source} module and to={to!r}. "
            f"Fix: pass to={other!r} (for the same framework use pzb.lower(pzb.lift(model)))."
        )
    naming = checked_naming(naming)
    # Strict: a module kept Foreign runs its own framework's code, which cannot run in the other one.
    lifted = lift(model, *example_args, example_kwargs=example_kwargs, naming=naming, strict=True, state=state)
    if source == "equinox":  # y, state = model(x, state): the converted model is called on the data only.
        from pzbridge.bridge.equinox.state import without_state_args

        example_args, state = without_state_args(example_args, state)
    lifted = example_convention(lifted, example_args, naming)  # A shape-keeping stock root records none.
    if converted_back(model, to):  # A converted model going home: its original classes come back.
        converted = lower_converted_back(lifted.body, to)
    else:
        converted = _lower_converted(lifted, source, to, naming, example_args, dict(example_kwargs or {}))
    if verify and example_args:
        converted = _verify(model, lifted, converted, source, to, example_args, dict(example_kwargs or {}), state,
                            naming)
    return converted, _report(converted, source, to)


def _lower_converted(lifted: LiftedModel, source: str, target: str, naming: AxisNaming, args: Sequence[Any],
                     kwargs: Mapping[str, Any]) -> Any:
    root = root_convention(lifted, source, naming, _output_names(lifted, args, kwargs))
    return lower_with_convention(lifted.body, target, root, naming, unit_batch=source == "nnx", converted_from=source)


def _output_names(lifted: LiftedModel, args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The names of the original output's axes in positional order (as ``lifted.positional`` lays them out)."""
    convention = lifted.convention
    if not args or convention.output is None:
        return convention.output

    structure, values = unbind_variables(lifted.body, freeze=True)

    def run(*arrays: Any) -> Any:
        # Stateless: running the lifted model would write traced values into its StateVariables.
        x, side = convention.split_call(arrays, kwargs)
        return stateless_call(structure, values, x, **side)[0]

    structs = [jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)) for a in args]
    try:
        out = jax.eval_shape(run, *structs)
    except Exception:  # noqa: BLE001 - the verification step reports a failing model with context
        return convention.output
    if not nx.is_namedarray(out) or out.positional_shape:
        return convention.output
    present = [n for n in convention.output if n in out.named_shape]
    return (*[n for n in out.named_shape if n not in present], *present)


def _report(converted: Any, source: str, target: str) -> ConversionReport:
    parts = []
    for path, module in _modules(converted, target):
        runs = adapter_runs(module)
        parts.append(ConvertedPart(path, type(module).__name__, "adapter" if runs is not None else "native",
                                   runs or ""))
    return ConversionReport(source, target, tuple(parts))


def _modules(root: Any, target: str) -> list[tuple[str, Any]]:
    """Every module of the converted model with its path, root first."""
    if target == "nnx":
        from flax import nnx

        # Containers (an adapter's lists of arrays, Variables and natives; a Sequential's layer list) are not parts.
        found = [(".".join(map(str, path)), module) for path, module in nnx.iter_modules(root)
                 if not isinstance(module, (nnx.List, nnx.Dict))]
        return sorted(found, key=lambda item: (item[0].count(".") + bool(item[0]), item[0]))
    import equinox as eqx

    found: list[tuple[str, Any]] = []

    def walk(path: str, node: Any) -> None:
        found.append((path, node))
        leaves = jax.tree_util.tree_leaves_with_path(
            node, is_leaf=lambda x: x is not node and isinstance(x, eqx.Module))
        for keypath, leaf in leaves:
            if isinstance(leaf, eqx.Module) and leaf is not node:
                walk(_join(path, jax.tree_util.keystr(keypath, simple=True, separator=".")), leaf)

    walk("", root)
    return found


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if a and b else a or b


def _is_array(value: Any) -> bool:
    return isinstance(value, (jax.Array, np.ndarray)) and np.ndim(value) > 0


def _verify(model: Any, lifted: LiftedModel, converted: Any, source: str, target: str, args: Sequence[Any],
            kwargs: dict[str, Any], state: Any, naming: AxisNaming) -> Any:
    """``converted``, checked to compute what the original computes on the examples; else a LowerError.

    An NNX module whose examples interact (attention over the batch axis,
    statistics of the batch) computes something else per example: if it
    computes the original under ``jax.vmap(..., axis_name="batch")`` (where
    the adapter sees the whole batch), it comes back marked to need that axis.
    """
    leaves = jax.tree_util.tree_leaves((args, kwargs))
    if not leaves or not all(isinstance(leaf, (jax.Array, np.ndarray)) or np.isscalar(leaf) for leaf in leaves):
        return converted  # Abstract examples (ShapeDtypeStructs): nothing to compare numerically.
    from flax import nnx

    if converted_back(model, target):
        # An adapter root: its lifted body keeps the original's (other-framework) convention, so run the adapter.
        if source == "nnx":
            want = nnx.clone(model)(*args, **kwargs)
        else:
            # A copy: eqx.nn.State.set invalidates the State it is called on, and this one is the user's.
            call = (lambda *a: model(*a, **kwargs)) if state is None else (
                lambda *a: model(*a, _copied(state), **kwargs)[0])
            want = _named_batch_call(model, call, args) if getattr(model, "needs_batch_axis", False) else call(*args)
    elif source == "equinox" and _batch_coupled_equinox(model, lifted, state):
        # Statistics of the batch: the original needs the vmap axis its BatchNorms reduce over.
        call = lambda *a: model(*a, _copied(state), **kwargs)[0]  # noqa: E731
        want = _named_batch_call(None, call, args, axis=_batch_axis_of(lifted, naming))
    else:
        before = _state_values(lifted.body)
        want = lifted.positional(*args, **kwargs)
        if target == "equinox":
            converted = _keep_written_state(converted, before, _state_values(lifted.body))
        # The original itself, where it runs on the examples as given: a lifting that computes something else
        # would otherwise convert faithfully to the wrong model.
        want = _original_output(model, source, args, kwargs, state, default=want)
    if source == "equinox":
        probe = nnx.clone(converted)  # Running may update state (batch statistics, RNG counts): not the user's.
        batched = [jnp.asarray(a)[None] for a in args]
        batched_kwargs = {k: jnp.asarray(v)[None] if _is_array(v) else v for k, v in kwargs.items()}
        _check_outputs(want, jax.tree_util.tree_map(lambda y: y[0], probe(*batched, **batched_kwargs)))
        return converted
    stateful = _stateful_equinox(converted)
    args, in_axes = _example_axes(args)
    if stateful:
        import equinox as eqx

        initial = eqx.nn.State(converted)
        got, new = jax.vmap(lambda *a: converted(*a, _copied(initial), **kwargs), axis_name=_batch_axis(converted),
                            in_axes=in_axes, out_axes=(0, None))(*args)
        if converted_back(model, target):
            _check_outputs(want, got)  # Equinox's own stateful layers (a BatchNorm) run only under the named vmap.
            return converted
        _verify_state(lifted, converted, new)
        per_example = lambda *a: converted(*a, _copied(initial), **kwargs)[0]  # noqa: E731
    else:
        per_example = lambda *a: converted(*a, **kwargs)  # noqa: E731
    plain = _mismatch(want, jax.vmap(per_example, in_axes=in_axes)(*args))
    if plain is None:
        return converted
    if hasattr(converted, "needs_batch_axis"):
        named = got if stateful else _named_batch_call(converted, per_example, args, batched=True, in_axes=in_axes)
        if _mismatch(want, named) is None:
            return dataclasses.replace(converted, needs_batch_axis=True)
    raise LowerError(plain)


def _original_output(model: Any, source: str, args: Sequence[Any], kwargs: Mapping[str, Any], state: Any,
                     default: Any) -> Any:
    """What the user's model returns on the examples, run on copies (never the user's module or State).

    ``default`` (the lifted model's output) where the original does not run
    as called here (code that needs a named ``vmap`` axis, for one).
    """
    try:
        if source == "nnx":
            from flax import nnx

            return nnx.clone(model)(*args, **kwargs)
        if state is None:
            return model(*args, **kwargs)
        return model(*args, _copied(state), **kwargs)[0]
    except Exception:  # noqa: BLE001 - the lifted model's output stands in; the comparison below still runs
        return default


def _batch_coupled_equinox(model: Any, lifted: LiftedModel, state: Any) -> bool:
    """Whether an Equinox model's BatchNorms compute batch statistics (so it runs only under a named vmap)."""
    if state is None:  # A model holding a BatchNorm is called with its State (a stock layer or custom code).
        return False
    return any(not norm.use_running_average for norm in _equinox_batch_norms(lifted))


def _equinox_batch_norms(lifted: LiftedModel) -> tuple[Any, ...]:
    from pzbridge.bridge.equinox.state import EqxBatchNorm

    return select(lifted.body).at_instances_of(EqxBatchNorm).get_sequence()


def _batch_axis_of(lifted: LiftedModel, naming: AxisNaming) -> str:
    """The one vmap axis name an Equinox model's BatchNorms reduce over; a LowerError when NNX cannot give it."""
    batch = naming.batch
    found = sorted({tuple(norm.batch_axes) for norm in _equinox_batch_norms(lifted)})
    if found != [(batch,)]:
        raise LowerError(
            f"<root>: a converted NNX model is called on a batch whose axis is named {batch!r}; the Equinox "
            f"BatchNorms reduce over the vmap axes {[list(f) for f in found]}. Fix: build them with "
            f"axis_name={batch!r} (the name NNX's batch axis gets), or keep the model in Equinox."
        )
    return batch


def _state_values(layer: Any) -> dict[str, Any]:
    """Each StateVariable's current value by label (random streams' counters aside: Equinox takes keys per call)."""
    streams = {id(s.offset) for s in select(layer).at_instances_of(RandomStream).get_sequence()}
    return {v.label: v.value for v in select(layer).at_instances_of(StateVariable).get_sequence()
            if id(v) not in streams}


def _keep_written_state(converted: Any, before: Mapping[str, Any], after: Mapping[str, Any]) -> Any:
    """``converted`` keeping in its ``eqx.nn.State`` every variable the call wrote (BatchNorm in training mode)."""
    changed = [label for label, value in after.items() if value is not before.get(label)]
    if not changed:
        return converted
    if not hasattr(converted, "with_written"):
        raise LowerError(
            f"<root>: the converted model would drop the updates of state variables {sorted(changed)} that the "
            f"original writes during the call (found a native {type(converted).__name__} root). Fix: convert the "
            "model in inference mode (model.eval()), or keep it in its framework."
        )
    return converted.with_written(changed)


def _named_batch_call(module: Any, call: Any, args: Sequence[Any], batched: bool = False,
                      axis: str | None = None, in_axes: Any = 0) -> Any:
    """``call`` under ``jax.vmap`` naming the module's batch axis (one example as a batch of one unless ``batched``)."""
    inputs = args if batched else [jnp.asarray(a)[None] for a in args]
    out = jax.vmap(call, axis_name=axis or _batch_axis(module), in_axes=in_axes)(*inputs)
    return out if batched else jax.tree_util.tree_map(lambda y: y[0], out)


def _example_axes(args: Sequence[Any]) -> tuple[list[Any], tuple[int | None, ...]]:
    """NNX examples as per-example Equinox calls take them: a leading size-1 axis NNX broadcasts is not mapped.

    (A mask ``[1, 1, q, kv]`` for every example of the batch is one
    ``[1, q, kv]`` mask passed with ``in_axes=None``.)
    """
    size = jnp.shape(args[0])[0] if args and jnp.ndim(args[0]) else None
    shared = [size not in (None, 1) and i > 0 and jnp.ndim(a) > 0 and jnp.shape(a)[0] == 1
              for i, a in enumerate(args)]
    return ([jnp.asarray(a)[0] if s else a for a, s in zip(args, shared)],
            tuple(None if s else 0 for s in shared))


def _check_outputs(want: Any, got: Any) -> None:
    message = _mismatch(want, got)
    if message is not None:
        raise LowerError(message)


def _mismatch(want: Any, got: Any) -> str | None:
    """Why ``got`` is not the original's output ``want`` (None when it is, within 1e-5)."""
    want_leaves, got_leaves = jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)
    if len(want_leaves) != len(got_leaves):
        return (f"<root>: the converted model returns {len(got_leaves)} arrays where the original returns "
                f"{len(want_leaves)}. Fix: report this with the model's code (pass verify=False to inspect it).")
    for index, (w, g) in enumerate(zip(want_leaves, got_leaves)):
        w, g = np.asarray(w), np.asarray(g)
        if w.shape != g.shape:
            return (f"<root>: output {index} of the converted model has shape {g.shape}, the original's has "
                    f"{w.shape}. Fix: report this with the model's code (pass verify=False to inspect it).")
        if w.dtype.kind in "fc" and not np.allclose(g, w, atol=1e-5, rtol=1e-5):
            return (f"<root>: the converted model differs from the original on the examples (output {index}, max "
                    f"abs difference {float(np.max(np.abs(g - w))):.3g}, expected <= 1e-5). Fix: report this with "
                    "the model's code (pass verify=False to inspect the converted model).")
        if w.dtype.kind not in "fc" and not np.array_equal(g, w):
            return (f"<root>: output {index} of the converted model differs from the original's (integer outputs). "
                    "Fix: report this with the model's code.")
    return None


def _copied(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda leaf: leaf, tree)


def _stateful_equinox(module: Any) -> bool:
    """Whether an Equinox module is called ``y, state = module(x, state)``: it holds a ``StateIndex``."""
    import equinox as eqx

    if isinstance(module, eqx.nn.StatefulLayer):
        return module.is_stateful()
    is_index = lambda leaf: isinstance(leaf, eqx.nn.StateIndex)  # noqa: E731
    return any(is_index(leaf) for leaf in jax.tree_util.tree_leaves(module, is_leaf=is_index))


def _batch_axis(module: Any) -> str:
    """The ``vmap`` axis name over which a converted stateful Equinox model forms its batch."""
    return getattr(module, "batch_axis", AxisNaming().batch)


def _verify_state(lifted: LiftedModel, converted: Any, new: Any) -> None:
    """Raises when the State a converted model returns differs from the state the original wrote (same call)."""
    written = getattr(converted, "written", ())
    if not written:
        return
    from pzbridge.bridge.equinox.adapter_state import state_dict

    want = state_dict(written, unbind_variables(lifted.body, freeze=True)[1])
    for label, got in new.get(converted.state_index).items():
        if not np.allclose(np.asarray(got), np.asarray(want[label]), atol=1e-5, rtol=1e-5):
            raise LowerError(
                f"{converted.state_index.marker}: the converted model writes state variable {label!r} unlike the "
                "original on the examples. Fix: report this with the model's code (pass verify=False to inspect it)."
            )
