"""Lowering a lifted model into the other framework: native layers, an adapter root, a converted convention.

:func:`lower_with_convention` is what ``pzb.lower(lifted, framework=other)``
and :func:`pzbridge.bridge.convert.convert` run: every sub-layer with a
counterpart in the target becomes its native class (see
:mod:`pzbridge.bridge.native_calls`), and the root is native when the whole
model has a counterpart laid out as the calling convention says, else an
adapter that names positional inputs by that convention.
:func:`converted_convention` is the lifted model's convention in the other
framework: NNX modules take a batch axis, Equinox models are called per
example.

Example:
    >>> import jax, jax.numpy as jnp, equinox as eqx
    >>> import pzbridge as pzb
    >>> lifted = pzb.lift(eqx.nn.Linear(3, 2, key=jax.random.key(0)))
    >>> module = lower_with_convention(lifted.body, "nnx", converted_convention(lifted, "nnx"))
    >>> type(module).__name__, module(jnp.ones((4, 3))).shape
    ('Linear', (4, 2))
"""

from __future__ import annotations

from typing import Any

from pzbridge.bridge.frameworks import FRAMEWORKS, traversal_of
from pzbridge.bridge.lifted import CallingConvention, LiftedModel
from pzbridge.bridge.naming import AxisNaming, checked_naming
from pzbridge.bridge.native_calls import NATIVE_CHILDREN, conventions_chain
from pzbridge.core.errors import LowerError
from pzbridge.core.random_stream import RandomStream
from pzbridge.core.selectors import select

__all__ = ["adapter_runs", "converted_convention", "converted_back", "lower_converted_back", "lower_with_convention",
           "root_convention"]


def root_convention(lifted: LiftedModel, source: str, naming: AxisNaming,
                     output: tuple[str, ...] | None) -> CallingConvention:
    """The converted root's convention: the source's, with the batch axis added (Equinox to NNX).

    An NNX source keeps its convention (batched, possibly naming ``batch``):
    the Equinox root adds a unit batch axis around each per-example call
    (``lower_with_convention(..., unit_batch=True)``).

    Example:
        >>> import jax, equinox as eqx
        >>> import pzbridge as pzb
        >>> lifted = pzb.lift(eqx.nn.Linear(3, 2, key=jax.random.key(0)))
        >>> root_convention(lifted, "equinox", AxisNaming(), ("features",)).output
        ('batch', 'features')
    """
    convention = CallingConvention(lifted.convention.inputs, output, lifted.convention.side_names)
    if not convention.inputs:
        raise LowerError(
            f"<root>: {lifted.body.__class__.__name__} has no recorded calling convention (found none: the root "
            "was not traced). Fix: pass example inputs to pzb.convert so the model is traced."
        )
    batch = naming.batch
    if source == "equinox":
        used = {n for names in convention.inputs for n in names} | set(convention.output or ())
        if batch in used:
            raise LowerError(
                f"<root>: the Equinox model already names an axis {batch!r} (found convention "
                f"{convention.inputs}), so the NNX batch axis needs another name. "
                "Fix: pass naming=AxisNaming(batch='examples') to pzb.convert."
            )
        add = lambda names: (batch, *names)  # noqa: E731
        output = None if convention.output is None else add(convention.output)
        return CallingConvention(tuple(add(n) for n in convention.inputs), output, convention.side_names,
                                 batched_keywords=batch)
    return convention


def converted_convention(lifted: LiftedModel, target: str, naming: AxisNaming | None = None) -> CallingConvention:
    """The calling convention ``lifted`` gets in ``target`` (a batch axis added from Equinox to NNX).

    Example:
        >>> import jax, equinox as eqx
        >>> import pzbridge as pzb
        >>> lifted = pzb.lift(eqx.nn.Linear(3, 2, key=jax.random.key(0)))
        >>> converted_convention(lifted, "nnx").inputs
        (('batch', 'features'),)
    """
    naming = checked_naming(naming)
    if target == lifted.framework:
        return lifted.convention
    return root_convention(lifted, lifted.framework, naming, lifted.convention.output)


def lower_with_convention(body: Any, target: str, convention: CallingConvention,
                          naming: AxisNaming | None = None, unit_batch: bool = False,
                          converted_from: str | None = None) -> Any:
    """Lowers ``body`` into ``target`` as a module called positionally by ``convention``.

    Every sub-layer with a counterpart becomes the target's native class;
    glue and pzbridge-only layers run in an adapter root that names the
    positional inputs by ``convention`` (NNX: include the batch axis name, e.g.
    ``("batch", "seq")``; Equinox: per example). The root is native itself
    when the whole body has a counterpart laid out as ``convention`` says.

    Args:
      body: A lifted layer (for example ``lifted.body`` or a pzbridge model).
      target: ``"nnx"`` or ``"equinox"``.
      convention: Names of the positional axes of each input and of the output.
      naming: The axis naming of the natives' conventions.
      unit_batch: Equinox only: ``convention`` describes a batched call (an
        NNX model's); the Equinox root, called per example, adds a batch axis
        of size one around the call (exact for per-example computations).
      converted_from: The framework the model came from, recorded on an
        adapter root so converting it back restores the original classes
        (see :func:`lower_converted_back`).

    Example:
        >>> import jax.numpy as jnp
        >>> import pzbridge as pzb
        >>> from pzbridge.bridge.lifted import CallingConvention
        >>> conv = CallingConvention((("batch", "f"),), ("batch", "f"))
        >>> module = lower_with_convention(pzb.nn.Softmax("f"), "nnx", conv)
        >>> module(jnp.zeros((3, 2))).tolist()[0]
        [0.5, 0.5]
    """
    naming = checked_naming(naming)
    if target not in FRAMEWORKS:
        raise LowerError(f"<root>: cannot lower to framework {target!r}. Fix: pass 'equinox' or 'nnx'.")
    traversal = traversal_of(target)
    ctx = traversal.new_lower_context()
    ctx.shared.extras[NATIVE_CHILDREN] = naming
    native = _native_root(body, target, traversal, ctx, convention, naming)
    if native is not None:
        return native
    if target == "nnx":
        from pzbridge.bridge.nnx.adapter import NnxAdapter

        return NnxAdapter.wrap(body, ctx, convention, converted_from=converted_from)
    from pzbridge.bridge.equinox.adapter import EquinoxAdapter

    return EquinoxAdapter.wrap(body, ctx, convention, unit_batch=unit_batch, converted_from=converted_from)


def converted_back(module: Any, target: str) -> bool:
    """Whether ``module`` is a converted adapter root that came from ``target`` (so converting restores it).

    Example:
        >>> converted_back(object(), "nnx")
        False
    """
    return getattr(module, "converted_from", None) == target


def lower_converted_back(body: Any, target: str) -> Any:
    """Lowers a re-lifted converted model into the framework it came from, as an ordinary lowering.

    The re-lifted layers are the original lifted ones (custom classes traced,
    stock layers by their rules) except the native children, which lift from
    the other framework and lower back through the cross rules; so the result
    has the original's classes and calling convention.

    Example:
        >>> import jax, equinox as eqx
        >>> import pzbridge as pzb
        >>> body = pzb.lift(eqx.nn.Linear(3, 2, key=jax.random.key(0))).body
        >>> type(lower_converted_back(body, "equinox")).__name__
        'Linear'
    """
    ctx = traversal_of(target).new_lower_context()
    if target == "nnx":
        from pzbridge.bridge.nnx.traversal import MERGE_EQUAL_COPIES

        ctx.shared.extras[MERGE_EQUAL_COPIES] = {}  # Modules shared in the original came back as equal copies.
        return ctx.lower_node(body, ctx)
    from pzbridge.bridge.equinox.state import with_initial_state

    # Equinox keeps a BatchNorm's statistics in a State: eqx.nn.State(converted) builds it from the indices.
    return with_initial_state(ctx.lower_node(body, ctx), ctx)


def _native_root(body: Any, target: str, traversal: Any, ctx: Any, root: CallingConvention,
                 naming: AxisNaming) -> Any | None:
    """The lowered root when it is native and takes the converted convention as it is, else None."""
    if target == "equinox" and select(body).at_instances_of(RandomStream).count():
        # Equinox modules take keys per call and hold no stream: a native root would drop it for good.
        return None
    try:
        module = ctx.lower_node(body, ctx)
    except LowerError:
        return None
    if adapter_runs(module) is not None:
        return None
    own = traversal.RULES.lowered_convention(body, module, naming) or traversal.RULES.convention_of(module, naming)
    if own is None or not _same_layout(own, root, naming):
        return None
    if type(module).__name__ == "Sequential" and not _chains(module, traversal, naming):
        return None
    return module


def _same_layout(own: CallingConvention, root: CallingConvention, naming: AxisNaming) -> bool:
    # Native modules take (NNX) or need (Equinox) no batch name: compare without it.
    strip = lambda names: tuple(n for n in names if n != naming.batch)  # noqa: E731
    if own.output is None or root.output is None or len(own.inputs) != len(root.inputs):
        return False
    return strip(own.output) == strip(root.output) and all(
        strip(a) == strip(b) for a, b in zip(own.inputs, root.inputs))


def _chains(module: Any, traversal: Any, naming: AxisNaming) -> bool:
    items = list(getattr(module, "layers", ()))
    if any(adapter_runs(item) is not None for item in items):
        return False
    # Plain functions (activations) have no convention: they keep the layout.
    return conventions_chain([traversal.RULES.convention_of(item, naming) for item in items])


def adapter_runs(module: Any) -> str | None:
    """What an adapter module runs (``None`` when ``module`` is not an adapter).

    Example:
        >>> adapter_runs(object()) is None
        True
    """
    name = type(module).__name__
    if name not in ("NnxAdapter", "EquinoxAdapter"):
        return None
    structure = module.structure if name == "EquinoxAdapter" else module.layer_with_slots(native=False)
    inner = type(structure).__name__
    template = getattr(structure, "template", None)
    original = getattr(template, "class_name", None)
    return f"{inner}({original})" if original else inner
