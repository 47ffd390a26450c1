"""Jagged2 <-> padded dense ``[B, N, N]``: Triton kernels, launchers, autograd and public
functions. ``jagged2_to_padded_dense`` and ``dense_to_jagged2`` are each other's gradient."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from ._library import jagged_op
from ._launch import fast_launch
from ._rows import find_row, row_span, square_tile_offsets
from ._utils import (TRITON_INTERPRETER, binary_search_steps, cdiv, check_max_len, check_offsets,
                     check_offsets_content, check_tensor, unit_last_stride, use_triton)


@fast_launch
@triton.jit(do_not_specialize=["max_len", "num_line_blocks"])
def _jagged2_to_padded_dense_kernel(
    values_ptr, offsets_ptr, square_offsets_ptr, dense_ptr, max_len, num_line_blocks, padding_value,
    stride_db, stride_di, stride_dj,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per (row, block of lines, block of columns) of the dense output: every dense
    # entry is written once; entries outside the row's L x L block get the padding value.
    pid = tl.program_id(0)
    row = (pid // num_line_blocks).to(tl.int64)
    offs_m = (pid % num_line_blocks).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    _, length = row_span(offsets_ptr, row)
    square_begin = tl.load(square_offsets_ptr + row)
    inside = (offs_m < length)[:, None] & (offs_n < length)[None, :]
    x = tl.load(values_ptr + square_tile_offsets(square_begin, length, offs_m, offs_n, False), mask=inside,
                other=padding_value)
    tl.store(dense_ptr + row * stride_db + offs_m[:, None] * stride_di + offs_n[None, :] * stride_dj, x,
             mask=(offs_m < max_len)[:, None] & (offs_n < max_len)[None, :])


@fast_launch
@triton.jit(do_not_specialize=["total_square", "batch_size", "search_steps", "dense_lines", "dense_cols"])
def _dense_to_jagged2_kernel(
    dense_ptr, offsets_ptr, square_offsets_ptr, values_ptr, total_square, batch_size, search_steps,
    dense_lines, dense_cols, stride_db, stride_di, stride_dj,
    BLOCK: tl.constexpr,
):
    # One program per BLOCK jagged2 entries (a grid over real entries only): each finds its row
    # by binary search over the square offsets, then its (i, j). Entries past the dense
    # tensor's extent read 0.
    flat = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = flat < total_square
    row = find_row(square_offsets_ptr, flat, batch_size, search_steps, 0)
    _, length = row_span(offsets_ptr, row)
    local = flat - tl.load(square_offsets_ptr + row)
    line = local // tl.maximum(length, 1)
    col = local - line * length
    inside = ok & (line < dense_lines) & (col < dense_cols)
    x = tl.load(dense_ptr + row * stride_db + line * stride_di + col * stride_dj, mask=inside, other=0.0)
    tl.store(values_ptr + flat, x, mask=ok)


@jagged_op("jagged2_to_padded_dense")
def _launch_jagged2_to_padded_dense(values: torch.Tensor, offsets: torch.Tensor, square_offsets: torch.Tensor,
                                    max_len: int, padding_value: float) -> torch.Tensor:
    """values [S] -> [B, max_len, max_len]."""
    values = unit_last_stride(values)
    batch_size = offsets.numel() - 1
    dense = torch.empty((batch_size, max_len, max_len), dtype=values.dtype, device=values.device)
    if dense.numel() == 0:
        return dense
    block = 4 if TRITON_INTERPRETER else min(64, triton.next_power_of_2(max_len))
    num_line_blocks = cdiv(max_len, block)
    _jagged2_to_padded_dense_kernel[(batch_size * num_line_blocks, cdiv(max_len, block))](
        values, offsets, square_offsets, dense, max_len, num_line_blocks, padding_value, *dense.stride(),
        BLOCK_M=block, BLOCK_N=block)
    return dense


@jagged_op("dense_to_jagged2")
def _launch_dense_to_jagged2(dense: torch.Tensor, offsets: torch.Tensor, square_offsets: torch.Tensor,
                             total_square: int) -> torch.Tensor:
    """dense [B, N, M] -> values [S] (0 where a row's block is larger than the dense one)."""
    values = torch.empty(total_square, dtype=dense.dtype, device=dense.device)
    if total_square == 0:
        return values
    batch_size = offsets.numel() - 1
    block = 16 if TRITON_INTERPRETER else 1024
    _dense_to_jagged2_kernel[(cdiv(total_square, block),)](
        dense, offsets, square_offsets, values, total_square, batch_size, binary_search_steps(batch_size),
        dense.shape[1], dense.shape[2], *dense.stride(), BLOCK=block)
    return values


@_launch_jagged2_to_padded_dense.register_fake
def _(values, offsets, square_offsets, max_len, padding_value):
    return values.new_empty((offsets.shape[0] - 1, max_len, max_len))


@_launch_dense_to_jagged2.register_fake
def _(dense, offsets, square_offsets, total_square):
    return dense.new_empty((total_square,))


def _save_for_to_padded_backward(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])
    ctx.total_square = inputs[0].numel()


def _jagged2_to_padded_dense_backward(ctx, grad_dense):
    offsets, square_offsets = ctx.saved_tensors
    return _launch_dense_to_jagged2(grad_dense, offsets, square_offsets, ctx.total_square), None, None, None, None


def _save_for_to_jagged2_backward(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])
    ctx.dense_shape = inputs[0].shape


def _dense_to_jagged2_backward(ctx, grad_values):
    offsets, square_offsets = ctx.saved_tensors
    lines, cols = ctx.dense_shape[1:]
    # The gradient lives on the top-left min(N, L) block; pad to the larger extent, then cut.
    side = max(lines, cols)
    grad = _launch_jagged2_to_padded_dense(grad_values, offsets, square_offsets, side, 0.0)
    return grad[:, :lines, :cols], None, None, None


_launch_jagged2_to_padded_dense.register_autograd(_jagged2_to_padded_dense_backward,
                                                  setup_context=_save_for_to_padded_backward)
_launch_dense_to_jagged2.register_autograd(_dense_to_jagged2_backward, setup_context=_save_for_to_jagged2_backward)


def jagged2_to_padded_dense(s, max_len: int | None = None, padding_value: float = 0.0) -> torch.Tensor:
    """Jagged2 blocks -> dense ``[B, max_len, max_len]``.

    Args:
        s: :class:`jagged.Jagged2Tensor` (any dtype).
        max_len: side of the dense blocks; default ``s.max_len``. Longer rows are cut to their
            top-left ``max_len x max_len`` corner.
        padding_value: value of the entries outside each row's ``L_b x L_b`` block.

    Returns:
        ``[B, max_len, max_len]`` in s's dtype. Differentiable w.r.t. ``s.values`` (the
        gradient of cut entries is 0).

    Raises:
        TypeError if s is not a Jagged2Tensor or max_len not an int; ValueError for a negative
        max_len.
    """
    from ..jagged2 import Jagged2Tensor

    if not isinstance(s, Jagged2Tensor):
        raise TypeError(f"s must be a jagged.Jagged2Tensor, got {type(s).__name__}")
    max_len = s.max_len if max_len is None else check_max_len(max_len)
    if not use_triton(s.values):
        return reference.jagged2_to_padded_dense(s.values, s.offsets, max_len, padding_value)
    return _launch_jagged2_to_padded_dense(s.values, s.offsets, s.square_offsets, max_len, float(padding_value))


def dense_to_jagged2(dense: torch.Tensor, offsets: torch.Tensor, *, max_len: int | None = None,
                     validate: bool = True):
    """Dense ``[B, N, M]`` -> :class:`jagged.Jagged2Tensor`: the top-left ``L_b x L_b`` block of
    ``dense[b]``, with ``L_b`` from ``offsets``; entries past N (lines) or M (columns) are 0.

    Args:
        dense: ``[B, N, M]`` tensor (any strides).
        offsets: ``[B+1]`` int32/int64 row offsets on dense's device.
        max_len: the longest row, if known (carried by the result).
        validate: check the offsets' contents (one more synchronisation).

    Returns:
        Jagged2Tensor on ``offsets``. Differentiable w.r.t. ``dense``. One device
        synchronisation, to size the result (``sum L_b^2``).

    Raises:
        TypeError for non-tensors; ValueError if dense is not 3-D, offsets are not ``[B+1]``
        int32/int64 on dense's device.
    """
    from ..jagged2 import Jagged2Tensor, square_offsets_of

    check_tensor(dense, "dense")
    if dense.dim() != 3:
        raise ValueError(f"dense must be 3-D [B, N, M], got shape {tuple(dense.shape)}")
    check_offsets(offsets, device=dense.device)
    if offsets.numel() != dense.shape[0] + 1:
        raise ValueError(f"offsets must have B+1 = {dense.shape[0] + 1} entries for dense [B={dense.shape[0]}, ...], "
                         f"got {offsets.numel()}")
    square_offsets = square_offsets_of(offsets)
    total_square, total_len = torch.stack([square_offsets[-1], offsets[-1].long()]).tolist()
    if validate:
        check_offsets_content(offsets, total_len)
    if not use_triton(dense):
        values = reference.dense_to_jagged2(dense, offsets)
    else:
        values = _launch_dense_to_jagged2(dense, offsets, square_offsets, total_square)
    return Jagged2Tensor(values, offsets, square_offsets=square_offsets, max_len=max_len, total_len=total_len,
                         validate=False)
