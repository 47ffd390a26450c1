"""Jagged softmax: softmax over each row's positions, per feature column. Triton forward and
backward kernels, autograd, public API."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from ._library import jagged_op
from ._launch import fast_launch
from ._online_softmax import online_softmax_step, softmax_weights
from ._rows import load_row_chunk, row_span
from ._utils import (check_float_features, row_walk_launch, rows_as_matrix, unflatten_features, unit_last_stride,
                     use_triton)

# A program's tile: one 128-byte line per token (64 columns of 16-bit values, 32 of float32) and
# 8192 values (128 x 64 or 256 x 32), 64 float32 registers a thread at 4 warps. The best of
# benchmarks/tune_ops.py's sweeps at the shapes (benchmarks/NOTES.md): bf16 1.2-1.85 TB/s
# against 0.8-1.5 with pooling's 8 KB tiles; float32 (sessions 1-9 used bf16's 64 x 64 tile)
# 1.50-1.87 -> 1.89-2.34 TB/s forward, backward 1.23-1.68 -> 1.65-1.94.
SOFTMAX_LINE_BYTES = 128
SOFTMAX_TILE_VALUES = 8192


def _softmax_launch(offsets: torch.Tensor, values2d: torch.Tensor) -> tuple[tuple[int, int], dict]:
    """Grid (rows, column blocks) and tile of the softmax kernels (see SOFTMAX_LINE_BYTES)."""
    element_size = values2d.element_size()
    return row_walk_launch(offsets, values2d, tile_bytes=SOFTMAX_TILE_VALUES * element_size,
                           max_block_d=SOFTMAX_LINE_BYTES // element_size)


@fast_launch
@triton.jit
def _jagged_softmax_forward_kernel(
    x_ptr, offsets_ptr, y_ptr, feature_dim, stride_xt, stride_yt,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (row, block of columns). A longer row than one tile: pass 1 running max and
    # rescaled sum of exponents (online softmax), pass 2 normalise and write (its reads mostly hit
    # L2). The grid holds every row twice: the first half runs the rows longer than one tile, the
    # second half the others (each program of the wrong kind returns at once), so that the GPU
    # starts the longest programs first instead of wherever they fall in the batch: no sort, no
    # device sync. H100, bf16, B=1024 max_L=512 D=128, exponential lengths: 39.1 -> 37.2 us;
    # other shapes within 1% (benchmarks/NOTES.md, session 9). Pass 2's reads and every write are
    # the data's last touch here: marked evict-first, they leave L2 to the pass-1 tiles that other
    # long rows are about to read again (H100, bf16, same shape, 37.2 -> 34.6 us; uniform lengths
    # 72.2 -> 62.7; NOTES, session 11).
    batch_size = tl.num_programs(0) // 2
    row = tl.program_id(0).to(tl.int64) % batch_size
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < feature_dim
    begin, length = row_span(offsets_ptr, row)
    m = tl.full([BLOCK_D], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_D], dtype=tl.float32)
    first_half = tl.program_id(0) < batch_size
    if (length > BLOCK_T) != first_half:
        pass
    elif length <= BLOCK_T:
        # The row fits one tile (most rows at recsys lengths): one read, no second pass.
        x, in_row = load_row_chunk(x_ptr, begin, 0, length, cols, col_ok, stride_xt, float("-inf"), BLOCK_T)
        m, s = online_softmax_step(m, s, x, 0)
        tokens = begin + tl.arange(0, BLOCK_T)
        tl.store(y_ptr + tokens[:, None] * stride_yt + cols[None, :],
                 softmax_weights(x, m, s, 0).to(y_ptr.dtype.element_ty), mask=in_row[:, None] & col_ok[None, :],
                 eviction_policy="evict_first")
    else:
        for start in range(0, length, BLOCK_T):
            x, _ = load_row_chunk(x_ptr, begin, start, length, cols, col_ok, stride_xt, float("-inf"), BLOCK_T)
            m, s = online_softmax_step(m, s, x, 0)
        for start in range(0, length, BLOCK_T):
            x, in_row = load_row_chunk(x_ptr, begin, start, length, cols, col_ok, stride_xt, float("-inf"), BLOCK_T,
                                       "evict_first")
            tokens = begin + start + tl.arange(0, BLOCK_T)
            tl.store(y_ptr + tokens[:, None] * stride_yt + cols[None, :],
                     softmax_weights(x, m, s, 0).to(y_ptr.dtype.element_ty), mask=in_row[:, None] & col_ok[None, :],
                     eviction_policy="evict_first")


@fast_launch
@triton.jit
def _jagged_softmax_backward_kernel(
    y_ptr, dy_ptr, offsets_ptr, dx_ptr, feature_dim, stride_yt, stride_dyt, stride_dxt,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # dx = y * (dy - sum_row(dy * y)), per column: pass 1 the sum, pass 2 the gradient (its reads
    # and writes evict-first, as in the forward: B=1024 max_L=512 D=128 bf16 uniform 114.8 -> 93.7 us).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < feature_dim
    begin, length = row_span(offsets_ptr, row)
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for start in range(0, length, BLOCK_T):
        y, _ = load_row_chunk(y_ptr, begin, start, length, cols, col_ok, stride_yt, 0.0, BLOCK_T)
        dy, _ = load_row_chunk(dy_ptr, begin, start, length, cols, col_ok, stride_dyt, 0.0, BLOCK_T)
        acc += y * dy
    dot = tl.sum(acc, 0)
    for start in range(0, length, BLOCK_T):
        y, in_row = load_row_chunk(y_ptr, begin, start, length, cols, col_ok, stride_yt, 0.0, BLOCK_T, "evict_first")
        dy, _ = load_row_chunk(dy_ptr, begin, start, length, cols, col_ok, stride_dyt, 0.0, BLOCK_T, "evict_first")
        tokens = begin + start + tl.arange(0, BLOCK_T)
        tl.store(dx_ptr + tokens[:, None] * stride_dxt + cols[None, :],
                 (y * (dy - dot[None, :])).to(dx_ptr.dtype.element_ty), mask=in_row[:, None] & col_ok[None, :],
                 eviction_policy="evict_first")


@jagged_op("jagged_softmax_forward")
def _softmax_forward(x2d: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [T, D] (any token stride, unit feature stride) -> y [T, D], softmax within each row."""
    y = torch.empty((x2d.shape[0], x2d.shape[1]), dtype=x2d.dtype, device=x2d.device)
    if y.numel():
        grid, tiles = _softmax_launch(offsets, x2d)
        grid = (2 * grid[0], grid[1])  # long rows first (see the kernel)
        _jagged_softmax_forward_kernel[grid](x2d, offsets, y, x2d.shape[1], x2d.stride(0), y.stride(0), **tiles)
    return y


@jagged_op("jagged_softmax_backward")
def _softmax_backward(y: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """dx = y * (dy - rowsum(y * dy)), per row and column."""
    dy = unit_last_stride(dy)
    dx = torch.empty((y.shape[0], y.shape[1]), dtype=y.dtype, device=y.device)
    if dx.numel():
        grid, tiles = _softmax_launch(offsets, y)
        _jagged_softmax_backward_kernel[grid](y, dy, offsets, dx, y.shape[1], y.stride(0), dy.stride(0),
                                              dx.stride(0), **tiles)
    return dx


@_softmax_forward.register_fake
def _(x2d, offsets):
    return x2d.new_empty((x2d.shape[0], x2d.shape[1]))


@_softmax_backward.register_fake
def _(y, dy, offsets):
    return y.new_empty((y.shape[0], y.shape[1]))


def _save_for_softmax_backward(ctx, inputs, output):
    ctx.save_for_backward(output, inputs[1])


def _softmax_autograd_backward(ctx, dy):
    y, offsets = ctx.saved_tensors
    return _softmax_backward(y, dy, offsets), None


_softmax_forward.register_autograd(_softmax_autograd_backward, setup_context=_save_for_softmax_backward)


def jagged_softmax(x):
    """Softmax over the positions of each row, separately for every feature column.

    Args:
        x: :class:`jagged.JaggedTensor` with floating values ``[T, *F]`` (F at least one dim).

    Returns:
        JaggedTensor with x's offsets and values ``[T, *F]`` in x's dtype (computed in float32):
        within each row and column the values are positive and sum to 1. Empty rows stay empty.
        A column that is -inf throughout a row gives NaN there, as ``torch.softmax`` does; NaN
        inputs propagate. Differentiable w.r.t. ``x.values``.

    Raises:
        TypeError if x is not a JaggedTensor; ValueError for non-float or 1-D values.

    Example::

        >>> x = jagged.JaggedTensor.from_list([torch.zeros(2, 1), torch.zeros(4, 1)])
        >>> jagged.jagged_softmax(x).values[:, 0]
        tensor([0.5000, 0.5000, 0.2500, 0.2500, 0.2500, 0.2500])
    """
    check_float_features(x, "jagged_softmax")
    if not use_triton(x.values):
        return x.with_values(reference.jagged_softmax(x.values, x.offsets))
    x2d, feature_shape = rows_as_matrix(x.values)
    y = _softmax_forward(x2d, x.offsets)
    return x.with_values(unflatten_features(y, feature_shape))
