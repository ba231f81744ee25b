"""Workflows built only on ``core`` and ``nn``: LoRA, training, checkpointing.

Never imports Equinox or Flax (see docs/architecture.md, "Layers of the
package"); framework-specific pieces (lowering LoRA to ``nnx.LoRALinear``,
the Equinox LoRA module) live in :mod:`pzbridge.bridge`.
"""

from pzbridge.toolshed import checkpoint_manager, checkpointing, intermediates, interventions, lora, training
from pzbridge.toolshed.intermediates import capture_intermediates
from pzbridge.toolshed.interventions import (
    Ablate,
    AddVector,
    InterveneWith,
    Patch,
    ZeroAblation,
    insert_intervention,
    patch_activations,
)
from pzbridge.toolshed.lora import LowRankAdapter, loraify_linears_in_selection, merge_lora
from pzbridge.toolshed.checkpoint_manager import CheckpointManager
from pzbridge.toolshed.training import (
    CheckpointEvery,
    Checkpointed,
    EvaluateEvery,
    FitResult,
    Trainer,
    build_train_step,
)
