"""Workflows built only on ``core`` and ``nn``: LoRA, training, checkpointing, capture and interventions.

Never imports Equinox or Flax (see docs/architecture.md, "Layers of the
package"); framework-specific pieces (lowering LoRA to ``nnx.LoRALinear``,
the Equinox LoRA module) live in :mod:`pzbridge.bridge`.
"""

from pzbridge.toolshed import (
    ablation,
    attribution,
    capture,
    checkpoint_manager,
    checkpointing,
    decoding,
    diff,
    intermediates,
    interventions,
    lora,
    path_patching,
    specs,
    steering,
    training,
    where,
    worlds,
)
from pzbridge.toolshed.ablation import ablate, knockout_heads
from pzbridge.toolshed.attribution import Perturb, activation_gradients, attribution_patching
from pzbridge.toolshed.capture import Isolated, capture_all, capture_shapes, isolate
from pzbridge.toolshed.diff import LayerChange, ModelDiff, ValueChange
from pzbridge.toolshed.specs import Spec, SpecError, load_spec, register_spec_operation, save_spec
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
from pzbridge.toolshed.linearize import Linearized, linearize
from pzbridge.toolshed.lora import LowRankAdapter, loraify_linears_in_selection, merge_lora
from pzbridge.toolshed.decoding import add_kv_caches, cached_greedy_decode, recompute_greedy_decode
from pzbridge.toolshed.steering import Steer, steer
from pzbridge.toolshed.path_patching import SelectWorlds, TransferWorlds, interchange, patch_paths
from pzbridge.toolshed.trainable import BoundlessMask, LowRankRotatedInterchange, RotatedSubspaceInterchange
from pzbridge.toolshed.trainable_fit import InterventionFit, interchange_accuracy, train_intervention
from pzbridge.toolshed.sharding import ConstrainSharding, ShardingRules, constrain_sharding, shard_inputs, shard_model
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
