"""Jagged flash attention: Triton forward + backward kernels, launchers, autograd, public API.

Exact softmax attention over jagged rows, FlashAttention-2 style: each program owns a block of
one row's queries (forward, dQ) or keys (dK/dV) for one head and streams the other side of the
same row through on-chip tiles. No L x L matrix is stored and nothing is padded. The softmax runs
in base 2 (``exp2``) on scores pre-multiplied by ``scale * log2(e)``; the forward saves the
per-query log-sum-exp (base 2) from which the backward recomputes the probabilities. The backward
is two kernels with no atomics, so it is deterministic.

Causal masking lets query i (0-based in its row) see key j when ``j <= i + (L_k - L_q)``, i.e.
aligned to the end of the key row as FlashAttention does; for self-attention that is ``j <= i``.
A query that sees no key (empty key row, or causal with L_q > L_k) gets 0 and zero gradients.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import reference
from ._library import jagged_op
from ._rows import row_block, row_span
from ._utils import (TRITON_INTERPRETER, binary_search_steps, check_max_len, check_offsets, check_offsets_content, check_same_rows,
                     check_tensor, dot_precision, next_power_of_2, unit_last_stride, use_triton)

LOG2_E = 1.4426950408889634
MAX_HEAD_DIM = 256


@triton.jit
def _load_tile(ptr, tokens, token_ok, head, cols, n_cols, stride_t, stride_h, TRANSPOSE: tl.constexpr):
    """[tokens, cols] of one head (or its transpose), zero outside the row and past n_cols.
    Features are contiguous (the launchers ensure a unit last stride)."""
    mask = token_ok[:, None] & (cols < n_cols)[None, :]
    offs = tokens[:, None] * stride_t + head * stride_h + cols[None, :]
    if TRANSPOSE:
        mask = token_ok[None, :] & (cols < n_cols)[:, None]
        offs = tokens[None, :] * stride_t + head * stride_h + cols[:, None]
    return tl.load(ptr + offs, mask=mask, other=0.0)


@triton.jit
def _visible(offs_m, offs_n, q_len, k_len, CAUSAL: tl.constexpr):
    """[M, N] mask of the (query, key) pairs that attend: both inside their rows, and causal."""
    ok = (offs_m < q_len)[:, None] & (offs_n < k_len)[None, :]
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None] + (k_len - q_len))
    return ok


@triton.jit(do_not_specialize=["batch_size", "search_steps"])
def _attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, q_offsets_ptr, k_offsets_ptr,
    batch_size, search_steps, qk_scale, head_dim, head_dim_v,
    stride_qt, stride_qh, stride_kt, stride_kh,
    stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    head = tl.program_id(1).to(tl.int64)
    row, q_begin, q_len, block = row_block(q_offsets_ptr, tl.program_id(0).to(tl.int64), batch_size, search_steps, BLOCK_M)
    if block * BLOCK_M >= q_len:
        return
    k_begin, k_len = row_span(k_offsets_ptr, row)
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(q_ptr, q_begin + offs_m, offs_m < q_len, head, offs_d, head_dim, stride_qt, stride_qh, False)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    end_n = k_len
    if CAUSAL:  # keys past the block's last query (+ the row shift) are hidden from all of it
        end_n = tl.minimum(k_len, (block + 1) * BLOCK_M + (k_len - q_len))
    for start_n in range(0, end_n, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = offs_n < k_len
        k_t = _load_tile(k_ptr, k_begin + offs_n, key_ok, head, offs_d, head_dim, stride_kt, stride_kh, True)
        s = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale
        s = tl.where(_visible(offs_m, offs_n, q_len, k_len, CAUSAL), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A query with nothing visible yet keeps m = -inf; subtract 0 instead to avoid inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_ptr, k_begin + offs_n, key_ok, head, offs_dv, head_dim_v, stride_vt, stride_vh, False)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    tokens = q_begin + offs_m
    o_mask = (offs_m < q_len)[:, None] & (offs_dv < head_dim_v)[None, :]
    tl.store(o_ptr + tokens[:, None] * stride_ot + head * stride_oh + offs_dv[None, :],
             out.to(o_ptr.dtype.element_ty), mask=o_mask)
    # +inf for a query that saw nothing: the backward's exp2(s - lse) is then exactly 0.
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(lse_ptr + head * stride_lh + tokens, lse, mask=offs_m < q_len)


@triton.jit(do_not_specialize=["total_q"])
def _attention_backward_delta_kernel(
    o_ptr, do_ptr, delta_ptr, total_q, head_dim_v, stride_ot, stride_oh, stride_dot, stride_doh, stride_lh,
    BLOCK_T: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # delta_i = rowsum(dO_i * O_i) in float32, the softmax backward's per-query correction: once
    # per query here, rather than once per (query, key block) inside the dK/dV loop (which cost
    # 60% more backward time at L=4096; benchmarks/NOTES.md).
    head = tl.program_id(1).to(tl.int64)
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < total_q
    cols = tl.arange(0, BLOCK_DV)
    o = _load_tile(o_ptr, tokens, token_ok, head, cols, head_dim_v, stride_ot, stride_oh, False)
    do = _load_tile(do_ptr, tokens, token_ok, head, cols, head_dim_v, stride_dot, stride_doh, False)
    tl.store(delta_ptr + head * stride_lh + tokens, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=token_ok)


@triton.jit
def _backward_dkdv(
    slot, head, q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, q_offsets_ptr, k_offsets_ptr,
    batch_size, search_steps, qk_scale, scale, head_dim, head_dim_v,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_lh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    """dK, dV of one block of one row's keys: stream over the row's queries."""
    row, k_begin, k_len, block = row_block(k_offsets_ptr, slot, batch_size, search_steps, BLOCK_N)
    if block * BLOCK_N < k_len:
        q_begin, q_len = row_span(q_offsets_ptr, row)
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        key_ok = offs_n < k_len
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        k = _load_tile(k_ptr, k_begin + offs_n, key_ok, head, offs_d, head_dim, stride_kt, stride_kh, False)
        v = _load_tile(v_ptr, k_begin + offs_n, key_ok, head, offs_dv, head_dim_v, stride_vt, stride_vh, False)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
        start = 0
        if CAUSAL:  # queries before (first key - row shift) see none of these keys
            start = tl.maximum(block * BLOCK_N - (k_len - q_len), 0) // BLOCK_M * BLOCK_M
        for start_m in range(start, q_len, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            query_ok = offs_m < q_len
            tokens = q_begin + offs_m
            q_t = _load_tile(q_ptr, tokens, query_ok, head, offs_d, head_dim, stride_qt, stride_qh, True)
            do = _load_tile(do_ptr, tokens, query_ok, head, offs_dv, head_dim_v, stride_dot, stride_doh, False)
            lse = tl.load(lse_ptr + head * stride_lh + tokens, mask=query_ok, other=float("inf"))
            delta = tl.load(delta_ptr + head * stride_lh + tokens, mask=query_ok, other=0.0)
            # Transposed scores [N, M]: recompute the probabilities from the saved log-sum-exp.
            s_t = tl.dot(k, q_t, input_precision=PRECISION) * qk_scale
            p_t = tl.math.exp2(s_t - lse[None, :])
            p_t = tl.where(tl.trans(_visible(offs_m, offs_n, q_len, k_len, CAUSAL)), p_t, 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=PRECISION)
        tokens = k_begin + offs_n
        tl.store(dk_ptr + tokens[:, None] * stride_dkt + head * stride_dkh + offs_d[None, :],
                 (dk * scale).to(dk_ptr.dtype.element_ty), mask=key_ok[:, None] & (offs_d < head_dim)[None, :])
        tl.store(dv_ptr + tokens[:, None] * stride_dvt + head * stride_dvh + offs_dv[None, :],
                 dv.to(dv_ptr.dtype.element_ty), mask=key_ok[:, None] & (offs_dv < head_dim_v)[None, :])


@triton.jit
def _backward_dq(
    slot, head, q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, q_offsets_ptr, k_offsets_ptr,
    batch_size, search_steps, qk_scale, scale, head_dim, head_dim_v,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_lh, stride_dqt, stride_dqh,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    """dQ of one block of one row's queries: stream over the row's keys."""
    row, q_begin, q_len, block = row_block(q_offsets_ptr, slot, batch_size, search_steps, BLOCK_M)
    if block * BLOCK_M < q_len:
        k_begin, k_len = row_span(k_offsets_ptr, row)
        offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
        query_ok = offs_m < q_len
        tokens = q_begin + offs_m
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        q = _load_tile(q_ptr, tokens, query_ok, head, offs_d, head_dim, stride_qt, stride_qh, False)
        do = _load_tile(do_ptr, tokens, query_ok, head, offs_dv, head_dim_v, stride_dot, stride_doh, False)
        lse = tl.load(lse_ptr + head * stride_lh + tokens, mask=query_ok, other=float("inf"))
        delta = tl.load(delta_ptr + head * stride_lh + tokens, mask=query_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        end_n = k_len
        if CAUSAL:
            end_n = tl.minimum(k_len, (block + 1) * BLOCK_M + (k_len - q_len))
        for start_n in range(0, end_n, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            key_ok = offs_n < k_len
            k_t = _load_tile(k_ptr, k_begin + offs_n, key_ok, head, offs_d, head_dim, stride_kt, stride_kh, True)
            v_t = _load_tile(v_ptr, k_begin + offs_n, key_ok, head, offs_dv, head_dim_v, stride_vt, stride_vh, True)
            s = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale
            p = tl.where(_visible(offs_m, offs_n, q_len, k_len, CAUSAL), tl.math.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, v_t, input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=PRECISION)
        tl.store(dq_ptr + tokens[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :],
                 (dq * scale).to(dq_ptr.dtype.element_ty), mask=query_ok[:, None] & (offs_d < head_dim)[None, :])


@triton.jit(do_not_specialize=["batch_size", "search_steps", "num_kv_slots"])
def _attention_backward_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr, q_offsets_ptr, k_offsets_ptr,
    batch_size, search_steps, num_kv_slots, qk_scale, scale, head_dim, head_dim_v,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_lh, stride_dqt, stride_dqh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    CAUSAL: tl.constexpr, KV_BLOCK_M: tl.constexpr, KV_BLOCK_N: tl.constexpr, Q_BLOCK_M: tl.constexpr,
    Q_BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    # One launch for dK, dV and dQ (launches dominate short rows): slots [0, num_kv_slots) own key
    # blocks (dK, dV), the rest own query blocks (dQ). Each output element is written by exactly
    # one program, with no atomics: the backward is deterministic.
    head = tl.program_id(1).to(tl.int64)
    slot = tl.program_id(0).to(tl.int64)
    if slot < num_kv_slots:
        _backward_dkdv(slot, head, q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                       q_offsets_ptr, k_offsets_ptr, batch_size, search_steps, qk_scale, scale, head_dim,
                       head_dim_v, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                       stride_dot, stride_doh, stride_lh, stride_dkt, stride_dkh,
                       stride_dvt, stride_dvh, CAUSAL, KV_BLOCK_M, KV_BLOCK_N, BLOCK_D, BLOCK_DV, PRECISION)
    else:
        _backward_dq(slot - num_kv_slots, head, q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                     q_offsets_ptr, k_offsets_ptr, batch_size, search_steps, qk_scale, scale, head_dim,
                     head_dim_v, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_dot, stride_doh, stride_lh, stride_dqt, stride_dqh,
                     CAUSAL, Q_BLOCK_M, Q_BLOCK_N, BLOCK_D, BLOCK_DV, PRECISION)


# Rows at most this long take the short-row tiles (when the caller knows max_len).
SHORT_ROWS = 512


def _tiles(kernel: str, head_dim: int, head_dim_v: int, max_len: int | None = None) -> dict:
    """Block sizes and warps per kernel ("forward" or "backward"), by head dim and, when the
    longest row is known, by length bucket. Under the interpreter, 16 x 16 tiles so that small
    test rows still span several blocks (the multi-block paths are what the tests must reach).
    See benchmarks/NOTES.md for how these were chosen."""
    block_d = max(16, next_power_of_2(head_dim))
    block_dv = max(16, next_power_of_2(head_dim_v))
    dims = dict(BLOCK_D=block_d, BLOCK_DV=block_dv)
    if TRITON_INTERPRETER:
        if kernel == "backward":
            return dict(KV_BLOCK_M=16, KV_BLOCK_N=16, Q_BLOCK_M=16, Q_BLOCK_N=16, num_warps=4, **dims)
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, **dims)
    widest = max(block_d, block_dv) > 128
    short = max_len is not None and max_len <= SHORT_ROWS
    if kernel == "forward":
        if widest:
            return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2, **dims)
        # Short rows: 32-key blocks waste less of a row's last block (H100, graph replay: 33 -> 29
        # us at B=256 max_L=256 D=64 skew; 94 -> 83 us at D=128).
        return dict(BLOCK_M=64, BLOCK_N=32 if short else 64, num_warps=4, num_stages=3, **dims)
    # backward: dK/dV programs hold two accumulators [KV_BLOCK_N, D], so their query block is
    # small; dQ programs hold one [Q_BLOCK_M, D]. One kernel, so one warp count for both.
    # Measured on the H100 (benchmarks/tune_attention.py): 4 warps and 3 stages beat 8 warps / 2
    # stages at D=64 and D=128 (D=64, L=4096: 4.75 vs 5.94 ms; D=128: 262 vs 532 us).
    if widest:
        return dict(KV_BLOCK_M=16, KV_BLOCK_N=64, Q_BLOCK_M=64, Q_BLOCK_N=16, num_warps=8, num_stages=2, **dims)
    if short and max(block_d, block_dv) <= 64:  # 16-row inner blocks: 78 -> 65 us at max_L=256 D=64 skew
        return dict(KV_BLOCK_M=16, KV_BLOCK_N=64, Q_BLOCK_M=64, Q_BLOCK_N=16, num_warps=4, num_stages=3, **dims)
    return dict(KV_BLOCK_M=32, KV_BLOCK_N=64, Q_BLOCK_M=64, Q_BLOCK_N=32, num_warps=4, num_stages=3, **dims)


@jagged_op("flash_attention_forward")
def _attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offsets: torch.Tensor,
                       k_offsets: torch.Tensor, causal: bool, scale: float,
                       max_len: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Output ``[T_q, H, D_v]`` and the per-query log-sum-exp ``[H, T_q]`` (float32, base 2)."""
    total_q, heads, head_dim = q.shape
    head_dim_v = v.shape[2]
    out = torch.empty((total_q, heads, head_dim_v), dtype=q.dtype, device=q.device)
    lse = torch.empty((heads, total_q), dtype=torch.float32, device=q.device)
    batch_size = q_offsets.numel() - 1
    if total_q == 0 or heads == 0:
        return out, lse
    tiles = _tiles("forward", head_dim, head_dim_v, max_len)
    grid = (batch_size + total_q // tiles["BLOCK_M"], heads)
    _attention_forward_kernel[grid](
        q, k, v, out, lse, q_offsets, k_offsets,
        batch_size, binary_search_steps(batch_size), scale * LOG2_E, head_dim, head_dim_v,
        *q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *out.stride()[:2], lse.stride(0),
        CAUSAL=causal, PRECISION=dot_precision(q.dtype), **tiles,
    )
    return out, lse


@_attention_forward.register_fake
def _(q, k, v, q_offsets, k_offsets, causal, scale, max_len=None):
    return (q.new_empty((q.shape[0], q.shape[1], v.shape[2])),
            q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32))


@jagged_op("flash_attention_backward")
def _attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                        lse: torch.Tensor, q_offsets: torch.Tensor, k_offsets: torch.Tensor, causal: bool,
                        scale: float, max_len: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ, dK, dV (contiguous; q, k, v may be strided views: each is read with its own strides)."""
    dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
    batch_size, heads = q_offsets.numel() - 1, q.shape[1]
    if q.shape[0] == 0 or heads == 0:  # no query: nothing depends on k or v
        return dq, dk.zero_(), dv.zero_()
    do = unit_last_stride(do)
    tiles = _tiles("backward", q.shape[2], v.shape[2], max_len)
    num_kv_slots = batch_size + k.shape[0] // tiles["KV_BLOCK_N"]
    num_q_slots = batch_size + q.shape[0] // tiles["Q_BLOCK_M"]
    delta = torch.empty_like(lse)
    block_t = 64
    _attention_backward_delta_kernel[(triton.cdiv(q.shape[0], block_t), heads)](
        out, do, delta, q.shape[0], v.shape[2], *out.stride()[:2], *do.stride()[:2], delta.stride(0),
        BLOCK_T=block_t, BLOCK_DV=tiles["BLOCK_DV"])
    _attention_backward_kernel[(num_kv_slots + num_q_slots, heads)](
        q, k, v, do, lse, delta, dq, dk, dv, q_offsets, k_offsets,
        batch_size, binary_search_steps(batch_size), num_kv_slots, scale * LOG2_E, scale, q.shape[2], v.shape[2],
        *q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *do.stride()[:2], lse.stride(0),
        *dq.stride()[:2], *dk.stride()[:2], *dv.stride()[:2],
        CAUSAL=causal, PRECISION=dot_precision(q.dtype), **tiles,
    )
    return dq, dk, dv


@_attention_backward.register_fake
def _(do, q, k, v, out, lse, q_offsets, k_offsets, causal, scale, max_len=None):
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))


def _save_for_attention_backward(ctx, inputs, output):
    q, k, v, q_offsets, k_offsets, causal, scale, max_len = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], q_offsets, k_offsets)
    ctx.causal, ctx.scale, ctx.max_len = causal, scale, max_len


def _attention_autograd_backward(ctx, grad_out, grad_lse):
    # lse is an internal output (saved for the backward): nothing differentiates through it.
    q, k, v, out, lse, q_offsets, k_offsets = ctx.saved_tensors
    dq, dk, dv = _attention_backward(grad_out, q, k, v, out, lse, q_offsets, k_offsets, ctx.causal, ctx.scale,
                                     ctx.max_len)
    return dq, dk, dv, None, None, None, None, None


_attention_forward.register_autograd(_attention_autograd_backward, setup_context=_save_for_attention_backward)


def _check_attention_inputs(q, k, v, q_offsets, k_offsets):
    for name, x in (("q", q), ("k", k), ("v", v), ("q_offsets", q_offsets), ("k_offsets", k_offsets)):
        check_tensor(x, name)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 3:
            raise ValueError(f"{name} values must be 3-D [T, H, D], got shape {tuple(x.shape)}")
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
        if x.dtype != q.dtype or x.device != q.device:
            raise ValueError(f"{name} must have q's dtype and device ({q.dtype}, {q.device}), got {x.dtype}, {x.device}")
        if not 1 <= x.shape[2] <= MAX_HEAD_DIM:
            raise ValueError(f"{name}'s head dim must be in [1, {MAX_HEAD_DIM}], got {x.shape[2]}")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"k and v must have the same [T_k, H], got {tuple(k.shape[:2])} and {tuple(v.shape[:2])}")
    if q.shape[1] != k.shape[1] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same heads and head dim, got [.., {q.shape[1]}, {q.shape[2]}] "
                         f"and [.., {k.shape[1]}, {k.shape[2]}]")
    for name, off in (("q_offsets", q_offsets), ("k_offsets", k_offsets)):
        check_offsets(off, name=name, device=q.device)
    if q_offsets.numel() != k_offsets.numel():
        raise ValueError(f"q and k must have the same batch size, got {q_offsets.numel() - 1} and {k_offsets.numel() - 1}")


def jagged_flash_attention_values(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offsets: torch.Tensor, k_offsets: torch.Tensor,
    *, causal: bool = False, scale: float | None = None, validate: bool = True, max_len: int | None = None,
) -> torch.Tensor:
    """Raw-tensor form of :func:`jagged_flash_attention`, for callers holding their own offsets.

    Args:
        q: ``[T_q, H, D]`` float16 / bfloat16 / float32 values of the query rows.
        k, v: ``[T_k, H, D]`` and ``[T_k, H, D_v]``, rows given by ``k_offsets``.
        q_offsets, k_offsets: ``[B+1]`` int32/int64 on q's device (same B). Pass the same tensor
            for self-attention.
        causal, scale: as in :func:`jagged_flash_attention`.
        validate: check the offsets' contents against ``T_q`` and ``T_k`` (``offsets[0] == 0``,
            non-decreasing, ``offsets[-1] == T``; one device synchronisation each). Pass
            ``False`` on hot paths whose offsets are known good: the kernels trust them.
        max_len: the longest row of q and k (or an upper bound), if known; it picks the tiles
            (rows up to 512 get smaller ones) and never changes the result. Found by
            ``validate`` when not given.

    Returns:
        ``[T_q, H, D_v]``, differentiable w.r.t. q, k and v.
    """
    _check_attention_inputs(q, k, v, q_offsets, k_offsets)
    if max_len is not None:
        max_len = check_max_len(max_len)
    if validate:
        longest = check_offsets_content(q_offsets, q.shape[0], name="q_offsets")
        if k_offsets is not q_offsets or k.shape[0] != q.shape[0]:
            longest = max(longest, check_offsets_content(k_offsets, k.shape[0], name="k_offsets"))
        max_len = longest if max_len is None else max_len
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else float(scale)
    if not use_triton(q):
        return reference.jagged_attention(q, k, v, q_offsets, k_offsets, causal=causal, scale=scale)
    q, k, v = (unit_last_stride(x) for x in (q, k, v))
    return _attention_forward(q, k, v, q_offsets, k_offsets, bool(causal), scale, max_len)[0]


def jagged_flash_attention(q, k, v, *, causal: bool = False, scale: float | None = None):
    """Exact multi-head softmax attention within each jagged row, never padding.

    ``out_i = softmax(scale * q_i k_i^T + mask) v_i`` for every row i and head, computed tile by
    tile (FlashAttention-2) without materialising the ``L_q x L_k`` scores.

    Args:
        q: :class:`jagged.JaggedTensor` with values ``[T_q, H, D]`` (float16, bfloat16 with float32
            accumulation, or float32; 1 <= D <= 256, fastest at 16/32/64/128).
        k: JaggedTensor with values ``[T_k, H, D]`` and q's batch size. Self-attention when it has
            q's rows; cross-attention otherwise (row i of q attends to row i of k).
        v: JaggedTensor with values ``[T_k, H, D_v]`` and k's rows (its offsets are taken to be
            k's: build it with ``k.with_values(...)``; a different offsets tensor is compared
            with k's, which synchronises).
        causal: query i sees key j only if ``j <= i + (L_k - L_q)`` (end-aligned, as in
            FlashAttention; ``j <= i`` for self-attention).
        scale: multiplies the scores; default ``1/sqrt(D)``.

    Returns:
        JaggedTensor with values ``[T_q, H, D_v]`` and q's offsets. A query that sees no key
        (empty key row) gets 0, and zero gradients. Differentiable w.r.t. the values of q, k, v.

    Raises:
        TypeError: an argument is not a JaggedTensor.
        ValueError: ranks, dtypes, devices, heads or head dims disagree, D > 256, batch sizes
            differ, or v's rows differ from k's.

    Example::

        >>> x = jagged.JaggedTensor.from_list([torch.randn(n, 4, 64, device="cuda", dtype=torch.bfloat16)
        ...                                    for n in (100, 3, 0, 250)])
        >>> out = jagged.jagged_flash_attention(x, x, x, causal=True)    # values [353, 4, 64]
    """
    from ..tensor import JaggedTensor

    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, JaggedTensor):
            raise TypeError(f"{name} must be a jagged.JaggedTensor, got {type(x).__name__}")
    check_same_rows(v, k, "v", "k")
    # A JaggedTensor's offsets were checked when it was built (or the caller opted out).
    q_max, k_max = q.known_max_len, k.known_max_len
    # The longer of the two, if both are known (a comparison, not max(): under torch.compile they
    # may be symbolic).
    max_len = None if q_max is None or k_max is None else k_max if k_max > q_max else q_max
    out = jagged_flash_attention_values(q.values, k.values, v.values, q.offsets, k.offsets, causal=causal, scale=scale,
                                        validate=False, max_len=max_len)
    return q.with_values(out)
