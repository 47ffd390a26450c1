"""Jagged <-> padded dense conversions: Triton kernels, launchers
(``jagged::`` custom ops with autograd) and public functions.

``jagged_to_padded_dense`` and ``dense_to_jagged`` are each other's gradient. Trailing feature
dims are flattened to one dim D for the kernels and restored afterwards.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from ._library import jagged_op
from ._launch import fast_launch
from ._rows import find_row
from ._utils import (
    binary_search_steps,
    cdiv,
    check_max_len,
    check_offsets,
    check_offsets_content,
    check_tensor,
    flatten_features,
    memory_tile,
    unflatten_features,
    use_triton,
)


@fast_launch
@triton.jit(do_not_specialize=["total_len", "max_len", "num_pos_blocks"])
def _jagged_to_padded_dense_kernel(
    values_ptr, offsets_ptr, dense_ptr,
    total_len, max_len, feature_dim, num_pos_blocks, padding_value,
    stride_vt, stride_vd, stride_db, stride_dl, stride_dd,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (row, block of dense positions, block of features): every dense element
    # is written exactly once, so the grid covers the dense output.
    pid = tl.program_id(0)
    row = (pid // num_pos_blocks).to(tl.int64)
    pos = (pid % num_pos_blocks).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    begin = tl.load(offsets_ptr + row).to(tl.int64)
    # Clamped to [0, T] so that bad offsets can never read outside the values.
    end = tl.minimum(tl.load(offsets_ptr + row + 1).to(tl.int64), total_len)
    token = begin + pos
    col_ok = cols < feature_dim
    in_row = (token < end) & (token >= 0)
    x = tl.load(
        values_ptr + token[:, None] * stride_vt + cols[None, :] * stride_vd,
        mask=in_row[:, None] & col_ok[None, :],
        other=padding_value,
    )
    tl.store(
        dense_ptr + row * stride_db + pos[:, None] * stride_dl + cols[None, :] * stride_dd,
        x,
        mask=(pos < max_len)[:, None] & col_ok[None, :],
    )


# What the gather kernel does with the gathered dense value y and a jagged operand x (its OP
# constexpr; the kernel compares with the literals, since Triton's compiler, unlike its
# interpreter, reads no plain Python globals).
GATHER, GATHER_ADD, GATHER_MUL, GATHER_ROW_MEAN = 0, 1, 2, 3


@fast_launch
@triton.jit(do_not_specialize=["total_len", "batch_size", "dense_len", "search_steps"])
def _dense_to_jagged_kernel(
    dense_ptr, offsets_ptr, values_ptr, jagged_ptr,
    total_len, batch_size, dense_len, feature_dim, search_steps,
    stride_db, stride_dl, stride_dd, stride_vt, stride_vd, stride_jt, stride_jd,
    OP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per block of jagged tokens: the grid covers real work only, however skewed the
    # lengths. Each token finds its row by a binary search over the offsets (cached, log2(B)).
    token = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    token_ok = token < total_len
    row = find_row(offsets_ptr, token, batch_size, search_steps, 0)
    begin = tl.load(offsets_ptr + row).to(tl.int64)
    pos = token - begin
    col_ok = cols < feature_dim
    # Positions past the dense tensor's length read as 0 (FBGEMM's convention).
    inside = token_ok & (pos < dense_len) & (pos >= 0)
    x = tl.load(
        dense_ptr + row[:, None] * stride_db + pos[:, None] * stride_dl + cols[None, :] * stride_dd,
        mask=inside[:, None] & col_ok[None, :],
        other=0.0,
    )
    out_mask = token_ok[:, None] & col_ok[None, :]
    if OP == 3:  # GATHER_ROW_MEAN: divided by the row's length (jagged_mean's backward, ops/pooling.py)
        length = tl.load(offsets_ptr + row + 1).to(tl.int64) - begin
        x = x.to(tl.float32) / tl.maximum(length, 1).to(tl.float32)[:, None]
    elif OP != 0:  # GATHER_ADD or GATHER_MUL: fused op with a jagged operand (ops/elementwise.py)
        other = tl.load(jagged_ptr + token[:, None] * stride_jt + cols[None, :] * stride_jd, mask=out_mask, other=0.0)
        if OP == 1:  # GATHER_ADD
            x = other.to(tl.float32) + x.to(tl.float32)
        else:
            x = other.to(tl.float32) * x.to(tl.float32)
    tl.store(values_ptr + token[:, None] * stride_vt + cols[None, :] * stride_vd,
             x.to(values_ptr.dtype.element_ty), mask=out_mask)


@jagged_op("jagged_to_padded_dense")
def _launch_jagged_to_padded_dense(values2d: torch.Tensor, offsets: torch.Tensor, max_len: int,
                                   padding_value: float) -> torch.Tensor:
    """values [T, D] -> [B, max_len, D]."""
    total_len, feature_dim = values2d.shape
    batch_size = offsets.numel() - 1
    dense = torch.empty((batch_size, max_len, feature_dim), dtype=values2d.dtype, device=values2d.device)
    if dense.numel() == 0:
        return dense
    block_l, block_d = memory_tile(feature_dim, values2d.element_size())
    block_l = min(block_l, triton.next_power_of_2(max_len))
    num_pos_blocks = cdiv(max_len, block_l)
    grid = (batch_size * num_pos_blocks, cdiv(feature_dim, block_d))
    _jagged_to_padded_dense_kernel[grid](
        values2d, offsets, dense,
        total_len, max_len, feature_dim, num_pos_blocks, padding_value,
        values2d.stride(0), values2d.stride(1), dense.stride(0), dense.stride(1), dense.stride(2),
        BLOCK_L=block_l, BLOCK_D=block_d,
    )
    return dense


@_launch_jagged_to_padded_dense.register_fake
def _(values2d, offsets, max_len, padding_value):
    return values2d.new_empty((offsets.shape[0] - 1, max_len, values2d.shape[1]))


def gather_from_dense(dense3d, offsets, total_len, jagged2d=None, op=GATHER):
    """values[t] = dense[row(t), pos(t)] (0 past the dense length), or that value combined with
    ``jagged2d[t]`` by ``op`` (GATHER_ADD / GATHER_MUL), or divided by the row's length
    (GATHER_ROW_MEAN). The launcher behind ``dense_to_jagged``, the fused jagged-dense elementwise
    ops and the pooling backward (each its own custom op)."""
    batch_size, dense_len, feature_dim = dense3d.shape
    values = torch.empty((total_len, feature_dim), dtype=dense3d.dtype, device=dense3d.device)
    if values.numel() == 0:
        return values
    if batch_size == 0 or dense_len == 0:  # every position reads 0
        if op == GATHER_ADD:
            return values.copy_(jagged2d)
        return values.zero_()
    other = values if jagged2d is None else jagged2d
    block_t, block_d = memory_tile(feature_dim, dense3d.element_size())
    grid = (cdiv(total_len, block_t), cdiv(feature_dim, block_d))
    _dense_to_jagged_kernel[grid](
        dense3d, offsets, values, other,
        total_len, batch_size, dense_len, feature_dim, binary_search_steps(batch_size),
        dense3d.stride(0), dense3d.stride(1), dense3d.stride(2), values.stride(0), values.stride(1),
        other.stride(0), other.stride(1), OP=op, BLOCK_T=block_t, BLOCK_D=block_d,
    )
    return values


@jagged_op("dense_to_jagged")
def _launch_dense_to_jagged(dense3d: torch.Tensor, offsets: torch.Tensor, total_len: int) -> torch.Tensor:
    """dense [B, L, D] -> values [T, D]."""
    return gather_from_dense(dense3d, offsets, total_len)


@_launch_dense_to_jagged.register_fake
def _(dense3d, offsets, total_len):
    return dense3d.new_empty((total_len, dense3d.shape[2]))


def _save_for_to_padded_backward(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.total_len = inputs[0].shape[0]


def _jagged_to_padded_dense_backward(ctx, grad_dense):
    (offsets,) = ctx.saved_tensors
    return _launch_dense_to_jagged(grad_dense, offsets, ctx.total_len), None, None, None


def _save_for_to_jagged_backward(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.dense_len = inputs[0].shape[1]


def _dense_to_jagged_backward(ctx, grad_values):
    (offsets,) = ctx.saved_tensors
    # Positions beyond a row's length were never read: their gradient is 0.
    return _launch_jagged_to_padded_dense(grad_values, offsets, ctx.dense_len, 0.0), None, None


_launch_jagged_to_padded_dense.register_autograd(_jagged_to_padded_dense_backward,
                                                 setup_context=_save_for_to_padded_backward)
_launch_dense_to_jagged.register_autograd(_dense_to_jagged_backward, setup_context=_save_for_to_jagged_backward)


def jagged_to_padded_dense(
    values: torch.Tensor, offsets: torch.Tensor, max_len: int, padding_value: float = 0.0, *, validate: bool = True
) -> torch.Tensor:
    """Pad jagged rows into a dense batch.

    Args:
        values: ``[T, *F]``, any dtype; all rows concatenated along dim 0.
        offsets: ``[B+1]`` int32 or int64, on the same device; row ``b`` is
            ``values[offsets[b]:offsets[b+1]]``.
        max_len: length L of the dense rows (a Python int). Rows longer than L are truncated.
        padding_value: written at positions ``l >= length_b``.
        validate: check the offsets' contents (``offsets[0] == 0``, non-decreasing,
            ``offsets[-1] == T``; one device synchronisation). ``False`` on hot paths whose
            offsets are known good (a JaggedTensor's are checked when it is built); the kernel
            never reads outside ``values`` either way.

    Returns:
        ``[B, max_len, *F]`` with ``values``' dtype and device. Differentiable w.r.t. ``values``
        (the gradient is :func:`dense_to_jagged` of the incoming gradient; truncated positions
        get 0).

    Raises:
        TypeError / ValueError for a non-tensor, bad offsets shape/dtype/device (or contents,
        with ``validate``), 0-d values or a negative ``max_len``.

    Example::

        >>> values = torch.arange(5.0)[:, None]              # rows [0, 1], [], [2, 3, 4]
        >>> offsets = torch.tensor([0, 2, 2, 5])
        >>> jagged_to_padded_dense(values, offsets, max_len=3)[..., 0]
        tensor([[0., 1., 0.],
                [0., 0., 0.],
                [2., 3., 4.]])
    """
    check_tensor(values, "values")
    if values.dim() < 1:
        raise ValueError("values must be at least 1-D [T, *F], got a 0-d tensor")
    check_offsets(offsets, device=values.device)
    max_len = check_max_len(max_len)
    if validate:
        check_offsets_content(offsets, values.shape[0])
    if not use_triton(values):
        return reference.jagged_to_padded_dense(values, offsets, max_len, padding_value)
    values2d, feature_shape = flatten_features(values, 1)
    dense = _launch_jagged_to_padded_dense(values2d, offsets, max_len, float(padding_value))
    return unflatten_features(dense, feature_shape)


def dense_to_jagged(
    dense: torch.Tensor, offsets: torch.Tensor, total_len: int | None = None, *, validate: bool = True
) -> torch.Tensor:
    """Gather the real positions of a padded dense batch into jagged values.

    Args:
        dense: ``[B, L, *F]``, any dtype.
        offsets: ``[B+1]`` int32 or int64, on ``dense``'s device.
        total_len: T, the number of jagged values (``offsets[-1]``). If None it is read from
            ``offsets`` (one device synchronisation).
        validate: check the offsets' contents against T (one synchronisation, shared with
            reading T); ``False`` on hot paths with known-good offsets and a given ``total_len``
            (no synchronisation at all).

    Returns:
        values ``[T, *F]``. A row longer than L gets 0 at positions ``l >= L`` (as FBGEMM's
        ``dense_to_jagged``). Differentiable w.r.t. ``dense`` (the gradient is
        :func:`jagged_to_padded_dense` of the incoming gradient, 0 at padded positions).

    Raises:
        TypeError / ValueError for a non-tensor, dense with fewer than 2 dims, offsets whose
        shape, dtype or device do not match ``dense`` (or bad contents, with ``validate``), or a
        negative ``total_len``.

    Example::

        >>> dense = torch.arange(6.0).view(2, 3)               # B=2, L=3, no feature dims
        >>> dense_to_jagged(dense, torch.tensor([0, 1, 4]), total_len=4)
        tensor([0., 3., 4., 5.])
    """
    check_tensor(dense, "dense")
    if dense.dim() < 2:
        raise ValueError(f"dense must be at least 2-D [B, L, *F], got shape {tuple(dense.shape)}")
    check_offsets(offsets, device=dense.device)
    if offsets.numel() - 1 != dense.shape[0]:
        raise ValueError(
            f"offsets must have B+1={dense.shape[0] + 1} entries for dense of batch size "
            f"B={dense.shape[0]}, got {offsets.numel()}"
        )
    if total_len is not None:
        total_len = check_max_len(total_len, "total_len")
    if validate:
        check_offsets_content(offsets, int(offsets[-1]) if total_len is None else total_len)
    if total_len is None:
        total_len = int(offsets[-1])  # synchronises; documented above
    if not use_triton(dense):
        return reference.dense_to_jagged(dense, offsets, total_len)
    dense3d, feature_shape = flatten_features(dense, 2)
    values = _launch_dense_to_jagged(dense3d, offsets, total_len)
    return unflatten_features(values, feature_shape)
