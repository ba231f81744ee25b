"""``nnx.SpectralNorm`` / ``nnx.WeightNorm``: kept ``Foreign`` around a lifted layer; what state comes back.

What actually happens (asserted below, so a change in behaviour is noticed):

- Both wrappers have no pzbridge rule: they lift to ``Foreign`` and their
  ``layer_instance`` (an ``nnx.Linear``) is lifted, so its ``kernel`` / ``bias``
  are ``Parameter``s reachable by ``pzb.select(lifted).at_instances_of(pzb.Parameter)``.
- ``lower(lift(m))`` is exact (graphdef, bitwise state), and the first call's
  outputs equal NNX's.
- ``SpectralNorm``'s power-iteration state (``batch_stats`` ``u`` / ``sigma``,
  ``nnx.BatchStat``) is written back into the lifted ``StateVariable``s after a
  call with ``update_stats=True`` and carried back on lowering (bitwise equal
  to NNX's own in-place update).
- NNX also writes the *normalised kernel* back into ``layer_instance.kernel``
  (an ``nnx.Param``) in place. pzbridge does NOT carry Params written in place
  back: the lifted ``Parameter`` keeps the raw kernel, and so does the lowered
  model (and the user's model is untouched). A lifted call therefore always
  normalises the stored (raw) kernel, where a reused NNX module would
  normalise its already-normalised kernel on the next call.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pzbridge as pzb
from pzbridge.core.variables import StateVariable
from pzbridge.nn.foreign import Foreign
from nnx_checks import assert_round_trip
from nnx_checks import pure
from pzbridge.testing.numerics import assert_bitwise_reproducible


def _spectral():
    return nnx.SpectralNorm(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))


def _weight():
    return nnx.WeightNorm(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))


def test_weight_norm_wrappers_stay_foreign_with_the_wrapped_kernel_selectable():
    for model in (_spectral(), _weight()):
        lifted = pzb.lift(model)
        assert isinstance(lifted.body, Foreign)
        params = pzb.select(lifted).at_instances_of(pzb.Parameter).get_sequence()
        kernel = [p for p in params if p.label == "layer_instance.kernel"]
        assert len(kernel) == 1
        raw = kernel[0].value.data_array if pzb.nx.is_namedarray(kernel[0].value) else kernel[0].value
        assert raw is model.layer_instance.kernel.get_raw_value()


def test_weight_norm_wrappers_round_trip_exactly():
    assert_round_trip(_spectral())
    assert_round_trip(_weight())


def test_weight_norm_wrappers_compute_what_nnx_computes():
    x = jax.random.normal(jax.random.key(0), (2, 3))
    model = _spectral()
    # Bitwise on any CPU: Foreign runs NNX's own program (the jaxprs, on copies of the state, are compared).
    assert_bitwise_reproducible(pure(lambda l, a: l.positional(a, update_stats=True), pzb.lift(model)),
                                lambda a: nnx.clone(model)(a, update_stats=True), x)
    assert np.array_equal(pzb.lift(model).positional(x, update_stats=True), nnx.clone(model)(x, update_stats=True))
    model = _weight()
    assert_bitwise_reproducible(pure(lambda l, a: l.positional(a), pzb.lift(model)), lambda a: nnx.clone(model)(a), x)
    assert np.array_equal(pzb.lift(model).positional(x), nnx.clone(model)(x))


def test_spectral_norm_power_iteration_state_is_written_back_and_lowered():
    model = _spectral()
    x = jax.random.normal(jax.random.key(0), (2, 3))
    reference = nnx.clone(model)
    reference(x, update_stats=True)
    lifted = pzb.lift(model)
    stats = pzb.select(lifted).at_instances_of(StateVariable).get_sequence()
    assert len(stats) == 2
    before = [s.value for s in stats]
    lifted.positional(x, update_stats=True)
    assert all(b is not s.value for b, s in zip(before, stats))
    lowered = pzb.lower(lifted)
    got = jax.tree.leaves(nnx.state(lowered, nnx.BatchStat))
    expected = jax.tree.leaves(nnx.state(reference, nnx.BatchStat))
    assert len(got) == len(expected) == 2

    def lowered_stats(a):
        fresh = pzb.lift(nnx.clone(model))
        fresh.positional(a, update_stats=True)
        return jax.tree.leaves(nnx.state(pzb.lower(fresh), nnx.BatchStat))

    def nnx_stats(a):
        fresh = nnx.clone(model)
        fresh(a, update_stats=True)
        return jax.tree.leaves(nnx.state(fresh, nnx.BatchStat))

    assert_bitwise_reproducible(lowered_stats, nnx_stats, x)  # NNX's power iteration, run by Foreign
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))
    # The user's model is untouched by the lifted call.
    original = jax.tree.leaves(nnx.state(model, nnx.BatchStat))
    assert not all(np.array_equal(a, b) for a, b in zip(original, expected))


def test_kernels_normalised_in_place_by_nnx_are_not_carried_back():
    x = jax.random.normal(jax.random.key(0), (2, 3))
    for model, kwargs in ((_spectral(), {"update_stats": True}), (_weight(), {})):
        raw = model.layer_instance.kernel[...]
        reference = nnx.clone(model)
        reference(x, **kwargs)
        assert not np.array_equal(reference.layer_instance.kernel[...], raw)  # NNX overwrote its Param
        lifted = pzb.lift(model)
        lifted.positional(x, **kwargs)
        lowered = pzb.lower(lifted)
        assert np.array_equal(lowered.layer_instance.kernel[...], raw)
        assert np.array_equal(model.layer_instance.kernel[...], raw)
