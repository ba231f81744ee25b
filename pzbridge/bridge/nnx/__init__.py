"""Flax NNX <-> pzbridge: the traversal, variables, statics, the adapter and one module per layer family.

Each family module (``linear``, ``attention``, ``norm`` ...) holds the lifted
classes that carry NNX configuration back and its rules, with both directions
side by side: grep for an ``nnx`` class (``nnx.LoRALinear`` is in
:mod:`~pzbridge.bridge.nnx.lora`) to find how it lifts and lowers. Importing
this package imports every family, which registers its rules in
:data:`~pzbridge.bridge.nnx.traversal.NNX`; the LoRA rules come last because
they wrap the Linear rules. See ``docs/architecture.md``.

Example:
    >>> from flax import nnx
    >>> from pzbridge.bridge.nnx import NNX
    >>> NNX.lift_rule_for(nnx.LoRALinear).__class__.__name__
    'LoRALinearRule'
"""

from pzbridge.bridge.nnx.traversal import NNX, nnx_rule
from pzbridge.bridge.nnx.adapter import NnxAdapter
from pzbridge.bridge.nnx import linear, containers, attention, dropout, embed, norm  # noqa: F401
from pzbridge.bridge.nnx import conv, group_norm, prelu, recurrent  # noqa: F401
from pzbridge.bridge.nnx import lora, lora_general  # noqa: F401
from pzbridge.bridge.nnx import stack, tracing  # noqa: F401  (layer stacks, traced lifting of custom modules)
from pzbridge.bridge.nnx import lower_specs  # noqa: F401  (what native modules built by lowering need)
from pzbridge.bridge.nnx import from_equinox  # noqa: F401  (layers lifted from Equinox lower natively)

__all__ = ["NNX", "NnxAdapter", "nnx_rule"]
