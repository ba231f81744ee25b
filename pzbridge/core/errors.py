"""pzbridge's exception hierarchy.

Every error a user can trigger is a :class:`PzbridgeError`. Each one answers
three questions: *where* in the model it
happened (a path such as ``blocks[3].attn.query``), *what* was expected and
what was found, and *how* to fix it. Subclasses also inherit from the closest
built-in exception (``ValueError``, ``TypeError``, ...) so code that already
catches those keeps working.

Example:
    >>> from pzbridge.core.errors import NamedAxisError
    >>> try:
    ...     raise NamedAxisError("axis 'seq' has size 3 in one operand and 4 in another")
    ... except ValueError as e:
    ...     print(type(e).__name__)
    NamedAxisError
"""

from __future__ import annotations


class PzbridgeError(Exception):
    """Base class of every error pzbridge raises on bad input.

    Example:
        >>> isinstance(StructError("x"), PzbridgeError)
        True
    """


class StructError(PzbridgeError, TypeError):
    """A :class:`~pzbridge.core.struct.Struct` subclass is defined or used wrongly.

    Example:
        >>> raise StructError("decorate Foo with @pzb.pytree_dataclass")
        Traceback (most recent call last):
        ...
        pzbridge.core.errors.StructError: decorate Foo with @pzb.pytree_dataclass
    """


class NamedAxisError(PzbridgeError, ValueError):
    """Named axes do not match: missing, duplicated, or of conflicting sizes.

    Example:
        >>> str(NamedAxisError("axis 'seq': 3 vs 4"))
        "axis 'seq': 3 vs 4"
    """


class StructureMismatchError(PzbridgeError, ValueError):
    """A value does not match a ``pzb.chk`` pattern (tree structure, dtype, shape or a dimension variable).

    Example:
        >>> isinstance(StructureMismatchError("x"), ValueError)
        True
    """


class SelectionError(PzbridgeError, ValueError):
    """A selector operation cannot apply to what was selected.

    Example:
        >>> str(SelectionError("parent of .layers[0] is not a list"))
        'parent of .layers[0] is not a list'
    """


class VariableError(PzbridgeError, ValueError):
    """A variable is missing, unbound, frozen, or of the wrong kind.

    Example:
        >>> str(VariableError("slot 'w' has no variable to bind"))
        "slot 'w' has no variable to bind"
    """


class VariableConflictError(VariableError):
    """Two different variable objects carry the same label.

    Example:
        >>> isinstance(VariableConflictError("two 'w'"), VariableError)
        True
    """


class LiftError(PzbridgeError, TypeError):
    """A module cannot be lifted (no rule, unsupported configuration).

    Example:
        >>> isinstance(LiftError("no rule"), PzbridgeError)
        True
    """


class LowerError(PzbridgeError, TypeError):
    """A lifted model cannot be lowered to the requested framework.

    Example:
        >>> isinstance(LowerError("no rule"), PzbridgeError)
        True
    """


class CheckpointError(PzbridgeError, ValueError):
    """A checkpoint cannot be saved, read, or does not match the model it is restored into.

    The message names the checkpoint directory, what was expected and found,
    and the fix.

    Example:
        >>> isinstance(CheckpointError("'ckpt': no committed version"), ValueError)
        True
    """


def format_path(keypath: tuple) -> str:
    """Renders a JAX keypath as the model path users see in errors.

    Args:
      keypath: A tuple of JAX key entries (``GetAttrKey``, ``SequenceKey``,
        ``DictKey``, ...), as produced by ``jax.tree_util`` functions.

    Returns:
      A path such as ``blocks[3].attn.query``; ``<root>`` for the empty path.

    Example:
        >>> from jax.tree_util import GetAttrKey, SequenceKey
        >>> format_path((GetAttrKey("blocks"), SequenceKey(3), GetAttrKey("attn")))
        'blocks[3].attn'
    """
    import jax

    if not keypath:
        return "<root>"
    text = jax.tree_util.keystr(tuple(keypath))
    return text[1:] if text.startswith(".") else text
