"""Reference models built only from ``pzbridge.nn`` layers (never Equinox or Flax).

- :mod:`pzbridge.models.gpt`: a GPT-style language model, key/value-cache
  conversion and greedy decoding;
- :mod:`pzbridge.models.gpt_reference`: the same architecture hand-written
  in pure jax, for tests and benchmarks.
"""
