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
from typing import Any

__version__ = "0.1.0"

# Public name -> (module, attribute or None for the module itself).
_EXPORTS: dict[str, tuple[str, str | None]] = {
    "nx": ("pzbridge.core.named_axes", None),
    "Struct": ("pzbridge.core.struct", "Struct"),
    "pytree_dataclass": ("pzbridge.core.struct", "pytree_dataclass"),
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
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    try:
        module_name, attribute = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'pzbridge' has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # Cache: later lookups skip __getattr__.
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
