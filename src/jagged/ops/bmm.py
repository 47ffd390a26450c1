"""Jagged batched matmuls: jagged x dense -> jagged, and jagged x jagged -> dense. Triton
kernels, launchers (registered as ``jagged::`` custom ops, with autograd) and public functions.

The two are each other's gradients (transposes are passed as strides, never copied):
    out = jagged_dense_bmm(x, y):   dx = jagged_dense_bmm(dout, y^T),  dy = jagged_jagged_bmm(x, dout)
    z = jagged_jagged_bmm(x, y):    dx = jagged_dense_bmm(y, dz^T),    dy = jagged_dense_bmm(x, dz)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from . import bmm_hopper
from ._library import jagged_op
from ._launch import fast_launch
from ._rows import row_block, row_span, slot_row_block
from ._utils import (RANGE_FLATTEN, TRITON_INTERPRETER, cdiv, check_jagged_matrix, check_same_rows, check_tensor,
                     dot_precision, multiprocessor_count, scan_width, slot_search, use_triton)


@triton.jit
def _jagged_dense_bmm_tile(
    x_ptr, y_ptr, out_ptr, row, begin, length, block, col_block, k_dim, n_dim,
    stride_xt, stride_xk, stride_yb, stride_yk, stride_yn, stride_ot, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    MAY_BE_SPARE: tl.constexpr, EVEN_K: tl.constexpr, Y_ROW_MAJOR: tl.constexpr,
):
    # Output block (block of BLOCK_M tokens of one row, block of columns): the row's tokens times
    # the row's own [K, N] matrix. MAY_BE_SPARE: the block may lie past the row's end (a spare
    # slot of the persistent loop), and then reads and stores nothing. EVEN_K: BLOCK_K divides K
    # (x needs no mask on k); Y_ROW_MAJOR: y's N stride is 1.
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    tokens = begin + offs_m
    m_ok = offs_m < length
    cols = tl.cast(col_block, tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = cols < n_dim
    # m_ok already masks a spare block's x; its y is masked out through a bound on k (y's row
    # dim) when y is row-major, else through its columns, by a vector of one value (a runtime
    # bound on the contiguous dim would lose the loads' vector width). H100, B=256 max_L=1024
    # D=256 bf16: the bound on k 45.6 -> 44.2 us against masking the columns (NOTES, session 11).
    k_end = k_dim
    y_cols_ok = n_ok
    if MAY_BE_SPARE:
        if Y_ROW_MAJOR:
            k_end = tl.where(block * BLOCK_M < length, k_dim, 0)
        else:
            y_cols_ok = n_ok & (block * BLOCK_M + cols * 0 < length)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            x_mask = m_ok[:, None]
        else:
            x_mask = m_ok[:, None] & (ks < k_dim)[None, :]
        a = tl.load(x_ptr + tokens[:, None] * stride_xt + ks[None, :] * stride_xk, mask=x_mask, other=0.0)
        b = tl.load(y_ptr + row * stride_yb + ks[:, None] * stride_yk + cols[None, :] * stride_yn,
                    mask=(ks < k_end)[:, None] & y_cols_ok[None, :], other=0.0)
        acc += tl.dot(a, b, input_precision=PRECISION)
    tl.store(out_ptr + tokens[:, None] * stride_ot + cols[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@fast_launch
@triton.jit(do_not_specialize=["batch_size", "row_search", "num_tiles"])
def _jagged_dense_bmm_kernel(
    x_ptr, y_ptr, out_ptr, offsets_ptr, batch_size, row_search, k_dim, n_dim, num_tiles,
    stride_xt, stride_xk, stride_yb, stride_yk, stride_yn, stride_ot, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    PERSISTENT: tl.constexpr, COL_BLOCKS: tl.constexpr, EVEN_K: tl.constexpr, Y_ROW_MAJOR: tl.constexpr,
    SCAN: tl.constexpr,
):
    # Work slots cover real tokens only (see find_row). PERSISTENT: a fixed grid of programs,
    # each looping over (slot, column block) tiles, the tile loop flattened with the K loop so that
    # the next tile's loads are in flight during this tile's epilogue (the big 16-bit tiles fit one
    # program an SM, which otherwise leaves nothing to overlap a program's prologue and epilogue).
    # Else one program per (slot, column block). COL_BLOCKS = cdiv(N, BLOCK_N) is a constexpr for
    # the persistent loop: divided by a runtime count, the flattened loop lost its 3-stage
    # pipeline and vector stores (sm_90 PTX; benchmarks/NOTES.md, session 11). SCAN: a program
    # (not the persistent loop) finds its row by a scan over the offsets (ops/_utils.py:
    # scan_width; H100, B=128 max_L=512 D=128 skewed 11.7 -> 11.2 us); inside the persistent loop
    # the scan's reductions cost the pipeline (B=256 max_L=1024 D=256 skewed 44.0 -> 53.0 us).
    if PERSISTENT:
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=True):
            slot = tile // COL_BLOCKS
            row, begin, length, block = row_block(offsets_ptr, tl.cast(slot, tl.int64), batch_size, row_search, BLOCK_M,
                                                  True)
            _jagged_dense_bmm_tile(
                x_ptr, y_ptr, out_ptr, row, begin, length, block, tile % COL_BLOCKS, k_dim, n_dim,
                stride_xt, stride_xk, stride_yb, stride_yk, stride_yn, stride_ot, stride_on,
                BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, True, EVEN_K, Y_ROW_MAJOR)
    else:
        row, begin, length, block = slot_row_block(offsets_ptr, tl.program_id(0).to(tl.int64), batch_size, row_search,
                                                   BLOCK_M, True, SCAN)
        if block * BLOCK_M < length:
            _jagged_dense_bmm_tile(
                x_ptr, y_ptr, out_ptr, row, begin, length, block, tl.program_id(1), k_dim, n_dim,
                stride_xt, stride_xk, stride_yb, stride_yk, stride_yn, stride_ot, stride_on,
                BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, False, EVEN_K, Y_ROW_MAJOR)


@fast_launch
@triton.jit
def _jagged_jagged_bmm_kernel(
    x_ptr, y_ptr, out_ptr, offsets_ptr, m_dim, n_dim,
    stride_xt, stride_xm, stride_yt, stride_yn, stride_ob, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    # One program per (row, block of M, block of N): sum over the row's tokens of x_t^T y_t,
    # BLOCK_K tokens per step. An empty row writes zeros.
    row = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(2).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < m_dim
    n_ok = offs_n < n_dim
    begin, length = row_span(offsets_ptr, row)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for t0 in range(0, length, BLOCK_K):
        pos = t0 + tl.arange(0, BLOCK_K)
        t_ok = pos < length
        tokens = begin + pos
        a_t = tl.load(x_ptr + tokens[None, :] * stride_xt + offs_m[:, None] * stride_xm,
                      mask=m_ok[:, None] & t_ok[None, :], other=0.0)
        b = tl.load(y_ptr + tokens[:, None] * stride_yt + offs_n[None, :] * stride_yn,
                    mask=t_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(a_t, b, input_precision=PRECISION)
    tl.store(out_ptr + row * stride_ob + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _dense_bmm_tiles(k_dim: int, n_dim: int, element_size: int) -> dict:
    """jagged_dense_bmm blocks (tokens x output columns x reduction). 16 under the interpreter
    (small test shapes span several blocks); on the GPU the winners of benchmarks/tune_ops.py
    for 16-bit types (benchmarks/NOTES.md), smaller tiles for float32 (twice the bytes a tile).
    ``PROGRAMS_PER_SM`` > 0: the persistent kernel with that many programs per SM. H100, bf16,
    B=256, max_L=1024, D=256: 142 -> 150 TFLOP/s (skewed lengths), 207 -> 229 (uniform); at N <=
    128 (several programs an SM already overlap) it was slower: 85.7 -> 80.8 TFLOP/s at D=128."""
    if TRITON_INTERPRETER:
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4)
    if element_size > 2:
        return dict(BLOCK_M=64, BLOCK_N=128 if n_dim > 64 else 64, BLOCK_K=32, num_warps=4, num_stages=3)
    if n_dim > 128:
        return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3,
                    PROGRAMS_PER_SM=1 if RANGE_FLATTEN else 0)
    if n_dim > 64:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32 if k_dim <= 64 else 64, num_warps=4, num_stages=3)


# A batch whose mean row is shorter than this fraction of its longest row is "skewed": its few
# longest rows, each walked by one program per output block, are the kernel's tail.
SKEWED_FILL = 0.3


def _jagged_bmm_tiles(m_dim: int, n_dim: int, element_size: int, skewed: bool = False) -> dict:
    """jagged_jagged_bmm blocks (M x N outputs x tokens per step); as above. ``skewed`` (see
    SKEWED_FILL; only when the longest row is known): at N > 128, 128 x 128 blocks, twice the
    programs per row, so that the longest rows' programs are half as long. H100, bf16, B=256,
    max_L=1024, D=256 (benchmarks/tune_ops.py): skewed lengths 150 -> 157 TFLOP/s; but uniform
    lengths 242 -> 192, hence 128 x 256 otherwise."""
    if TRITON_INTERPRETER:
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4)
    if element_size > 2:
        return dict(BLOCK_M=64, BLOCK_N=128 if n_dim > 64 else 64, BLOCK_K=32 if m_dim <= 64 else 64, num_warps=4,
                    num_stages=3)
    if n_dim > 128 and m_dim > 64 and not skewed:
        return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3)
    if m_dim > 64:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=128 if n_dim > 64 else 64, BLOCK_K=64, num_warps=4, num_stages=3)


@jagged_op("jagged_dense_bmm")
def _launch_jagged_dense_bmm(x: torch.Tensor, y: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [T, K] (rows by offsets), y [B, K, N] (any strides) -> [T, N]."""
    total, k_dim = x.shape
    batch_size, n_dim = offsets.numel() - 1, y.shape[2]
    out = torch.empty((total, n_dim), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    if bmm_hopper.jagged_dense_bmm_hopper(x, y, offsets, out):  # Hopper, 16-bit: the Gluon kernel
        return out
    tiles = dict(_dense_bmm_tiles(k_dim, n_dim, x.element_size()))
    programs_per_sm = tiles.pop("PROGRAMS_PER_SM", 0)
    slots, col_blocks = batch_size + total // tiles["BLOCK_M"], cdiv(n_dim, tiles["BLOCK_N"])
    if programs_per_sm:
        grid = (min(slots * col_blocks, programs_per_sm * multiprocessor_count(x.device)),)
    else:
        grid = (slots, col_blocks)
    _jagged_dense_bmm_kernel[grid](
        x, y, out, offsets, batch_size, slot_search(batch_size), k_dim, n_dim, slots * col_blocks,
        *x.stride(), *y.stride(), *out.stride(), PRECISION=dot_precision(x.dtype), PERSISTENT=programs_per_sm > 0,
        COL_BLOCKS=col_blocks if programs_per_sm else 1, EVEN_K=k_dim % tiles["BLOCK_K"] == 0,
        Y_ROW_MAJOR=y.stride(2) == 1, SCAN=0 if programs_per_sm else scan_width(batch_size, tiles["num_warps"], total),
        **tiles)
    return out


@_launch_jagged_dense_bmm.register_fake
def _(x, y, offsets):
    return x.new_empty((x.shape[0], y.shape[2]))


@jagged_op("jagged_jagged_bmm")
def _launch_jagged_jagged_bmm(x: torch.Tensor, y: torch.Tensor, offsets: torch.Tensor,
                              skewed: bool = False) -> torch.Tensor:
    """x [T, M], y [T, N] (same rows, any strides) -> [B, M, N]. ``skewed``: a tile hint only
    (see _jagged_bmm_tiles)."""
    batch_size, m_dim, n_dim = offsets.numel() - 1, x.shape[1], y.shape[1]
    out = torch.empty((batch_size, m_dim, n_dim), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    tiles = _jagged_bmm_tiles(m_dim, n_dim, x.element_size(), skewed)
    grid = (batch_size, cdiv(m_dim, tiles["BLOCK_M"]), cdiv(n_dim, tiles["BLOCK_N"]))
    _jagged_jagged_bmm_kernel[grid](
        x, y, out, offsets, m_dim, n_dim, *x.stride(), *y.stride(), *out.stride(),
        PRECISION=dot_precision(x.dtype), **tiles)
    return out


@_launch_jagged_jagged_bmm.register_fake
def _(x, y, offsets, skewed=False):
    return x.new_empty((offsets.shape[0] - 1, x.shape[1], y.shape[1]))


def _save_operands(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3])  # the operands and offsets (not jagged_jagged_bmm's tile hint)


def _jagged_dense_bmm_backward(ctx, dout):
    x, y, offsets = ctx.saved_tensors
    dx = _launch_jagged_dense_bmm(dout, y.transpose(1, 2), offsets) if ctx.needs_input_grad[0] else None
    dy = _launch_jagged_jagged_bmm(x, dout, offsets) if ctx.needs_input_grad[1] else None
    return dx, dy, None


def _jagged_jagged_bmm_backward(ctx, dz):
    x, y, offsets = ctx.saved_tensors
    dx = _launch_jagged_dense_bmm(y, dz.transpose(1, 2), offsets) if ctx.needs_input_grad[0] else None
    dy = _launch_jagged_dense_bmm(x, dz, offsets) if ctx.needs_input_grad[1] else None
    return dx, dy, None, None


_launch_jagged_dense_bmm.register_autograd(_jagged_dense_bmm_backward, setup_context=_save_operands)
_launch_jagged_jagged_bmm.register_autograd(_jagged_jagged_bmm_backward, setup_context=_save_operands)


def jagged_dense_bmm(x, y: torch.Tensor):
    """Each row's block of x times that row's own dense matrix.

    Args:
        x: :class:`jagged.JaggedTensor` with values ``[T, K]`` (float16, bfloat16, float32).
        y: ``[B, K, N]`` tensor of x's dtype and device, B = x.batch_size (any strides).

    Returns:
        JaggedTensor with x's offsets and values ``[T, N]``: row b is ``x_b @ y[b]`` (float32
        accumulation). Differentiable w.r.t. x's values and y.

    Raises:
        TypeError if x is not a JaggedTensor or y not a tensor; ValueError for wrong ranks,
        dtypes or devices, ``y.shape[0] != B`` or ``y.shape[1] != K``.

    Example::

        >>> x = jagged.JaggedTensor.from_list([torch.randn(3, 8), torch.randn(0, 8), torch.randn(5, 8)])
        >>> jagged.jagged_dense_bmm(x, torch.randn(3, 8, 4)).values.shape
        torch.Size([8, 4])
    """
    check_jagged_matrix(x, "x")
    check_tensor(y, "y")
    if y.dim() != 3 or y.shape[0] != x.batch_size or y.shape[1] != x.values.shape[1]:
        raise ValueError(f"y must be [B={x.batch_size}, K={x.values.shape[1]}, N], got shape {tuple(y.shape)}")
    if y.dtype != x.dtype or y.device != x.device:
        raise ValueError(f"y must have x's dtype and device ({x.dtype}, {x.device}), got {y.dtype}, {y.device}")
    if not use_triton(x.values):
        return x.with_values(reference.jagged_dense_bmm(x.values, x.offsets, y))
    return x.with_values(_launch_jagged_dense_bmm(x.values, y, x.offsets))


def jagged_jagged_bmm(x, y) -> torch.Tensor:
    """Per row, the sum over its positions of the outer products ``x_t^T y_t``.

    Args:
        x: :class:`jagged.JaggedTensor` with values ``[T, M]`` (float16, bfloat16, float32).
        y: JaggedTensor with values ``[T, N]``, x's rows (offsets) and dtype.

    Returns:
        ``[B, M, N]``: ``out[b] = x_b^T @ y_b`` (float32 accumulation); an empty row gives zeros.
        This is the weight-gradient shape of :func:`jagged_dense_bmm`. Differentiable w.r.t. the
        values of x and y. If x knows its longest row (``known_max_len``) and its lengths are
        skewed, wide outputs take smaller tiles (faster; same result).

    Raises:
        TypeError for non-JaggedTensors; ValueError for wrong ranks, dtypes, devices or rows.
    """
    check_jagged_matrix(x, "x")
    check_jagged_matrix(y, "y", x.dtype, x.device)
    check_same_rows(y, x, "y", "x")
    if not use_triton(x.values):
        return reference.jagged_jagged_bmm(x.values, y.values, x.offsets)
    return _launch_jagged_jagged_bmm(x.values, y.values, x.offsets, _skewed(x))


def _skewed(x) -> bool:
    """Whether x's mean row is shorter than SKEWED_FILL of its longest (False when the longest
    is not known: no device sync for a tile hint)."""
    longest = x.known_max_len
    return bool(longest) and x.values.shape[0] < SKEWED_FILL * x.batch_size * longest
