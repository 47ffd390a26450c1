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
from ._rows import load_row_chunk, load_row_chunk_native, tiered_row
from ._utils import (cdiv, check_float_features, rows_as_matrix, tiered_walk_launch, unflatten_features,
                     unit_last_stride, use_triton)

# A program's tile: one 128-byte line per token (64 columns of 16-bit values, 32 of float32) and
# 8192 values (128 x 64 or 256 x 32), 64 float32 registers a thread at 4 warps. The best of
# benchmarks/tune_ops.py's sweeps at the shapes (benchmarks/NOTES.md): bf16 1.2-1.85 TB/s
# against 0.8-1.5 with pooling's 8 KB tiles; float32 (sessions 1-9 used bf16's 64 x 64 tile)
# 1.50-1.87 -> 1.89-2.34 TB/s forward, backward 1.23-1.68 -> 1.65-1.94.
SOFTMAX_LINE_BYTES = 128
SOFTMAX_TILE_VALUES = 8192
# The long-row tier's tile (ops/_utils.py: tiered_walk_launch). A row longer than one tile is
# walked twice by one program per column block: a chain of 2 * cdiv(longest, BLOCK_T) tile steps,
# ~1.6 us each on an H100, that no other program shortens. When that chain outlasts the batch's
# own traffic at ~2.5 TB/s (cdiv(longest, BLOCK_T) * SOFTMAX_CHAIN_BYTES > the input's bytes), the
# forward's long-row tier takes half-line tiles: twice the tokens and half the columns, so twice
# the programs per long row and half the steps each. Fitted on 24 cases (6 shapes x 2 length
# patterns x bf16, float32; NOTES, session 13), the faster of the two in all: B=256 max_L=1024
# D=256 bf16 skewed 39.6 -> 35.1 us, max_L=2048 D=128 56.8 -> 42.4; where the rule keeps full
# lines, halving would have cost up to 40% (B=1024 max_L=1024 D=128 uniform 134 -> 191 us). The
# backward keeps full lines: halving slowed it at every shape measured (42.4 -> 45.7 us, 52.2 ->
# 54.7 at the two above).
SOFTMAX_CHAIN_BYTES = 4_000_000
# With halved long-row tiles, the rows that walk several of them start before the rows of one
# when the longest row spans at least this many (ops/_rows.py: tiered_row, WALKERS_FIRST).
# H100, bf16 (benchmarks/NOTES.md, session 15): B=256 max_L=1024 D=256 skewed (4 tiles) 35.0 ->
# 32.0 us together with no prefetch there (below); at 2 tiles it lost (B=256 max_L=512 D=256
# skewed 21.1 -> 22.3: the extra, idle programs cost more than the order saves).
SOFTMAX_WALKERS_FIRST_TILES = 4
# The forward's long-row walk loads the next chunk (in the data's dtype) before it reduces the
# current one when its tiles are full lines (not halved) and the longest row is known to span at
# least this many of them. It holds a second tile in registers (bf16 127 -> 168: 3 programs a SM
# instead of 4), which pays only where long walks dominate. H100 (benchmarks/NOTES.md, sessions
# 14-15), bf16: B=256 max_L=1024 D=256 uniform 76.0 -> 70.0 us, B=1024 max_L=1024 D=128 skewed
# 61.8 -> 58.7, B=256 max_L=2048 D=128 uniform 90.3 -> 77.8; with 4 tiles it lost (B=1024
# max_L=512 D=128 skewed 32.2 -> 36.2), in float32 too; with halved tiles, whose walks are half
# as long, it lost too (B=256 max_L=1024 D=256 skewed, walkers first: 32.5 -> 34.5).
SOFTMAX_PREFETCH_TILES = 8


def _softmax_launch(offsets: torch.Tensor, values2d: torch.Tensor, longest: int,
                    halve_long_tiles: bool) -> tuple[tuple[int, int], dict]:
    """Grid (rows, long-tier + short-tier column blocks) and tiles of the softmax kernels
    (SOFTMAX_LINE_BYTES, SOFTMAX_CHAIN_BYTES; ops/_utils.py: tiered_walk_launch)."""
    element_size = values2d.element_size()
    grid, tiles = tiered_walk_launch(offsets, values2d, longest, tile_bytes=SOFTMAX_TILE_VALUES * element_size,
                                     max_block_d=SOFTMAX_LINE_BYTES // element_size,
                                     chain_bytes=SOFTMAX_CHAIN_BYTES if halve_long_tiles else 0,
                                     walkers_first_tiles=SOFTMAX_WALKERS_FIRST_TILES)
    # With a long tier the short tier's rows fit one tile, and its programs compile for that
    # alone (a length branch there cost 2-3%: B=4096 max_L=256 D=64 bf16 43.7 -> 45.1 us).
    tiles["LONG_TIER"] = grid[1] > cdiv(values2d.shape[1], tiles["SHORT_D"])
    return grid, tiles


def _prefetches(tiles: dict, longest: int) -> bool:
    """Whether the forward's long-row walk prefetches (SOFTMAX_PREFETCH_TILES); longest 0
    (unknown): no."""
    return tiles["LONG_T"] == tiles["SHORT_T"] and cdiv(longest, tiles["SHORT_T"]) >= SOFTMAX_PREFETCH_TILES


@triton.jit
def _softmax_one_tile(x_ptr, y_ptr, begin, length, block, feature_dim, stride_xt, stride_yt,
                      BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Softmax of a row that fits one tile, for column block ``block``: one read, no second pass.
    The write is the data's last touch here: evict-first (see the forward kernel)."""
    cols = block.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < feature_dim
    x, in_row = load_row_chunk(x_ptr, begin, 0, length, cols, col_ok, stride_xt, float("-inf"), BLOCK_T)
    m, s = online_softmax_step(tl.full([BLOCK_D], float("-inf"), dtype=tl.float32),
                               tl.zeros([BLOCK_D], dtype=tl.float32), x, 0)
    tokens = begin + tl.arange(0, BLOCK_T)
    tl.store(y_ptr + tokens[:, None] * stride_yt + cols[None, :],
             softmax_weights(x, m, s, 0).to(y_ptr.dtype.element_ty), mask=in_row[:, None] & col_ok[None, :],
             eviction_policy="evict_first")


@triton.jit
def _softmax_row(x_ptr, y_ptr, begin, length, block, feature_dim, stride_xt, stride_yt,
                 BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, PREFETCH: tl.constexpr):
    """Softmax of a row for column block ``block``: in one tile if it fits, else pass 1 running
    max and rescaled sum (online softmax), pass 2 normalise and write. PREFETCH: each step of
    both passes issues the next chunk's load (in the data's dtype; past the row's end it is all
    masked and reads nothing) before it reduces or writes this one (SOFTMAX_PREFETCH_TILES)."""
    if length <= BLOCK_T:
        _softmax_one_tile(x_ptr, y_ptr, begin, length, block, feature_dim, stride_xt, stride_yt, BLOCK_T, BLOCK_D)
    else:
        cols = block.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < feature_dim
        m = tl.full([BLOCK_D], float("-inf"), dtype=tl.float32)
        s = tl.zeros([BLOCK_D], dtype=tl.float32)
        if PREFETCH:
            x, x_rows = load_row_chunk_native(x_ptr, begin, 0, length, cols, col_ok, stride_xt, float("-inf"), BLOCK_T)
            for start in range(0, length, BLOCK_T):
                next_x, next_rows = load_row_chunk_native(x_ptr, begin, start + BLOCK_T, length, cols, col_ok,
                                                          stride_xt, float("-inf"), BLOCK_T)
                m, s = online_softmax_step(m, s, x, 0)
                x = next_x
        else:
            for start in range(0, length, BLOCK_T):
                x, x_rows = load_row_chunk(x_ptr, begin, start, length, cols, col_ok, stride_xt, float("-inf"), BLOCK_T)
                m, s = online_softmax_step(m, s, x, 0)
        if PREFETCH:
            x, x_rows = load_row_chunk_native(x_ptr, begin, 0, length, cols, col_ok, stride_xt, float("-inf"), BLOCK_T,
                                              "evict_first")
        for start in range(0, length, BLOCK_T):
            if PREFETCH:
                next_x, next_rows = load_row_chunk_native(x_ptr, begin, start + BLOCK_T, length, cols, col_ok,
                                                          stride_xt, float("-inf"), BLOCK_T, "evict_first")
                in_row = x_rows
            else:
                x, in_row = load_row_chunk(x_ptr, begin, start, length, cols, col_ok, stride_xt, float("-inf"),
                                           BLOCK_T, "evict_first")
            tokens = begin + start + tl.arange(0, BLOCK_T)
            tl.store(y_ptr + tokens[:, None] * stride_yt + cols[None, :],
                     softmax_weights(x, m, s, 0).to(y_ptr.dtype.element_ty), mask=in_row[:, None] & col_ok[None, :],
                     eviction_policy="evict_first")
            if PREFETCH:
                x = next_x
                x_rows = next_rows


@fast_launch
@triton.jit
def _jagged_softmax_forward_kernel(
    x_ptr, offsets_ptr, y_ptr, feature_dim, stride_xt, stride_yt,
    SHORT_T: tl.constexpr, SHORT_D: tl.constexpr, LONG_T: tl.constexpr, LONG_D: tl.constexpr,
    WALKERS_FIRST: tl.constexpr,
    LONG_TIER: tl.constexpr, PREFETCH: tl.constexpr,
):
    # One program per (row, column block of its tier); the grid runs the long-row tier first for
    # every row and column block, then the short rows (tiered_row), so that the GPU starts the
    # longest walks first: no sort, no device sync. H100, bf16, B=1024 max_L=512 D=128,
    # exponential lengths: 39.1 -> 37.2 us with the long rows first per column block (session
    # 9), 36.9 -> 34.0 first across all column blocks (session 13). Pass 2's reads and every
    # write are the data's last touch here: marked evict-first, they leave L2 to the pass-1 tiles
    # that other long rows are about to read again (same shape, 37.2 -> 34.6 us; uniform lengths
    # 72.2 -> 62.7; benchmarks/NOTES.md, session 11).
    active, long_tier, block, begin, length = tiered_row(offsets_ptr, feature_dim, SHORT_T, SHORT_D, LONG_T,
                                                         WALKERS_FIRST)
    if active:
        if long_tier:
            _softmax_row(x_ptr, y_ptr, begin, length, block, feature_dim, stride_xt, stride_yt, LONG_T, LONG_D,
                         PREFETCH)
        elif LONG_TIER:
            _softmax_one_tile(x_ptr, y_ptr, begin, length, block, feature_dim, stride_xt, stride_yt, SHORT_T,
                              SHORT_D)
        else:  # no long tier: every row is here (see tiered_row)
            _softmax_row(x_ptr, y_ptr, begin, length, block, feature_dim, stride_xt, stride_yt, SHORT_T, SHORT_D,
                         PREFETCH)


@triton.jit
def _softmax_grad_walk(y_ptr, dy_ptr, dx_ptr, begin, length, block, feature_dim, stride_yt, stride_dyt,
                       stride_dxt, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """dx = y * (dy - sum_row(dy * y)) for column block ``block`` of a row: pass 1 the sum, pass 2
    the gradient (its reads and writes evict-first, as in the forward: B=1024 max_L=512 D=128
    bf16 uniform 114.8 -> 93.7 us)."""
    cols = block.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < feature_dim
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


@triton.jit
def _softmax_grad_one_tile(y_ptr, dy_ptr, dx_ptr, begin, length, block, feature_dim, stride_yt, stride_dyt,
                           stride_dxt, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """_softmax_grad_walk for a row that fits one tile: y and dy read once."""
    cols = block.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < feature_dim
    y, in_row = load_row_chunk(y_ptr, begin, 0, length, cols, col_ok, stride_yt, 0.0, BLOCK_T, "evict_first")
    dy, _ = load_row_chunk(dy_ptr, begin, 0, length, cols, col_ok, stride_dyt, 0.0, BLOCK_T, "evict_first")
    dot = tl.sum(y * dy, 0)
    tokens = begin + tl.arange(0, BLOCK_T)
    tl.store(dx_ptr + tokens[:, None] * stride_dxt + cols[None, :],
             (y * (dy - dot[None, :])).to(dx_ptr.dtype.element_ty), mask=in_row[:, None] & col_ok[None, :],
             eviction_policy="evict_first")


@triton.jit
def _softmax_grad_row(y_ptr, dy_ptr, dx_ptr, begin, length, block, feature_dim, stride_yt, stride_dyt, stride_dxt,
                      BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """The softmax gradient of a row for column block ``block``, of any length."""
    if length <= BLOCK_T:
        _softmax_grad_one_tile(y_ptr, dy_ptr, dx_ptr, begin, length, block, feature_dim, stride_yt, stride_dyt,
                               stride_dxt, BLOCK_T, BLOCK_D)
    else:
        _softmax_grad_walk(y_ptr, dy_ptr, dx_ptr, begin, length, block, feature_dim, stride_yt, stride_dyt,
                           stride_dxt, BLOCK_T, BLOCK_D)


@fast_launch
@triton.jit
def _jagged_softmax_backward_kernel(
    y_ptr, dy_ptr, offsets_ptr, dx_ptr, feature_dim, stride_yt, stride_dyt, stride_dxt,
    SHORT_T: tl.constexpr, SHORT_D: tl.constexpr, LONG_T: tl.constexpr, LONG_D: tl.constexpr,
    WALKERS_FIRST: tl.constexpr,
    LONG_TIER: tl.constexpr,
):
    # The forward's grid and tiers (long rows first): B=1024 max_L=512 D=128 bf16 skewed 45.1 ->
    # 38.2 us, uniform 94.3 -> 83.8, with y and dy of a one-tile row read once (41.4 and 94.1 us
    # with its two passes; benchmarks/NOTES.md, session 13).
    active, long_tier, block, begin, length = tiered_row(offsets_ptr, feature_dim, SHORT_T, SHORT_D, LONG_T,
                                                         WALKERS_FIRST)
    if active:
        if long_tier:
            _softmax_grad_walk(y_ptr, dy_ptr, dx_ptr, begin, length, block, feature_dim, stride_yt, stride_dyt,
                               stride_dxt, LONG_T, LONG_D)
        elif LONG_TIER:
            _softmax_grad_one_tile(y_ptr, dy_ptr, dx_ptr, begin, length, block, feature_dim, stride_yt, stride_dyt,
                                   stride_dxt, SHORT_T, SHORT_D)
        else:
            _softmax_grad_row(y_ptr, dy_ptr, dx_ptr, begin, length, block, feature_dim, stride_yt, stride_dyt,
                              stride_dxt, SHORT_T, SHORT_D)


@jagged_op("jagged_softmax_forward")
def _softmax_forward(x2d: torch.Tensor, offsets: torch.Tensor, longest: int = 0) -> torch.Tensor:
    """x [T, D] (any token stride, unit feature stride) -> y [T, D], softmax within each row.
    ``longest``: the longest row or a bound on it (0: unknown), a tile hint only."""
    y = torch.empty((x2d.shape[0], x2d.shape[1]), dtype=x2d.dtype, device=x2d.device)
    if y.numel():
        grid, tiles = _softmax_launch(offsets, x2d, longest, True)
        _jagged_softmax_forward_kernel[grid](x2d, offsets, y, x2d.shape[1], x2d.stride(0), y.stride(0),
                                             PREFETCH=_prefetches(tiles, longest), **tiles)
    return y


@jagged_op("jagged_softmax_backward")
def _softmax_backward(y: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, longest: int = 0) -> torch.Tensor:
    """dx = y * (dy - rowsum(y * dy)), per row and column (``longest`` as in the forward)."""
    dy = unit_last_stride(dy)
    dx = torch.empty((y.shape[0], y.shape[1]), dtype=y.dtype, device=y.device)
    if dx.numel():
        grid, tiles = _softmax_launch(offsets, y, longest, False)
        _jagged_softmax_backward_kernel[grid](y, dy, offsets, dx, y.shape[1], y.stride(0), dy.stride(0),
                                              dx.stride(0), **tiles)
    return dx


@_softmax_forward.register_fake
def _(x2d, offsets, longest=0):
    return x2d.new_empty((x2d.shape[0], x2d.shape[1]))


@_softmax_backward.register_fake
def _(y, dy, offsets, longest=0):
    return y.new_empty((y.shape[0], y.shape[1]))


def _save_for_softmax_backward(ctx, inputs, output):
    ctx.save_for_backward(output, inputs[1])
    ctx.longest = inputs[2]


def _softmax_autograd_backward(ctx, dy):
    y, offsets = ctx.saved_tensors
    return _softmax_backward(y, dy, offsets, ctx.longest), None, None


_softmax_forward.register_autograd(_softmax_autograd_backward, setup_context=_save_for_softmax_backward)


def jagged_softmax(x):
    """Softmax over the positions of each row, separately for every feature column.

    Args:
        x: :class:`jagged.JaggedTensor` with floating values ``[T, *F]`` (F at least one dim).

    Returns:
        JaggedTensor with x's offsets and values ``[T, *F]`` in x's dtype (computed in float32):
        within each row and column the values are positive and sum to 1. Empty rows stay empty.
        A column that is -inf throughout a row gives NaN there, as ``torch.softmax`` does; NaN
        inputs propagate. Differentiable w.r.t. ``x.values``. If x knows its longest row
        (``known_max_len``), long skewed rows may take narrower tiles (faster; same result).

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
    y = _softmax_forward(x2d, x.offsets, x.known_max_len or 0)
    return x.with_values(unflatten_features(y, feature_shape))
