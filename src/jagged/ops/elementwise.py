"""Jagged (+|*) dense elementwise ops with a jagged output: custom op, autograd and public API. The kernel is
the dense->jagged gather of ops/conversions.py with the op fused in (OP constexpr).

Positions a row has beyond the dense tensor's length L read the dense operand as 0 (FBGEMM's
convention): ``add`` leaves x there, ``mul`` gives 0.
"""

from __future__ import annotations

import torch

from .. import reference
from ._library import jagged_op
from ._utils import check_tensor, flatten_features, jagged_tensor_type, unflatten_features, use_triton
from .conversions import GATHER_ADD, GATHER_MUL, _launch_jagged_to_padded_dense, gather_from_dense


@jagged_op("jagged_dense_elementwise")
def _jagged_dense_elementwise(x2d: torch.Tensor, dense3d: torch.Tensor, offsets: torch.Tensor, op: int) -> torch.Tensor:
    """x [T, D] (+|*) dense [B, L, D] at each row's positions -> [T, D]."""
    return gather_from_dense(dense3d, offsets, x2d.shape[0], x2d, op)


@_jagged_dense_elementwise.register_fake
def _(x2d, dense3d, offsets, op):
    return torch.empty_like(x2d, memory_format=torch.contiguous_format)


def _save_for_elementwise_backward(ctx, inputs, output):
    x2d, dense3d, offsets, op = inputs
    ctx.save_for_backward(x2d, dense3d, offsets)
    ctx.op = op


def _jagged_dense_elementwise_backward(ctx, grad):
    x2d, dense3d, offsets = ctx.saved_tensors
    dense_len = dense3d.shape[1]
    dx = ddense = None
    # Each gradient only when asked for: the dense one writes all of [B, L, D].
    if ctx.needs_input_grad[0]:
        dx = grad if ctx.op == GATHER_ADD else _jagged_dense_elementwise(grad, dense3d, offsets, GATHER_MUL)
    if ctx.needs_input_grad[1]:
        # Positions past L never read the dense operand: no gradient flows there.
        ddense = _launch_jagged_to_padded_dense(grad if ctx.op == GATHER_ADD else grad * x2d, offsets, dense_len, 0.0)
    return dx, ddense, None, None


_jagged_dense_elementwise.register_autograd(_jagged_dense_elementwise_backward,
                                            setup_context=_save_for_elementwise_backward)


def _elementwise(x, y, op, name):
    JaggedTensor = jagged_tensor_type()
    if not isinstance(x, JaggedTensor):
        raise TypeError(f"x must be a jagged.JaggedTensor, got {type(x).__name__}")
    check_tensor(y, "y")
    feature_shape = tuple(x.feature_shape)
    if y.dim() != 2 + len(feature_shape) or y.shape[0] != x.batch_size or tuple(y.shape[2:]) != feature_shape:
        raise ValueError(f"y must be [B={x.batch_size}, L, *{feature_shape}] to match x, got shape {tuple(y.shape)}")
    if not x.values.is_floating_point() or y.dtype != x.dtype or y.device != x.device:
        raise ValueError(f"{name} needs floating x and y of one dtype and device, got {x.dtype} on {x.device} "
                         f"and {y.dtype} on {y.device}")
    if not use_triton(x.values):
        fn = reference.jagged_dense_elementwise_add if op == GATHER_ADD else reference.jagged_dense_elementwise_mul
        return x.with_values(fn(x.values, x.offsets, y))
    x2d, feature_shape = flatten_features(x.values, 1)
    y3d, _ = flatten_features(y, 2)
    out = _jagged_dense_elementwise(x2d, y3d, x.offsets, op)
    return x.with_values(unflatten_features(out, feature_shape))


def jagged_dense_elementwise_add(x, y: torch.Tensor):
    """``x + y`` at each row's positions: x JaggedTensor ``[T, *F]``, y dense ``[B, L, *F]`` (x's
    float dtype and device) -> JaggedTensor with x's offsets. Where a row is longer than L, y reads
    as 0 (x passes through), as in FBGEMM. Differentiable w.r.t. x's values and y (y's padded
    positions get zero gradient). Raises TypeError / ValueError for a non-JaggedTensor x, mismatched
    shapes, dtypes or devices."""
    return _elementwise(x, y, GATHER_ADD, "jagged_dense_elementwise_add")


def jagged_dense_elementwise_mul(x, y: torch.Tensor):
    """``x * y`` at each row's positions, like :func:`jagged_dense_elementwise_add`; where a row is
    longer than L, y reads as 0, so the product is 0 there (NaN for inf/NaN x, as IEEE has it).
    Differentiable w.r.t. x's values and y."""
    return _elementwise(x, y, GATHER_MUL, "jagged_dense_elementwise_mul")
