"""Traced lifting, framework-neutral: a custom module's ``__call__`` as explicit pzbridge layers.

The framework bridges (:mod:`pzbridge.bridge.equinox.tracing`,
:mod:`pzbridge.bridge.nnx.tracing`) trace a module with its children behind
:class:`~pzbridge.bridge.tracing.child_calls.ChildProxy` s; this package turns
the jaxpr into a :class:`~pzbridge.nn.dataflow.Traced` layer: axis names
(:mod:`~pzbridge.bridge.tracing.axes`), equations to layers
(:mod:`~pzbridge.bridge.tracing.graph`), combinators
(:mod:`~pzbridge.bridge.tracing.structure`) and the pieces both bridges share
(:mod:`~pzbridge.bridge.tracing.assemble`). See ``docs/lifting_custom_modules.md``.
"""
