"""Workflows built only on ``core`` and ``nn``: LoRA, training, checkpointing.

Never imports Equinox or Flax (see ``shared/DESIGN.md``, "Layers of the
package"); framework-specific pieces (lowering LoRA to ``nnx.LoRALinear``,
the Equinox LoRA module) live in :mod:`pzbridge.bridge`.
"""
