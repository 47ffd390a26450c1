"""Matmuls with jagged2 (per-row ``L_b x L_b``) results or operands: Triton kernels, launchers,
autograd and public functions.

    s = jagged_jagged_bmm_jagged_out(x, y):  s_b = x_b @ y_b^T      (scores)
    o = jagged2_jagged_bmm(p, v):            o_b = p_b @ v_b        (weighted sums)

Each is the other's gradient (a transposed jagged2 operand is read in place, never copied):
    ds -> dx = jagged2_jagged_bmm(ds, y),  dy = jagged2_jagged_bmm(ds^T, x)
    do -> dp = jagged_jagged_bmm_jagged_out(do, v),  dv = jagged2_jagged_bmm(p^T, do)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from ._library import jagged_op
from ._launch import fast_launch
from ._rows import square_block_lines, square_tile_offsets
from ._utils import (TRITON_INTERPRETER, cdiv, check_jagged2, check_jagged_matrix, check_same_rows, dot_precision,
                     slot_search, unit_last_stride, use_triton)


@fast_launch
@triton.jit(do_not_specialize=["batch_size", "row_search"])
def _jagged_jagged_bmm_jagged_out_kernel(
    x_ptr, y_ptr, out_ptr, offsets_ptr, square_offsets_ptr, batch_size, row_search, k_dim,
    stride_xt, stride_xk, stride_yt, stride_yk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    # One program per block of BLOCK_M positions i of one row (work slots, see find_row): entries
    # (i, j) for every j of the row, BLOCK_N at a time. Grid over real work, no max_len needed.
    active, begin, length, square_begin, offs_m = square_block_lines(
        offsets_ptr, square_offsets_ptr, tl.program_id(0).to(tl.int64), batch_size, row_search, BLOCK_M)
    if active:
        m_ok = offs_m < length
        for n0 in range(0, length, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < length
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, k_dim, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < k_dim
                a = tl.load(x_ptr + (begin + offs_m)[:, None] * stride_xt + ks[None, :] * stride_xk,
                            mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                b_t = tl.load(y_ptr + (begin + offs_n)[None, :] * stride_yt + ks[:, None] * stride_yk,
                              mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                acc += tl.dot(a, b_t, input_precision=PRECISION)
            tl.store(out_ptr + square_tile_offsets(square_begin, length, offs_m, offs_n, False),
                     acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@fast_launch
@triton.jit(do_not_specialize=["batch_size", "row_search"])
def _jagged2_jagged_bmm_kernel(
    p_ptr, v_ptr, out_ptr, offsets_ptr, square_offsets_ptr, batch_size, row_search, n_dim,
    stride_vt, stride_vn, stride_ot, stride_on,
    TRANSPOSE_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # One program per (block of BLOCK_M positions of one row, block of output columns): that
    # block of p_b (or p_b^T) times v_b, BLOCK_K of the row's positions per step.
    active, begin, length, square_begin, offs_m = square_block_lines(
        offsets_ptr, square_offsets_ptr, tl.program_id(0).to(tl.int64), batch_size, row_search, BLOCK_M)
    if active:
        m_ok = offs_m < length
        cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = cols < n_dim
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, length, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < length
            p = tl.load(p_ptr + square_tile_offsets(square_begin, length, offs_m, ks, TRANSPOSE_P),
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            v = tl.load(v_ptr + (begin + ks)[:, None] * stride_vt + cols[None, :] * stride_vn,
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc += tl.dot(p, v, input_precision=PRECISION)
        tl.store(out_ptr + (begin + offs_m)[:, None] * stride_ot + cols[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _tiles(inner_dim: int, n_dim: int = 64) -> dict:
    """16-wide blocks under the interpreter (small test rows still span several blocks); on the
    GPU 64-line tiles, 64 or 128 output columns, a 32/64-deep reduction step."""
    if TRITON_INTERPRETER:
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4)
    return dict(BLOCK_M=64, BLOCK_N=128 if n_dim > 64 else 64, BLOCK_K=32 if inner_dim <= 32 else 64, num_warps=4,
                num_stages=3)


@jagged_op("jagged_jagged_bmm_jagged_out")
def _launch_jagged_jagged_bmm_jagged_out(x: torch.Tensor, y: torch.Tensor, offsets: torch.Tensor,
                                         square_offsets: torch.Tensor, total_square: int) -> torch.Tensor:
    """x, y ``[T, K]`` (same rows, any strides) -> ``[total_square]`` row-major x_b @ y_b^T blocks."""
    out = torch.empty(total_square, dtype=x.dtype, device=x.device)
    if total_square == 0:
        return out
    batch_size = offsets.numel() - 1
    tiles = _tiles(x.shape[1])
    _jagged_jagged_bmm_jagged_out_kernel[(batch_size + x.shape[0] // tiles["BLOCK_M"],)](
        x, y, out, offsets, square_offsets, batch_size, slot_search(batch_size), x.shape[1],
        *x.stride(), *y.stride(), PRECISION=dot_precision(x.dtype), **tiles)
    return out


@jagged_op("jagged2_jagged_bmm")
def _launch_jagged2_jagged_bmm(p: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, square_offsets: torch.Tensor,
                               transpose_p: bool) -> torch.Tensor:
    """p ``[S]`` jagged2 blocks (read transposed if asked), v ``[T, N]`` -> ``[T, N]``."""
    p = unit_last_stride(p)
    total, n_dim = v.shape
    out = torch.empty((total, n_dim), dtype=v.dtype, device=v.device)
    if out.numel() == 0:
        return out
    batch_size = offsets.numel() - 1
    tiles = _tiles(64, n_dim)  # the reduction runs over the row's positions
    grid = (batch_size + total // tiles["BLOCK_M"], cdiv(n_dim, tiles["BLOCK_N"]))
    _jagged2_jagged_bmm_kernel[grid](
        p, v, out, offsets, square_offsets, batch_size, slot_search(batch_size), n_dim,
        *v.stride(), *out.stride(), TRANSPOSE_P=transpose_p, PRECISION=dot_precision(v.dtype), **tiles)
    return out


@_launch_jagged_jagged_bmm_jagged_out.register_fake
def _(x, y, offsets, square_offsets, total_square):
    return x.new_empty((total_square,))


@_launch_jagged2_jagged_bmm.register_fake
def _(p, v, offsets, square_offsets, transpose_p):
    return v.new_empty((v.shape[0], v.shape[1]))


def _save_operands(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])


def _jagged_jagged_bmm_jagged_out_backward(ctx, ds):
    x, y, offsets, square_offsets = ctx.saved_tensors
    dx = _launch_jagged2_jagged_bmm(ds, y, offsets, square_offsets, False) if ctx.needs_input_grad[0] else None
    dy = _launch_jagged2_jagged_bmm(ds, x, offsets, square_offsets, True) if ctx.needs_input_grad[1] else None
    return dx, dy, None, None, None


def _save_for_jagged2_jagged_bmm_backward(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.transpose_p = inputs[4]


def _jagged2_jagged_bmm_backward(ctx, dout):
    p, v, offsets, square_offsets = ctx.saved_tensors
    dp = dv = None
    if ctx.needs_input_grad[0]:  # d(p^T) is the transpose of dp: swap the operands
        dp = (_launch_jagged_jagged_bmm_jagged_out(v, dout, offsets, square_offsets, p.numel()) if ctx.transpose_p
              else _launch_jagged_jagged_bmm_jagged_out(dout, v, offsets, square_offsets, p.numel()))
    if ctx.needs_input_grad[1]:
        dv = _launch_jagged2_jagged_bmm(p, dout, offsets, square_offsets, not ctx.transpose_p)
    return dp, dv, None, None, None


_launch_jagged_jagged_bmm_jagged_out.register_autograd(_jagged_jagged_bmm_jagged_out_backward,
                                                       setup_context=_save_operands)
_launch_jagged2_jagged_bmm.register_autograd(_jagged2_jagged_bmm_backward,
                                             setup_context=_save_for_jagged2_jagged_bmm_backward)


def jagged_jagged_bmm_jagged_out(x, y):
    """Per row, all pairwise dot products of its positions: ``s_b = x_b @ y_b^T`` (``L_b x L_b``).

    Args:
        x: :class:`jagged.JaggedTensor` with values ``[T, K]`` (float16, bfloat16, float32).
        y: JaggedTensor with values ``[T, K]``, x's rows (offsets), dtype and device.

    Returns:
        :class:`jagged.Jagged2Tensor` on x's offsets with ``sum L_b^2`` values in x's dtype
        (float32 accumulation): entry (i, j) of row b is ``x_b[i] . y_b[j]``. Differentiable
        w.r.t. the values of x and y. One device synchronisation, to size the output
        (``sum L_b^2``).

    Raises:
        TypeError for non-JaggedTensors; ValueError for wrong ranks, dtypes, devices, rows, or
        ``y``'s K differing from x's.

    Example::

        >>> x = jagged.JaggedTensor.from_list([torch.randn(2, 8), torch.randn(3, 8)])
        >>> jagged.jagged_jagged_bmm_jagged_out(x, x).values.shape
        torch.Size([13])
    """
    from ..jagged2 import Jagged2Tensor, square_offsets_of

    check_jagged_matrix(x, "x")
    check_jagged_matrix(y, "y", x.dtype, x.device)
    check_same_rows(y, x, "y", "x")
    if y.values.shape[1] != x.values.shape[1]:
        raise ValueError(f"y.values must be [T, K={x.values.shape[1]}] like x, got {tuple(y.values.shape)}")
    square_offsets = square_offsets_of(x.offsets)
    if not use_triton(x.values):
        values = reference.jagged_jagged_bmm_jagged_out(x.values, y.values, x.offsets)
    else:
        total_square = int(square_offsets[-1])
        values = _launch_jagged_jagged_bmm_jagged_out(x.values, y.values, x.offsets, square_offsets, total_square)
    return Jagged2Tensor(values, x.offsets, square_offsets=square_offsets, max_len=x._max_len, total_len=x.total_len,
                         validate=False)


def jagged2_jagged_bmm(p, v):
    """Per row, the ``L_b x L_b`` matrix of p times the row of v: ``o_b = p_b @ v_b``.

    Args:
        p: :class:`jagged.Jagged2Tensor` (e.g. attention weights), float16/bfloat16/float32.
        v: :class:`jagged.JaggedTensor` with values ``[T, N]`` on p's rows (offsets), p's dtype
            and device.

    Returns:
        JaggedTensor with v's offsets and values ``[T, N]`` (float32 accumulation).
        Differentiable w.r.t. ``p.values`` and ``v.values``.

    Raises:
        TypeError for wrong types; ValueError for wrong ranks, dtypes, devices or rows.
    """
    check_jagged2(p, "p")
    check_jagged_matrix(v, "v", p.dtype, p.device)
    check_same_rows(v, p, "v", "p")
    if not use_triton(v.values):
        return v.with_values(reference.jagged2_jagged_bmm(p.values, v.offsets, v.values))
    return v.with_values(_launch_jagged2_jagged_bmm(p.values, v.values, v.offsets, p.square_offsets, False))
