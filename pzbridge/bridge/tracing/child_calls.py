"""One JAX primitive per child call, so a traced ``__call__`` shows its children as single equations.

While a custom module is traced, each of its child modules is replaced by a
:class:`ChildProxy`. Calling the proxy binds :data:`child_call_p`, whose
operands are the child's own arrays and the call's array arguments, and whose
``call`` parameter (a :class:`ChildCall`) says how to rebuild and run the
real child. In the jaxpr the child is one equation; the glue around it is
ordinary equations. ``jax.vmap`` over a child (``jax.vmap(self.mlp)(x)``)
stays one equation too: the batching rule records the mapped axes in the
``vmaps`` parameter instead of expanding the child, so the lifted child can
treat the mapped axis as a named axis that keeps its outside name.

The primitive has an abstract evaluation (``jax.eval_shape`` of the real
call), an implementation and an XLA lowering (the real call, vmapped as
recorded), and a JVP rule (the JVP of the implementation), so traced code
may also be evaluated or differentiated.

Example:
    >>> import jax, jax.numpy as jnp
    >>> call = ChildCall("double", lambda leaves, args, kwargs: args[0] * 2, 0, jax.tree_util.tree_structure(((1,), {})), ())
    >>> jaxpr = jax.make_jaxpr(lambda x: bind_child_call(call, [], [x]))(jnp.ones(3))
    >>> [e.primitive.name for e in jaxpr.eqns]
    ['pzb_child_call']
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from pzbridge.core.errors import LiftError

child_call_p = Primitive("pzb_child_call")
child_call_p.multiple_results = True


@dataclasses.dataclass(frozen=True, eq=False)
class ChildCall:
    """How to run one traced child call from flat operands (hashable by identity: a primitive parameter).

    Attributes:
      key: The child's key in its parent (``"attn"``, ``"layers[2]"``).
      run: ``run(module_leaves, args, kwargs) -> output`` calls the real child. A
        ``pzb_signature`` attribute on it (or on the object of a bound method;
        hashable: the child's structure and static fields) lets equal children
        share abstract evaluations.
      module_leaf_count: How many leading operands are the child's arrays.
      args_treedef: Tree structure of ``(args, kwargs)`` with array leaves
        replaced by operands and the rest kept in ``static_leaves``.
      static_leaves: ``(position, value)`` of the non-array leaves of ``(args, kwargs)``.
      arg_positions: Flat positions of the array leaves in ``(args, kwargs)``.
      out_treedef: Tree structure of the output (set by the abstract evaluation).
    """

    key: str
    run: Callable[[Sequence[Any], tuple[Any, ...], dict[str, Any]], Any]
    module_leaf_count: int
    args_treedef: Any
    static_leaves: tuple[tuple[int, Any], ...]
    arg_positions: tuple[int, ...] = ()
    out_treedef: list[Any] = dataclasses.field(default_factory=lambda: [None])

    def rebuild_args(self, arrays: Sequence[Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The call's ``(args, kwargs)`` with ``arrays`` in the array positions."""
        leaves: list[Any] = [None] * self.args_treedef.num_leaves
        for position, value in self.static_leaves:
            leaves[position] = value
        positions = self.arg_positions or tuple(i for i in range(len(leaves)) if i not in dict(self.static_leaves))
        for position, value in zip(positions, arrays):
            leaves[position] = value
        return jax.tree_util.tree_unflatten(self.args_treedef, leaves)

    def flat_call(self, *operands: Any) -> list[Any]:
        """Runs the real child on flat operands and returns its flat outputs."""
        module_leaves = operands[: self.module_leaf_count]
        args, kwargs = self.rebuild_args(operands[self.module_leaf_count :])
        out = self.run(module_leaves, args, kwargs)
        flat, treedef = jax.tree_util.tree_flatten(out)
        self.out_treedef[0] = treedef
        return flat


def _apply(*operands: Any, call: ChildCall, vmaps: tuple[tuple[int | None, ...], ...]) -> list[Any]:
    fn: Callable[..., Any] = call.flat_call
    for in_axes in reversed(vmaps):  # innermost vmap first
        fn = jax.vmap(fn, in_axes=in_axes)
    return fn(*operands)


_SHAPES: dict[Any, tuple[list[Any], Any]] = {}  # structural call key -> (output avals, output treedef)
_SHAPES_LIMIT = 4096


def _shape_key(call: ChildCall, avals: Sequence[Any], vmaps: Any) -> Any:
    """A key under which calls of structurally equal children on equal shapes share one abstract evaluation."""
    owner = getattr(call.run, "__self__", call.run)  # a bound method: its object carries the signature
    signature = getattr(owner, "pzb_signature", None)
    if signature is None:
        return None
    key = (signature, call.module_leaf_count, call.args_treedef, call.static_leaves, call.arg_positions,
           tuple((tuple(a.shape), str(a.dtype)) for a in avals), vmaps)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _abstract_eval(*avals: Any, call: ChildCall, vmaps: tuple[tuple[int | None, ...], ...]) -> list[Any]:
    # The blocks of a model are equal in structure: evaluate each (structure, shapes) once per process.
    key = _shape_key(call, avals, vmaps)
    hit = _SHAPES.get(key) if key is not None else None  # one lookup: another thread may clear the table
    if hit is not None:
        out_avals, call.out_treedef[0] = hit
        return list(out_avals)
    structs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals]
    out = jax.eval_shape(functools.partial(_apply, call=call, vmaps=vmaps), *structs)
    out_avals = [jax.core.ShapedArray(o.shape, o.dtype) for o in out]
    if key is not None:
        if len(_SHAPES) >= _SHAPES_LIMIT:
            _SHAPES.clear()
        _SHAPES[key] = (out_avals, call.out_treedef[0])
    return out_avals


def _batch(args: Sequence[Any], dims: Sequence[Any], *, call: ChildCall,
           vmaps: tuple[tuple[int | None, ...], ...]) -> tuple[list[Any], list[int]]:
    in_axes = tuple(d if isinstance(d, int) else None for d in dims)  # unbatched operands: None or NotMapped
    out = child_call_p.bind(*args, call=call, vmaps=(in_axes, *vmaps))
    return out, [0] * len(out)


def _jvp(primals: Sequence[Any], tangents: Sequence[Any], *, call: ChildCall,
         vmaps: tuple[tuple[int | None, ...], ...]) -> tuple[Any, Any]:
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    return jax.jvp(functools.partial(_apply, call=call, vmaps=vmaps), list(primals), tangents)


child_call_p.def_impl(_apply)
child_call_p.def_abstract_eval(_abstract_eval)
batching.primitive_batchers[child_call_p] = _batch
ad.primitive_jvps[child_call_p] = _jvp
mlir.register_lowering(child_call_p, mlir.lower_fun(_apply, multiple_results=True))


def bind_child_call(call: ChildCall, module_leaves: Sequence[Any], arrays: Sequence[Any]) -> Any:
    """Binds one child call and returns its output in the child's own output structure.

    Example:
        >>> call = ChildCall("id", lambda leaves, args, kwargs: args[0], 0, jax.tree_util.tree_structure(((1,), {})), ())
        >>> float(bind_child_call(call, [], [jax.numpy.float32(2.0)]))
        2.0
    """
    flat = child_call_p.bind(*module_leaves, *arrays, call=call, vmaps=())
    return jax.tree_util.tree_unflatten(call.out_treedef[0], flat)


def call_child(key: str, run: Callable[[Sequence[Any], tuple[Any, ...], dict[str, Any]], Any],
               module_leaves: Sequence[Any], calls: list[ChildCall], args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> Any:
    """Binds one call of the child ``key`` (arrays ``module_leaves``) with ``args`` / ``kwargs``; records it in ``calls``.

    Example:
        >>> calls = []
        >>> out = call_child("id", lambda leaves, args, kwargs: args[0], [], calls, (jax.numpy.ones(2),), {})
        >>> out.shape, calls[0].key
        ((2,), 'id')
    """
    flat, treedef = jax.tree_util.tree_flatten((args, kwargs))
    arrays = [(i, v) for i, v in enumerate(flat) if is_array_leaf(v)]
    static = tuple((i, v) for i, v in enumerate(flat) if not is_array_leaf(v))
    call = ChildCall(key, run, len(module_leaves), treedef, static, tuple(i for i, _ in arrays))
    calls.append(call)
    return bind_child_call(call, module_leaves, [v for _, v in arrays])


def is_array_leaf(value: Any) -> bool:
    """True for values that become traced operands (arrays, tracers, array-likes with a dtype).

    Example:
        >>> is_array_leaf(jax.numpy.ones(2)), is_array_leaf(3), is_array_leaf("x")
        (True, False, False)
    """
    return isinstance(value, (jax.Array, jax.core.Tracer)) or (hasattr(value, "dtype") and hasattr(value, "shape"))


class ChildProxy:
    """Stands in for a child module while its parent is traced.

    Calling the proxy binds one :data:`child_call_p`; any other attribute is
    read from the child rebuilt on traced arrays, so code that reads a
    child's weight (``self.proj.weight @ x``) traces that weight as an
    operand of the parent's glue.

    Args:
      key: The child's key in the parent.
      module: The child module rebuilt on traced arrays.
      leaves: The traced arrays of ``module`` (its flattened array leaves).
      run: ``run(leaves, args, kwargs)`` calls the real child rebuilt on ``leaves``.
      calls: A list collecting every :class:`ChildCall` made (for the converter).
    """

    def __init__(self, key: str, module: Any, leaves: Sequence[Any],
                 run: Callable[[Sequence[Any], tuple[Any, ...], dict[str, Any]], Any], calls: list[ChildCall]):
        object.__setattr__(self, "_pzb_key", key)
        object.__setattr__(self, "_pzb_module", module)
        object.__setattr__(self, "_pzb_leaves", tuple(leaves))
        object.__setattr__(self, "_pzb_run", run)
        object.__setattr__(self, "_pzb_calls", calls)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return call_child(self._pzb_key, self._pzb_run, self._pzb_leaves, self._pzb_calls, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pzb_module, name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise LiftError(
            f"{self._pzb_key}: the traced __call__ assigns {name!r} on a child module (a Python side effect). "
            "Fix: traced lifting needs side-effect-free code; lift without example inputs to keep it Foreign."
        )


_PROXY_CLASSES: dict[tuple[type, str, Callable[[Any], list[Any]]], type] = {}
_BINDINGS: contextvars.ContextVar[dict[type, tuple[Any, list[ChildCall]]] | None] = contextvars.ContextVar(
    "pzb_child_call_bindings", default=None)


def proxy_class(cls: type, key: str, leaves_of: Callable[[Any], list[Any]]) -> type:
    """A subclass of ``cls`` whose ``__call__`` binds one child call of the child ``key`` (see :func:`bind_proxy`).

    One class per ``(cls, key)`` for the whole process: Equinox and NNX
    register every module class with JAX for good, so a class per trace
    would leak. What a call needs from its trace (the child's ``run`` and the
    recorder) is looked up per thread when the proxy is called.

    Example:
        >>> class Double:
        ...     def __call__(self, x): return 2 * x
        >>> proxy = proxy_class(Double, "double", lambda module: [])
        >>> calls = []
        >>> bind_proxy(proxy, lambda leaves, args, kwargs: args[0] * 2, calls)
        >>> out = object.__new__(proxy)(jax.numpy.ones(2))
        >>> calls[0].key, out.tolist()
        ('double', [2.0, 2.0])
    """
    index = (cls, key, leaves_of)
    if index not in _PROXY_CLASSES:

        def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
            run, calls = (_BINDINGS.get() or {})[type(self)]
            return call_child(key, run, leaves_of(self), calls, args, kwargs)

        _PROXY_CLASSES[index] = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                                            "__qualname__": cls.__qualname__})
    return _PROXY_CLASSES[index]


def bind_proxy(proxy: type, run: Callable[..., Any], calls: list[ChildCall]) -> None:
    """Makes calls of ``proxy`` instances in this thread run ``run`` and record into ``calls`` (until rebound)."""
    bindings = _BINDINGS.get()
    if bindings is None:
        bindings = {}
        _BINDINGS.set(bindings)
    bindings[proxy] = (run, calls)
