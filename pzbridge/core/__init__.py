"""The data model: structs, named axes, selectors and variables.

This layer knows nothing about Equinox or Flax (a test enforces it).
"""
