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
from ._rows import load_row_chunk_native, row_span, tiered_row
from ._utils import (cdiv, check_float_features, rows_as_matrix, tiered_walk_launch, unflatten_features,
                     unit_last_stride, use_triton)
from .conversions import GATHER, GATHER_ROW_MEAN, gather_from_dense


# Pooling's tile: 8 KB, at most 64 columns, so that B * D / 64 programs fill the GPU even at
# B = 256 (benchmarks/NOTES.md). One pass over a row, so a tier of their own for the long rows
# pays only with halved tiles (ops/_utils.py: tiered_walk_launch): the tiered kernel runs when
# cdiv(longest, tile tokens) * chain bytes exceeds the input's bytes, the one-tier kernel
# otherwise (the tiered one with full tiles: B=1024 max_L=512 D=128 bf16 uniform 44.3 -> 48.1 us).
# The chain bytes depend on what halving costs: at 16 bits it splits a token's 128-byte line in
# two, at 32 bits it keeps whole lines, and it pays for longer chains there. Both constants are
# fitted on 24 shape x length x dtype cases (H100, the prefetching walk; benchmarks/NOTES.md,
# session 14): they pick the faster kernel, or one within 1%, in all 24. B=256 max_L=2048 D=128
# skewed: halved 27.1 us vs 31.4 (bf16), 41.5 vs 55.1 (float32); B=1024 max_L=512 D=128 bf16
# skewed: one tier 21.9 vs 23.9 halved.
POOL_TILE_BYTES = 8192
POOL_MAX_BLOCK_D = 64
POOL_CHAIN_BYTES_SPLIT_LINE = 1_700_000
POOL_CHAIN_BYTES_WHOLE_LINES = 4_000_000
# With halved tiles, rows of several long tiles start first (ops/_rows.py: tiered_row,
# WALKERS_FIRST) when the longest row spans at least this many. H100 (benchmarks/NOTES.md,
# session 15): 8+ tiles 1-3% faster (B=1024 max_L=512 D=128 float32 skewed 33.7 -> 33.0 us,
# B=256 max_L=512 D=256 float32 skewed 21.0 -> 20.2); at 4 tiles mixed (B=256 max_L=512 D=256
# bf16 skewed 14.9 -> 15.4, B=512 max_L=256 D=64 float32 skewed 10.3 -> 10.1).
POOL_WALKERS_FIRST_TILES = 8


def _pool_launch(offsets: torch.Tensor, values2d: torch.Tensor, longest: int) -> tuple[tuple[int, int], dict]:
    """Grid (rows, long-tier + short-tier column blocks) and tiles of the pooling kernels; the
    tiers' tiles are equal when the one-tier kernel is to run (see POOL_CHAIN_BYTES_*)."""
    whole_lines = POOL_MAX_BLOCK_D * values2d.element_size() >= 256
    return tiered_walk_launch(offsets, values2d, longest, tile_bytes=POOL_TILE_BYTES, max_block_d=POOL_MAX_BLOCK_D,
                              chain_bytes=POOL_CHAIN_BYTES_WHOLE_LINES if whole_lines else POOL_CHAIN_BYTES_SPLIT_LINE,
                              walkers_first_tiles=POOL_WALKERS_FIRST_TILES)


@triton.jit
def _pool_row(values_ptr, out_ptr, row, begin, length, block, feature_dim, stride_vt, stride_ob,
              MEAN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Sum (or mean) of a row's tokens for column block ``block``: BLOCK_T-token chunks added
    into a [BLOCK_T, BLOCK_D] float32 tile (independent adds), reduced once at the end. Each
    step issues the next chunk's load before it adds this one, so two chunks are in flight:
    H100, B=1024 max_L=512 D=128 bf16 uniform 44.9 -> 38.6 us, B=256 max_L=2048 D=128 skewed
    33.6 -> 27.1 (benchmarks/NOTES.md, session 14). The softmax forward does the same only for
    long walks (softmax.py: SOFTMAX_PREFETCH_TILES)."""
    cols = block.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < feature_dim
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    chunk, chunk_rows = load_row_chunk_native(values_ptr, begin, 0, length, cols, col_ok, stride_vt, 0.0, BLOCK_T)
    for start in range(0, length, BLOCK_T):
        next_chunk, next_rows = load_row_chunk_native(values_ptr, begin, start + BLOCK_T, length, cols, col_ok,
                                                      stride_vt, 0.0, BLOCK_T)
        acc += chunk.to(tl.float32)
        chunk = next_chunk
    total = tl.sum(acc, 0)
    if MEAN:  # an empty row's mean is 0, like its sum
        total = total / tl.maximum(length, 1).to(tl.float32)
    tl.store(out_ptr + row * stride_ob + cols, total.to(out_ptr.dtype.element_ty), mask=col_ok)


@fast_launch
@triton.jit
def _jagged_pool_kernel(
    values_ptr, offsets_ptr, out_ptr, feature_dim, stride_vt, stride_ob,
    MEAN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (row, block of columns), walking the whole row.
    row = tl.program_id(0).to(tl.int64)
    begin, length = row_span(offsets_ptr, row)
    _pool_row(values_ptr, out_ptr, row, begin, length, tl.program_id(1), feature_dim, stride_vt, stride_ob, MEAN,
              BLOCK_T, BLOCK_D)


@fast_launch
@triton.jit
def _jagged_pool_tiered_kernel(
    values_ptr, offsets_ptr, out_ptr, feature_dim, stride_vt, stride_ob,
    MEAN: tl.constexpr, SHORT_T: tl.constexpr, SHORT_D: tl.constexpr, LONG_T: tl.constexpr, LONG_D: tl.constexpr,
    WALKERS_FIRST: tl.constexpr,
):
    # One program per (row, column block of its tier), the long rows' tier first
    # (ops/_rows.py: tiered_row), with taller, narrower tiles (see POOL_CHAIN_BYTES_*).
    active, long_tier, block, begin, length = tiered_row(offsets_ptr, feature_dim, SHORT_T, SHORT_D, LONG_T,
                                                         WALKERS_FIRST)
    if active:
        row = tl.program_id(0).to(tl.int64)
        if long_tier:
            _pool_row(values_ptr, out_ptr, row, begin, length, block, feature_dim, stride_vt, stride_ob, MEAN, LONG_T,
                      LONG_D)
        else:
            _pool_row(values_ptr, out_ptr, row, begin, length, block, feature_dim, stride_vt, stride_ob, MEAN, SHORT_T,
                      SHORT_D)


@jagged_op("jagged_pool")
def _launch_pool(values2d: torch.Tensor, offsets: torch.Tensor, mean: bool, longest: int = 0) -> torch.Tensor:
    """values [T, D] -> per-row sum or mean [B, D]. ``longest``: the longest row or a bound on
    it (0: unknown), a tile hint only."""
    batch_size = offsets.numel() - 1
    feature_dim = values2d.shape[1]
    out = torch.empty((batch_size, feature_dim), dtype=values2d.dtype, device=values2d.device)
    if out.numel() == 0:
        return out
    grid, tiles = _pool_launch(offsets, values2d, longest)
    args = (values2d, offsets, out, feature_dim, values2d.stride(0), out.stride(0))
    if tiles["LONG_D"] < tiles["SHORT_D"]:
        _jagged_pool_tiered_kernel[grid](*args, MEAN=mean, **tiles)
    else:
        _jagged_pool_kernel[(grid[0], cdiv(feature_dim, tiles["SHORT_D"]))](
            *args, MEAN=mean, BLOCK_T=tiles["SHORT_T"], BLOCK_D=tiles["SHORT_D"], num_warps=tiles["num_warps"])
    return out


@_launch_pool.register_fake
def _(values2d, offsets, mean, longest=0):
    return values2d.new_empty((offsets.shape[0] - 1, values2d.shape[1]))


def _save_for_pool_backward(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.total_len, ctx.mean = inputs[0].shape[0], inputs[2]


def _pool_backward(ctx, grad_out):
    (offsets,) = ctx.saved_tensors
    return _launch_pool_backward(grad_out, offsets, ctx.total_len, ctx.mean), None, None, None


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
    return unflatten_features(_launch_pool(values2d, x.offsets, mean, x.known_max_len or 0), feature_shape)


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
