"""Native children inside adapters: the named-to-positional bridge a converted model runs on.

When a lifted model is lowered into the *other* framework
(:func:`pzbridge.bridge.convert.convert`), glue that has no counterpart (a
traced module's own computation, a pzbridge-only layer) becomes an adapter
module, but every layer inside it that does have a counterpart should become
that framework's native class, so the converted model is built from the
target's own ``nnx.Linear`` / ``eqx.nn.Conv2d`` / ... and trains there like
one written by hand.

:func:`split_natives` walks a layer and replaces each outermost sub-layer
that lowers natively by a :class:`NativeSlot` (a placeholder in the
adapter's static structure, holding the native's calling convention); the
adapter keeps the native modules as real children. At call time
:func:`fill_native_slots` puts a :class:`NativeCall` in each slot, which
turns the named arrays the glue passes into the positional layout the native
expects (its convention), calls it and names the result again. Extra named
axes (a batch, a worlds axis) become leading positional axes for modules that
broadcast over them (NNX: ``batched=True``) or are mapped over with
:func:`~pzbridge.core.named_axes.nmap` for modules called per example
(Equinox).

Example:
    >>> import jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> from pzbridge.bridge.lifted import CallingConvention
    >>> call = NativeCall(lambda x: x * 2, CallingConvention((("f",),), ("f",)), batched=True)
    >>> dict(call(pzb.nx.wrap(jnp.ones((3, 2)), "b", "f")).named_shape)
    {'b': 3, 'f': 2}
"""

from __future__ import annotations

import inspect

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from pzbridge.bridge.lifted import CallingConvention, name_trailing_axes
from pzbridge.core import named_axes as nx
from pzbridge.core.errors import LowerError, NamedAxisError, PzbridgeError
from pzbridge.core.selectors import select
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.combinators import BranchAndAddTogether, BranchAndMultiplyTogether, Residual, Sequential
from pzbridge.nn.dataflow import BindSideInputs, Branch, CallChild, Traced
from pzbridge.nn.layer import Layer
from pzbridge.nn.switch import Switch

__all__ = [
    "NATIVE_CHILDREN",
    "NativeCall",
    "NativeConvention",
    "NativeInputsNotConvertible",
    "NativeSlot",
    "conventions_chain",
    "fill_native_slots",
    "is_glue",
    "keyword_inputs_of",
    "native_lowerer",
    "native_slots",
    "register_keyword_inputs",
    "split_natives",
    "wants_native_children",
]

# Key of LowerContext.shared.extras: set (to the AxisNaming) while converting between frameworks.
NATIVE_CHILDREN = "native_children"


KeywordInputs = tuple[tuple[str, tuple[str, ...]], ...]

# Native classes taking inputs beyond their positional convention as keyword arguments (NNX attention's `mask=`):
# class -> (module, naming) -> ((keyword, names of its trailing axes), ...). Filled by the framework rule modules.
_KEYWORD_INPUTS: dict[type, Callable[[Any, Any], KeywordInputs]] = {}


def register_keyword_inputs(cls: type, keywords_of: Callable[[Any, Any], KeywordInputs]) -> None:
    """Declares that natives of class ``cls`` take the inputs after their positional ones as keywords.

    ``keywords_of(module, naming)`` gives, per extra input in order, the
    keyword and the names of the trailing axes the native expects; an axis
    the input lacks is passed with size 1, for the native to broadcast
    (``naming`` is the conversion's :class:`~pzbridge.bridge.naming.AxisNaming`).

    Example:
        >>> class Masked:
        ...     def __call__(self, x, *, mask=None):
        ...         return x if mask is None else x * mask
        >>> register_keyword_inputs(Masked, lambda module, naming: (("mask", ("f",)),))
        >>> keyword_inputs_of(Masked(), None)
        (('mask', ('f',)),)
    """
    _KEYWORD_INPUTS[cls] = keywords_of


def keyword_inputs_of(module: Any, naming: Any) -> KeywordInputs:
    """The keyword inputs registered for ``module``'s class (looked up along its MRO), else ``()``.

    Example:
        >>> keyword_inputs_of(object(), None)
        ()
    """
    for cls in type(module).__mro__:
        if cls in _KEYWORD_INPUTS:
            return tuple(_KEYWORD_INPUTS[cls](module, naming))
    return ()


class NativeInputsNotConvertible(LowerError, NotImplementedError):
    """A native child is called with inputs its calling convention has no place for yet (not implemented).

    Example:
        >>> issubclass(NativeInputsNotConvertible, LowerError)
        True
    """


@pytree_dataclass
class NativeConvention(CallingConvention):
    """A native's calling convention plus the keywords its further inputs are passed as.

    The glue calls a native child as the lifted layer it replaces was called:
    an Equinox attention takes ``(query, key, value, mask)``, NNX's takes the
    mask as ``mask=``. Inputs after the positional ones go to ``keywords`` in
    order, laid out ``(*extra axes, *names)`` with size 1 where the input lacks
    a name.

    Attributes:
      keywords: ``(keyword, names of its trailing axes)`` per extra input (static).

    Example:
        >>> conv = NativeConvention((("f",),), ("f",), keywords=(("mask", ("f",)),))
        >>> conv.keywords[0][0], conv.inputs
        ('mask', (('f',),))
    """

    keywords: KeywordInputs = static_field(default=())

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "keywords", tuple((k, tuple(names)) for k, names in self.keywords))


def wants_native_children(ctx: Any) -> bool:
    """Whether adapters made in this lowering should hold native children (only inside a conversion).

    Example:
        >>> from pzbridge.bridge.context import LowerContext
        >>> wants_native_children(LowerContext(framework="toy", lower_node=lambda l, c: l))
        False
    """
    return NATIVE_CHILDREN in ctx.shared.extras


def native_lowerer(ctx: Any, convention_of: Callable[[Any, Any], CallingConvention | None],
                   is_native: Callable[[Any], bool],
                   accept: Callable[[Any], bool] = lambda layer: True,
                   lowered_convention: Callable[[Any, Any, Any], CallingConvention | None] | None = None,
                   ) -> Callable[[Any, str], tuple[Any, CallingConvention] | None]:
    """The ``lower_native`` function :func:`split_natives` needs, for one framework's lowering ``ctx``.

    A sub-layer counts as native when ``accept`` takes it, it lowers without
    error to a module ``is_native`` accepts (not an adapter), and that
    module's lift rule records a convention with named inputs and one output
    (``lowered_convention(layer, module, naming)``, where given and not None,
    says it for natives whose convention depends on the lifted layer).

    Example:
        >>> from pzbridge.bridge.context import LowerContext
        >>> ctx = LowerContext(framework="toy", lower_node=lambda l, c: "native")
        >>> conv = CallingConvention((("f",),), ("f",))
        >>> native_lowerer(ctx, lambda m, naming: conv, lambda m: True)("layer", "a.b")[0]
        'native'
    """
    naming = ctx.shared.extras.get(NATIVE_CHILDREN)

    def lower_native(layer: Any, where: str) -> tuple[Any, CallingConvention] | None:
        if not accept(layer):
            return None
        try:
            module = ctx.lower_node(layer, ctx.child(*[p for p in where.split(".") if p]))
        except PzbridgeError:
            return None
        if not is_native(module):
            return None
        convention = lowered_convention(layer, module, naming) if lowered_convention is not None else None
        convention = convention or convention_of(module, naming)
        if convention is None or convention.output is None or not convention.inputs:
            return None
        keywords = keyword_inputs_of(module, naming)
        if keywords:
            convention = NativeConvention(convention.inputs, convention.output, convention.side_names,
                                          convention.batched_keywords, keywords=keywords)
        return module, convention

    return lower_native


@pytree_dataclass
class NativeSlot(Layer):
    """Where an adapter calls its native child ``index`` (a placeholder in the adapter's static structure).

    Attributes:
      index: Which of the adapter's native children runs here (static).
      convention: The native's calling convention (names of its positional axes, static).
      path: Where the child sat in the lifted model, for messages and reports (static).

    Example:
        >>> NativeSlot(0, CallingConvention((("f",),), ("f",)), "blocks.0.mlp").index
        0
    """

    index: int = static_field()
    convention: CallingConvention = static_field()
    path: str = static_field(default="")

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        raise LowerError(
            f"{self.path or '<root>'}: this native slot is not bound to a module (found an empty slot). "
            "Fix: call the adapter module that holds it, not its static structure."
        )


@pytree_dataclass
class NativeCall(Layer):
    """Runs a native framework module on named arrays, through the module's calling convention.

    Each input's axes named in ``convention.inputs[i]`` become its trailing
    positional axes; other named axes are vectorised over: as leading
    positional axes when ``batched`` (the module broadcasts over leading
    axes, as NNX layers do), else by :func:`~pzbridge.core.named_axes.nmap`
    (the module is called per example, as Equinox layers are). The output's
    trailing axes get ``convention.output``'s names back.

    Attributes:
      module: The native module, or any callable on positional arrays (static).
      convention: How its positional axes are named (static).
      batched: Whether it takes leading batch axes itself (static).
      path: Where it sits in the lifted model, for messages (static).

    Example:
        >>> import jax.numpy as jnp
        >>> import pzbridge as pzb
        >>> double = NativeCall(lambda x: x * 2, CallingConvention((("f",),), ("f",)), batched=False)
        >>> double(pzb.nx.wrap(jnp.ones((3, 2)), "b", "f")).unwrap("b", "f").tolist()
        [[2.0, 2.0], [2.0, 2.0], [2.0, 2.0]]
    """

    module: Any = static_field()
    convention: CallingConvention = static_field()
    batched: bool = static_field(default=True)
    path: str = static_field(default="")

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        inputs = _self_attention_filled(tuple(x) if isinstance(x, tuple) else (x,), self.module, self.convention)
        keywords = getattr(self.convention, "keywords", ())
        count = len(self.convention.inputs)
        if len(inputs) > count + len(keywords):
            taken = [list(n) for n in self.convention.inputs] + [f"{k}={list(n)}" for k, n in keywords]
            raise NamedAxisError(
                f"{self.path or '<root>'}: the native {type(self.module).__name__} takes "
                f"{count + len(keywords)} inputs named {taken}, found {len(inputs)}. "
                "Fix: check the converted model's glue."
            )
        inputs, extra = inputs[:count], inputs[count:]
        mask_names = None
        if not self.batched:
            inputs, mask_names = _mask_as_input(inputs, side_inputs, self.module, self.convention, self.path)
        # Fewer inputs than the convention names leave the native's trailing optional ones (a mask) at their defaults.
        names = self.convention.inputs[:len(inputs)]
        if mask_names is not None:
            names = (*names[:-1], mask_names)
        inputs = tuple(nx.wrap(v) if not nx.is_namedarray(v) else v for v in inputs)
        for value, own in zip(inputs, names):
            missing = [n for n in own if n not in value.named_shape]
            if missing:
                raise NamedAxisError(
                    f"{self.path or '<root>'}: the native {type(self.module).__name__} needs input axes "
                    f"{list(own)}; axes {missing} are missing (found named shape {dict(value.named_shape)}). "
                    "Fix: name the input's axes as the lifted layer expects."
                )
        keyword_inputs = tuple((kw, value, own) for (kw, own), value in zip(keywords, extra) if value is not None)
        # A side input named as one of the native's keywords (the glue's `attn(x, x, x, mask=m)`) is passed as it.
        given = {kw for kw, _, _ in keyword_inputs} | ({"mask"} if mask_names is not None else set())
        keyword_inputs += tuple((kw, side_inputs[kw], own) for kw, own in keywords
                                if kw not in given and side_inputs.get(kw) is not None)
        if self.batched:
            return self._call_batched(inputs, keyword_inputs)
        dropped = sorted(k for k, v in side_inputs.items()
                         if k not in given and (nx.is_namedarray(v) or isinstance(v, jax.Array)))
        if dropped:
            # A per-example native's convention has no place for them: running without would compute something else.
            raise NativeInputsNotConvertible(
                f"{self.path or '<root>'}: the native {type(self.module).__name__} is called with array keyword "
                f"inputs {dropped}, which natives called per example (Equinox) cannot take yet (found only a "
                f"place for its positional inputs {[list(n) for n in self.convention.inputs]}). Fix: keep this "
                "model in its framework, or pass those inputs positionally in the model's code."
            )
        if keyword_inputs:
            raise NativeInputsNotConvertible(
                f"{self.path or '<root>'}: keyword inputs {[kw for kw, _, _ in keyword_inputs]} of a native "
                f"{type(self.module).__name__} called per example are not supported yet (found batched=False; "
                "only batched natives, NNX, take them). Fix: register no keyword inputs for per-example natives."
            )
        positional = [value.untag(*own) for value, own in zip(inputs, names)]
        return self._name_output(nx.nmap(self._per_example)(*positional))

    def _per_example(self, *arrays: Any) -> Any:
        # Leading positional axes (an NNX model's unnamed batch) are mapped over too.
        run = self.module
        for _ in range(arrays[0].ndim - len(self.convention.inputs[0])):
            run = jax.vmap(run)
        return run(*arrays)

    def _call_batched(self, inputs: Sequence[nx.NamedArrayBase],
                      keyword_inputs: Sequence[tuple[str, Any, tuple[str, ...]]] = ()) -> Any:
        extras: list[str] = []
        for value, own in zip(inputs, self.convention.inputs):
            extras += [n for n in value.named_shape if n not in own and n not in extras]
        for _, value, own in keyword_inputs:
            if nx.is_namedarray(value):
                extras += [n for n in value.named_shape if n not in own and n not in extras]
        arrays = []
        for value, own in zip(inputs, self.convention.inputs):
            sizes = dict(value.named_shape)
            # An input lacking an extra axis (a key without the worlds axis) is broadcast to it.
            for name in extras:
                if name not in sizes:
                    size = _size_of(name, [*inputs, *(v for _, v, _ in keyword_inputs)])
                    value = value + nx.zeros({name: size}, dtype=value.dtype)
            arrays.append(value.unwrap(*extras, *own))
        keywords = {kw: _keyword_array(value, (*extras, *own)) for kw, value, own in keyword_inputs}
        out = self.module(*arrays, **keywords)
        # Leading positional axes the input had (an NNX model's unnamed batch) stay positional, in front.
        return name_trailing_axes(nx.wrap(out), (*extras, *(self.convention.output or ())))

    def _name_output(self, out: Any) -> Any:
        names = self.convention.output or ()
        return name_trailing_axes(out, names) if names else out


def _size_of(name: str, values: Sequence[Any]) -> int:
    return next(dict(v.named_shape)[name] for v in values if nx.is_namedarray(v) and name in v.named_shape)


def _keyword_array(value: Any, names: tuple[str, ...]) -> Any:
    """``value`` laid out ``(*positional, *names)``, with a size-1 axis for each name it lacks (broadcast by the native).

    Positional axes first stand for the trailing names the input lacks (an
    Equinox mask's unnamed heads axis, as Equinox attention reads it); any
    further ones stay in front. An unnamed array is passed as it is: it is
    already in the native's layout.
    """
    if not nx.is_namedarray(value) or not value.named_shape:
        return nx.unwrap(value) if nx.is_namedarray(value) else value
    missing = [n for n in names if n not in value.named_shape]
    count = min(len(missing), len(value.positional_shape))
    if count:
        lead = len(value.positional_shape) - count
        value = value.tag_prefix(*[f"__keyword_lead{i}" for i in range(lead)], *missing[len(missing) - count:])
        value = value.untag_prefix(*[f"__keyword_lead{i}" for i in range(lead)]) if lead else value
    present = [n for n in names if n in value.named_shape]
    data = value.unwrap(*present)
    lead_shape = data.shape[:len(value.positional_shape)]
    return data.reshape(lead_shape + tuple(dict(value.named_shape).get(n, 1) for n in names))


def _required_inputs(module: Any) -> int:
    """How many positional arguments ``module``'s ``__call__`` cannot do without."""
    try:
        params = list(inspect.signature(type(module).__call__).parameters.values())[1:]
    except (TypeError, ValueError):
        return 0
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds and p.default is inspect.Parameter.empty for p in params)


def _mask_as_input(inputs: tuple[Any, ...], side_inputs: Mapping[str, Any], module: Any,
                   convention: CallingConvention, path: str) -> tuple[tuple[Any, ...], tuple[str, ...] | None]:
    """``inputs`` with a ``mask=`` side input appended where the per-example native takes ``mask`` next.

    The glue of an NNX model calls attention with ``mask=`` (NNX layout
    ``[batch..., heads | 1, q, kv]``); Equinox's attention takes the mask as
    its fourth positional argument, ``(q, kv)`` or ``(heads, q, kv)`` per
    example. A size-1 axis left positional (the broadcast heads axis) is
    dropped; one more axis of the attention's head count is the heads axis.
    Also returns the names the mask's positional axes take (None: no mask).
    """
    mask = side_inputs.get("mask")
    if mask is None or not nx.is_namedarray(mask) or len(inputs) >= len(convention.inputs):
        return inputs, None
    if _positional_parameter(module, len(inputs)) != "mask":
        return inputs, None
    mask = without_unit_positional(mask)
    own = convention.inputs[len(inputs)]
    query = inputs[0].named_shape if nx.is_namedarray(inputs[0]) else {}
    extra = [n for n in mask.named_shape if n not in own and n not in query]
    if len(extra) == 1 and mask.named_shape[extra[0]] == getattr(module, "num_heads", None):
        own = (extra[0], *own)  # One mask per head.
    elif mask.positional_shape or extra:
        raise NativeInputsNotConvertible(
            f"{path or '<root>'}: the native {type(module).__name__} takes a mask over {list(own)} (and heads) per "
            f"example; found a mask with axes {dict(mask.named_shape)} and positional shape "
            f"{mask.positional_shape} (axes {extra} are neither the query's nor the mask's own). Fix: pass a mask "
            "in NNX's layout [batch, heads | 1, q, kv], or keep this model in its framework."
        )
    return (*inputs, mask), own  # nmap broadcasts it over the query's batch axes it lacks (NNX's size 1).


def without_unit_positional(mask: nx.NamedArrayBase) -> nx.NamedArrayBase:
    """``mask`` without its positional axes when all have size 1 (they broadcast, as in NNX); else ``mask``.

    A traced caller's NNX mask ``[batch, 1, q, kv]`` keeps its size-1 heads
    axis positional between named ones.

    Example:
        >>> import jax.numpy as jnp
        >>> import pzbridge as pzb
        >>> m = pzb.nx.wrap(jnp.ones((2, 1, 3), bool)).tag("batch", "__h", "kv").untag("__h")
        >>> without_unit_positional(m).positional_shape
        ()
    """
    if mask.positional_shape and all(s == 1 for s in mask.positional_shape):
        return nx.nmap(lambda m: m.reshape(()))(mask)
    return mask


def _positional_parameter(module: Any, index: int) -> str | None:
    """The name of the ``index``-th positional parameter of ``module.__call__`` (None if unknown)."""
    try:
        parameters = list(inspect.signature(type(module).__call__).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return positional[index] if index < len(positional) else None


def _self_attention_filled(inputs: tuple[Any, ...], module: Any, convention: CallingConvention) -> tuple[Any, ...]:
    """One input where the native requires keys and values too (NNX self-attention ``attn(x)``): ``x`` for each.

    Each copy is renamed position by position to the names the convention gives that input (``seq`` -> ``kv_seq``).
    """
    required = _required_inputs(module)
    if len(inputs) != 1 or required <= 1 or len(convention.inputs) < required or not nx.is_namedarray(inputs[0]):
        return inputs
    first, own = inputs[0], convention.inputs[0]
    if any(len(names) != len(own) for names in convention.inputs[1:required]) or any(n not in first.named_shape
                                                                                     for n in own):
        return inputs
    filled = [first]
    for names in convention.inputs[1:required]:
        renames = {a: b for a, b in zip(own, names) if a != b}
        filled.append(first.untag(*renames).tag(*renames.values()) if renames else first)
    return tuple(filled)


def conventions_chain(conventions: Sequence[CallingConvention | None]) -> bool:
    """Whether modules with these conventions can run one after another positionally (a native Sequential).

    ``None`` marks an elementwise step (a plain function), which keeps the
    layout; so does a module naming no axis at all (``((),) -> ()``: Dropout,
    a scalar PReLU work on any shape).

    Example:
        >>> f = CallingConvention((("f",),), ("f",))
        >>> conventions_chain([f, None, f]), conventions_chain([f, CallingConvention((("c", "h"),), ("c", "h"))])
        (True, False)
        >>> conventions_chain([f, CallingConvention(((),), ()), f])
        True
    """
    previous = None
    for convention in conventions:
        if convention is None or (convention.inputs == ((),) and convention.output == ()):
            continue
        if len(convention.inputs) != 1 or convention.output is None:
            return False
        if previous is not None and tuple(convention.inputs[0]) != tuple(previous):
            return False
        previous = convention.output
    return True


def native_slots(structure: Any) -> list[NativeSlot]:
    """The native slots of an adapter's structure, in order of their index.

    Example:
        >>> import pzbridge as pzb
        >>> slot = NativeSlot(0, CallingConvention((("f",),), ("f",)))
        >>> [s.index for s in native_slots(pzb.nn.Sequential([slot]))]
        [0]
    """
    return sorted(select(structure).at_instances_of(NativeSlot).get_sequence(), key=lambda s: s.index)


def fill_native_slots(structure: Any, fill: Callable[[NativeSlot], Any]) -> Any:
    """``structure`` with each :class:`NativeSlot` replaced by ``fill(slot)``.

    Example:
        >>> import pzbridge as pzb
        >>> slot = NativeSlot(0, CallingConvention((("f",),), ("f",)))
        >>> fill_native_slots(pzb.nn.Sequential([slot]), lambda s: pzb.nn.Identity())
        Sequential(sublayers=[Identity()])
    """
    selection = select(structure).at_instances_of(NativeSlot)
    return selection.apply(fill, share_state=True) if selection.count() else structure  # Lowering keeps identity.


_GLUE = (Sequential, Residual, BranchAndAddTogether, BranchAndMultiplyTogether, Branch, BindSideInputs, CallChild,
         Traced, Switch)


def is_glue(layer: Any) -> bool:
    """Whether ``layer`` is glue a conversion opens up (combinators, traced bodies, child calls).

    Example:
        >>> import pzbridge as pzb
        >>> is_glue(pzb.nn.Sequential([])), is_glue(pzb.nn.Identity())
        (True, False)
    """
    return isinstance(layer, _GLUE)


def split_natives(layer: Any, lower_native: Callable[[Any, str], tuple[Any, CallingConvention] | None],
                  path: str = "", is_glue: Callable[[Any], bool] = is_glue) -> tuple[Any, list[Any]]:
    """Replaces each outermost sub-layer of ``layer`` that lowers natively by a :class:`NativeSlot`.

    Only children called by glue are candidates: the glue itself (a traced
    module's body, combinators such as :class:`~pzbridge.nn.Sequential`) is
    opened up, while a layer made by a framework rule (an attention layer with
    its projections) is native as a whole or stays lifted as a whole.

    Args:
      layer: The lifted layer an adapter will run (never replaced itself).
      lower_native: ``(sub_layer, path) -> (native_module, convention)``, or
        None when the sub-layer has no native form (then its own sub-layers
        are tried).
      path: The layer's path in the model (for messages).

    Returns:
      The structure with slots, and the native modules in slot order.

    Example:
        >>> import pzbridge as pzb
        >>> conv = CallingConvention((("f",),), ("f",))
        >>> seq = pzb.nn.Sequential([pzb.nn.Identity(), pzb.nn.Softmax("f")])
        >>> native = lambda sub, where: ("softmax", conv) if isinstance(sub, pzb.nn.Softmax) else None
        >>> structure, natives = split_natives(seq, native)
        >>> natives, type(structure.sublayers[1]).__name__
        (['softmax'], 'NativeSlot')
    """
    natives: list[Any] = []

    def visit(node: Any, where: str) -> Any:
        glue = is_glue(node)
        if not glue or isinstance(node, Sequential):  # A Sequential may have a native container.
            found = lower_native(node, where)
            if found is not None:
                natives.append(found[0])
                return NativeSlot(len(natives) - 1, found[1], where)
        # Glue is opened up; any other layer without a native form stays lifted as a whole (its
        # parts are named by its own rule, not as the target's layers name them).
        return descend(node, where) if glue else node

    def descend(node: Any, where: str) -> Any:
        selection = select(node).at_subtrees_where(lambda t: isinstance(t, Layer) and t is not node)
        if not selection.count():
            return node
        # share_state: lowering maps variables by identity, so the lowered copy must keep the lifted ones.
        return selection.apply(lambda keypath, sub: visit(sub, _join(where, keypath)), with_keypath=True,
                               share_state=True)

    return (descend(layer, path) if is_glue(layer) else layer), natives


def _join(where: str, keypath: Any) -> str:
    parts = [str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in keypath]
    return ".".join([p for p in (where, *parts) if p])
