"""Jagged pooling: per-row sum and mean -> dense ``[B, *F]``. Triton kernel,
launcher (``jagged::jagged_pool`` custom op, with autograd), public API.

The backward broadcasts each row's gradient (divided by the row's length for the mean) to the
row's positions; that is ``dense_to_jagged`` of the gradient expanded (stride 0) along a length
axis, so it reuses that kernel, with the division fused in.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from ._library import jagged_op
from ._launch import fast_launch
from ._rows import load_row_chunk, row_span
from ._utils import (check_float_features, row_walk_launch, rows_as_matrix, unflatten_features, unit_last_stride,
                     use_triton)
from .conversions import GATHER, GATHER_ROW_MEAN, gather_from_dense


@fast_launch
@triton.jit
def _jagged_pool_kernel(
    values_ptr, offsets_ptr, out_ptr, feature_dim, stride_vt, stride_ob,
    MEAN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (row, block of features); it walks the row in BLOCK_T-token chunks,
    # accumulating a [BLOCK_T, BLOCK_D] float32 tile (independent adds) reduced once at the end.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < feature_dim
    begin, length = row_span(offsets_ptr, row)
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for start in range(0, length, BLOCK_T):
        tile, _ = load_row_chunk(values_ptr, begin, start, length, cols, col_ok, stride_vt, 0.0, BLOCK_T)
        acc += tile
    total = tl.sum(acc, 0)
    if MEAN:  # an empty row's mean is 0, like its sum
        total = total / tl.maximum(length, 1).to(tl.float32)
    tl.store(out_ptr + row * stride_ob + cols, total.to(out_ptr.dtype.element_ty), mask=col_ok)


@jagged_op("jagged_pool")
def _launch_pool(values2d: torch.Tensor, offsets: torch.Tensor, mean: bool) -> torch.Tensor:
    """values [T, D] -> per-row sum or mean [B, D]."""
    batch_size = offsets.numel() - 1
    feature_dim = values2d.shape[1]
    out = torch.empty((batch_size, feature_dim), dtype=values2d.dtype, device=values2d.device)
    if out.numel() == 0:
        return out
    grid, tiles = row_walk_launch(offsets, values2d)
    _jagged_pool_kernel[grid](values2d, offsets, out, feature_dim, values2d.stride(0), out.stride(0), MEAN=mean, **tiles)
    return out


@_launch_pool.register_fake
def _(values2d, offsets, mean):
    return values2d.new_empty((offsets.shape[0] - 1, values2d.shape[1]))


def _save_for_pool_backward(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.total_len, ctx.mean = inputs[0].shape[0], inputs[2]


def _pool_backward(ctx, grad_out):
    (offsets,) = ctx.saved_tensors
    return _launch_pool_backward(grad_out, offsets, ctx.total_len, ctx.mean), None, None


@jagged_op("jagged_pool_backward")
def _launch_pool_backward(grad_out: torch.Tensor, offsets: torch.Tensor, total_len: int, mean: bool) -> torch.Tensor:
    """grad_out [B, D] -> [T, D]: row b's gradient (over its length if ``mean``) at each of its
    positions, in one kernel: the mean's division is fused into the gather, where it used to be
    five torch ops on the host before it (eager calls of this size are host-bound; the measured
    gain is within that host's noise, benchmarks/NOTES.md, session 10)."""
    # A stride-0 "dense" [B, T, D] view, long enough for any row.
    expanded = grad_out[:, None, :].expand(grad_out.shape[0], max(total_len, 1), grad_out.shape[1])
    return gather_from_dense(expanded, offsets, total_len, op=GATHER_ROW_MEAN if mean else GATHER)


@_launch_pool_backward.register_fake
def _(grad_out, offsets, total_len, mean):
    return grad_out.new_empty((total_len, grad_out.shape[1]))


def _save_for_pool_double_backward(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.mean = inputs[3]


def _pool_double_backward(ctx, grad_values):
    # The broadcast's adjoint is the pooling itself.
    (offsets,) = ctx.saved_tensors
    return _launch_pool(unit_last_stride(grad_values), offsets, ctx.mean), None, None, None


_launch_pool_backward.register_autograd(_pool_double_backward, setup_context=_save_for_pool_double_backward)
_launch_pool.register_autograd(_pool_backward, setup_context=_save_for_pool_backward)


def _pool(x, mean: bool, name: str) -> torch.Tensor:
    check_float_features(x, name)
    if not use_triton(x.values):
        return (reference.jagged_mean if mean else reference.jagged_sum)(x.values, x.offsets)
    values2d, feature_shape = rows_as_matrix(x.values)
    return unflatten_features(_launch_pool(values2d, x.offsets, mean), feature_shape)


def jagged_sum(x) -> torch.Tensor:
    """Sum over each row's positions.

    Args:
        x: :class:`jagged.JaggedTensor` with floating values ``[T, *F]`` (F at least one dim).

    Returns:
        ``[B, *F]`` in x's dtype (accumulated in float32); an empty row gives 0. Differentiable
        w.r.t. ``x.values`` (each position receives its row's gradient).

    Raises:
        TypeError if x is not a JaggedTensor; ValueError for non-float or 1-D values.

    Example::

        >>> x = jagged.JaggedTensor.from_list([torch.ones(2, 3), torch.ones(0, 3), torch.ones(4, 3)])
        >>> jagged.jagged_sum(x)[:, 0]
        tensor([2., 0., 4.])
    """
    return _pool(x, False, "jagged_sum")


def jagged_mean(x) -> torch.Tensor:
    """Mean over each row's positions: like :func:`jagged_sum`, divided by the row's length (an
    empty row gives 0, not NaN). Differentiable w.r.t. ``x.values``."""
    return _pool(x, True, "jagged_mean")
