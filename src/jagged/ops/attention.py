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
from . import attention_hopper, attention_hopper_backward
from ._attention_scores import (accumulate_bias_grad, dropout_keep, far_bias_value, far_query_tiles_start,
                                far_tiles_end, finish_bias_grad, full_key_tiles_end, full_query_tiles_start, key_range,
                                pointwise_activation, pointwise_activation_grad, query_range, relative_bias, visible)
from ._library import jagged_op
from ._launch import fast_launch
from ._rows import row_block, row_span, slot_row_block
from ._utils import (TRITON_INTERPRETER, check_max_len, check_offsets, check_offsets_content, check_same_rows, check_tensor,
                     dot_precision, jagged_tensor_type, next_power_of_2, scan_shape, slot_search, unit_last_stride,
                     use_triton)

LOG2_E = 1.4426950408889634
MAX_HEAD_DIM = 256
# Tokens per q / k values: the kernels' work-slot search runs in int32 (ops/_rows.py: find_row).
MAX_TOKENS = 2 ** 31 - 1
_ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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
def _row_targets(targets_ptr, row, k_len, HAS_TARGETS: tl.constexpr):
    """The row's number of targets, clamped to [0, L_k] (0 without targets), in k_len's integer
    type (clamped in int64 first: a count past 2^31 must not wrap)."""
    n_targets = k_len * 0
    if HAS_TARGETS:
        n_targets = tl.minimum(tl.maximum(tl.load(targets_ptr + row).to(tl.int64), 0), k_len.to(tl.int64))
        n_targets = n_targets.to(k_len.dtype)
    return n_targets


@triton.jit
def _row_inverse_norm(k_len, norm, ACTIVATION: tl.constexpr, NORM_BY_LENGTH: tl.constexpr):
    """1 / the pointwise activations' normaliser: the row's key count or a constant (1 for softmax,
    which normalises itself)."""
    if ACTIVATION == 0:
        return 1.0
    if NORM_BY_LENGTH:
        return 1.0 / tl.maximum(k_len, 1).to(tl.float32)
    return 1.0 / norm


@triton.jit
def _narrow(x, INT32_OFFSETS: tl.constexpr):
    """A row position, length or head index in int32 when the launcher found that every element
    offset of the call fits (_int32_offsets): per-element addresses then take one instruction,
    not a 64-bit pair, and fewer registers (H100, forward: 95 -> 84 registers at 64 x 32 tiles)."""
    if INT32_OFFSETS:
        x = x.to(tl.int32)
    return x


@triton.jit
def _score_tile(qk, qi, kj, q_len, k_len, head, bias_ptr, stride_bh, max_distance, n_targets, contextual_len, window,
                qk_scale, far_bias, CAUSAL: tl.constexpr, HSTU_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
                ACTIVATION: tl.constexpr, MASKED: tl.constexpr, KEY_BOUND: tl.constexpr, FAR: tl.constexpr):
    """Scores (base 2 for softmax: qk_scale holds log2 e) and the visibility mask of a tile of raw
    q.k products, queries ``qi`` x keys ``kj`` (row indices, broadcastable 2-D). Positions and
    lengths go to int32 here: rows are shorter than 2^31, and per-element int64 arithmetic is
    twice the instructions. Not MASKED (a tile the caller knows to be wholly visible): the mask
    is a constant True, which the compiler folds away with the selects on it. KEY_BOUND: mask
    the keys past the row's end (see visible: the kernels that sum over keys need it). FAR (a
    tile whose every distance clamps to -R, see far_tiles_end): the bias is ``far_bias``, the
    caller's far_bias_value, with no load per score."""
    qi, kj = qi.to(tl.int32), kj.to(tl.int32)
    q_len, k_len, n_targets = q_len.to(tl.int32), k_len.to(tl.int32), n_targets.to(tl.int32)
    s = qk * qk_scale
    if HAS_BIAS:
        if FAR:
            s = s + far_bias
        else:
            bias = relative_bias(bias_ptr, head, stride_bh, kj - (qi + (k_len - q_len)), max_distance)
            if ACTIVATION == 0:
                bias = bias * 1.4426950408889634  # log2(e): the softmax runs in base 2
            s = s + bias
    if MASKED:
        ok = visible(qi, kj, q_len, k_len, n_targets, contextual_len, window, CAUSAL, HSTU_MASK, KEY_BOUND)
    else:
        ok = tl.full([1, 1], 1, tl.int1)
    return s, ok


@triton.jit
def _attention_weights(s, ok, lse, ACTIVATION: tl.constexpr):
    """Recomputed weights of a score tile: probabilities from the saved log-sum-exp (broadcast
    to s) for softmax, the activation for the pointwise kinds; 0 where masked."""
    if ACTIVATION == 0:
        return tl.where(ok, tl.math.exp2(s - lse), 0.0)
    return tl.where(ok, pointwise_activation(s, ACTIVATION), 0.0)


@triton.jit
def _score_grad(w, s, ok, dp, delta, ACTIVATION: tl.constexpr):
    """dL/d(score) (natural units) from the weights, dL/d(weights) and, for softmax, delta."""
    if ACTIVATION == 0:
        return w * (dp - delta)
    return tl.where(ok, dp * pointwise_activation_grad(s, ACTIVATION), 0.0)


@triton.jit
def _forward_tile(
    acc, m_i, l_i, q, start_n, offs_m, tokens, k_ptr, v_ptr, k_begin, q_len, k_len, head, head_dim, head_dim_v,
    stride_kt, stride_kh, stride_vt, stride_vh, bias_ptr, stride_bh, max_distance, n_targets, contextual_len,
    window, qk_scale, far_bias, dropout_p, seed, CAUSAL: tl.constexpr, ACTIVATION: tl.constexpr,
    HSTU_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, MASKED: tl.constexpr, FAR: tl.constexpr,
    SCALE_IN_EXP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One key tile of the forward: the online softmax's running max m_i, sum l_i and output acc
    (or the pointwise weights' sum) updated with keys [start_n, start_n + BLOCK_N).
    SCALE_IN_EXP (softmax, a positive scale, no bias): the scale is applied in the exponent's
    fused multiply-add, and to the row max after the reduction (a positive factor commutes with
    the max), not to every score first: one instruction per score fewer."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    key_ok = offs_n < k_len
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_t = _load_tile(k_ptr, k_begin + offs_n, key_ok, head, offs_d, head_dim, stride_kt, stride_kh, True)
    v = _load_tile(v_ptr, k_begin + offs_n, key_ok, head, offs_dv, head_dim_v, stride_vt, stride_vh, False)
    qk = tl.dot(q, k_t, input_precision=PRECISION)
    s, ok = _score_tile(qk, offs_m[:, None], offs_n[None, :], q_len, k_len, head, bias_ptr, stride_bh, max_distance,
                        n_targets, contextual_len, window, qk_scale, far_bias, CAUSAL, HSTU_MASK, HAS_BIAS, ACTIVATION,
                        MASKED, True, FAR)
    if ACTIVATION == 0:
        factor = 1.0
        if SCALE_IN_EXP:  # the scaled s is then unused (and not computed)
            s = qk
            factor = qk_scale
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * factor)
        # A query with nothing visible yet keeps m = -inf; subtract 0 instead to avoid inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.math.exp2(s * factor - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(w, 1)
        acc = acc * alpha[:, None]
        m_i = m_new
    else:
        w = tl.where(ok, pointwise_activation(s, ACTIVATION), 0.0)
    if DROPOUT:  # dropped after the softmax's sum: the kept weights are rescaled, not renormalised
        keep = dropout_keep(seed, tokens[:, None], (k_begin + offs_n)[None, :], head, dropout_p)
        w = tl.where(keep, w * (1.0 / (1.0 - dropout_p)), 0.0)
    acc += tl.dot(w.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_i, l_i


# The attention kernels find a slot's row by a scan over the offsets in small batches (see
# ops/_utils.py: scan_width), else by the binary search (row_block(..., False)), not the
# 32-way one the batched matmuls use. Measured on the H100 (graph replay, bf16, H=4, D=64): the
# 32-way search helped the forward on short rows a little (27.6 -> 27.1 us at B=256 max_L=256
# skew) but slowed it on long rows (1351 -> 1430 us at B=64 max_L=4096, 409 -> 426 us at
# max_L=1024), and slowed the backward (f+b 82 -> 93 us, 177 -> 215 us at max_L=256).
# The forward takes the head dims as constexprs, so that the head-dim masks of its loads and
# stores fold away at power-of-two dims (H100, D=64: max_L=4096 1250 -> 1137-1184 us, max_L=256
# 53 -> 52 us). The backward keeps them runtime values: as constexprs its non-causal long rows got
# slower (max_L=1024 f+b 1553 -> 1709-1734 us; benchmarks/NOTES.md, session 7).
@fast_launch
@triton.jit(do_not_specialize=["batch_size", "row_search", "contextual_len", "window", "max_distance", "seed",
                               "stride_lh"])
def _attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, q_offsets_ptr, k_offsets_ptr, bias_ptr, targets_ptr,
    batch_size, row_search, qk_scale, norm, head_dim: tl.constexpr, head_dim_v: tl.constexpr,
    contextual_len, window, max_distance, dropout_p, seed,
    stride_qt, stride_qh, stride_kt, stride_kh,
    stride_vt, stride_vh, stride_ot, stride_oh, stride_lh, stride_bh,
    CAUSAL: tl.constexpr, ACTIVATION: tl.constexpr, HSTU_MASK: tl.constexpr, HAS_TARGETS: tl.constexpr,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, NORM_BY_LENGTH: tl.constexpr, UNMASKED_TILES: tl.constexpr,
    FAR_TILES: tl.constexpr,
    SCALE_IN_EXP: tl.constexpr, INT32_OFFSETS: tl.constexpr, SCAN_ROWS: tl.constexpr, SCAN_STRIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    head = _narrow(tl.program_id(1).to(tl.int64), INT32_OFFSETS)
    row, q_begin, q_len, block = slot_row_block(q_offsets_ptr, tl.program_id(0).to(tl.int64), batch_size, row_search,
                                                BLOCK_M, False, SCAN_ROWS, SCAN_STRIDE)
    if block * BLOCK_M >= q_len:
        return
    k_begin, k_len = row_span(k_offsets_ptr, row)
    n_targets = _narrow(_row_targets(targets_ptr, row, k_len, HAS_TARGETS), INT32_OFFSETS)
    q_begin, q_len = _narrow(q_begin, INT32_OFFSETS), _narrow(q_len, INT32_OFFSETS)
    block = _narrow(block, INT32_OFFSETS)
    k_begin, k_len = _narrow(k_begin, INT32_OFFSETS), _narrow(k_len, INT32_OFFSETS)
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    tokens = q_begin + offs_m
    q = _load_tile(q_ptr, tokens, offs_m < q_len, head, offs_d, head_dim, stride_qt, stride_qh, False)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    start_n, end_n = key_range(block * BLOCK_M, tl.minimum(block * BLOCK_M + BLOCK_M, q_len) - 1, q_len, k_len,
                               n_targets, contextual_len, window, CAUSAL, HSTU_MASK, BLOCK_N)
    # With a bias, the key tiles at least R behind the block's first query first, with one bias
    # value for all (far_tiles_end; no mask either, unless HSTU's); else (UNMASKED_TILES) the
    # tiles every query of the block sees whole (in the row, before the causal diagonal), without
    # a mask. Then the rest (the diagonal, the row's last partial tile), masked.
    full_end = start_n
    far_bias = qk_scale * 0.0
    if FAR_TILES:
        full_end = far_tiles_end(start_n, end_n, block * BLOCK_M + (k_len - q_len), max_distance, BLOCK_N)
        far_bias = far_bias_value(bias_ptr, head, stride_bh, ACTIVATION)
    elif UNMASKED_TILES:
        full_end = full_key_tiles_end(start_n, end_n, block * BLOCK_M, q_len, k_len, CAUSAL, BLOCK_N)
    if FAR_TILES or UNMASKED_TILES:
        for start_n in range(start_n, full_end, BLOCK_N):
            acc, m_i, l_i = _forward_tile(
                acc, m_i, l_i, q, start_n, offs_m, tokens, k_ptr, v_ptr, k_begin, q_len, k_len, head, head_dim,
                head_dim_v, stride_kt, stride_kh, stride_vt, stride_vh, bias_ptr, stride_bh, max_distance, n_targets,
                contextual_len, window, qk_scale, far_bias, dropout_p, seed, CAUSAL, ACTIVATION, HSTU_MASK, HAS_BIAS,
                DROPOUT, FAR_TILES and HSTU_MASK, FAR_TILES, SCALE_IN_EXP, BLOCK_N, BLOCK_D, BLOCK_DV, PRECISION)
    for start_n in range(full_end, end_n, BLOCK_N):
        acc, m_i, l_i = _forward_tile(
            acc, m_i, l_i, q, start_n, offs_m, tokens, k_ptr, v_ptr, k_begin, q_len, k_len, head, head_dim, head_dim_v,
            stride_kt, stride_kh, stride_vt, stride_vh, bias_ptr, stride_bh, max_distance, n_targets, contextual_len,
            window, qk_scale, far_bias, dropout_p, seed, CAUSAL, ACTIVATION, HSTU_MASK, HAS_BIAS, DROPOUT, True, False,
            SCALE_IN_EXP, BLOCK_N, BLOCK_D, BLOCK_DV, PRECISION)

    if ACTIVATION == 0:
        seen = l_i > 0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        # +inf for a query that saw nothing: the backward's exp2(s - lse) is then exactly 0.
        lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("inf"))
        tl.store(lse_ptr + head * stride_lh + tokens, lse, mask=offs_m < q_len)
    else:
        out = acc * _row_inverse_norm(k_len, norm, ACTIVATION, NORM_BY_LENGTH)
    o_mask = (offs_m < q_len)[:, None] & (offs_dv < head_dim_v)[None, :]
    tl.store(o_ptr + tokens[:, None] * stride_ot + head * stride_oh + offs_dv[None, :],
             out.to(o_ptr.dtype.element_ty), mask=o_mask)


@fast_launch
@triton.jit(do_not_specialize=["total_q", "stride_lh"])
def _attention_backward_delta_kernel(
    o_ptr, do_ptr, delta_ptr, total_q, head_dim_v: tl.constexpr, stride_ot, stride_oh, stride_dot, stride_doh,
    stride_lh, BLOCK_T: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # delta_i = rowsum(dO_i * O_i) in float32, the softmax backward's per-query correction: once
    # per query here, rather than once per (query, key block) inside the dK/dV loop (which cost
    # 60% more backward time at L=4096; benchmarks/NOTES.md). With dropout it is still
    # rowsum(P * dP): O already holds the dropped, rescaled weights.
    head = tl.program_id(1).to(tl.int64)
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < total_q
    cols = tl.arange(0, BLOCK_DV)
    o = _load_tile(o_ptr, tokens, token_ok, head, cols, head_dim_v, stride_ot, stride_oh, False)
    do = _load_tile(do_ptr, tokens, token_ok, head, cols, head_dim_v, stride_dot, stride_doh, False)
    tl.store(delta_ptr + head * stride_lh + tokens, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=token_ok)


@triton.jit
def _dkdv_tile(
    dk, dv, k, v, start_m, offs_n, k_tokens, q_ptr, do_ptr, lse_ptr, delta_ptr, q_begin, q_len, k_len, head,
    head_dim, head_dim_v, stride_qt, stride_qh, stride_dot, stride_doh, stride_lh, bias_ptr, stride_bh,
    max_distance, n_targets, contextual_len, window, qk_scale, far_bias, dropout_p, seed, CAUSAL: tl.constexpr,
    ACTIVATION: tl.constexpr, HSTU_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    MASKED: tl.constexpr, FAR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dK, dV of a key block updated with queries [start_m, start_m + BLOCK_M). Queries past the
    row load as zeros with lse = +inf and delta = 0: their weights and dO are 0, so they add
    nothing even unmasked."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    query_ok = offs_m < q_len
    tokens = q_begin + offs_m
    q_t = _load_tile(q_ptr, tokens, query_ok, head, tl.arange(0, BLOCK_D), head_dim, stride_qt, stride_qh, True)
    do = _load_tile(do_ptr, tokens, query_ok, head, tl.arange(0, BLOCK_DV), head_dim_v, stride_dot, stride_doh, False)
    # Transposed tiles [N, M]: keys down, queries across.
    s_t, ok_t = _score_tile(tl.dot(k, q_t, input_precision=PRECISION), offs_m[None, :], offs_n[:, None],
                            q_len, k_len, head, bias_ptr, stride_bh, max_distance,
                            n_targets, contextual_len, window, qk_scale, far_bias, CAUSAL, HSTU_MASK, HAS_BIAS,
                            ACTIVATION, MASKED, False, FAR)
    lse = tl.zeros([BLOCK_M], dtype=tl.float32)
    delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    if ACTIVATION == 0:
        lse = tl.load(lse_ptr + head * stride_lh + tokens, mask=query_ok, other=float("inf"))
        delta = tl.load(delta_ptr + head * stride_lh + tokens, mask=query_ok, other=0.0)
    w_t = _attention_weights(s_t, ok_t, lse[None, :], ACTIVATION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    if DROPOUT:
        keep = dropout_keep(seed, tokens[None, :], k_tokens[:, None], head, dropout_p)
        dropout_scale = 1.0 / (1.0 - dropout_p)
        dv += tl.dot(tl.where(keep, w_t * dropout_scale, 0.0).to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.where(keep, dp_t * dropout_scale, 0.0)
    else:
        dv += tl.dot(w_t.to(do.dtype), do, input_precision=PRECISION)
    ds_t = _score_grad(w_t, s_t, ok_t, dp_t, delta[None, :], ACTIVATION)
    dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dq_tile(
    dq, clamped_low, clamped_high, q, do, lse, delta, start_n, offs_m, tokens, first_query, grad_row, k_ptr, v_ptr,
    k_begin, q_len, k_len, head, head_dim, head_dim_v, stride_kt, stride_kh, stride_vt, stride_vh, bias_ptr,
    stride_bh, max_distance, n_targets, contextual_len, window, qk_scale, far_bias, inv_norm, dropout_p, seed,
    CAUSAL: tl.constexpr, ACTIVATION: tl.constexpr, HSTU_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr, BIAS_GRAD: tl.constexpr, MASKED: tl.constexpr, FAR: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_W: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dQ of a query block (and its bias-gradient diagonal sums) updated with keys
    [start_n, start_n + BLOCK_N)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    key_ok = offs_n < k_len
    k_t = _load_tile(k_ptr, k_begin + offs_n, key_ok, head, tl.arange(0, BLOCK_D), head_dim, stride_kt, stride_kh,
                     True)
    v_t = _load_tile(v_ptr, k_begin + offs_n, key_ok, head, tl.arange(0, BLOCK_DV), head_dim_v, stride_vt,
                     stride_vh, True)
    s, ok = _score_tile(tl.dot(q, k_t, input_precision=PRECISION), offs_m[:, None], offs_n[None, :],
                        q_len, k_len, head, bias_ptr, stride_bh, max_distance,
                        n_targets, contextual_len, window, qk_scale, far_bias, CAUSAL, HSTU_MASK, HAS_BIAS, ACTIVATION,
                        MASKED, True, FAR)
    w = _attention_weights(s, ok, lse[:, None], ACTIVATION)
    dp = tl.dot(do, v_t, input_precision=PRECISION)
    if DROPOUT:
        keep = dropout_keep(seed, tokens[:, None], (k_begin + offs_n)[None, :], head, dropout_p)
        dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
    ds = _score_grad(w, s, ok, dp, delta[:, None], ACTIVATION)
    dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=PRECISION)
    if BIAS_GRAD:
        if FAR:  # every distance clamps to -R: one bucket
            clamped_low += tl.sum(ds) * inv_norm
        else:
            first_rel = start_n - (first_query + k_len - q_len) - (BLOCK_M - 1)
            clamped_low, clamped_high = accumulate_bias_grad(
                ds * inv_norm, first_rel, grad_row, max_distance, clamped_low, clamped_high, BLOCK_M, BLOCK_N,
                BLOCK_W)
    return dq, clamped_low, clamped_high


@triton.jit
def _backward_dkdv(
    slot, head, q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, q_offsets_ptr, k_offsets_ptr,
    bias_ptr, targets_ptr, batch_size, row_search, qk_scale, scale, norm, head_dim, head_dim_v,
    contextual_len, window, max_distance, dropout_p, seed,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_lh, stride_bh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    CAUSAL: tl.constexpr, ACTIVATION: tl.constexpr, HSTU_MASK: tl.constexpr, HAS_TARGETS: tl.constexpr,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, NORM_BY_LENGTH: tl.constexpr, UNMASKED_TILES: tl.constexpr,
    FAR_TILES: tl.constexpr,
    INT32_OFFSETS: tl.constexpr, SCAN_ROWS: tl.constexpr, SCAN_STRIDE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    """dK, dV of one block of one row's keys: stream over the row's queries."""
    row, k_begin, k_len, block = slot_row_block(k_offsets_ptr, slot, batch_size, row_search, BLOCK_N, False, SCAN_ROWS,
                                                SCAN_STRIDE)
    # Narrowed before the branch: a variable may not change type inside it.
    k_begin, k_len, block = _narrow(k_begin, INT32_OFFSETS), _narrow(k_len, INT32_OFFSETS), _narrow(block, INT32_OFFSETS)
    if block * BLOCK_N < k_len:
        q_begin, q_len = row_span(q_offsets_ptr, row)
        n_targets = _narrow(_row_targets(targets_ptr, row, k_len, HAS_TARGETS), INT32_OFFSETS)
        q_begin, q_len = _narrow(q_begin, INT32_OFFSETS), _narrow(q_len, INT32_OFFSETS)
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        key_ok = offs_n < k_len
        k_tokens = k_begin + offs_n
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        k = _load_tile(k_ptr, k_tokens, key_ok, head, offs_d, head_dim, stride_kt, stride_kh, False)
        v = _load_tile(v_ptr, k_tokens, key_ok, head, offs_dv, head_dim_v, stride_vt, stride_vh, False)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
        start_m, end_m = query_range(block * BLOCK_N, tl.minimum(block * BLOCK_N + BLOCK_N, k_len) - 1, q_len, k_len,
                                     n_targets, contextual_len, window, CAUSAL, HSTU_MASK, HAS_TARGETS, BLOCK_M)
        # Query tiles on the causal diagonal first, masked; then, with a bias, those at least R past
        # the block's last key, with one bias value (far_query_tiles_start; no mask either, unless
        # HSTU's), else (UNMASKED_TILES) those whose every query sees every key of the block,
        # without a mask (full_query_tiles_start).
        full_start = end_m
        last_key = tl.minimum(block * BLOCK_N + BLOCK_N, k_len) - 1
        far_bias = qk_scale * 0.0
        if FAR_TILES:
            full_start = far_query_tiles_start(start_m, end_m, last_key - (k_len - q_len), max_distance, BLOCK_M)
            far_bias = far_bias_value(bias_ptr, head, stride_bh, ACTIVATION)
        elif UNMASKED_TILES:
            full_start = full_query_tiles_start(start_m, end_m, last_key, q_len, k_len, CAUSAL, BLOCK_M)
        for start_m in range(start_m, full_start, BLOCK_M):
            dk, dv = _dkdv_tile(
                dk, dv, k, v, start_m, offs_n, k_tokens, q_ptr, do_ptr, lse_ptr, delta_ptr, q_begin, q_len, k_len,
                head, head_dim, head_dim_v, stride_qt, stride_qh, stride_dot, stride_doh, stride_lh, bias_ptr,
                stride_bh, max_distance, n_targets, contextual_len, window, qk_scale, far_bias, dropout_p, seed,
                CAUSAL, ACTIVATION, HSTU_MASK, HAS_BIAS, DROPOUT, True, False, BLOCK_M, BLOCK_D, BLOCK_DV, PRECISION)
        if FAR_TILES or UNMASKED_TILES:
            for start_m in range(full_start, end_m, BLOCK_M):
                dk, dv = _dkdv_tile(
                    dk, dv, k, v, start_m, offs_n, k_tokens, q_ptr, do_ptr, lse_ptr, delta_ptr, q_begin, q_len,
                    k_len, head, head_dim, head_dim_v, stride_qt, stride_qh, stride_dot, stride_doh, stride_lh,
                    bias_ptr, stride_bh, max_distance, n_targets, contextual_len, window, qk_scale, far_bias,
                    dropout_p, seed, CAUSAL, ACTIVATION, HSTU_MASK, HAS_BIAS, DROPOUT, FAR_TILES and HSTU_MASK,
                    FAR_TILES, BLOCK_M, BLOCK_D, BLOCK_DV, PRECISION)
        inv_norm = _row_inverse_norm(k_len, norm, ACTIVATION, NORM_BY_LENGTH)
        tl.store(dk_ptr + k_tokens[:, None] * stride_dkt + head * stride_dkh + offs_d[None, :],
                 (dk * (scale * inv_norm)).to(dk_ptr.dtype.element_ty),
                 mask=key_ok[:, None] & (offs_d < head_dim)[None, :])
        tl.store(dv_ptr + k_tokens[:, None] * stride_dvt + head * stride_dvh + offs_dv[None, :],
                 (dv * inv_norm).to(dv_ptr.dtype.element_ty), mask=key_ok[:, None] & (offs_dv < head_dim_v)[None, :])


@triton.jit
def _backward_dq(
    slot, head, q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dbias_ptr, q_offsets_ptr, k_offsets_ptr,
    bias_ptr, targets_ptr, batch_size, row_search, qk_scale, scale, norm, head_dim, head_dim_v,
    contextual_len, window, max_distance, dropout_p, seed,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_lh, stride_bh, stride_dqt, stride_dqh, stride_dbs, stride_dbh,
    CAUSAL: tl.constexpr, ACTIVATION: tl.constexpr, HSTU_MASK: tl.constexpr, HAS_TARGETS: tl.constexpr,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, NORM_BY_LENGTH: tl.constexpr, UNMASKED_TILES: tl.constexpr,
    FAR_TILES: tl.constexpr,
    BIAS_GRAD: tl.constexpr, INT32_OFFSETS: tl.constexpr, SCAN_ROWS: tl.constexpr, SCAN_STRIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_W: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dQ of one block of one row's queries: stream over the row's keys. With a bias gradient,
    also the sums of dS along the tiles' diagonals (one per key-minus-query distance)."""
    row, q_begin, q_len, block = slot_row_block(q_offsets_ptr, slot, batch_size, row_search, BLOCK_M, False, SCAN_ROWS,
                                                SCAN_STRIDE)
    # Narrowed before the branch: a variable may not change type inside it.
    q_begin, q_len, block = _narrow(q_begin, INT32_OFFSETS), _narrow(q_len, INT32_OFFSETS), _narrow(block, INT32_OFFSETS)
    if block * BLOCK_M < q_len:
        k_begin, k_len = row_span(k_offsets_ptr, row)
        n_targets = _narrow(_row_targets(targets_ptr, row, k_len, HAS_TARGETS), INT32_OFFSETS)
        k_begin, k_len = _narrow(k_begin, INT32_OFFSETS), _narrow(k_len, INT32_OFFSETS)
        inv_norm = _row_inverse_norm(k_len, norm, ACTIVATION, NORM_BY_LENGTH)
        offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
        query_ok = offs_m < q_len
        tokens = q_begin + offs_m
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        q = _load_tile(q_ptr, tokens, query_ok, head, offs_d, head_dim, stride_qt, stride_qh, False)
        do = _load_tile(do_ptr, tokens, query_ok, head, offs_dv, head_dim_v, stride_dot, stride_doh, False)
        lse = tl.zeros([BLOCK_M], dtype=tl.float32)
        delta = tl.zeros([BLOCK_M], dtype=tl.float32)
        if ACTIVATION == 0:
            lse = tl.load(lse_ptr + head * stride_lh + tokens, mask=query_ok, other=float("inf"))
            delta = tl.load(delta_ptr + head * stride_lh + tokens, mask=query_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        # Bias gradient: this program's own row of partial sums, and the sums for the distances
        # clamped to -R and +R.
        grad_row = dbias_ptr + slot * stride_dbs + head * stride_dbh
        clamped_low = tl.zeros([1], dtype=tl.float32)
        clamped_high = tl.zeros([1], dtype=tl.float32)
        start_n, end_n = key_range(block * BLOCK_M, tl.minimum(block * BLOCK_M + BLOCK_M, q_len) - 1, q_len, k_len,
                                   n_targets, contextual_len, window, CAUSAL, HSTU_MASK, BLOCK_N)
        # As in the forward: the far key tiles with one bias value (with a bias) or the whole
        # visible key tiles without a mask, then the rest masked.
        full_end = start_n
        far_bias = qk_scale * 0.0
        if FAR_TILES:
            full_end = far_tiles_end(start_n, end_n, block * BLOCK_M + (k_len - q_len), max_distance, BLOCK_N)
            far_bias = far_bias_value(bias_ptr, head, stride_bh, ACTIVATION)
        elif UNMASKED_TILES:
            full_end = full_key_tiles_end(start_n, end_n, block * BLOCK_M, q_len, k_len, CAUSAL, BLOCK_N)
        if FAR_TILES or UNMASKED_TILES:
            for start_n in range(start_n, full_end, BLOCK_N):
                dq, clamped_low, clamped_high = _dq_tile(
                    dq, clamped_low, clamped_high, q, do, lse, delta, start_n, offs_m, tokens, block * BLOCK_M,
                    grad_row, k_ptr, v_ptr, k_begin, q_len, k_len, head, head_dim, head_dim_v, stride_kt, stride_kh,
                    stride_vt, stride_vh, bias_ptr, stride_bh, max_distance, n_targets, contextual_len, window,
                    qk_scale, far_bias, inv_norm, dropout_p, seed, CAUSAL, ACTIVATION, HSTU_MASK, HAS_BIAS, DROPOUT,
                    BIAS_GRAD, FAR_TILES and HSTU_MASK, FAR_TILES, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, BLOCK_W,
                    PRECISION)
        for start_n in range(full_end, end_n, BLOCK_N):
            dq, clamped_low, clamped_high = _dq_tile(
                dq, clamped_low, clamped_high, q, do, lse, delta, start_n, offs_m, tokens, block * BLOCK_M, grad_row,
                k_ptr, v_ptr, k_begin, q_len, k_len, head, head_dim, head_dim_v, stride_kt, stride_kh, stride_vt,
                stride_vh, bias_ptr, stride_bh, max_distance, n_targets, contextual_len, window, qk_scale, far_bias,
                inv_norm, dropout_p, seed, CAUSAL, ACTIVATION, HSTU_MASK, HAS_BIAS, DROPOUT, BIAS_GRAD, True, False,
                BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, BLOCK_W, PRECISION)
        if BIAS_GRAD:
            finish_bias_grad(grad_row, max_distance, clamped_low, clamped_high)
        tl.store(dq_ptr + tokens[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :],
                 (dq * (scale * inv_norm)).to(dq_ptr.dtype.element_ty),
                 mask=query_ok[:, None] & (offs_d < head_dim)[None, :])


@fast_launch
@triton.jit(do_not_specialize=["batch_size", "row_search", "num_kv_slots", "contextual_len", "window",
                               "max_distance", "seed", "stride_lh"])
def _attention_backward_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr, dbias_ptr, q_offsets_ptr, k_offsets_ptr,
    bias_ptr, targets_ptr, batch_size, row_search, num_kv_slots, qk_scale, scale, norm, head_dim, head_dim_v,
    contextual_len, window, max_distance, dropout_p, seed,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_lh, stride_bh, stride_dqt, stride_dqh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    stride_dbs, stride_dbh,
    CAUSAL: tl.constexpr, ACTIVATION: tl.constexpr, HSTU_MASK: tl.constexpr, HAS_TARGETS: tl.constexpr,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, NORM_BY_LENGTH: tl.constexpr, UNMASKED_TILES: tl.constexpr,
    FAR_TILES: tl.constexpr,
    BIAS_GRAD: tl.constexpr, INT32_OFFSETS: tl.constexpr, SCAN_ROWS: tl.constexpr, SCAN_STRIDE: tl.constexpr,
    KV_BLOCK_M: tl.constexpr, KV_BLOCK_N: tl.constexpr, Q_BLOCK_M: tl.constexpr, Q_BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_W: tl.constexpr, PRECISION: tl.constexpr,
    INTERLEAVE: tl.constexpr,
):
    # One launch for dK, dV and dQ (launches dominate short rows): slots [0, num_kv_slots) own key
    # blocks (dK, dV), the rest own query blocks (dQ); with INTERLEAVE (the two kinds have the same
    # slots) program 2s is slot s's dK/dV program and 2s + 1 its dQ program, so that both read the
    # row's tiles while they are in L2 (attention_hopper_backward.interleaves). Each dQ, dK, dV
    # element is written by exactly one program, with no atomics; so is each bias partial sum:
    # deterministic.
    head = _narrow(tl.program_id(1).to(tl.int64), INT32_OFFSETS)
    slot = tl.program_id(0).to(tl.int64)  # int64: it indexes the bias gradient's partial sums
    if INTERLEAVE:
        kv = slot % 2 == 0
        slot = slot // 2
    else:
        kv = slot < num_kv_slots
        slot = tl.where(kv, slot, slot - num_kv_slots)
    if kv:
        _backward_dkdv(slot, head, q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                       q_offsets_ptr, k_offsets_ptr, bias_ptr, targets_ptr, batch_size, row_search, qk_scale,
                       scale, norm, head_dim, head_dim_v, contextual_len, window, max_distance, dropout_p, seed,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                       stride_dot, stride_doh, stride_lh, stride_bh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                       CAUSAL, ACTIVATION, HSTU_MASK, HAS_TARGETS, HAS_BIAS, DROPOUT, NORM_BY_LENGTH, UNMASKED_TILES,
                       FAR_TILES, INT32_OFFSETS, SCAN_ROWS, SCAN_STRIDE, KV_BLOCK_M, KV_BLOCK_N, BLOCK_D, BLOCK_DV,
                       PRECISION)
    else:
        _backward_dq(slot, head, q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dbias_ptr,
                     q_offsets_ptr, k_offsets_ptr, bias_ptr, targets_ptr, batch_size, row_search, qk_scale,
                     scale, norm, head_dim, head_dim_v, contextual_len, window, max_distance, dropout_p, seed,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_dot, stride_doh, stride_lh, stride_bh, stride_dqt, stride_dqh, stride_dbs, stride_dbh,
                     CAUSAL, ACTIVATION, HSTU_MASK, HAS_TARGETS, HAS_BIAS, DROPOUT, NORM_BY_LENGTH, UNMASKED_TILES,
                     FAR_TILES, BIAS_GRAD, INT32_OFFSETS, SCAN_ROWS, SCAN_STRIDE, Q_BLOCK_M, Q_BLOCK_N, BLOCK_D,
                     BLOCK_DV, BLOCK_W, PRECISION)


# Rows at most this long take the short-row tiles (when the caller knows max_len).
SHORT_ROWS = 512
# ... and at most this long, at head dims up to 32, the forward's smallest tiles.
TINY_ROWS = 128


def _tiles(kernel: str, head_dim: int, head_dim_v: int, max_len: int | None = None, hstu_mask: bool = False,
           plain: bool = False, bias: bool = False) -> dict:
    """Launch tiles; ``plain``: softmax attention without a bias, dropout or HSTU mask (the
    variant the backward's long-row tiles were measured on); ``bias``: a relative-position bias."""
    tiles = _block_sizes(kernel, head_dim, head_dim_v, max_len, plain)
    # No unmasked loop with the HSTU masks (every tile is masked: full_key_tiles_end knows none) or
    # with a bias: there the second loop cost more than the masks it saves (H100, graph replay,
    # benchmarks/NOTES.md session 30; B=512 H=4 D=128 causal softmax + bias, max_L=1024 forward
    # 3849 -> 3040 us, forward+backward 12024 -> 10046; max_L=4096 at 5% fill 1347 -> 940, 4015 ->
    # 3160; D=64 max_L=1024 forward 1158 -> 1067). Long biased rows take the far-bias loop
    # instead (_far_tiles).
    if hstu_mask or bias:
        tiles["UNMASKED_TILES"] = False
    if kernel == "backward":  # the dQ tiles' diagonals, for the bias gradient
        tiles["BLOCK_W"] = next_power_of_2(tiles["Q_BLOCK_M"] + tiles["Q_BLOCK_N"] - 1)
    return tiles


def _block_dim(head_dim: int) -> int:
    """A head dim's tile width (BLOCK_D, BLOCK_DV): a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, next_power_of_2(head_dim))


def _block_sizes(kernel: str, head_dim: int, head_dim_v: int, max_len: int | None, plain: bool = False) -> dict:
    """Block sizes and warps per kernel ("forward" or "backward"), by head dim and, when the
    longest row is known, by length bucket. Under the interpreter, 16 x 16 tiles so that small
    test rows still span several blocks (the multi-block paths are what the tests must reach).
    See benchmarks/NOTES.md for how these were chosen."""
    block_d, block_dv = _block_dim(head_dim), _block_dim(head_dim_v)
    dims = dict(BLOCK_D=block_d, BLOCK_DV=block_dv)
    if TRITON_INTERPRETER:
        dims["UNMASKED_TILES"] = True  # the tests reach both loops (tests/test_attention.py turns it off too)
        if kernel == "backward":
            return dict(KV_BLOCK_M=16, KV_BLOCK_N=16, Q_BLOCK_M=16, Q_BLOCK_N=16, num_warps=4, **dims)
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, **dims)
    widest = max(block_d, block_dv) > 128
    short = max_len is not None and max_len <= SHORT_ROWS
    # Unmasked tiles first (UNMASKED_TILES, see full_key_tiles_end). H100, bf16, graph replay, D=64
    # (benchmarks/NOTES.md): max_L=4096 forward 1357 -> 1232 us, f+b 5347 -> 5094 (causal 824 -> 677,
    # 3483 -> 3079); max_L=512 132 -> 125 us forward. Rows up to 256 have few whole tiles, and the
    # second loop's pipeline restart cost them 1-3% at D=32/64 and 84 -> 106 us forward at D=128.
    dims["UNMASKED_TILES"] = not widest and (not short or (max_len > 256 and max(block_d, block_dv) <= 64))
    if kernel == "forward":
        if widest:
            return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2, **dims)
        if short and max_len <= TINY_ROWS and max(block_d, block_dv) <= 32:
            # Rows up to 128 at D <= 32: 32 x 16 tiles on two warps (H100, graph replay,
            # benchmarks/NOTES.md session 16): B=1024 max_L=128 H=2 D=32 skew 23.4 -> 20.6 us (FA2
            # 46.3), uniform 36.2 -> 35.6. They lose at max_L=256 (skew 31.2 -> 32.1, uniform
            # 62 -> 70 at H=8) and at D=64 (uniform max_L=128 83 -> 115).
            return dict(BLOCK_M=32, BLOCK_N=16, num_warps=2, num_stages=3, **dims)
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
    if plain and max(block_d, block_dv) <= 64:
        # Rows over 512 at D <= 64: 128-key dK/dV blocks and 128 x 64 dQ tiles, twice the work per
        # loaded tile (H100, graph replay, benchmarks/NOTES.md sessions 15-16): D=64, B=64
        # max_L=4096 backward 3863 -> 3290 us (FA2 4025), causal 2331 -> 1948 (FA2 2220); B=256
        # max_L=1024 1145 -> 1096, causal 906 -> 829; B=64 max_L=2048 skewed 315 -> 316. D=32 (H=8):
        # B=16 max_L=4096 1231 -> 1114 (FA2 1450), causal 741 -> 658; B=64 max_L=1024 403 -> 389;
        # D=16: 1120 -> 1003. At D=128 these tiles spill (B=64 max_L=1024: 302 -> 873 us).
        return dict(KV_BLOCK_M=32, KV_BLOCK_N=128, Q_BLOCK_M=128, Q_BLOCK_N=64, num_warps=4, num_stages=3, **dims)
    return dict(KV_BLOCK_M=32, KV_BLOCK_N=64, Q_BLOCK_M=64, Q_BLOCK_N=32, num_warps=4, num_stages=3, **dims)


# Token rows past a row's end that a program's masked lanes may address (a block's rows or keys
# beyond the row, at most the largest tile): their offsets are formed though never loaded.
_SPARE_ROWS = 256


def _int32_offsets(token_major: tuple, head_major: tuple = (), contiguous: tuple = ()) -> bool:
    """Whether every element offset the attention kernels form fits in int32 (they then narrow
    row positions to int32: INT32_OFFSETS): for ``token_major`` tensors [T, H, D] and
    ``head_major`` ones [H, T] (log-sum-exp, delta), the farthest element plus _SPARE_ROWS tokens;
    ``contiguous``: the shapes (T, H, D) of contiguous [T, H, D] tensors (the gradients the
    backward allocates), from the shape alone. Shapes and strides only: no device
    synchronisation. Plain arithmetic on the unpacked sizes: it runs on every eager call (a
    generic loop over dims cost 9 us a backward call on the CPU machine, this 4)."""
    for tokens, heads, dim in contiguous:
        if (tokens + _SPARE_ROWS) * heads * dim > 2 ** 31:
            return False
    for x in token_major:
        (tokens, heads, dim), (stride_t, stride_h, stride_d) = x.shape, x.stride()
        reach = (tokens - 1 + _SPARE_ROWS) * stride_t + max(heads - 1, 0) * stride_h + max(dim - 1, 0) * stride_d
        if reach >= 2 ** 31:
            return False
    for x in head_major:
        (heads, tokens), (stride_h, stride_t) = x.shape, x.stride()
        if max(heads - 1, 0) * stride_h + (tokens - 1 + _SPARE_ROWS) * stride_t >= 2 ** 31:
            return False
    return True


# Activation codes of the kernels' ACTIVATION constexpr.
ACTIVATIONS = {"softmax": 0, "silu": 1, "gelu": 2}
# window=None: a distance no row reaches.
NO_WINDOW = 2 ** 30


def _hstu_mask(num_targets: Optional[torch.Tensor], contextual_len: int, window: Optional[int]) -> bool:
    """Whether any of the HSTU masks (targets, contextual prefix, window) is on."""
    return num_targets is not None or contextual_len > 0 or window is not None


def _plain_softmax(activation: int, bias: Optional[torch.Tensor], dropout_p: float, hstu_mask: bool) -> bool:
    """Softmax attention without a bias, dropout or HSTU mask: what the Hopper kernels compute and
    what the Triton backward's long-row tiles were measured on."""
    return activation == 0 and bias is None and dropout_p == 0 and not hstu_mask


def _far_tiles(bias: Optional[torch.Tensor], batch_size: int, total_k: int) -> bool:
    """The kernels' FAR_TILES: with a bias [H, 2R + 1], the key (query) tiles at least R from every
    query (key) of a block run first with one bias value, bias[h, 0], instead of one load per
    score (_attention_scores.far_tiles_end). Only where the rows are longer than R plus a tile on
    average: on shorter rows the extra loops' code cost the backward 2-8% (H100, graph replay,
    B=512 H=4 D=128 causal softmax + bias, forward+backward: max_L=1024 uniform 9129 -> 6885 us,
    max_L=4096 at 5% fill 2899 -> 2455, D=64 max_L=1024 3467 -> 2149; max_L=256 uniform 1025 ->
    1090, max_L=1024 at 5% fill 586 -> 630; benchmarks/NOTES.md session 30). Always under the
    interpreter, so that the tests reach them."""
    if bias is None:
        return False
    return TRITON_INTERPRETER or total_k > ((bias.shape[1] - 1) // 2 + 64) * batch_size


def _score_arguments(q: torch.Tensor, q_offsets: torch.Tensor, causal: bool, scale: float, activation: int,
                     norm: Optional[float], bias: Optional[torch.Tensor], num_targets: Optional[torch.Tensor],
                     contextual_len: int, window: Optional[int], dropout_p: float, seed: int, total_k: int) -> dict:
    """The kernel arguments (shared by forward and backward) that say how scores are made, masked
    and weighted. Absent tensors are replaced by a placeholder the kernels never read."""
    softmax = activation == 0
    return dict(
        bias_ptr=q_offsets if bias is None else bias, targets_ptr=q_offsets if num_targets is None else num_targets,
        qk_scale=scale * LOG2_E if softmax else scale, norm=1.0 if norm is None else float(norm),
        contextual_len=contextual_len, window=NO_WINDOW if window is None else window,
        max_distance=0 if bias is None else (bias.shape[1] - 1) // 2, dropout_p=dropout_p, seed=seed,
        stride_bh=0 if bias is None else bias.stride(0),
        CAUSAL=causal, ACTIVATION=activation,
        HSTU_MASK=_hstu_mask(num_targets, contextual_len, window),
        HAS_TARGETS=num_targets is not None, HAS_BIAS=bias is not None, DROPOUT=dropout_p > 0,
        FAR_TILES=_far_tiles(bias, q_offsets.numel() - 1, total_k),
        NORM_BY_LENGTH=norm is None, PRECISION=dot_precision(q.dtype),
    )


def _row_scan(batch_size: int, num_warps: int, total: int, head_dim: int) -> dict:
    """The kernels' SCAN_ROWS and SCAN_STRIDE (ops/_utils.py: scan_shape). The two-pass scan (over
    511 rows at 4 warps) replaces the binary search at head dims up to 64 (H100, graph, B=1024
    max_L=256 D=64 skewed: forward 76.2 -> 69.5 us, forward+backward 276 -> 258; B=1024 max_L=128
    D=32 skewed 59.0 -> 54.8; benchmarks/NOTES.md, session 25). At D=128 the kernels already spill
    at 255 registers and the scan's values spill more (B=512 max_L=256 silu: 582 -> 669 us): the
    search stays."""
    width, stride = scan_shape(batch_size, num_warps, total)
    if stride > 1 and head_dim > 64:
        width, stride = 0, 1
    return dict(SCAN_ROWS=width, SCAN_STRIDE=stride)


@jagged_op("flash_attention_forward")
def _attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offsets: torch.Tensor,
                       k_offsets: torch.Tensor, causal: bool, scale: float, max_len: Optional[int] = None,
                       activation: int = 0, norm: Optional[float] = None, bias: Optional[torch.Tensor] = None,
                       num_targets: Optional[torch.Tensor] = None, contextual_len: int = 0,
                       window: Optional[int] = None, dropout_p: float = 0.0,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Output ``[T_q, H, D_v]`` and, for softmax, the per-query log-sum-exp ``[H, T_q]`` (float32,
    base 2; ``[H, 0]`` for the pointwise activations, whose backward needs none)."""
    total_q, heads, head_dim = q.shape
    head_dim_v = v.shape[2]
    out = (torch.empty_like(q, memory_format=torch.contiguous_format) if head_dim_v == head_dim
           else torch.empty((total_q, heads, head_dim_v), dtype=q.dtype, device=q.device))
    lse = torch.empty((heads, total_q if activation == 0 else 0), dtype=torch.float32, device=q.device)
    batch_size = q_offsets.numel() - 1
    if total_q == 0 or heads == 0:
        return out, lse
    plain = _plain_softmax(activation, bias, dropout_p, _hstu_mask(num_targets, contextual_len, window))
    if (attention_hopper.hopper_forward_supported(q, k, v, q_offsets, scale, max_len, plain,
                                                  plain and _int32_offsets((out,), (lse,)))
            and attention_hopper.attention_forward_hopper(q, k, v, q_offsets, k_offsets, causal, scale, max_len, out,
                                                          lse)):
        return out, lse
    tiles = _tiles("forward", head_dim, head_dim_v, max_len, _hstu_mask(num_targets, contextual_len, window),
                   bias=bias is not None)
    grid = (batch_size + total_q // tiles["BLOCK_M"], heads)
    _attention_forward_kernel[grid](
        q, k, v, out, lse, q_offsets, k_offsets,
        batch_size=batch_size, row_search=slot_search(batch_size, wide=False), head_dim=head_dim,
        head_dim_v=head_dim_v, stride_qt=q.stride(0), stride_qh=q.stride(1), stride_kt=k.stride(0),
        stride_kh=k.stride(1), stride_vt=v.stride(0), stride_vh=v.stride(1), stride_ot=out.stride(0),
        stride_oh=out.stride(1), stride_lh=lse.stride(0),
        SCALE_IN_EXP=activation == 0 and bias is None and scale > 0,
        INT32_OFFSETS=_int32_offsets((q, k, v, out), (lse,)),
        **_row_scan(batch_size, tiles["num_warps"], max(q.shape[0], k.shape[0]), max(q.shape[2], v.shape[2])),
        **_score_arguments(q, q_offsets, causal, scale, activation, norm, bias, num_targets, contextual_len, window,
                           dropout_p, seed, k.shape[0]),
        **tiles,
    )
    return out, lse


@_attention_forward.register_fake
def _(q, k, v, q_offsets, k_offsets, causal, scale, max_len=None, activation=0, norm=None, bias=None,
      num_targets=None, contextual_len=0, window=None, dropout_p=0.0, seed=0):
    return (q.new_empty((q.shape[0], q.shape[1], v.shape[2])),
            q.new_empty((q.shape[1], q.shape[0] if activation == 0 else 0), dtype=torch.float32))


# The Triton backward interleaves its two kinds of program only once a head's Q, K, V, O and dO
# hold this many bytes (H100, graph replay, benchmarks/NOTES.md session 30): at 8.6-9.0 MB it lost
# 2-3% (nothing is read from memory twice, and the split order's dQ programs fill the tail), from
# 17 MB on it won 2-9%.
TRITON_INTERLEAVE_MIN_BYTES = 12 * 2 ** 20


def _interleaves(q: torch.Tensor, v: torch.Tensor, q_offsets: torch.Tensor, k_offsets: torch.Tensor, tiles: dict,
                 max_len: Optional[int]) -> bool:
    """The Triton backward's INTERLEAVE: where the Gluon backward's rule
    (attention_hopper_backward.interleaves) holds and a head's tensors reach
    TRITON_INTERLEAVE_MIN_BYTES."""
    head_bytes = q.shape[0] * (2 * q.shape[2] + 3 * v.shape[2]) * q.element_size()
    return head_bytes >= TRITON_INTERLEAVE_MIN_BYTES and attention_hopper_backward.interleaves(
        attention_hopper.same_offsets(q_offsets, k_offsets), tiles, max_len)


@jagged_op("flash_attention_backward")
def _attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                        lse: torch.Tensor, q_offsets: torch.Tensor, k_offsets: torch.Tensor, causal: bool,
                        scale: float, max_len: Optional[int] = None, activation: int = 0,
                        norm: Optional[float] = None, bias: Optional[torch.Tensor] = None,
                        num_targets: Optional[torch.Tensor] = None, contextual_len: int = 0,
                        window: Optional[int] = None, dropout_p: float = 0.0, seed: int = 0,
                        bias_grad: bool = False,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ, dK, dV (contiguous; q, k, v may be strided views: each is read with its own strides)
    and the bias gradient (float32, bias's shape; empty unless ``bias_grad``)."""
    # empty_like: 4 us a tensor on the H100's host, against 6-9 for torch.empty with shape and dtype.
    dq, dk, dv = (torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))
    batch_size, heads = q_offsets.numel() - 1, q.shape[1]
    bias_grad = bias_grad and bias is not None
    if q.shape[0] == 0 or heads == 0:  # no query: nothing depends on k, v or the bias
        return dq, dk.zero_(), dv.zero_(), torch.zeros(bias.shape if bias_grad else (0,), dtype=torch.float32,
                                                      device=q.device)
    do = unit_last_stride(do)
    hstu_mask = _hstu_mask(num_targets, contextual_len, window)
    plain = _plain_softmax(activation, bias, dropout_p, hstu_mask)
    gradients = (q.shape, k.shape, v.shape)  # dq, dk, dv: contiguous
    delta = lse
    if activation == 0:
        hopper = attention_hopper_backward.hopper_backward_supported(
            q, k, v, do, q_offsets, scale, max_len, plain,
            plain and _int32_offsets((q, k, v, do, out), (lse,), gradients))
        # On short rows the Gluon backward makes delta itself from O (no delta kernel).
        if (hopper and attention_hopper_backward.fuses_delta(out, max_len)
                and attention_hopper_backward.attention_backward_hopper(
                    do, q, k, v, lse, None, q_offsets, k_offsets, causal, scale, dq, dk, dv, max_len, out=out)):
            return dq, dk, dv, lse.new_empty((0,))  # (plain softmax: no bias, no bias gradient)
        delta = torch.empty_like(lse)
        block_t = 64
        _attention_backward_delta_kernel[(triton.cdiv(q.shape[0], block_t), heads)](
            out, do, delta, q.shape[0], v.shape[2], *out.stride()[:2], *do.stride()[:2], delta.stride(0),
            BLOCK_T=block_t, BLOCK_DV=_block_dim(v.shape[2]))
        if hopper and attention_hopper_backward.attention_backward_hopper(
                do, q, k, v, lse, delta, q_offsets, k_offsets, causal, scale, dq, dk, dv, max_len):
            return dq, dk, dv, lse.new_empty((0,))
    # The Triton kernel (its tiles found only now: the Gluon calls above need none of them).
    tiles = _tiles("backward", q.shape[2], v.shape[2], max_len, hstu_mask, plain, bias is not None)
    num_kv_slots = batch_size + k.shape[0] // tiles["KV_BLOCK_N"]
    num_q_slots = batch_size + q.shape[0] // tiles["Q_BLOCK_M"]
    # Bias gradient: one row of partial sums per (dQ program, head), summed in a fixed order
    # afterwards (deterministic; faster than atomics, see accumulate_bias_grad).
    bias_partial = (torch.zeros((num_q_slots, *bias.shape), dtype=torch.float32, device=q.device) if bias_grad
                    else lse.new_empty((0,)))
    _attention_backward_kernel[(num_kv_slots + num_q_slots, heads)](
        q, k, v, do, lse, delta, dq, dk, dv, bias_partial, q_offsets, k_offsets,
        batch_size=batch_size, row_search=slot_search(batch_size, wide=False), num_kv_slots=num_kv_slots,
        scale=scale, head_dim=q.shape[2], head_dim_v=v.shape[2],
        stride_qt=q.stride(0), stride_qh=q.stride(1), stride_kt=k.stride(0), stride_kh=k.stride(1),
        stride_vt=v.stride(0), stride_vh=v.stride(1), stride_dot=do.stride(0), stride_doh=do.stride(1),
        stride_lh=lse.stride(0), stride_dqt=dq.stride(0), stride_dqh=dq.stride(1), stride_dkt=dk.stride(0),
        stride_dkh=dk.stride(1), stride_dvt=dv.stride(0), stride_dvh=dv.stride(1),
        stride_dbs=bias_partial.stride(0) if bias_grad else 0, stride_dbh=bias_partial.stride(1) if bias_grad else 0,
        BIAS_GRAD=bias_grad, INT32_OFFSETS=_int32_offsets((q, k, v, do), (lse, delta), gradients),
        INTERLEAVE=_interleaves(q, v, q_offsets, k_offsets, tiles, max_len),
        **_row_scan(batch_size, tiles["num_warps"], max(q.shape[0], k.shape[0]), max(q.shape[2], v.shape[2])),
        **_score_arguments(q, q_offsets, causal, scale, activation, norm, bias, num_targets, contextual_len, window,
                           dropout_p, seed, k.shape[0]),
        **tiles,
    )
    return dq, dk, dv, bias_partial.sum(0) if bias_grad else bias_partial


@_attention_backward.register_fake
def _(do, q, k, v, out, lse, q_offsets, k_offsets, causal, scale, max_len=None, activation=0, norm=None, bias=None,
      num_targets=None, contextual_len=0, window=None, dropout_p=0.0, seed=0, bias_grad=False):
    grads = tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
    bias_shape = bias.shape if bias_grad and bias is not None else (0,)
    return (*grads, q.new_empty(bias_shape, dtype=torch.float32))


_FORWARD_ARGUMENTS = ("q", "k", "v", "q_offsets", "k_offsets", "causal", "scale", "max_len", "activation", "norm",
                      "bias", "num_targets", "contextual_len", "window", "dropout_p", "seed")
_BIAS = _FORWARD_ARGUMENTS.index("bias")


def _save_for_attention_backward(ctx, inputs, output):
    # Positional unpacking, not a dict by name: this runs on every eager call with a gradient.
    (q, k, v, q_offsets, k_offsets, causal, scale, max_len, activation, norm, bias, num_targets, contextual_len,
     window, dropout_p, seed) = inputs
    ctx.save_for_backward(q, k, v, q_offsets, k_offsets, bias, num_targets, *output)
    ctx.options = (causal, scale, max_len, activation, norm, contextual_len, window, dropout_p, seed)
    ctx.bias_grad = bias is not None and ctx.needs_input_grad[_BIAS]
    # lse is an internal output (saved for the backward): nothing differentiates through it, so
    # no zero gradient is made for it on every backward (a fill kernel and its launch).
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _attention_autograd_backward(ctx, grad_out, grad_lse):
    grads = [None] * len(_FORWARD_ARGUMENTS)
    if grad_out is None:  # (not materialised: the output took no part in what was differentiated)
        return tuple(grads)
    q, k, v, q_offsets, k_offsets, bias, num_targets, out, lse = ctx.saved_tensors
    causal, scale, max_len, activation, norm, contextual_len, window, dropout_p, seed = ctx.options
    grads[0], grads[1], grads[2], dbias = _attention_backward(
        grad_out, q, k, v, out, lse, q_offsets, k_offsets, causal, scale, max_len, activation, norm, bias, num_targets,
        contextual_len, window, dropout_p, seed, ctx.bias_grad)
    if ctx.bias_grad:
        grads[_BIAS] = dbias.to(bias.dtype)
    return tuple(grads)


_attention_forward.register_autograd(_attention_autograd_backward, setup_context=_save_for_attention_backward)


def _check_attention_inputs(q, k, v, q_offsets, k_offsets):
    # Written for the host path (it runs on every call): each attribute read once.
    for name, x in (("q", q), ("k", k), ("v", v), ("q_offsets", q_offsets), ("k_offsets", k_offsets)):
        check_tensor(x, name)
    dtype, device = q.dtype, q.device
    for name, x in (("q", q), ("k", k), ("v", v)):
        shape = x.shape
        if len(shape) != 3:
            raise ValueError(f"{name} values must be 3-D [T, H, D], got shape {tuple(shape)}")
        x_dtype = x.dtype
        if x_dtype not in _ATTENTION_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16 or float32, got {x_dtype}")
        if x is not q and (x_dtype != dtype or x.device != device):
            raise ValueError(f"{name} must have q's dtype and device ({dtype}, {device}), got {x_dtype}, {x.device}")
        if not 1 <= shape[2] <= MAX_HEAD_DIM:
            raise ValueError(f"{name}'s head dim must be in [1, {MAX_HEAD_DIM}], got {shape[2]}")
        if shape[0] > MAX_TOKENS:
            raise ValueError(f"{name} has {shape[0]} tokens; jagged attention takes at most 2^31 - 1 (its kernels "
                             "find a block's row in int32, as FA2's int32 offsets also limit it)")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"k and v must have the same [T_k, H], got {tuple(k.shape[:2])} and {tuple(v.shape[:2])}")
    if q.shape[1] != k.shape[1] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same heads and head dim, got [.., {q.shape[1]}, {q.shape[2]}] "
                         f"and [.., {k.shape[1]}, {k.shape[2]}]")
    check_offsets(q_offsets, name="q_offsets", device=device)
    if k_offsets is not q_offsets:
        check_offsets(k_offsets, name="k_offsets", device=device)
        if q_offsets.numel() != k_offsets.numel():
            raise ValueError(f"q and k must have the same batch size, got {q_offsets.numel() - 1} and "
                             f"{k_offsets.numel() - 1}")


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
            (rows up to 512 get smaller ones) and changes the result only by rounding. Found by
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


def _check_number(value, name: str, low: float, high: float, *, integer: bool = False, low_open: bool = False,
                  high_open: bool = False):
    """``value`` is an int (or, unless ``integer``, a float) in [low, high] (open ends as asked)."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{name} must be {'an int' if integer else 'a number'}, got {type(value).__name__} {value!r}")
    if not (low < value if low_open else low <= value) or not (value < high if high_open else value <= high):
        raise ValueError(f"{name} must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}, "
                         f"got {value}")
    return value


def _check_generalized_arguments(q, q_offsets, activation, norm, bias, num_targets, contextual_len, window,
                                 dropout_p, seed, deterministic):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if norm is not None:
        if activation == "softmax":
            raise ValueError("norm applies to the pointwise activations ('silu', 'gelu'); softmax normalises itself")
        _check_number(norm, "norm", 0.0, math.inf, low_open=True, high_open=True)
    if bias is not None:
        check_tensor(bias, "bias")
        if bias.dim() != 2 or bias.shape[0] != q.shape[1] or bias.shape[1] % 2 != 1:
            raise ValueError(f"bias must be [H, 2 * max_distance + 1] = [{q.shape[1]}, odd], got {tuple(bias.shape)}")
        if bias.dtype not in (torch.float16, torch.bfloat16, torch.float32) or bias.device != q.device:
            raise ValueError(f"bias must be float16/bfloat16/float32 on {q.device}, got {bias.dtype} on {bias.device}")
    if num_targets is not None:
        check_tensor(num_targets, "num_targets")
        if num_targets.shape != (q_offsets.numel() - 1,) or num_targets.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"num_targets must be int32/int64 of shape [B] = [{q_offsets.numel() - 1}], got "
                             f"{num_targets.dtype} {tuple(num_targets.shape)}")
        if num_targets.device != q.device:
            raise ValueError(f"num_targets must be on {q.device}, got {num_targets.device}")
    _check_number(contextual_len, "contextual_len", 0, NO_WINDOW, integer=True)
    if window is not None:
        _check_number(window, "window", 1, NO_WINDOW, integer=True)
    _check_number(dropout_p, "dropout_p", 0.0, 1.0, high_open=True)
    if seed is not None:
        _check_number(seed, "seed", 0, 2 ** 63 - 1, integer=True)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")


def _jagged_rows(q, k, v) -> Optional[int]:
    """Check that q, k, v are JaggedTensors and v has k's rows; return the longest row of q and k
    if both JaggedTensors know it (no sync), else None. Their offsets were checked when they were
    built (or the caller opted out)."""
    JaggedTensor = jagged_tensor_type()
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, JaggedTensor):
            raise TypeError(f"{name} must be a jagged.JaggedTensor, got {type(x).__name__}")
    check_same_rows(v, k, "v", "k")
    q_max, k_max = q.known_max_len, k.known_max_len
    # A comparison, not max(): under torch.compile they may be symbolic.
    return None if q_max is None or k_max is None else k_max if k_max > q_max else q_max


def jagged_attention(q, k, v, *, activation: str = "softmax", scale: float | None = None, norm: float | None = None,
                     causal: bool = False, bias: torch.Tensor | None = None, num_targets: torch.Tensor | None = None,
                     contextual_len: int = 0, window: int | None = None, dropout_p: float = 0.0,
                     seed: int | None = None, deterministic: bool = False):
    """Generalized jagged attention for recommendation models: softmax or pointwise (HSTU)
    weights, a learnable relative-position bias, target / contextual / window masks, dropout.

    For each row and head, with queries at key positions ``p = i + L_k - L_q`` (``p = i`` for
    self-attention) and keys ``j``::

        s_ij   = scale * q_i . k_j + bias[h, clamp(j - p, -R, R) + R]      (bias optional)
        w_ij   = softmax_j(s_ij) over the visible keys               (activation="softmax")
               = act(s_ij) / norm where visible, else 0              ("silu", "gelu")
        out_i  = sum_j dropout(w_ij) v_j

    :func:`jagged_flash_attention` is this function's plain-softmax fast path (same kernels).

    Args:
        q, k, v: :class:`jagged.JaggedTensor` as in :func:`jagged_flash_attention` (values
            ``[T, H, D]``, ``[T_k, H, D]``, ``[T_k, H, D_v]``).
        activation: ``"softmax"``, ``"silu"`` (HSTU) or ``"gelu"`` (exact, erf form).
        scale: multiplies ``q . k``; default ``1/sqrt(D)`` (HSTU's alpha).
        norm: pointwise only: the divisor of the weights; default (None) the row's number of
            keys ``L_k``, so a row's output does not grow with its length. HSTU divides by the
            batch's padded length instead: pass ``norm=max_len`` for that.
        causal: key ``j`` visible to query ``p`` only if ``j <= p`` (with the HSTU masks below:
            only if ``id(j) < id(p)``, or ``j == p``).
        bias: ``[H, 2R + 1]`` relative-position bias (float16/bfloat16/float32, a learnable
            parameter: gradients flow into it), indexed by the key-minus-query distance
            ``j - p`` clamped to ``[-R, R]``. Fused in the kernels; its gradient is the sum of
            dL/ds along each diagonal of every tile.
        num_targets: ``[B]`` int tensor: the last ``num_targets[b]`` positions of row b are
            targets (candidates): each sees the non-target history (subject to causal and
            window) and itself, and no target sees another. Clamped to ``[0, L_k]``.
        contextual_len: the first ``contextual_len`` positions are a contextual prefix: they see
            every non-target key, and (sharing one id) are seen as one position by the rest.
        window: local attention: visible only within ``window`` ids (``|id(p) - id(j)| <=
            window``; HSTU's max_attn_len). None: no window.
        dropout_p: drop attention weights with this probability (and scale the kept ones by
            ``1 / (1 - dropout_p)``); the mask is one Philox draw per (query token, key token,
            head) of ``seed``: the same in forward and backward, reproducible given the seed.
            Training only: pass 0 in evaluation.
        seed: dropout seed; default a draw from torch's global CPU generator (so
            ``torch.manual_seed`` makes runs repeat).
        deterministic: accepted for API compatibility (FlashAttention's, HSTU's): the backward
            is always bitwise reproducible. No atomics anywhere: dQ, dK, dV each have one writer,
            and the bias gradient is reduced from per-program partial sums in a fixed order
            (``(T_q / 64 + B) * H * (2R + 1) * 4`` bytes during the backward), which measured
            1.2-3x faster than float32 atomics (benchmarks/NOTES.md).

    The HSTU masks (any of num_targets, contextual_len, window) define ids
    ``id(x) = min(max(x - c + 1, 0), L_k - c + 1 - t)`` (c = contextual_len, t = the row's
    targets); ``(p, j)`` is visible iff ``j == p``, or ``0 < id(p) - id(j) <= window`` (causal) /
    ``0 < |id(p) - id(j)| <= window`` (not causal), or ``0 <= p < c`` and ``j < L_k - t``. This
    is HSTU's ``_get_valid_attn_mask``; :func:`jagged.reference.attention_mask` writes it out.

    Returns:
        JaggedTensor with values ``[T_q, H, D_v]`` and q's offsets. A softmax query that sees no
        key gets 0; so does a pointwise one, naturally.

    Example (HSTU: SiLU, causal, 2 contextual positions, candidates as targets)::

        >>> out = jagged.jagged_attention(x, x, x, activation="silu", causal=True, contextual_len=2,
        ...                               num_targets=candidates_per_row, bias=rel_bias)
    """
    max_len = _jagged_rows(q, k, v)
    qv, kv, vv = q.values, k.values, v.values
    _check_attention_inputs(qv, kv, vv, q.offsets, k.offsets)
    _check_generalized_arguments(qv, q.offsets, activation, norm, bias, num_targets, contextual_len, window,
                                 dropout_p, seed, deterministic)
    scale = 1.0 / math.sqrt(qv.shape[2]) if scale is None else float(_check_number(scale, "scale", -math.inf, math.inf))
    if dropout_p > 0 and seed is None:
        seed = int(torch.randint(0, 2 ** 62, ()).item())
    if not use_triton(qv):  # CPU without the interpreter: the reference (dropout from torch's generator)
        keep = None
        if dropout_p > 0:
            keep = torch.rand(attention_dropout_shape(q, k), device=qv.device) >= dropout_p
        out = reference.jagged_attention(qv, kv, vv, q.offsets, k.offsets, causal=causal, scale=scale,
                                         activation=activation, norm=norm, bias=bias, num_targets=num_targets,
                                         contextual_len=contextual_len, window=window, dropout_p=dropout_p,
                                         dropout_keep=keep)
        return q.with_values(out)
    qv, kv, vv = (unit_last_stride(x) for x in (qv, kv, vv))
    if bias is not None:
        bias = unit_last_stride(bias)
    out = _attention_forward(qv, kv, vv, q.offsets, k.offsets, bool(causal), scale, max_len, ACTIVATIONS[activation],
                             None if norm is None else float(norm), bias, num_targets, contextual_len, window,
                             float(dropout_p), 0 if seed is None else seed)[0]
    return q.with_values(out)


def attention_dropout_shape(q, k) -> tuple[int, int, int, int]:
    """``(B, H, max L_q, max L_k)`` of :func:`attention_dropout_mask` (synchronises for the lengths)."""
    q_lengths, k_lengths = q.offsets.diff(), k.offsets.diff()
    max_q = int(q_lengths.max()) if q_lengths.numel() else 0
    max_k = int(k_lengths.max()) if k_lengths.numel() else 0
    return (q_lengths.numel(), q.values.shape[1], max_q, max_k)


@fast_launch
@triton.jit(do_not_specialize=["batch_size", "row_search", "seed"])
def _dropout_mask_kernel(keep_ptr, q_offsets_ptr, k_offsets_ptr, batch_size, row_search, dropout_p, seed,
                         stride_kb, stride_kh, stride_ki, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    head = tl.program_id(1).to(tl.int64)
    row, q_begin, q_len, block = row_block(q_offsets_ptr, tl.program_id(0).to(tl.int64), batch_size, row_search,
                                           BLOCK_M, True)
    if block * BLOCK_M < q_len:
        k_begin, k_len = row_span(k_offsets_ptr, row)
        offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
        for start_n in range(0, k_len, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            keep = dropout_keep(seed, (q_begin + offs_m)[:, None], (k_begin + offs_n)[None, :], head, dropout_p)
            tl.store(keep_ptr + row * stride_kb + head * stride_kh + offs_m[:, None] * stride_ki + offs_n[None, :],
                     keep.to(tl.int8), mask=(offs_m < q_len)[:, None] & (offs_n < k_len)[None, :])


def attention_dropout_mask(q, k, *, dropout_p: float, seed: int) -> torch.Tensor:
    """The keep-mask :func:`jagged_attention` applies for ``dropout_p`` and ``seed``, padded:
    ``[B, H, max L_q, max L_k]`` bool (False outside the rows). For debugging and tests (it
    synchronises and is ``O(B L^2)``); the kernels never store it."""
    _check_number(dropout_p, "dropout_p", 0.0, 1.0, high_open=True)
    _check_number(seed, "seed", 0, 2 ** 63 - 1, integer=True)
    if not use_triton(q.values):
        raise NotImplementedError("the dropout mask is drawn by the Triton kernels: CUDA or TRITON_INTERPRET=1")
    keep = torch.zeros(attention_dropout_shape(q, k), dtype=torch.int8, device=q.values.device)
    batch_size, total_q, block = q.offsets.numel() - 1, q.values.shape[0], 16
    if keep.numel():
        _dropout_mask_kernel[(batch_size + total_q // block, keep.shape[1])](
            keep, q.offsets, k.offsets, batch_size, slot_search(batch_size), float(dropout_p), seed,
            *keep.stride()[:3], BLOCK_M=block, BLOCK_N=16)
    return keep.bool()


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
    max_len = _jagged_rows(q, k, v)
    out = jagged_flash_attention_values(q.values, k.values, v.values, q.offsets, k.offsets, causal=causal, scale=scale,
                                        validate=False, max_len=max_len)
    return q.with_values(out)
