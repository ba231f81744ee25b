"""Equinox <-> pzbridge: the traversal, the adapter, state handling and one module per layer family.

Each family module (``linear``, ``attention``, ``norm`` ...) holds the lifted
classes that carry Equinox configuration back and its rules, with both
directions side by side: grep for an ``eqx.nn`` class to find how it lifts
and lowers. Importing this package imports every family, which registers its
rules in :data:`~pzbridge.bridge.equinox.traversal.EQUINOX`; the LoRA rules come
last because they wrap the Linear rules. See ``docs/architecture.md``.

Example:
    >>> import jax, equinox as eqx
    >>> from pzbridge.bridge.equinox import EQUINOX
    >>> EQUINOX.lift_rule_for(eqx.nn.Linear).__class__.__name__
    'LinearRule'
"""

from pzbridge.bridge.equinox.traversal import EQUINOX, equinox_rule
from pzbridge.bridge.equinox.adapter import EquinoxAdapter
from pzbridge.bridge.equinox import linear, sequential  # noqa: F401  (import order: later rules override)
from pzbridge.bridge.equinox import embedding, prelu, dropout, norm, attention, conv  # noqa: F401
from pzbridge.bridge.equinox import shared, pool, recurrent, group_norm  # noqa: F401
from pzbridge.bridge.equinox.state import lower_with_state
from pzbridge.bridge.equinox.lora import LoRALinear, lora_filter
from pzbridge.bridge.equinox import stack, tracing  # noqa: F401  (layer stacks, traced lifting of custom modules)
from pzbridge.bridge.equinox import lower_specs  # noqa: F401  (what native modules built by lowering need)
from pzbridge.bridge.equinox import from_nnx  # noqa: F401  (layers lifted from NNX -> eqx.nn; last: imports NNX rules)

__all__ = ["EQUINOX", "EquinoxAdapter", "LoRALinear", "equinox_rule", "lora_filter", "lower_with_state"]
