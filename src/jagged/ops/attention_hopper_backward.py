"""Jagged flash attention backward for Hopper (sm_90), written in Gluon: the kernel, its
launcher, and the rule for when the library's attention backward takes it.

It computes what ops/attention.py's Triton backward computes for plain softmax attention, with
the same split of the work: one launch whose programs each own one block of one row's keys
(dK, dV: stream over the row's queries) or one block of one row's queries (dQ: stream over the
row's keys); all of the first kind come first, or, on short rows, the two kinds alternate
(interleaves). Every gradient element is written by one program, without atomics:
deterministic. delta = rowsum(dO * O) comes from the Triton delta
kernel before it, or on short rows (fuses_delta) from the kernel itself, out of O tiles that
stream with Q and dO. As in the Hopper forward (ops/attention_hopper.py):

- Q, dO, K and V tiles arrive by TMA into a ring of shared-memory stages guarded by mbarriers;
  all matmuls are async wgmma, the second operand of dV, dK and dQ taken from registers. A dK/dV
  program's per-query lse (and delta) ride the same ring by cp.async (VECTOR_RING, _tiles): a
  TMA box must start 16-byte aligned, and a row's queries start anywhere.
- Only the causal diagonal and, in the dQ programs, the row's last key tile are masked.
- TMA reads a row's last tile whole, taking in rows of the next row. A dK/dV program zeroes those
  query rows of Q and dO in shared memory (their weights are then exactly 0: their lse is
  +inf), a dQ program those key rows of K (their weights are masked); so a non-finite value in
  one row never reaches another row's gradients (0 * inf is NaN); a delta made in the kernel is 0
  for those rows.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from . import _gluon, attention_hopper
from ._gluon import fence_async_shared, gl, gluon, mbarrier, warpgroup_mma, warpgroup_mma_wait
from ._launch import fast_launch

# JAGGED_HOPPER_ATTENTION_BACKWARD=0 keeps every backward on the Triton kernel.
ENABLED = os.environ.get("JAGGED_HOPPER_ATTENTION_BACKWARD", "1") != "0"
FUSED_DELTA = True  # see fuses_delta
INTERLEAVE = True  # see interleaves
_FAILED: set = set()

if gluon is not None:
    _tma_load = attention_hopper._tma_load
    _cta_barrier = attention_hopper._cta_barrier
    _slot_row = attention_hopper._slot_row
    _zero_rows_past = attention_hopper._zero_rows_past
    _store_layout = attention_hopper._store_layout
    _load_pair = attention_hopper._load_pair
    _store_rows = attention_hopper._store_rows
    _async_load = _gluon.async_load
    _async_copy_arrive = _gluon.async_copy_arrive
    _mma_layout = attention_hopper._mma_layout

    @gluon.jit
    def _copy_vectors(v_ptr, w_ptr, v_smem, w_smem, bar, stage, tile, base, length, BLOCK: gl.constexpr,
                      VECTORS: gl.constexpr, num_warps: gl.constexpr):
        """cp.async the entries tile * BLOCK.. of VECTORS per-query float32 vectors (v, then w; at
        ``base`` in each, the ones at or past ``length`` zero-filled) into their stage of two rings,
        the stage's mbarrier held until they land. Not TMA: a TMA box must start 16-byte aligned,
        and a row's queries start anywhere."""
        if VECTORS > 0:
            layout: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
            index = tile * BLOCK + gl.arange(0, BLOCK, layout=layout)
            inside = index < length
            _async_load(v_smem.index(stage), v_ptr + base + index, mask=inside)
            if VECTORS > 1:
                _async_load(w_smem.index(stage), w_ptr + base + index, mask=inside)
            # Each thread's arrive adds one to the phase's count and completes once its copies have
            # landed: the phase (begun by the mbarrier.expect after it) waits for them.
            _async_copy_arrive(bar)

    @gluon.jit
    def _load_ring(a_desc, b_desc, c_desc, a_smem, b_smem, c_smem, bars, tile, first_row, col, BLOCK: gl.constexpr,
                   STAGES: gl.constexpr, THREE: gl.constexpr, v_ptr, w_ptr, v_smem, w_smem, vec_base, vec_length,
                   VECTORS: gl.constexpr, num_warps: gl.constexpr):
        """_load_pair, of a third tensor too if THREE, and _copy_vectors of VECTORS per-query vectors."""
        stage = tile % STAGES
        _copy_vectors(v_ptr, w_ptr, v_smem, w_smem, bars.index(stage), stage, tile, vec_base, vec_length, BLOCK,
                      VECTORS, num_warps)
        if THREE:
            bar = bars.index(stage)
            mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes + c_desc.block_type.nbytes)
            _tma_load(a_desc, [first_row + tile * BLOCK, col], bar, a_smem.index(stage))
            _tma_load(b_desc, [first_row + tile * BLOCK, col], bar, b_smem.index(stage))
            _tma_load(c_desc, [first_row + tile * BLOCK, col], bar, c_smem.index(stage))
        else:
            _load_pair(a_desc, b_desc, a_smem, b_smem, bars, tile, first_row, col, BLOCK, STAGES)

    @gluon.jit
    def _open_tiles(once_a_desc, once_b_desc, once_c_desc, ring_a_desc, ring_b_desc, ring_c_desc, once_row, ring_row,
                    col, n_tiles, BLOCK: gl.constexpr, STAGES: gl.constexpr, ONCE_C: gl.constexpr,
                    RING_C: gl.constexpr, v_ptr, w_ptr, vec_base, vec_length, VECTORS: gl.constexpr,
                    num_warps: gl.constexpr):
        """Shared memory for the tiles a program loads once (rows once_row on: a, b, and c if
        ONCE_C) and those it streams through a ring of STAGES (tiles of BLOCK rows from ring_row
        on: a, b, and c if RING_C; and VECTORS per-query float32 vectors v, w, entries from
        vec_base on), with their mbarriers; starts the loads of the first and of the ring's first
        STAGES - 1 tiles. An absent c, v or w ring is returned as a / a's ring."""
        once_a = gl.allocate_shared_memory(once_a_desc.dtype, once_a_desc.block_type.shape, once_a_desc.layout)
        once_b = gl.allocate_shared_memory(once_b_desc.dtype, once_b_desc.block_type.shape, once_b_desc.layout)
        once_c = once_a
        if ONCE_C:
            once_c = gl.allocate_shared_memory(once_c_desc.dtype, once_c_desc.block_type.shape, once_c_desc.layout)
        ring_a = gl.allocate_shared_memory(ring_a_desc.dtype, [STAGES] + ring_a_desc.block_type.shape,
                                           ring_a_desc.layout)
        ring_b = gl.allocate_shared_memory(ring_b_desc.dtype, [STAGES] + ring_b_desc.block_type.shape,
                                           ring_b_desc.layout)
        ring_c = ring_a
        if RING_C:
            ring_c = gl.allocate_shared_memory(ring_c_desc.dtype, [STAGES] + ring_c_desc.block_type.shape,
                                               ring_c_desc.layout)
        ring_v = ring_a
        ring_w = ring_a
        vector_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        if VECTORS > 0:
            ring_v = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK], vector_layout)
        if VECTORS > 1:
            ring_w = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK], vector_layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        once_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        mbarrier.init(once_bar, count=1)
        if ONCE_C:
            mbarrier.expect(once_bar, once_a_desc.block_type.nbytes + once_b_desc.block_type.nbytes
                            + once_c_desc.block_type.nbytes)
            _tma_load(once_c_desc, [once_row, col], once_bar, once_c)
        else:
            mbarrier.expect(once_bar, once_a_desc.block_type.nbytes + once_b_desc.block_type.nbytes)
        _tma_load(once_a_desc, [once_row, col], once_bar, once_a)
        _tma_load(once_b_desc, [once_row, col], once_bar, once_b)
        for i in gl.static_range(STAGES - 1):
            if i < n_tiles:
                _load_ring(ring_a_desc, ring_b_desc, ring_c_desc, ring_a, ring_b, ring_c, bars, i, ring_row, col, BLOCK,
                           STAGES, RING_C, v_ptr, w_ptr, ring_v, ring_w, vec_base, vec_length, VECTORS, num_warps)
        return once_a, once_b, once_c, ring_a, ring_b, ring_c, ring_v, ring_w, bars, once_bar

    @gluon.jit
    def _row_delta(do_tile, o_tile, first, length, layout: gl.constexpr, HEAD_D: gl.constexpr,
                   num_warps: gl.constexpr):
        """delta = rowsum(dO * O) in float32 of a [BLOCK, HEAD_D] pair of shared-memory tiles, in
        ``layout`` (a slice of the score layout); 0 for the rows at or past ``length`` (the next
        row's, which may hold anything)."""
        tile_layout: gl.constexpr = _store_layout(HEAD_D, num_warps)
        delta = gl.sum(do_tile.load(tile_layout).to(gl.float32) * o_tile.load(tile_layout).to(gl.float32), 1)
        delta = gl.convert_layout(delta, layout)
        rows = first + gl.arange(0, do_tile.shape[0], layout=layout)
        return gl.where(rows < length, delta, 0.0)

    @gluon.jit
    def _close_tiles(bars, once_bar, STAGES: gl.constexpr):
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))
        mbarrier.invalidate(once_bar)

    @gluon.jit
    def _dkdv_program(
        slot, head, q_desc, k_desc, v_desc, do_desc, o_desc, lse_ptr, delta_ptr, dk_ptr, dv_ptr, q_offsets_ptr,
        k_offsets_ptr, batch_size, qk_scale, scale, stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh,
        CAUSAL: gl.constexpr, HEAD_D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr, SCAN: gl.constexpr, STRIDE: gl.constexpr, FUSED_DELTA: gl.constexpr,
        SAME_OFFSETS: gl.constexpr, VECTOR_RING: gl.constexpr, num_warps: gl.constexpr,
    ):
        """dK, dV of one block of BLOCK_N keys of one row: stream over the row's queries in tiles of
        BLOCK_M. Transposed score tiles [keys, queries], so that dV += P^T dO and dK += dS^T Q take
        P^T and dS^T from registers."""
        row, k_begin, k_len, block = _slot_row(k_offsets_ptr, slot, batch_size, BLOCK_N, SCAN, STRIDE, num_warps)
        if block * BLOCK_N < k_len:
            if SAME_OFFSETS:  # self-attention: the scan found the query span too
                q_begin = k_begin
                q_len = k_len
            else:
                q_begin = gl.load(q_offsets_ptr + row).to(gl.int32)
                q_len = gl.load(q_offsets_ptr + row + 1).to(gl.int32) - q_begin
            key_start = block * BLOCK_N
            start_m = 0
            if CAUSAL:  # query i sees key j <= i + (L_k - L_q): the first query tile that sees key_start
                start_m = (gl.maximum(key_start - (k_len - q_len), 0) // BLOCK_M) * BLOCK_M
            n_tiles = gl.cdiv(gl.maximum(q_len - start_m, 0), BLOCK_M)
            col = head * HEAD_D

            st_layout: gl.constexpr = _mma_layout(num_warps, BLOCK_M)
            acc_layout: gl.constexpr = _mma_layout(num_warps, HEAD_D)
            a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
            # VECTOR_RING: lse (and, without FUSED_DELTA, delta) of each query tile ride the Q / dO ring
            # (cp.async, same mbarrier). Loaded at the top of their own tile instead, their L2 latency
            # stands in front of the exponent; the ring costs registers (_tiles).
            VECTORS: gl.constexpr = (1 if FUSED_DELTA else 2) if VECTOR_RING else 0
            vec_base = head * stride_lh + q_begin + start_m
            k_smem, v_smem, _, q_smem, do_smem, o_smem, lse_smem, delta_smem, bars, kv_bar = _open_tiles(
                k_desc, v_desc, k_desc, q_desc, do_desc, o_desc, k_begin + key_start, q_begin + start_m, col, n_tiles,
                BLOCK_M, STAGES, False, FUSED_DELTA, lse_ptr, delta_ptr, vec_base, q_len - start_m, VECTORS,
                num_warps)

            keys = key_start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, st_layout))
            st_zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=st_layout)
            dk = gl.zeros([BLOCK_N, HEAD_D], gl.float32, layout=acc_layout)
            dv = gl.zeros([BLOCK_N, HEAD_D], gl.float32, layout=acc_layout)
            mbarrier.wait(kv_bar, 0)
            for j in range(n_tiles):
                if j + STAGES - 1 < n_tiles:  # its stage's last reader, tile j - 1, has finished
                    _load_ring(q_desc, do_desc, o_desc, q_smem, do_smem, o_smem, bars, j + STAGES - 1,
                               q_begin + start_m, col, BLOCK_M, STAGES, FUSED_DELTA, lse_ptr, delta_ptr, lse_smem,
                               delta_smem, vec_base, q_len - start_m, VECTORS, num_warps)
                q_start = start_m + j * BLOCK_M
                if not VECTOR_RING:
                    queries = q_start + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, st_layout))
                    query_ok = queries < q_len
                    # A query past the row (or that saw no key) has lse = +inf: its weights are 0.
                    lse = gl.load(lse_ptr + head * stride_lh + q_begin + queries, mask=query_ok, other=float("inf"))
                    if not FUSED_DELTA:
                        delta = gl.load(delta_ptr + head * stride_lh + q_begin + queries, mask=query_ok, other=0.0)
                stage = j % STAGES
                mbarrier.wait(bars.index(stage), (j // STAGES) & 1)
                q_tile = q_smem.index(stage)
                do_tile = do_smem.index(stage)
                partial = q_start + BLOCK_M > q_len
                if partial:  # the next row's queries: zeroed, so that 0 * them is 0
                    _zero_rows_past(q_tile, q_start, q_len, HEAD_D, num_warps)
                    _zero_rows_past(do_tile, q_start, q_len, HEAD_D, num_warps)
                    fence_async_shared()
                    _cta_barrier()
                if VECTOR_RING and not FUSED_DELTA:  # 0 past the row (zero-filled)
                    delta = delta_smem.index(stage).load(gl.SliceLayout(0, st_layout))
                if FUSED_DELTA:
                    delta = _row_delta(do_tile, o_smem.index(stage), q_start, q_len, gl.SliceLayout(0, st_layout),
                                       HEAD_D, num_warps)
                st = warpgroup_mma(k_smem, q_tile.permute((1, 0)), st_zero, use_acc=False, is_async=True)
                dpt = warpgroup_mma(v_smem, do_tile.permute((1, 0)), st_zero, use_acc=False, is_async=True)
                st = warpgroup_mma_wait(1, deps=(st, ))
                if VECTOR_RING:
                    lse = lse_smem.index(stage).load(gl.SliceLayout(0, st_layout))
                    if partial:  # past the row (zero-filled): +inf, so that those queries' weights are 0
                        lse = gl.where(q_start + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, st_layout)) < q_len,
                                       lse, float("inf"))
                pt = gl.exp2(st * qk_scale - gl.expand_dims(lse, 0))
                if CAUSAL:
                    if key_start + BLOCK_N - 1 > q_start + (k_len - q_len):  # the diagonal crosses the tile
                        queries = q_start + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, st_layout))
                        visible = gl.expand_dims(keys, 1) <= gl.expand_dims(queries + (k_len - q_len), 0)
                        pt = gl.where(visible, pt, 0.0)
                pt_op = gl.convert_layout(pt.to(do_desc.dtype), a_layout)
                dv = warpgroup_mma(pt_op, do_tile, dv, is_async=True)
                dpt = warpgroup_mma_wait(1, deps=(dpt, ))
                dst = pt * (dpt - gl.expand_dims(delta, 0))
                dst_op = gl.convert_layout(dst.to(q_desc.dtype), a_layout)
                dk = warpgroup_mma(dst_op, q_tile, dk, is_async=True)
                dk, dv = warpgroup_mma_wait(0, deps=(dk, dv))

            _close_tiles(bars, kv_bar, STAGES)
            _store_rows(dk_ptr, dk * scale, key_start, k_len, k_begin, stride_dkt, stride_dkh, head, HEAD_D,
                        num_warps)
            _store_rows(dv_ptr, dv, key_start, k_len, k_begin, stride_dvt, stride_dvh, head, HEAD_D, num_warps)

    @gluon.jit
    def _dq_program(
        slot, head, q_desc, k_desc, v_desc, do_desc, o_desc, lse_ptr, delta_ptr, dq_ptr, q_offsets_ptr,
        k_offsets_ptr, batch_size, qk_scale, scale, stride_dqt, stride_dqh, stride_lh,
        CAUSAL: gl.constexpr, HEAD_D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr, SCAN: gl.constexpr, STRIDE: gl.constexpr, FUSED_DELTA: gl.constexpr,
        SAME_OFFSETS: gl.constexpr, num_warps: gl.constexpr,
    ):
        """dQ of one block of BLOCK_M queries of one row: stream over the row's keys in tiles of
        BLOCK_N (the forward's walk)."""
        row, q_begin, q_len, block = _slot_row(q_offsets_ptr, slot, batch_size, BLOCK_M, SCAN, STRIDE, num_warps)
        if block * BLOCK_M < q_len:
            q_start = block * BLOCK_M
            k_begin, k_len, end_n = attention_hopper._key_span(k_offsets_ptr, row, q_begin, q_start, q_len, CAUSAL,
                                                                    BLOCK_M, SAME_OFFSETS)
            n_tiles = gl.cdiv(end_n, BLOCK_N)
            col = head * HEAD_D

            s_layout: gl.constexpr = _mma_layout(num_warps, BLOCK_N)
            acc_layout: gl.constexpr = _mma_layout(num_warps, HEAD_D)
            a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
            q_smem, do_smem, o_smem, k_smem, v_smem, _, _, _, bars, q_bar = _open_tiles(
                q_desc, do_desc, o_desc, k_desc, v_desc, k_desc, q_begin + q_start, k_begin, col, n_tiles, BLOCK_N,
                STAGES, FUSED_DELTA, False, lse_ptr, delta_ptr, 0, 0, 0, num_warps)

            queries = q_start + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
            query_ok = queries < q_len
            lse = gl.load(lse_ptr + head * stride_lh + q_begin + queries, mask=query_ok, other=float("inf"))
            if not FUSED_DELTA:
                delta = gl.load(delta_ptr + head * stride_lh + q_begin + queries, mask=query_ok, other=0.0)
            s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
            dq = gl.zeros([BLOCK_M, HEAD_D], gl.float32, layout=acc_layout)
            mbarrier.wait(q_bar, 0)
            if FUSED_DELTA:
                delta = _row_delta(do_smem, o_smem, q_start, q_len, gl.SliceLayout(1, s_layout), HEAD_D, num_warps)
            for j in range(n_tiles):
                if j + STAGES - 1 < n_tiles:
                    _load_pair(k_desc, v_desc, k_smem, v_smem, bars, j + STAGES - 1, k_begin, col, BLOCK_N, STAGES)
                stage = j % STAGES
                mbarrier.wait(bars.index(stage), (j // STAGES) & 1)
                k_tile = k_smem.index(stage)
                masked = (j + 1) * BLOCK_N > k_len
                if masked:  # the next row's keys: zeroed, so that dS K is not 0 * them
                    _zero_rows_past(k_tile, j * BLOCK_N, k_len, HEAD_D, num_warps)
                    fence_async_shared()
                    _cta_barrier()
                s = warpgroup_mma(q_smem, k_tile.permute((1, 0)), s_zero, use_acc=False, is_async=True)
                dp = warpgroup_mma(do_smem, v_smem.index(stage).permute((1, 0)), s_zero, use_acc=False,
                                   is_async=True)
                s = warpgroup_mma_wait(1, deps=(s, ))
                if CAUSAL:
                    masked = masked | ((j + 1) * BLOCK_N - 1 > q_start + (k_len - q_len))
                if masked:
                    s = attention_hopper._mask_tile(s, j, queries, k_len, q_len, s_layout, CAUSAL, BLOCK_N)
                p = gl.exp2(s * qk_scale - gl.expand_dims(lse, 1))
                dp = warpgroup_mma_wait(0, deps=(dp, ))
                ds = p * (dp - gl.expand_dims(delta, 1))
                if (j + 1) * BLOCK_N > k_len:  # the next row's V rows make dP there anything, inf included
                    keys = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
                    ds = gl.where(gl.expand_dims(keys < k_len, 0), ds, 0.0)
                dq = warpgroup_mma(gl.convert_layout(ds.to(k_desc.dtype), a_layout), k_tile, dq, is_async=True)
                dq = warpgroup_mma_wait(0, deps=(dq, ))

            _close_tiles(bars, q_bar, STAGES)
            _store_rows(dq_ptr, dq * scale, q_start, q_len, q_begin, stride_dqt, stride_dqh, head, HEAD_D, num_warps)

    @fast_launch
    @gluon.jit(do_not_specialize=["batch_size", "num_kv_slots", "stride_lh"])  # batch-varying (docs/design.md)
    def _attention_backward_hopper_kernel(
        kv_q_desc, kv_k_desc, kv_v_desc, kv_do_desc, kv_o_desc, dq_q_desc, dq_k_desc, dq_v_desc, dq_do_desc,
        dq_o_desc, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr, q_offsets_ptr, k_offsets_ptr, batch_size,
        num_kv_slots, qk_scale, scale, stride_dqt, stride_dqh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
        stride_lh,
        CAUSAL: gl.constexpr, HEAD_D: gl.constexpr, KV_BLOCK_M: gl.constexpr, KV_BLOCK_N: gl.constexpr,
        Q_BLOCK_M: gl.constexpr, Q_BLOCK_N: gl.constexpr, STAGES: gl.constexpr, SCAN: gl.constexpr,
        STRIDE: gl.constexpr, FUSED_DELTA: gl.constexpr, SAME_OFFSETS: gl.constexpr, VECTOR_RING: gl.constexpr,
        INTERLEAVE: gl.constexpr, num_warps: gl.constexpr,
    ):
        # One launch for both kinds of program (as the Triton backward: they fill each other's tails).
        # FUSED_DELTA: each program makes delta = rowsum(dO * O) from O tiles (the *_o_desc) instead
        # of reading the delta kernel's (delta_ptr). INTERLEAVE (the two kinds have the same slots:
        # self-attention, KV_BLOCK_N == Q_BLOCK_M): program 2s is the dK/dV program of slot s and
        # 2s + 1 its dQ program, so the two read one row's tiles at about the same time, from L2.
        slot = gl.program_id(0)
        head = gl.program_id(1)
        if INTERLEAVE:
            kv = slot % 2 == 0
            slot = slot // 2
        else:
            kv = slot < num_kv_slots
            if not kv:
                slot -= num_kv_slots
        if kv:
            _dkdv_program(slot, head, kv_q_desc, kv_k_desc, kv_v_desc, kv_do_desc, kv_o_desc, lse_ptr, delta_ptr,
                          dk_ptr, dv_ptr, q_offsets_ptr, k_offsets_ptr, batch_size, qk_scale, scale, stride_dkt,
                          stride_dkh, stride_dvt, stride_dvh, stride_lh, CAUSAL, HEAD_D, KV_BLOCK_M, KV_BLOCK_N, STAGES,
                          SCAN, STRIDE, FUSED_DELTA, SAME_OFFSETS, VECTOR_RING, num_warps)
        else:
            _dq_program(slot, head, dq_q_desc, dq_k_desc, dq_v_desc, dq_do_desc, dq_o_desc, lse_ptr,
                        delta_ptr, dq_ptr, q_offsets_ptr, k_offsets_ptr, batch_size, qk_scale, scale, stride_dqt,
                        stride_dqh, stride_lh, CAUSAL, HEAD_D, Q_BLOCK_M, Q_BLOCK_N, STAGES, SCAN, STRIDE, FUSED_DELTA,
                        SAME_OFFSETS, num_warps)


def _tiles(head_dim: int, causal: bool, fused_delta: bool) -> dict:
    """Tiles by head dim (H100, graph replay, benchmarks/NOTES.md sessions 21 and 23). At D <= 64,
    64-key dK/dV blocks walking 32-query tiles, 64-query dQ blocks walking 64-key tiles, 3 stages
    (B=256 max_L=512 D=64 uniform 285 us vs 294-341 for the other tiles tried). When the kernel
    makes delta itself (not causal), 32-key dQ tiles instead: with the O tiles the 64-key ones
    take 74 KB of shared memory (3 programs an SM), the 32-key ones 53 KB and, at D=64, 128
    registers: 4 programs an SM (B=256 max_L=256 D=64 uniform 106 -> 97 us, max_L=512 277 -> 265);
    at D=32 a 96-register cap makes that 5 (D=32 H=8 140 -> 135). Causal (156 registers at D=64,
    3 programs either way) and the unfused path keep the 64-key tiles (max_L=1024 915 vs 949). At
    D=128, 64 x 64 everywhere with 2 stages (193 vs 199-277 us at max_L=256, 212 vs 238-323 at
    max_L=1024). The register counts are Triton 3.6's (the GPU image); Triton 3.9's ptxas gives the
    fused D=64 variant 148 (3 programs an SM) and spills 36 bytes under a 128 cap, which on 3.6
    measured 1% slower than no cap: after a Triton upgrade, check `python tests/_compile_hopper.py
    --footprint` and re-measure.

    VECTOR_RING (the dK/dV programs' lse and delta through the Q / dO ring instead of a load at the
    top of each tile; session 24): on everywhere but the fused, non-causal D=64 variant, which it
    takes from 128 to 136 registers (3 programs an SM; 97 -> 105 us at max_L=256 uniform, and
    under a 128 cap it spills and still loses at max_L=512, 263 -> 272). Elsewhere: D=32 H=8
    max_L=256 uniform 137 -> 132, max_L=512 199 -> 192, D=64 causal 91.5 -> 88.7, D=128 194 ->
    190."""
    if head_dim == 128:
        return dict(KV_BLOCK_M=64, KV_BLOCK_N=64, Q_BLOCK_M=64, Q_BLOCK_N=64, STAGES=2, VECTOR_RING=True, num_warps=4)
    tiles = dict(KV_BLOCK_M=32, KV_BLOCK_N=64, Q_BLOCK_M=64, Q_BLOCK_N=64, STAGES=3, VECTOR_RING=True, num_warps=4)
    if fused_delta and not causal:
        tiles["Q_BLOCK_N"] = 32
        if head_dim <= 32:
            tiles["maxnreg"] = 96
        else:
            tiles["VECTOR_RING"] = False
    return tiles


def hopper_backward_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor,
                              q_offsets: torch.Tensor, scale: float, max_len: Optional[int], plain_softmax: bool,
                              int32_offsets: bool) -> bool:
    """Whether the attention backward of these (validated) inputs runs on the Gluon kernel: what
    attention_hopper.hopper_inputs_supported asks of q, k, v and dO, except at D=32 on rows of at
    most 128 (or of unknown length), where the Triton kernel's 16-row tiles waste less (B=1024
    max_L=128 D=32 skewed: 45 us vs 64)."""
    if q.shape[2] <= 32 and (max_len is None or max_len <= 128):
        return False
    return attention_hopper.hopper_inputs_supported((q, k, v, do), q_offsets, scale, plain_softmax, int32_offsets,
                                                    ENABLED)


def fuses_delta(out: torch.Tensor, max_len: Optional[int]) -> bool:
    """Whether the Gluon backward makes delta = rowsum(dO * O) itself from the forward's output
    instead of reading the Triton delta kernel's: at D <= 64 on rows of at most 512 (max_len
    known), with ``out`` TMA-ready. Each dK/dV program then re-reads its row's O, once per key
    block: on short rows that costs less than the delta kernel's launch and pass (H100, graph,
    B=256 max_L=256 D=64 uniform 113.5 -> 106.5 us, skewed 52.6 -> 49.0, causal 99.6 -> 92.6; D=32
    150 -> 141), on longer rows or at D=128 (the O ring's shared memory costs occupancy) more
    (max_L=1024 930 -> 970, D=128 193 -> 275; benchmarks/NOTES.md, session 22). FUSED_DELTA =
    False turns it off."""
    return (FUSED_DELTA and out.shape[2] <= 64 and max_len is not None and max_len <= 512
            and attention_hopper._tma_ready(out))


def interleaves(same: bool, tiles: dict, max_len: Optional[int]) -> bool:
    """Whether the launch interleaves the two kinds of program (the kernel's INTERLEAVE: program
    2s the dK/dV program of slot s, 2s + 1 its dQ program) instead of running every dK/dV
    program first: in self-attention (``same``) with as many keys a dK/dV program as queries a dQ
    program (the two kinds then have the same slots), on rows of at most 512 (max_len known). The
    two programs of a slot read one block's row at about the same time, so the second finds it in
    L2; with the dK/dV programs first, a head's Q, dO, O, K and V were read from memory twice once
    they passed L2's size. H100, graph replay (benchmarks/NOTES.md, session 29): B=1024 max_L=256
    D=64 uniform 385 -> 355 us, skewed 167 -> 155, B=256 max_L=256 D=128 190 -> 181, D=64 uniform
    96.5 -> 94.8, max_L=512 uniform 267 -> 261; max_L=512 skewed 89.7 -> 90.8. On longer rows it
    lost (B=64 max_L=2048 skewed 235 -> 248, D=128 max_L=1024 200 -> 205). The Triton backward
    takes the same rule with a size floor (ops/attention.py: _interleaves). INTERLEAVE = False
    turns it off in both."""
    return (INTERLEAVE and same and tiles["KV_BLOCK_N"] == tiles["Q_BLOCK_M"] and max_len is not None
            and max_len <= 512)


def attention_backward_hopper(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor,
                              delta: Optional[torch.Tensor], q_offsets: torch.Tensor, k_offsets: torch.Tensor,
                              causal: bool, scale: float, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
                              max_len: Optional[int], tiles: Optional[dict] = None,
                              out: Optional[torch.Tensor] = None) -> bool:
    """Fill dq, dk, dv for inputs that hopper_backward_supported accepted, from the forward's
    base-2 ``lse`` and ``delta`` = rowsum(dO * O) (both [H, T_q], one stride), or, with ``delta``
    None, from the forward's output ``out`` (TMA-ready, as q), of which the kernel makes delta
    itself. ``max_len`` (the longest row, or None) decides the order of the programs
    (interleaves). ``tiles`` replaces _tiles' choice (tuning scripts). Returns False, having written
    nothing, if this Triton cannot compile the kernel (warned once per configuration); the caller
    then runs the Triton kernel."""
    total_q, heads, head_dim = q.shape
    batch_size = q_offsets.numel() - 1
    fused = delta is None
    # A tuning script's tiles without VECTOR_RING (written before it existed) get the per-tile loads.
    tiles = {"VECTOR_RING": False, **tiles} if tiles else _tiles(head_dim, causal, fused)
    same = attention_hopper.same_offsets(q_offsets, k_offsets)
    interleave = interleaves(same, tiles, max_len)
    key = (head_dim, causal, q.dtype, fused, same, interleave, tuple(sorted(tiles.items())))
    if key in _FAILED:
        return False
    scan, stride = attention_hopper.scan_shape(batch_size, tiles["num_warps"])
    num_kv_slots = batch_size + k.shape[0] // tiles["KV_BLOCK_N"]
    num_q_slots = batch_size + total_q // tiles["Q_BLOCK_M"]
    kv_m, kv_n, q_m, q_n = tiles["KV_BLOCK_M"], tiles["KV_BLOCK_N"], tiles["Q_BLOCK_M"], tiles["Q_BLOCK_N"]
    # Each operand in the dK/dV programs' box and the dQ programs' box (one object, encoded once,
    # when the two agree).
    q_kv, q_q = attention_hopper.box_pair(q, kv_m, q_m)
    k_kv, k_q = attention_hopper.box_pair(k, kv_n, q_n)
    v_kv, v_q = attention_hopper.box_pair(v, kv_n, q_n)
    do_kv, do_q = attention_hopper.box_pair(do, kv_m, q_m)
    o_kv, o_q = attention_hopper.box_pair(out, kv_m, q_m) if fused else (do_kv, do_q)  # unread unless FUSED_DELTA
    try:
        _attention_backward_hopper_kernel[(num_kv_slots + num_q_slots, heads)](
            q_kv, k_kv, v_kv, do_kv, o_kv, q_q, k_q, v_q, do_q, o_q,
            lse, lse if fused else delta, dq, dk, dv, q_offsets, k_offsets, batch_size, num_kv_slots,
            scale * 1.4426950408889634, scale,
            dq.stride(0), dq.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0),
            CAUSAL=causal, HEAD_D=head_dim, SCAN=scan, STRIDE=stride, FUSED_DELTA=fused, SAME_OFFSETS=same,
            INTERLEAVE=interleave, **tiles)
    except _gluon.COMPILE_ERRORS as error:  # Gluon's API moves between releases
        return _gluon.compile_failed(_FAILED, key, "attention backward", error)
    return True
