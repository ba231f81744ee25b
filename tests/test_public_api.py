"""The public namespace promised by the issues: `import pzbridge as pzb` gives these names."""

import importlib

import pytest

import pzbridge as pzb

CORE_NAMES = [
    "nx", "select", "Selection", "Struct", "Parameter", "StateVariable", "ParameterValue",
    "StateVariableValue", "ParameterSlot", "StateVariableSlot", "unbind_variables", "unbind_params",
    "unbind_state_vars", "bind_variables", "freeze_params", "freeze_state_vars", "RandomStream",
    "pytree_dataclass", "static_field", "stateless_call", "variable_jit", "tree_equal",
    "nn", "lift", "lower", "convert", "convert_with_report", "testing", "toolshed", "checkpoint", "bridge",
    # Penzai core semantics (issue 15).
    "chk", "slice", "scoped_auto_state_var_labels", "is_pytree_dataclass_type",
    # Model diff (issue 11 point 9).
    "diff",
]


@pytest.mark.parametrize("name", CORE_NAMES)
def test_public_name_resolves(name):
    assert getattr(pzb, name) is not None
    assert name in dir(pzb)


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pzb.nope  # noqa: B018


def test_every_declared_export_imports():
    for name, (module, attribute) in pzb._EXPORTS.items():
        mod = importlib.import_module(module)
        if attribute is not None:
            assert hasattr(mod, attribute), f"pzb.{name} -> {module}.{attribute} is missing"


def test_random_stream_public_constructor():
    import jax

    stream = pzb.RandomStream.from_base_key(jax.random.key(0))
    assert stream.next_key() is not None


CHECKPOINT_NAMES = [
    "save", "restore", "restore_optimizer_state", "load_variables", "read_description", "describe",
    "structure_of", "all_steps", "latest_step", "versions", "CheckpointManager", "CheckpointError",
]
TRAINING_NAMES = ["Trainer", "FitResult", "Callback", "EvaluateEvery", "CheckpointEvery", "build_train_step",
                  "trainable_values", "TrainingError"]


def test_checkpoint_and_training_names():
    from pzbridge.toolshed import training

    assert all(name in pzb.checkpoint.__all__ and hasattr(pzb.checkpoint, name) for name in CHECKPOINT_NAMES)
    assert all(name in training.__all__ and hasattr(training, name) for name in TRAINING_NAMES)
    assert pzb.toolshed.CheckpointManager is pzb.checkpoint.CheckpointManager


INTERVENTION_NAMES = [
    "Where", "capture_intermediates", "capture_shapes", "capture_all", "isolate", "Isolated", "ablate",
    "knockout_heads", "insert_intervention", "patch_activations", "AtIndex", "Ablate", "ZeroAblation",
    "AddVector", "Patch", "InterveneWith", "patch_worlds", "stack_worlds", "unstack_worlds", "RouteWorlds",
    "patch_paths", "interchange", "TransferWorlds", "SelectWorlds", "activation_gradients", "attribution_patching",
    "Perturb", "linearize", "Linearized",
    "RotatedSubspaceInterchange", "LowRankRotatedInterchange", "BoundlessMask", "train_intervention",
    "interchange_accuracy", "InterventionFit",
]


@pytest.mark.parametrize("name", INTERVENTION_NAMES)
def test_toolshed_intervention_names_resolve(name):
    assert getattr(pzb.toolshed, name) is not None
