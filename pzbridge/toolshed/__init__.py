"""Workflows built only on ``core`` and ``nn``: LoRA, training, checkpointing, capture and interventions.

Never imports Equinox or Flax (see docs/architecture.md, "Layers of the
package"); framework-specific pieces (lowering LoRA to ``nnx.LoRALinear``,
the Equinox LoRA module) live in :mod:`pzbridge.bridge`.
"""

from pzbridge.toolshed import (
    ablation,
    capture,
    checkpoint_manager,
    checkpointing,
    intermediates,
    interventions,
    lora,
    training,
    where,
    worlds,
)
from pzbridge.toolshed.ablation import ablate, knockout_heads
from pzbridge.toolshed.capture import Isolated, capture_all, capture_shapes, isolate
from pzbridge.toolshed.intermediates import capture_intermediates
from pzbridge.toolshed.interventions import (
    Ablate,
    AddVector,
    AtIndex,
    InterveneWith,
    Patch,
    ZeroAblation,
    insert_intervention,
    patch_activations,
)
from pzbridge.toolshed.lora import LowRankAdapter, loraify_linears_in_selection, merge_lora
from pzbridge.toolshed.where import Where
from pzbridge.toolshed.worlds import RouteWorlds, patch_worlds, stack_worlds, unstack_worlds
from pzbridge.toolshed.checkpoint_manager import CheckpointManager
from pzbridge.toolshed.training import (
    CheckpointEvery,
    Checkpointed,
    EvaluateEvery,
    FitResult,
    Trainer,
    build_train_step,
)
