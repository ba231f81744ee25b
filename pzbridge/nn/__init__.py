"""The lifted vocabulary: the layer protocol, combinators and primitives on named axes.

Never imports Equinox or Flax (see ``shared/DESIGN.md``).
"""

from pzbridge.nn.combinators import (
    BranchAndAddTogether,
    BranchAndMultiplyTogether,
    CheckStructure,
    Identity,
    Residual,
    Sequential,
)
from pzbridge.nn.contraction import contract
from pzbridge.nn.layer import Layer
from pzbridge.nn.linear import AddBias, Affine, Linear
from pzbridge.nn.basic import (
    CastToDType,
    ConstantRescale,
    Elementwise,
    NamedEinsum,
    RenameAxes,
    Softmax,
    rename_axes,
)
