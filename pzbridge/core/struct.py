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

The decorator also carries Penzai's conveniences: a hand-written
``__init__`` may assign ``self.x = ...`` (it runs on a mutable proxy), the
inherited-``__init__`` and field-order safety checks are available as
options, and a class that is not a ``Struct`` can be decorated if it brings
its own ``tree_flatten_with_keys`` / ``tree_unflatten``.

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
import functools
import inspect
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


def is_pytree_node_field(field: dataclasses.Field) -> bool:
    """True when a dataclass field is a pytree child (not declared with :func:`static_field`).

    Example:
        >>> @pytree_dataclass
        ... class P(Struct):
        ...     w: Any
        ...     axis: str = static_field(default="f")
        >>> [is_pytree_node_field(f) for f in dataclasses.fields(P)]
        [True, False]
    """
    return field.metadata.get("pytree_node", True)


_is_child_field = is_pytree_node_field


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


def is_pytree_dataclass_type(cls: Any) -> bool:
    """True when ``cls`` itself was decorated with :func:`pytree_dataclass` (not merely a subclass of one).

    JAX registers each class separately, so a subclass of a decorated class
    is not a pytree node until it is decorated too.

    Example:
        >>> @pytree_dataclass
        ... class A(Struct):
        ...     x: int
        >>> class B(A):
        ...     pass
        >>> is_pytree_dataclass_type(A), is_pytree_dataclass_type(B), is_pytree_dataclass_type(A(1))
        (True, False, False)
    """
    return isinstance(cls, type) and cls.__dict__.get(_DECORATED_MARKER) is cls


def _check_fields(target: type, implicit: bool | None) -> None:
    """Penzai's field-order safety check (opt-in here: see ``has_implicitly_inherited_fields``)."""
    if implicit is None:
        return
    field_names = [f.name for f in dataclasses.fields(target)]
    declared = [name for name in inspect.get_annotations(target) if name in set(field_names)]
    if implicit:
        if set(field_names) == set(declared):
            raise StructError(
                f"{target.__name__}: has_implicitly_inherited_fields=True, but it inherits no field (its fields "
                f"{field_names} are all declared on the class). Fix: drop the option."
            )
    elif declared != field_names:
        raise StructError(
            f"{target.__name__}: its dataclass fields are {field_names}, but the class declares {declared}; "
            "dataclasses put inherited fields first, in the parent's order, so the constructor's argument order "
            "differs from what the class shows. Fix: re-declare every field on the class in that order, or pass "
            "has_implicitly_inherited_fields=True to accept the inherited ones."
        )


def _check_parent_init(target: type, init: bool, overwrite_parent_init: bool) -> None:
    """Refuses to silently replace an inherited hand-written ``__init__`` with a generated one."""
    if not init or overwrite_parent_init or "__init__" in target.__dict__:
        return
    inherited = target.__init__
    if inherited is object.__init__ or getattr(inherited, _GENERATED_INIT, False):
        return
    owner = next((base for base in target.__mro__[1:] if "__init__" in base.__dict__), object)
    raise StructError(
        f"@pytree_dataclass would replace the __init__ that {target.__name__} inherits from {owner.__name__} "
        "(written by hand) with one generated from the fields. Fix: pass overwrite_parent_init=True to generate "
        "it, init=False to keep the inherited one, or define __init__ on the class."
    )


def _wrap_init(target: type, original: Callable[..., None]) -> None:
    """Lets a hand-written ``__init__`` assign ``self.x = ...``: it runs on a mutable proxy, then fields are copied.

    The proxy is a subclass (so methods and ``super().__init__`` work) that
    is neither frozen nor a pytree; only dataclass fields are copied back, so
    scratch attributes set in ``__init__`` do not leak into the struct.
    """

    class _MutableInitProxy(target):  # type: ignore[misc, valid-type]
        __setattr__ = object.__setattr__
        __hash__ = None  # type: ignore[assignment]

    _MutableInitProxy.__name__ = f"{target.__name__}._MutableInitProxy"
    _MutableInitProxy.__qualname__ = f"{target.__qualname__}._MutableInitProxy"
    names = [f.name for f in dataclasses.fields(target)]
    setattr_ = object.__setattr__

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        proxy = object.__new__(_MutableInitProxy)
        original(proxy, *args, **kwargs)
        for name in names:
            try:
                value = getattr(proxy, name)
            except AttributeError:
                raise StructError(
                    f"{target.__name__}.__init__ returned without setting field {name!r} (fields: {names}). "
                    f"Fix: assign `self.{name} = ...` in __init__, or give the field a default."
                ) from None
            setattr_(self, name, value)

    target.__init__ = __init__  # type: ignore[misc]
    target._MutableInitProxy = _MutableInitProxy  # type: ignore[attr-defined]


_GENERATED_INIT = "__pzbridge_generated_init__"


@typing.dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field, static_field))
def pytree_dataclass(
    cls: type[_T] | None = None,
    /,
    *,
    has_implicitly_inherited_fields: bool | None = None,
    use_mutable_proxy_in_init: bool = True,
    overwrite_parent_init: bool = False,
    **dataclass_kwargs: Any,
) -> Any:
    """Makes a class a frozen dataclass registered as a pytree with keys.

    For a :class:`Struct` subclass, fields are pytree children unless
    declared with :func:`static_field`, and keypaths are
    ``jax.tree_util.GetAttrKey`` (flattening is generated). Any other class
    must define ``tree_flatten_with_keys`` and the class method
    ``tree_unflatten`` itself (``jax.tree_util.register_pytree_with_keys_class``).

    A hand-written ``__init__`` may assign fields normally (``self.w = w``):
    it runs on a mutable proxy and the fields are then copied onto the
    frozen object (``use_mutable_proxy_in_init``).

    Args:
      cls: The class to decorate (when used as ``@pytree_dataclass``).
      has_implicitly_inherited_fields: ``None`` (default): no check, so
        marker subclasses (``class EqxLinear(Affine)``) inherit their
        parent's fields. ``False``: the class must declare all its fields, in
        dataclass order (Penzai's default check). ``True``: it must inherit
        at least one field.
      use_mutable_proxy_in_init: Run a hand-written ``__init__`` on a mutable
        proxy.
      overwrite_parent_init: Allow generating ``__init__`` although the
        inherited one was written by hand (otherwise an error).
      **dataclass_kwargs: Extra options for :func:`dataclasses.dataclass`
        (``kw_only``, ``init``, ...). ``frozen`` is always ``True``.

    Returns:
      The decorated class (or a decorator when called with options only).

    Raises:
      StructError: If the class was already decorated, asks for
        ``frozen=False``, fails a safety check, or is not a ``Struct`` and
        lacks ``tree_flatten_with_keys`` / ``tree_unflatten``.

    Example:
        >>> @pytree_dataclass
        ... class Pair(Struct):
        ...     left: Any
        ...     right: Any
        >>> jax.tree_util.tree_leaves(Pair(1, 2))
        [1, 2]
        >>> @pytree_dataclass
        ... class Scaled(Struct):
        ...     w: Any
        ...     def __init__(self, w, times=2):
        ...         self.w = w * times
        >>> Scaled(3).w
        6
    """

    def decorate(target: type[_T]) -> type[_T]:
        if not isinstance(target, type):
            raise StructError(f"@pytree_dataclass expects a class, found {type(target).__name__} {target!r:.60}.")
        if target.__dict__.get(_DECORATED_MARKER) is target:
            raise StructError(f"{target.__name__} is already a pytree dataclass. Fix: apply @pzb.pytree_dataclass once.")
        if dataclass_kwargs.get("frozen", True) is not True:
            raise StructError(
                f"{target.__name__}: pzbridge structs are always frozen (found frozen=False). "
                "Fix: drop the frozen= option and build modified copies with `.replace(...)`."
            )
        is_struct_class = issubclass(target, Struct)
        if not is_struct_class and not (hasattr(target, "tree_flatten_with_keys") and hasattr(target, "tree_unflatten")):
            raise StructError(
                f"@pytree_dataclass on {target.__name__}, which is not a pzbridge.Struct: it must define "
                "`tree_flatten_with_keys(self)` and the classmethod `tree_unflatten(cls, aux, children)` "
                f"(JAX's register_pytree_with_keys_class protocol). Fix: define them, or subclass pzbridge.Struct "
                f"(`class {target.__name__}(pzb.Struct)`) to have them generated."
            )
        init = dataclass_kwargs.get("init", True)
        _check_parent_init(target, init, overwrite_parent_init)
        original_init = target.__dict__.get("__init__")
        options = {**dataclass_kwargs, "frozen": True}
        if is_struct_class:
            options["eq"] = False  # Struct.__eq__ is structural.
            options["repr"] = False  # Arrays summarised instead (pzbridge.core.struct_repr), set below.
        target = dataclasses.dataclass(target, **options)
        if is_struct_class and dataclass_kwargs.get("repr", True) and "__repr__" not in target.__dict__:
            from pzbridge.core.struct_repr import struct_repr

            target.__repr__ = struct_repr  # type: ignore[method-assign]
        if init and original_init is None:
            setattr(target.__init__, _GENERATED_INIT, True)
        _check_fields(target, has_implicitly_inherited_fields)
        setattr(target, _DECORATED_MARKER, target)
        if is_struct_class:
            _register(target)
        else:
            jax.tree_util.register_pytree_with_keys_class(target)
        if use_mutable_proxy_in_init and original_init is not None:
            _wrap_init(target, original_init)
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

    @classmethod
    def key_for_field(cls, field_name: str) -> jax.tree_util.GetAttrKey:
        """The keypath entry of a field (what selectors and ``tree_flatten_with_path`` use).

        Example:
            >>> @pytree_dataclass
            ... class P(Struct):
            ...     a: int
            >>> P.key_for_field("a")
            GetAttrKey(name='a')
        """
        names = [f.name for f in dataclasses.fields(cls)]
        if field_name not in names:
            raise StructError(f"{cls.__name__} has no field {field_name!r} (fields: {names}).")
        return jax.tree_util.GetAttrKey(field_name)

    def attributes_dict(self) -> dict[str, Any]:
        """All fields (children and static) as a dict, in field order.

        Example:
            >>> @pytree_dataclass
            ... class P(Struct):
            ...     a: int
            ...     b: str = static_field(default="x")
            >>> P(1).attributes_dict()
            {'a': 1, 'b': 'x'}
        """
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_attributes(cls: type[_T], **field_values: Any) -> _T:
        """Builds an instance from exactly its fields, without running ``__init__`` or ``__post_init__``.

        The inverse of :meth:`attributes_dict`, for classes whose
        ``__init__`` takes other arguments than the fields.

        Raises:
          StructError: If a field is missing or an unknown name is given.

        Example:
            >>> @pytree_dataclass
            ... class Doubled(Struct):
            ...     w: int
            ...     def __init__(self, base):
            ...         self.w = 2 * base
            >>> Doubled.from_attributes(w=5).w, Doubled(5).w
            (5, 10)
        """
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in field_values]
        extra = sorted(set(field_values) - set(names))
        if missing or extra:
            raise StructError(
                f"{cls.__name__}.from_attributes needs exactly the fields {names}; missing {missing}, unknown "
                f"{extra}. Fix: pass every field by name (see .attributes_dict())."
            )
        obj = cls.__new__(cls)
        for name in names:
            object.__setattr__(obj, name, field_values[name])
        return obj

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
