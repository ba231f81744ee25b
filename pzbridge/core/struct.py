"""Frozen pytree dataclasses: the building block of every lifted model.

A lifted model is plain data: a tree of small frozen dataclasses whose array
fields are pytree children and whose configuration (axis names, epsilons,
flags) is static. Subclass :class:`Struct` and decorate the class with
:func:`pytree_dataclass`; the decorator makes the class a frozen dataclass and
registers it with JAX *with keys*, so every child has an attribute keypath
(``.blocks[3].attn``) that selectors and error messages use.

Why a decorator and not ``__init_subclass__`` magic: a subclass may be an
abstract intermediate with no fields of its own, and the decorator makes
"this class is a concrete pytree node" explicit. Forgetting it is caught the
first time the class is instantiated, with an error that says what to add.

Flattening is on the hot path of every selector and every ``jax.jit`` call, so
each class gets a flatten function specialised to its field names, and
unflattening bypasses ``__init__`` (validation in ``__post_init__`` runs once,
when the user builds the object, not on every tree rebuild).

Example:
    >>> import jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> @pzb.pytree_dataclass
    ... class Scale(pzb.Struct):
    ...     factor: jnp.ndarray
    ...     name: str = pzb.static_field(default="scale")
    >>> s = Scale(jnp.ones(2))
    >>> jax.tree_util.tree_flatten_with_path(s)[0][0][0]
    (GetAttrKey(name='factor'),)
"""

from __future__ import annotations

import dataclasses
import operator
import typing
from typing import Any, Callable, TypeVar

import jax

from pzbridge.core.errors import StructError
from pzbridge.core.tree_util import tree_equal

_T = TypeVar("_T")
_DECORATED_MARKER = "__pzbridge_pytree_dataclass__"

# The function behind Struct.select. Selections are Structs, so this module
# cannot import the selectors; pzbridge.core.selectors registers its `select`
# here when it loads, and pzbridge/core/__init__.py imports it, so the hook is
# set before any core module can be used.
_select: Callable[[Any], Any] | None = None


def register_select(select: Callable[[Any], Any]) -> None:
    """Sets the function :meth:`Struct.select` calls (done by ``pzbridge.core.selectors``).

    Args:
      select: A function from a tree to a selection of the whole tree.

    Example:
        >>> from pzbridge.core.selectors import select
        >>> register_select(select)  # What importing pzbridge.core.selectors does.
    """
    global _select
    _select = select


def static_field(**kwargs: Any) -> Any:
    """Declares a dataclass field that is static (part of the tree structure).

    Static fields are not pytree children: JAX transformations see them in
    the tree definition, so they must be hashable and comparable with ``==``.

    Args:
      **kwargs: Forwarded to :func:`dataclasses.field` (``default``,
        ``default_factory``, ``repr``, ...).

    Returns:
      A dataclass field marked with ``metadata={"pytree_node": False}``.

    Example:
        >>> @pytree_dataclass
        ... class Named(Struct):
        ...     axis: str = static_field(default="features")
        >>> jax.tree_util.tree_leaves(Named())
        []
    """
    metadata = dict(kwargs.pop("metadata", None) or {})
    metadata["pytree_node"] = False
    return dataclasses.field(metadata=metadata, **kwargs)


def _is_child_field(field: dataclasses.Field) -> bool:
    return field.metadata.get("pytree_node", True)


def _getter(names: tuple[str, ...]) -> Callable[[Any], tuple]:
    """A fast function returning the tuple of the named attributes."""
    if not names:
        return lambda _: ()
    if len(names) == 1:
        name = names[0]
        return lambda obj: (getattr(obj, name),)
    return operator.attrgetter(*names)


def _register(cls: type) -> None:
    fields = dataclasses.fields(cls)
    child_names = tuple(f.name for f in fields if _is_child_field(f))
    static_names = tuple(f.name for f in fields if not _is_child_field(f))
    child_keys = tuple(jax.tree_util.GetAttrKey(n) for n in child_names)
    get_children = _getter(child_names)
    get_statics = _getter(static_names)
    new = object.__new__
    setattr_ = object.__setattr__

    def flatten(obj):
        return get_children(obj), get_statics(obj)

    def flatten_with_keys(obj):
        return tuple(zip(child_keys, get_children(obj))), get_statics(obj)

    def unflatten(statics, children):
        obj = new(cls)
        for name, value in zip(child_names, children):
            setattr_(obj, name, value)
        for name, value in zip(static_names, statics):
            setattr_(obj, name, value)
        return obj

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)


@typing.dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field, static_field))
def pytree_dataclass(cls: type[_T] | None = None, /, **dataclass_kwargs: Any) -> Any:
    """Makes a :class:`Struct` subclass a frozen dataclass registered as a pytree.

    Fields are pytree children unless declared with :func:`static_field`.
    The class is registered with keypaths made of ``jax.tree_util.GetAttrKey``.

    Args:
      cls: The class to decorate (when used as ``@pytree_dataclass``).
      **dataclass_kwargs: Extra options for :func:`dataclasses.dataclass`
        (``kw_only``, ...). ``frozen`` is always ``True``.

    Returns:
      The decorated class (or a decorator when called with options only).

    Raises:
      StructError: If the class does not subclass :class:`Struct`, or asks
        for ``frozen=False``.

    Example:
        >>> @pytree_dataclass
        ... class Pair(Struct):
        ...     left: Any
        ...     right: Any
        >>> jax.tree_util.tree_leaves(Pair(1, 2))
        [1, 2]
    """

    def decorate(target: type[_T]) -> type[_T]:
        if not (isinstance(target, type) and issubclass(target, Struct)):
            raise StructError(
                f"@pytree_dataclass expects a subclass of pzbridge.Struct, found {target!r}. "
                f"Fix: declare it as `class {getattr(target, '__name__', 'X')}(pzb.Struct): ...`."
            )
        if dataclass_kwargs.get("frozen", True) is not True:
            raise StructError(
                f"{target.__name__}: pzbridge structs are always frozen (found frozen=False). "
                "Fix: drop the frozen= option and build modified copies with `.replace(...)`."
            )
        options = {**dataclass_kwargs, "frozen": True, "eq": False, "repr": dataclass_kwargs.get("repr", True)}
        target = dataclasses.dataclass(target, **options)
        setattr(target, _DECORATED_MARKER, target)
        _register(target)
        return target

    if cls is None:
        return decorate
    return decorate(cls)


class Struct:
    """Base class of pzbridge's frozen pytree dataclasses.

    Concrete subclasses must be decorated with :func:`pytree_dataclass`.
    Equality is structural (same class, same tree structure, equal leaves);
    arrays compare by value, tracers by identity.

    Example:
        >>> import jax.numpy as jnp
        >>> @pytree_dataclass
        ... class Bias(Struct):
        ...     value: jnp.ndarray
        >>> Bias(jnp.zeros(3)) == Bias(jnp.zeros(3))
        True
        >>> Bias(jnp.zeros(3)).select().at(lambda b: b.value).count()
        1
    """

    def __new__(cls, *args: Any, **kwargs: Any):
        # The marker is looked up on the class itself (not inherited), so a
        # subclass of a decorated class that forgot the decorator is caught.
        if cls.__dict__.get(_DECORATED_MARKER) is not cls:
            raise StructError(
                f"{cls.__module__}.{cls.__qualname__} subclasses pzbridge.Struct but is not "
                "decorated, so JAX would treat it as an opaque leaf and its fields would be "
                f"invisible to selectors. Fix: add `@pzb.pytree_dataclass` above `class {cls.__name__}`."
            )
        return object.__new__(cls)

    def select(self):
        """Starts a selection rooted at this struct (see :func:`pzbridge.select`).

        Returns:
          A :class:`~pzbridge.core.selectors.Selection` selecting this whole
          struct.
        """
        if _select is None:
            raise StructError(
                "Struct.select() needs pzbridge.core.selectors, which registers itself when pzbridge.core "
                "is imported. Fix: import pzbridge (or pzbridge.core) instead of loading struct.py alone."
            )
        return _select(self)

    def replace(self: _T, **changes: Any) -> _T:
        """Returns a copy with the given fields replaced (runs ``__post_init__``).

        Example:
            >>> @pytree_dataclass
            ... class P(Struct):
            ...     a: int
            >>> P(1).replace(a=2).a
            2
        """
        return dataclasses.replace(self, **changes)

    def __eq__(self, other: object) -> bool:
        if type(self) is not type(other):
            return NotImplemented
        return tree_equal(self, other)

    def __hash__(self) -> int:
        # Consistent with __eq__: equal structs have equal tree structures.
        return hash(jax.tree_util.tree_structure(self))


def is_struct(value: Any) -> bool:
    """True when ``value`` is an instance of a :class:`Struct` subclass.

    Example:
        >>> is_struct(3)
        False
    """
    return isinstance(value, Struct)
