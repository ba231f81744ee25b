"""pzbridge: lift Equinox / Flax NNX models into editable model-as-data form.

``import pzbridge as pzb`` gives the public namespace: named axes (``pzb.nx``),
selectors (``pzb.select``), structs, variables, and (in later layers) the
lifted layer vocabulary, ``pzb.lift`` / ``pzb.lower`` and the toolshed.
Attributes are imported on first use so that ``import pzbridge`` stays fast
and light; see docs/architecture.md for the architecture.

Example:
    >>> import pzbridge as pzb
    >>> pzb.select([1, 2, 3]).at_pytree_leaves().count()
    3
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> (module, attribute or None for the module itself).
_EXPORTS: dict[str, tuple[str, str | None]] = {
    "nx": ("pzbridge.core.named_axes", None),
    "chk": ("pzbridge.core.chk", None),
    "slice": ("pzbridge.core.named_slice", "slice"),
    "Struct": ("pzbridge.core.struct", "Struct"),
    "pytree_dataclass": ("pzbridge.core.struct", "pytree_dataclass"),
    "is_pytree_dataclass_type": ("pzbridge.core.struct", "is_pytree_dataclass_type"),
    "static_field": ("pzbridge.core.struct", "static_field"),
    "tree_equal": ("pzbridge.core.tree_util", "tree_equal"),
    "select": ("pzbridge.core.selectors", "select"),
    "Selection": ("pzbridge.core.selectors", "Selection"),
    "AbstractVariable": ("pzbridge.core.variable_base", "AbstractVariable"),
    "Parameter": ("pzbridge.core.variables", "Parameter"),
    "StateVariable": ("pzbridge.core.variables", "StateVariable"),
    "ParameterValue": ("pzbridge.core.variables", "ParameterValue"),
    "StateVariableValue": ("pzbridge.core.variables", "StateVariableValue"),
    "ParameterSlot": ("pzbridge.core.variables", "ParameterSlot"),
    "StateVariableSlot": ("pzbridge.core.variables", "StateVariableSlot"),
    "unbind_variables": ("pzbridge.core.variables", "unbind_variables"),
    "unbind_params": ("pzbridge.core.variables", "unbind_params"),
    "unbind_state_vars": ("pzbridge.core.variables", "unbind_state_vars"),
    "bind_variables": ("pzbridge.core.variables", "bind_variables"),
    "freeze_params": ("pzbridge.core.variables", "freeze_params"),
    "freeze_state_vars": ("pzbridge.core.variables", "freeze_state_vars"),
    "freeze_variables": ("pzbridge.core.variables", "freeze_variables"),
    "stateless_call": ("pzbridge.core.variables", "stateless_call"),
    "variable_jit": ("pzbridge.core.variable_jit", "variable_jit"),
    "scoped_auto_state_var_labels": ("pzbridge.core.variables", "scoped_auto_state_var_labels"),
    "RandomStream": ("pzbridge.core.random_stream", "RandomStream"),
    "errors": ("pzbridge.core.errors", None),
    "PzbridgeError": ("pzbridge.core.errors", "PzbridgeError"),
    "testing": ("pzbridge.testing", None),
    "nn": ("pzbridge.nn", None),
    "bridge": ("pzbridge.bridge", None),
    "toolshed": ("pzbridge.toolshed", None),
    "checkpoint": ("pzbridge.checkpoint", None),
    "models": ("pzbridge.models", None),
    "lift": ("pzbridge.bridge.api", "lift"),
    "lower": ("pzbridge.bridge.api", "lower"),
    "convert": ("pzbridge.bridge.convert", "convert"),
    "convert_with_report": ("pzbridge.bridge.convert", "convert_with_report"),
    "diff": ("pzbridge.toolshed.diff", "diff"),
}

# ``slice`` stays out of ``__all__``: ``from pzbridge import *`` must not hide the builtin.
__all__ = sorted(name for name in _EXPORTS if name != "slice")

if TYPE_CHECKING:
    # What type checkers and IDEs see: the same names as _EXPORTS, imported
    # eagerly (``reveal_type(pzb.lift)`` is the function, not ``Any``). At run
    # time they load lazily through __getattr__. tests/test_packaging.py
    # checks that this block and _EXPORTS name the same things.
    from pzbridge import bridge as bridge
    from pzbridge import checkpoint as checkpoint
    from pzbridge import models as models
    from pzbridge import nn as nn
    from pzbridge import testing as testing
    from pzbridge import toolshed as toolshed
    from pzbridge.bridge.api import lift as lift
    from pzbridge.bridge.api import lower as lower
    from pzbridge.bridge.convert import convert as convert
    from pzbridge.bridge.convert import convert_with_report as convert_with_report
    from pzbridge.core import chk as chk
    from pzbridge.core import errors as errors
    from pzbridge.core import named_axes as nx
    from pzbridge.core.errors import PzbridgeError as PzbridgeError
    from pzbridge.core.named_slice import slice as slice
    from pzbridge.core.random_stream import RandomStream as RandomStream
    from pzbridge.core.selectors import Selection as Selection
    from pzbridge.core.selectors import select as select
    from pzbridge.core.struct import Struct as Struct
    from pzbridge.core.struct import is_pytree_dataclass_type as is_pytree_dataclass_type
    from pzbridge.core.struct import pytree_dataclass as pytree_dataclass
    from pzbridge.core.struct import static_field as static_field
    from pzbridge.core.tree_util import tree_equal as tree_equal
    from pzbridge.core.variable_base import AbstractVariable as AbstractVariable
    from pzbridge.core.variable_jit import variable_jit as variable_jit
    from pzbridge.core.variables import Parameter as Parameter
    from pzbridge.core.variables import ParameterSlot as ParameterSlot
    from pzbridge.core.variables import ParameterValue as ParameterValue
    from pzbridge.core.variables import StateVariable as StateVariable
    from pzbridge.core.variables import StateVariableSlot as StateVariableSlot
    from pzbridge.core.variables import StateVariableValue as StateVariableValue
    from pzbridge.core.variables import bind_variables as bind_variables
    from pzbridge.core.variables import freeze_params as freeze_params
    from pzbridge.core.variables import freeze_state_vars as freeze_state_vars
    from pzbridge.core.variables import freeze_variables as freeze_variables
    from pzbridge.core.variables import (
        scoped_auto_state_var_labels as scoped_auto_state_var_labels,
    )
    from pzbridge.core.variables import stateless_call as stateless_call
    from pzbridge.core.variables import unbind_params as unbind_params
    from pzbridge.core.variables import unbind_state_vars as unbind_state_vars
    from pzbridge.core.variables import unbind_variables as unbind_variables
    from pzbridge.toolshed.diff import diff as diff


def __getattr__(name: str) -> Any:
    try:
        module_name, attribute = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'pzbridge' has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # Cache: later lookups skip __getattr__.
    return value


# Besides the exports, only the dunders a user looks for (no helper imports
# such as ``importlib`` or ``Any``, which live in this module's globals).
_DIR_EXTRAS = ("__all__", "__doc__", "__file__", "__name__", "__path__", "__version__")


def __dir__() -> list[str]:
    return sorted(set(_EXPORTS) | set(_DIR_EXTRAS))
