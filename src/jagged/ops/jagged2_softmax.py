"""Softmax along each line of every ``L_b x L_b`` jagged2 block (optionally causal): Triton
forward and backward kernels, autograd, public API."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from ._library import jagged_op
from ._launch import fast_launch
from ._online_softmax import online_softmax_step, softmax_weights
from ._rows import square_block_lines, square_tile_offsets
from ._utils import TRITON_INTERPRETER, check_jagged2, slot_search, unit_last_stride, use_triton


@triton.jit
def _visible_tile(square_begin, length, offs_m, start, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """Columns [start, start + BLOCK_N) of lines offs_m: their flat offsets, which entries exist
    (inside the block) and which take part in the softmax (inside, and j <= i when causal)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    inside = (offs_m < length)[:, None] & (offs_n < length)[None, :]
    visible = inside
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None])
    return square_tile_offsets(square_begin, length, offs_m, offs_n, False), inside, visible


@fast_launch
@triton.jit(do_not_specialize=["batch_size", "row_search"])
def _jagged2_softmax_forward_kernel(
    s_ptr, y_ptr, offsets_ptr, square_offsets_ptr, batch_size, row_search,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per block of BLOCK_M lines of one row (work slots). Pass 1: online max and
    # rescaled sum; pass 2: normalise and write (0 at causally hidden entries). Line i always
    # sees j = i, so no line is empty.
    active, begin, length, square_begin, offs_m = square_block_lines(
        offsets_ptr, square_offsets_ptr, tl.program_id(0).to(tl.int64), batch_size, row_search, BLOCK_M)
    if active:
        # Causal lines end at i: stop at the block's last line.
        end = tl.minimum(length, tl.max(offs_m, 0) + 1) if CAUSAL else length
        m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        total = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, end, BLOCK_N):
            offsets, inside, visible = _visible_tile(square_begin, length, offs_m, start, CAUSAL, BLOCK_N)
            s = tl.load(s_ptr + offsets, mask=visible, other=float("-inf")).to(tl.float32)
            m, total = online_softmax_step(m, total, s, 1)
        # Lines past the row end have total = 0; divide them by 1 (they are not stored).
        total = tl.where(offs_m < length, total, 1.0)
        for start in range(0, length, BLOCK_N):
            offsets, inside, visible = _visible_tile(square_begin, length, offs_m, start, CAUSAL, BLOCK_N)
            s = tl.load(s_ptr + offsets, mask=visible, other=float("-inf")).to(tl.float32)
            y = tl.where(visible, softmax_weights(s, m, total, 1), 0.0)
            tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=inside)


@fast_launch
@triton.jit(do_not_specialize=["batch_size", "row_search"])
def _jagged2_softmax_backward_kernel(
    y_ptr, dy_ptr, dx_ptr, offsets_ptr, square_offsets_ptr, batch_size, row_search,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # dx = y * (dy - sum_j(y * dy)) per line; hidden entries have y = 0, so dx = 0 there.
    active, begin, length, square_begin, offs_m = square_block_lines(
        offsets_ptr, square_offsets_ptr, tl.program_id(0).to(tl.int64), batch_size, row_search, BLOCK_M)
    if active:
        end = tl.minimum(length, tl.max(offs_m, 0) + 1) if CAUSAL else length
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, end, BLOCK_N):
            offsets, inside, visible = _visible_tile(square_begin, length, offs_m, start, CAUSAL, BLOCK_N)
            y = tl.load(y_ptr + offsets, mask=visible, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offsets, mask=visible, other=0.0).to(tl.float32)
            acc += y * dy
        line_dot = tl.sum(acc, 1)
        for start in range(0, length, BLOCK_N):
            offsets, inside, visible = _visible_tile(square_begin, length, offs_m, start, CAUSAL, BLOCK_N)
            y = tl.load(y_ptr + offsets, mask=visible, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offsets, mask=visible, other=0.0).to(tl.float32)
            tl.store(dx_ptr + offsets, (y * (dy - line_dot[:, None])).to(dx_ptr.dtype.element_ty), mask=inside)


def _launch(kernel, tensors, offsets, square_offsets, total_len, causal):
    """Launch ``kernel`` over work slots of BLOCK_M lines: 16 x 16 tiles under the interpreter,
    32 lines x 128 columns (16 KB of float32) on the GPU."""
    block_m, block_n = (4, 8) if TRITON_INTERPRETER else (32, 128)
    batch_size = offsets.numel() - 1
    kernel[(batch_size + total_len // block_m,)](
        *tensors, offsets, square_offsets, batch_size, slot_search(batch_size),
        CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)


@jagged_op("jagged2_softmax_forward")
def _jagged2_softmax_forward(s: torch.Tensor, offsets: torch.Tensor, square_offsets: torch.Tensor, total_len: int,
                             causal: bool) -> torch.Tensor:
    """s [S] -> softmax along each line of every row's block, [S]."""
    s = unit_last_stride(s)
    y = torch.empty(s.shape, dtype=s.dtype, device=s.device)
    if y.numel():
        _launch(_jagged2_softmax_forward_kernel, (s, y), offsets, square_offsets, total_len, causal)
    return y


@jagged_op("jagged2_softmax_backward")
def _jagged2_softmax_backward(y: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, square_offsets: torch.Tensor,
                              total_len: int, causal: bool) -> torch.Tensor:
    dy = unit_last_stride(dy)
    dx = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    if dx.numel():
        _launch(_jagged2_softmax_backward_kernel, (y, dy, dx), offsets, square_offsets, total_len, causal)
    return dx


@_jagged2_softmax_forward.register_fake
def _(s, offsets, square_offsets, total_len, causal):
    return s.new_empty(s.shape)


@_jagged2_softmax_backward.register_fake
def _(y, dy, offsets, square_offsets, total_len, causal):
    return y.new_empty(y.shape)


def _save_for_jagged2_softmax_backward(ctx, inputs, output):
    _, offsets, square_offsets, ctx.total_len, ctx.causal = inputs
    ctx.save_for_backward(output, offsets, square_offsets)


def _jagged2_softmax_autograd_backward(ctx, dy):
    y, offsets, square_offsets = ctx.saved_tensors
    return _jagged2_softmax_backward(y, dy, offsets, square_offsets, ctx.total_len, ctx.causal), None, None, None, None


_jagged2_softmax_forward.register_autograd(_jagged2_softmax_autograd_backward,
                                           setup_context=_save_for_jagged2_softmax_backward)


def jagged2_softmax(s, *, causal: bool = False):
    """Softmax along each line ``i`` of every ``L_b x L_b`` block: ``y[i, j] = exp(s[i, j]) /
    sum_j' exp(s[i, j'])`` (computed in float32).

    Args:
        s: :class:`jagged.Jagged2Tensor` (float16, bfloat16, float32).
        causal: line i takes part only over ``j <= i``; entries ``j > i`` are 0 in the result
            (and get zero gradient).

    Returns:
        Jagged2Tensor with s's layout and dtype. Differentiable w.r.t. ``s.values``. A line of
        all -inf gives NaN, as ``torch.softmax`` does; NaN propagates.

    Raises:
        TypeError if s is not a Jagged2Tensor; ValueError for non-float values.
    """
    check_jagged2(s, "s")
    if not use_triton(s.values):
        return s.with_values(reference.jagged2_softmax(s.values, s.offsets, causal=causal))
    return s.with_values(_jagged2_softmax_forward(s.values, s.offsets, s.square_offsets, s.total_len, bool(causal)))
