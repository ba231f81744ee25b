"""assert_no_parameter_slots (Penzai 0.2.5 pz.nn.assert_no_parameter_slots)."""

import jax
import pytest

import pzbridge as pzb
from pzbridge.core.errors import VariableError
from pzbridge.nn import Affine, assert_no_parameter_slots


def test_bound_model_passes_and_slots_are_listed_with_paths():
    assert assert_no_parameter_slots(Affine.from_config("a", jax.random.key(0), {"f": 2}, {"f": 3})) is None
    slots = Affine.from_config("a", None, {"f": 2}, {"f": 3})
    with pytest.raises(VariableError, match=r"2 unbound parameter slots: sublayers\[0\]\.weights \('a\.weights'\), "
                                            r"sublayers\[1\]\.bias \('a\.bias'\)\. Fix: bind"):
        assert_no_parameter_slots(slots)
    assert assert_no_parameter_slots(pzb.nn.Sequential([pzb.StateVariableSlot("n")])) is None
