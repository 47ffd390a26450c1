"""jagged: Triton GPU kernels for jagged (variable-length) tensors.

Public API:

- :class:`JaggedTensor` and :func:`lengths_to_offsets`
- conversions: :func:`jagged_to_padded_dense`, :func:`dense_to_jagged`
- attention: :func:`jagged_flash_attention`, :func:`jagged_flash_attention_values`,
  :class:`jagged.nn.JaggedMultiheadAttention`; generalized (pointwise SiLU/GELU, relative bias,
  HSTU target/contextual/window masks, dropout): :func:`jagged_attention`,
  :func:`attention_dropout_mask`
- jagged (+|*) dense: :func:`jagged_dense_elementwise_add`, :func:`jagged_dense_elementwise_mul`
- batched matmuls: :func:`jagged_dense_bmm`, :func:`jagged_jagged_bmm`
- pooling and softmax over rows: :func:`jagged_sum`, :func:`jagged_mean`, :func:`jagged_softmax`
- jagged2 (one ``L_b x L_b`` matrix per row): :class:`Jagged2Tensor`,
  :func:`jagged_jagged_bmm_jagged_out`, :func:`jagged2_softmax`, :func:`jagged2_jagged_bmm`,
  :func:`jagged2_to_padded_dense`, :func:`dense_to_jagged2`
- :mod:`jagged.reference`: plain-PyTorch reference implementations of every op
"""

from . import nn, reference
from .ops.attention import (attention_dropout_mask, jagged_attention, jagged_flash_attention,
                            jagged_flash_attention_values)
from .ops.bmm import jagged_dense_bmm, jagged_jagged_bmm
from .ops.conversions import dense_to_jagged, jagged_to_padded_dense
from .jagged2 import Jagged2Tensor
from .ops.elementwise import jagged_dense_elementwise_add, jagged_dense_elementwise_mul
from .ops.jagged2_bmm import jagged2_jagged_bmm, jagged_jagged_bmm_jagged_out
from .ops.jagged2_conversions import dense_to_jagged2, jagged2_to_padded_dense
from .ops.jagged2_softmax import jagged2_softmax
from .ops.pooling import jagged_mean, jagged_sum
from .ops.softmax import jagged_softmax
from .tensor import JaggedTensor, lengths_to_offsets

__version__ = "0.1.0"

__all__ = [
    "Jagged2Tensor",
    "JaggedTensor",
    "attention_dropout_mask",
    "dense_to_jagged",
    "dense_to_jagged2",
    "jagged_attention",
    "jagged_dense_bmm",
    "jagged_dense_elementwise_add",
    "jagged_dense_elementwise_mul",
    "jagged_flash_attention",
    "jagged_flash_attention_values",
    "jagged2_jagged_bmm",
    "jagged2_softmax",
    "jagged2_to_padded_dense",
    "jagged_jagged_bmm",
    "jagged_jagged_bmm_jagged_out",
    "jagged_mean",
    "jagged_softmax",
    "jagged_sum",
    "jagged_to_padded_dense",
    "lengths_to_offsets",
    "nn",
    "reference",
]
