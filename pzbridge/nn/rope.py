"""Rotary position embeddings (RoPE) as a layer.

``ApplyRoPE`` rotates pairs of entries of the ``projection`` axis of queries
or keys by position-dependent angles ``pos / max_wavelength ** (2i / d)``.
Positions come from the ``token_positions`` side input (a named integer array
over ``seq``, optionally with batch axes), else from the index along ``seq``;
passing them explicitly is what makes key/value-cache decoding work.

Two pairings are supported, because frameworks disagree:

- ``"rotate_half"`` (default; Equinox ``RotaryPositionalEmbedding``, GPT-NeoX,
  Llama in HF form): entry ``i`` pairs with ``i + d/2``;
- ``"interleaved"`` (original RoFormer, GPT-J): entry ``2i`` pairs with ``2i+1``.

Angles and rotations are computed in float32 (or the input's wider dtype)
and the result cast back to the input dtype, as Equinox does. The math is a
positional function vectorised with :func:`pzbridge.core.named_axes.nmap`,
so every axis other than ``projection`` and the positions' axes passes
through.

Example:
    >>> import jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> x = pzb.nx.wrap(jnp.array([[1.0, 0.0]]), "seq", "projection")
    >>> ApplyRoPE()(x, token_positions=pzb.nx.wrap(jnp.array([0]), "seq")).unwrap("seq", "projection")
    Array([[1., 0.]], dtype=float32)
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jaxtyping import Array, Float, Real

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.layer import Layer

CONVENTIONS = ("rotate_half", "interleaved")


def rope_positional(x: Float[Array, "*batch d"], position: Real[Array, ""], max_wavelength: float,
                    convention: str) -> Float[Array, "*batch d"]:
    """RoPE along the last axis of ``x`` (even size ``d``) at a scalar position.

    Example:
        >>> rope_positional(jnp.array([1.0, 0.0]), jnp.array(0), 1e4, "rotate_half")
        Array([1., 0.], dtype=float32)
    """
    compute = jnp.promote_types(x.dtype, jnp.float32)
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (max_wavelength ** (jnp.arange(0, 2 * half, 2, dtype=compute) / (2 * half)))
    angle = position.astype(compute) * inv_freq
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    xc = x.astype(compute)
    if convention == "rotate_half":
        first, second = xc[..., :half], xc[..., half:]
        out = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    else:
        pairs = xc.reshape(*xc.shape[:-1], half, 2)
        first, second = pairs[..., 0], pairs[..., 1]
        out = jnp.stack([first * cos - second * sin, second * cos + first * sin], axis=-1).reshape(xc.shape)
    return out.astype(x.dtype)


@pytree_dataclass
class ApplyRoPE(Layer):
    """Applies rotary position embeddings along ``projection_axis``.

    Attributes:
      max_wavelength: The base of the angle frequencies ("theta") (static).
      convention: ``"rotate_half"`` or ``"interleaved"`` (static).
      projection_axis: The rotated axis; its size must be even (static).
      seq_axis: The sequence axis used for default positions (static).
      positions_input: The side input holding token positions (static).

    Example:
        >>> x = pzb.nx.ones({"seq": 3, "heads": 2, "projection": 4})
        >>> dict(ApplyRoPE()(x).named_shape) == dict(x.named_shape)
        True
    """

    max_wavelength: float = static_field(default=10_000.0)
    convention: str = static_field(default="rotate_half")
    projection_axis: str = static_field(default="projection")
    seq_axis: str = static_field(default="seq")
    positions_input: str = static_field(default="token_positions")

    def __post_init__(self) -> None:
        if self.convention not in CONVENTIONS:
            raise NamedAxisError(
                f"ApplyRoPE: unknown convention {self.convention!r}. Fix: use one of {list(CONVENTIONS)}."
            )

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        size = x.named_shape.get(self.projection_axis)
        if size is None or size % 2:
            found = "missing" if size is None else f"of odd size {size}"
            raise NamedAxisError(
                f"ApplyRoPE: the input's {self.projection_axis!r} axis is {found} (named shape "
                f"{dict(x.named_shape)}); RoPE rotates pairs along it, so it must exist with an even size. "
                "Fix: apply RoPE to queries/keys with an even head size, or set projection_axis."
            )
        positions = side_inputs.get(self.positions_input)
        if positions is None:
            if self.seq_axis not in x.named_shape:
                raise NamedAxisError(
                    f"ApplyRoPE: no {self.positions_input!r} side input and no {self.seq_axis!r} axis in the input "
                    f"(named shape {dict(x.named_shape)}). Fix: pass {self.positions_input}=pzb.nx.arange('seq', n) "
                    "or set seq_axis."
                )
            positions = nx.arange(self.seq_axis, x.named_shape[self.seq_axis])
        elif not nx.is_namedarray(positions) or positions.positional_shape:
            raise NamedAxisError(
                f"ApplyRoPE: side input {self.positions_input!r} must be a named integer array without positional "
                f"axes, found {type(positions).__name__} {getattr(positions, 'shape', '')}. "
                f"Fix: pass {self.positions_input}=pzb.nx.wrap(positions, 'seq')."
            )
        rotate = nx.nmap(lambda v, p: rope_positional(v, p, self.max_wavelength, self.convention))
        return rotate(x.untag(self.projection_axis), positions).tag(self.projection_axis)
