"""The lifted vocabulary: the layer protocol, combinators and primitives on named axes.

Never imports Equinox or Flax (see docs/architecture.md, "Layers of the package").
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
from pzbridge.nn.attention import AttendToValues, Attention, AttentionLogits
from pzbridge.nn.conv import Conv
from pzbridge.nn.conv_transpose import ConvTranspose
from pzbridge.nn.foreign import Foreign, ForeignTemplate
from pzbridge.nn.kv_cache import KVCachingAttention
from pzbridge.nn.layer_stack import LayerStack, stack_layers
from pzbridge.nn.check_structure import CheckStructure  # noqa: F811 - its own module (combinators re-exports it).
from pzbridge.nn.grouping import NamedGroup, inline_anonymous_sequentials, inline_groups
from pzbridge.nn.named_einsum import InputEinsum, named_einsum
from pzbridge.nn.parameter_checks import assert_no_parameter_slots
from pzbridge.nn.standardize import Standardize
from pzbridge.nn.switch import Switch
from pzbridge.nn.masks import ApplyCausalMask, ApplyExplicitMask, ApplySlidingWindowMask
from pzbridge.nn.pooling import (
    AdaptiveAvgPool,
    AdaptiveMaxPool,
    AvgPool,
    GlobalAvgPool,
    GlobalMaxPool,
    MaxPool,
)
from pzbridge.nn.recurrent import GRUCell, LSTMCell, SimpleCell
from pzbridge.nn.recurrent_scan import Bidirectional, ScanOverAxis
from pzbridge.nn.rope import ApplyRoPE
from pzbridge.nn.activations import PReLU
from pzbridge.nn.dropout import DisabledDropout, Dropout
from pzbridge.nn.embeddings import EmbeddingDecode, EmbeddingLookup, EmbeddingTable
from pzbridge.nn.normalization import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, RMSNorm
