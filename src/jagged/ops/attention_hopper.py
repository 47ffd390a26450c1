"""Jagged flash attention forward for Hopper (sm_90), written in Gluon: the Gluon kernel, its
launcher, and the rule for when the library's attention forward takes it.

The kernel computes what ops/attention.py's Triton forward computes for plain softmax attention
(no bias, dropout, HSTU mask or pointwise activation; a positive scale): each program owns one
block of BLOCK_M queries of one row and one head, and walks the row's keys in BLOCK_N tiles. It
returns the same output and base-2 log-sum-exp, so the Triton backward runs on its result. It
differs in how it moves data:

- Q, K and V tiles arrive by TMA (one instruction, no per-thread address or mask arithmetic)
  into a ring of shared-memory stages guarded by mbarriers; both matmuls are async wgmma.
- Only the tiles that need it are masked: the row's last key tile and the causal diagonal.
- The output leaves in 16-byte row-major vectors, after one layout conversion.

TMA loads whole boxes: the rows of a tile past a row's end come from the next row (or are
zeros past the tensor). Their scores are masked; their V rows are zeroed in shared memory before
the P V matmul, so a non-finite value in one row never reaches another row (0 * inf is NaN).
Queries past the row's end are computed and never stored.

H100, bf16, CUDA-graph replay, forward us against the Triton kernel (benchmarks/NOTES.md,
session 20): B=256 max_L=256 H=4 D=64 uniform 45.6 -> 40.7, skewed 24.4 -> 22.4, causal 41.9 ->
36.7; max_L=512 uniform 106.5 -> 95.8; D=32 H=8 57.7 -> 52.1; D=128 72.8 -> 66.0; B=64 max_L=1024
D=128 91 -> 77 (64-key tiles, softmax overlapped with the previous tile's P V).

Gluon's API moves between Triton releases (ops/_gluon.py): should a release fail to compile this
kernel, the launcher warns once and the library keeps the Triton kernel.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from . import _gluon
from ._gluon import (DTYPES as _DTYPES, TmaMatrix, fence_async_shared, gl, gluon, is_sm90 as _is_sm90,
                     mbarrier, warpgroup_mma, warpgroup_mma_wait)
from ._launch import fast_launch
from ._utils import TRITON_INTERPRETER, scan_shape as _scan_shape

# JAGGED_HOPPER_ATTENTION=0 keeps every call on the Triton kernel (A/B timing, tests).
ENABLED = os.environ.get("JAGGED_HOPPER_ATTENTION", "1") != "0"
_HEAD_DIMS = (32, 64, 128)
_FAILED: set = set()  # launch configurations this Triton failed to compile

if gluon is not None:
    _tma_load = _gluon.tma_load
    _cta_barrier = _gluon.cta_barrier
    _store_layout = _gluon.store_layout
    _mma_layout = _gluon.mma_layout

    @gluon.jit
    def _store_rows(ptr, acc, first, length, begin, stride_t, stride_h, head, HEAD_D: gl.constexpr,
                    num_warps: gl.constexpr):
        """Store a [BLOCK, HEAD_D] float32 accumulator as rows first.. of a row, head ``head``
        (16-byte vectors), the rows at or past ``length`` left out."""
        _gluon.store_rows(ptr, acc, first, length, begin, stride_t, head * stride_h, HEAD_D, HEAD_D, num_warps)

    @gluon.jit
    def _slot_row(offsets_ptr, slot, batch_size, BLOCK_M: gl.constexpr, SCAN: gl.constexpr, STRIDE: gl.constexpr,
                  num_warps: gl.constexpr):
        """ops/_rows.py: scan_row_block in Gluon: a work slot's row, the row's begin and length,
        and the slot's query block in the row, by one pass over all B + 1 offsets (int32). With
        STRIDE > 1 (more offsets than SCAN): two passes, one over every STRIDE-th offset, then one
        over the 2 * STRIDE that follow the last of those whose key is at most the slot (scan_shape)."""
        layout: gl.constexpr = gl.BlockedLayout([SCAN // (32 * num_warps)], [32], [num_warps], [0])
        index = gl.arange(0, SCAN, layout=layout) * STRIDE
        first = 0
        if STRIDE > 1:
            # A row's key (see ops/_rows.py: find_row) grows with the row: the keys at most the slot
            # are a prefix, and the last one of this sampled prefix begins the window holding the row.
            inside = index <= batch_size
            offsets = gl.load(offsets_ptr + index, mask=inside, other=0).to(gl.int32)
            first = (gl.sum((inside & (offsets // BLOCK_M + index <= slot)).to(gl.int32), 0) - 1) * STRIDE
            fine: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
            index = first + gl.arange(0, 2 * STRIDE, layout=fine)
        inside = index <= batch_size
        offsets = gl.load(offsets_ptr + index, mask=inside, other=0).to(gl.int32)
        below = inside & (offsets // BLOCK_M + index <= slot)
        row = first + gl.sum(below.to(gl.int32), 0) - 1
        begin = gl.max(gl.where(below, offsets, 0), 0)
        end = gl.min(gl.where(below | ~inside, 2147483647, offsets), 0)
        return row, begin, end - begin, slot - (begin // BLOCK_M + row)

    @gluon.jit
    def _key_span(k_offsets_ptr, row, q_begin, q_start, q_len, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr,
                  SAME_OFFSETS: gl.constexpr):
        """The keys of ``row`` that queries [q_start, q_start + BLOCK_M) see: the row's key begin
        and length, and the end of the keys any of them sees (causal: query i sees key
        j <= i + (L_k - L_q)). SAME_OFFSETS (self-attention): the query row's span, not loaded
        again (one memory round trip fewer before the first key tile can be requested)."""
        if SAME_OFFSETS:
            k_begin = q_begin
            k_len = q_len
        else:
            k_begin = gl.load(k_offsets_ptr + row).to(gl.int32)
            k_len = gl.load(k_offsets_ptr + row + 1).to(gl.int32) - k_begin
        end_n = k_len
        if CAUSAL:
            end_n = gl.minimum(k_len, gl.maximum(gl.minimum(q_start + BLOCK_M, q_len) + (k_len - q_len), 0))
        return k_begin, k_len, end_n

    @gluon.jit
    def _zero_rows_past(tile, first, length, HEAD_D: gl.constexpr, num_warps: gl.constexpr):
        """Zero the rows of a shared-memory tile [BLOCK, HEAD_D] that hold positions first + r at or
        past ``length`` (TMA brought them in from the next row). The caller fences and syncs."""
        layout: gl.constexpr = _store_layout(HEAD_D, num_warps)
        rows = first + gl.arange(0, tile.shape[0], layout=gl.SliceLayout(1, layout))
        values = tile.load(layout)
        tile.store(gl.where(gl.expand_dims(rows < length, 1), values, gl.zeros_like(values)))

    @gluon.jit
    def _load_pair(a_desc, b_desc, a_smem, b_smem, bars, tile, first_row, col, BLOCK: gl.constexpr,
                   STAGES: gl.constexpr):
        """TMA-load tile ``tile`` (rows first_row + tile * BLOCK on, columns col on) of two tensors
        into its stage of two rings, on the stage's mbarrier."""
        stage = tile % STAGES
        bar = bars.index(stage)
        mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes)
        _tma_load(a_desc, [first_row + tile * BLOCK, col], bar, a_smem.index(stage))
        _tma_load(b_desc, [first_row + tile * BLOCK, col], bar, b_smem.index(stage))

    @gluon.jit
    def _wait_kv(v_smem, bars, tile, k_len, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, STAGES: gl.constexpr,
                 num_warps: gl.constexpr):
        """Wait for a tile's K and V; in the row's last, partial tile zero the V rows past the
        row's end (they belong to the next row)."""
        stage = tile % STAGES
        mbarrier.wait(bars.index(stage), (tile // STAGES) & 1)
        if (tile + 1) * BLOCK_N > k_len:
            _zero_rows_past(v_smem.index(stage), tile * BLOCK_N, k_len, HEAD_D, num_warps)
            fence_async_shared()  # the generic-proxy writes before the wgmma's async-proxy read
            _cta_barrier()

    @gluon.jit
    def _mask_tile(s, tile, queries, k_len, q_len, s_layout: gl.constexpr, CAUSAL: gl.constexpr,
                   BLOCK_N: gl.constexpr):
        keys = tile * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        ok = gl.expand_dims(keys < k_len, 0)
        if CAUSAL:  # query i sees key j <= i + (L_k - L_q)
            ok = ok & (gl.expand_dims(keys, 0) <= gl.expand_dims(queries + (k_len - q_len), 1))
        return gl.where(ok, s, float("-inf"))

    @gluon.jit
    def _softmax_tile(qk, m_i, l_i, tile, queries, q_start, k_len, q_len, qk_scale, s_layout: gl.constexpr,
                      CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr):
        """The online softmax's step on a tile of raw q.k products: the weights, the factor that
        rescales the accumulator, and the new running max and sum (base 2; the scale applied in
        the exponent's fused multiply-add, as the Triton kernel's SCALE_IN_EXP)."""
        masked = (tile + 1) * BLOCK_N > k_len
        if CAUSAL:
            masked = masked | ((tile + 1) * BLOCK_N - 1 > q_start + (k_len - q_len))
        if masked:  # a uniform branch: most tiles of a row need no mask
            qk = _mask_tile(qk, tile, queries, k_len, q_len, s_layout, CAUSAL, BLOCK_N)
        m_new = gl.maximum(m_i, gl.max(qk, 1) * qk_scale)
        # A query with nothing visible yet keeps m = -inf; subtract 0 instead to avoid inf - inf.
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        w = gl.exp2(qk * qk_scale - gl.expand_dims(m_safe, 1))
        alpha = gl.exp2(m_i - m_safe)
        return w, alpha, m_new, l_i * alpha + gl.sum(w, 1)

    # Batch-varying integers are not specialised on (docs/design.md): no compile per batch.
    @fast_launch
    @gluon.jit(do_not_specialize=["batch_size", "stride_lh"])
    def _attention_forward_hopper_kernel(
        q_desc, k_desc, v_desc, o_ptr, lse_ptr, q_offsets_ptr, k_offsets_ptr, batch_size, qk_scale,
        stride_ot, stride_oh, stride_lh,
        CAUSAL: gl.constexpr, HEAD_D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr, SCAN: gl.constexpr, STRIDE: gl.constexpr, OVERLAP: gl.constexpr,
        SAME_OFFSETS: gl.constexpr, num_warps: gl.constexpr,
    ):
        head = gl.program_id(1)
        row, q_begin, q_len, block = _slot_row(q_offsets_ptr, gl.program_id(0), batch_size, BLOCK_M, SCAN, STRIDE,
                                               num_warps)
        if block * BLOCK_M >= q_len:  # a spare slot
            return
        q_start = block * BLOCK_M
        k_begin, k_len, end_n = _key_span(k_offsets_ptr, row, q_begin, q_start, q_len, CAUSAL, BLOCK_M, SAME_OFFSETS)
        n_tiles = gl.cdiv(end_n, BLOCK_N)
        col = head * HEAD_D

        s_layout: gl.constexpr = _mma_layout(num_warps, BLOCK_N)
        o_layout: gl.constexpr = _mma_layout(num_warps, HEAD_D)
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)

        q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        mbarrier.init(q_bar, count=1)

        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        _tma_load(q_desc, [q_begin + q_start, col], q_bar, q_smem)
        # The overlapped loop frees tile j-1's stage in iteration j and then loads tile
        # j-1+STAGES, so every stage starts full; the plain loop loads tile j+STAGES-1 first.
        PRELOAD: gl.constexpr = STAGES if OVERLAP else STAGES - 1
        for i in gl.static_range(PRELOAD):
            if i < n_tiles:
                _load_pair(k_desc, v_desc, k_smem, v_smem, bars, i, k_begin, col, BLOCK_N, STAGES)

        queries = q_start + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
        acc = gl.zeros([BLOCK_M, HEAD_D], gl.float32, layout=o_layout)
        qk_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
        mbarrier.wait(q_bar, 0)

        if OVERLAP:
            # FA3's in-warpgroup pipelining: tile j's q k^T and tile j-1's P V run on the tensor
            # cores while this warpgroup's softmax works on tile j.
            if n_tiles > 0:
                _wait_kv(v_smem, bars, 0, k_len, BLOCK_N, HEAD_D, STAGES, num_warps)
                qk = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), qk_zero, use_acc=False, is_async=True)
                qk = warpgroup_mma_wait(0, deps=(qk, ))
                w, alpha, m_i, l_i = _softmax_tile(qk, m_i, l_i, 0, queries, q_start, k_len, q_len, qk_scale,
                                                   s_layout, CAUSAL, BLOCK_N)
                p = gl.convert_layout(w.to(q_desc.dtype), p_layout)
                for j in range(1, n_tiles):
                    _wait_kv(v_smem, bars, j, k_len, BLOCK_N, HEAD_D, STAGES, num_warps)
                    qk = warpgroup_mma(q_smem, k_smem.index(j % STAGES).permute((1, 0)), qk_zero, use_acc=False,
                                       is_async=True)
                    acc = warpgroup_mma(p, v_smem.index((j - 1) % STAGES), acc, is_async=True)
                    qk = warpgroup_mma_wait(1, deps=(qk, ))
                    w, alpha, m_i, l_i = _softmax_tile(qk, m_i, l_i, j, queries, q_start, k_len, q_len, qk_scale,
                                                       s_layout, CAUSAL, BLOCK_N)
                    p = gl.convert_layout(w.to(q_desc.dtype), p_layout)
                    acc = warpgroup_mma_wait(0, deps=(acc, ))
                    acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
                    if j - 1 + STAGES < n_tiles:
                        _load_pair(k_desc, v_desc, k_smem, v_smem, bars, j - 1 + STAGES, k_begin, col, BLOCK_N, STAGES)
                acc = warpgroup_mma(p, v_smem.index((n_tiles - 1) % STAGES), acc, is_async=True)
                acc = warpgroup_mma_wait(0, deps=(acc, ))
        else:
            for j in range(n_tiles):
                if j + STAGES - 1 < n_tiles:
                    _load_pair(k_desc, v_desc, k_smem, v_smem, bars, j + STAGES - 1, k_begin, col, BLOCK_N, STAGES)
                _wait_kv(v_smem, bars, j, k_len, BLOCK_N, HEAD_D, STAGES, num_warps)
                qk = warpgroup_mma(q_smem, k_smem.index(j % STAGES).permute((1, 0)), qk_zero, use_acc=False,
                                   is_async=True)
                qk = warpgroup_mma_wait(0, deps=(qk, ))
                w, alpha, m_i, l_i = _softmax_tile(qk, m_i, l_i, j, queries, q_start, k_len, q_len, qk_scale,
                                                   s_layout, CAUSAL, BLOCK_N)
                p = gl.convert_layout(w.to(q_desc.dtype), p_layout)
                acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
                acc = warpgroup_mma(p, v_smem.index(j % STAGES), acc, is_async=True)
                acc = warpgroup_mma_wait(0, deps=(acc, ))

        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))
        mbarrier.invalidate(q_bar)

        seen = l_i > 0
        # +inf for a query that saw nothing: the backward's exp2(s - lse) is then exactly 0.
        lse = gl.where(seen, m_i + gl.log2(gl.where(seen, l_i, 1.0)), float("inf"))
        gl.store(lse_ptr + head * stride_lh + q_begin + queries, lse, mask=queries < q_len)
        inverse = gl.convert_layout(1.0 / gl.where(seen, l_i, 1.0), gl.SliceLayout(1, o_layout))
        _store_rows(o_ptr, acc * gl.expand_dims(inverse, 1), q_start, q_len, q_begin, stride_ot, stride_oh, head,
                    HEAD_D, num_warps)


def _tiles(head_dim: int, max_len: Optional[int], causal: bool, mean_len: float) -> dict:
    """Tiles by head dim, longest row and mean row length (H100, graph replay, benchmarks/NOTES.md
    sessions 20, 23 and 28). Rows up to 512: 32-key tiles without overlap (D=64 max_L=256 uniform
    40.7 us vs 44.6 with 64-key tiles overlapped), 3 stages at D <= 64 and 2 at D=128 (B=256
    max_L=256 D=128 uniform 66.0 -> 64.2 us, max_L=512 162 -> 152); 128-query tiles on 8 warps lose
    there (41.4 -> 47.2 us). Longer rows: 64-key tiles; when rows are long on average (``mean_len``
    >= 512) and not causal, 128-query tiles on 8 warps, two warpgroups sharing each K/V tile
    (B=64 max_L=4096 D=64 uniform 1078 -> 999 us, B=16 max_L=4096 D=128 441 -> 400); causal rows
    and rows of mixed lengths keep 64-query tiles (causal max_L=1024 D=64 206 -> 225 with 128;
    B=64 max_L=2048 skewed, mean 430, 95 against 102), overlapped at D=128 (B=64 max_L=1024 77 vs
    86 us), not at D <= 64."""
    if max_len is not None and max_len <= 512:
        return dict(BLOCK_M=64, BLOCK_N=32, STAGES=2 if head_dim == 128 else 3, OVERLAP=False, num_warps=4)
    if not causal and mean_len >= 512 and head_dim >= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, STAGES=2, OVERLAP=False, num_warps=8)
    return dict(BLOCK_M=64, BLOCK_N=64, STAGES=3, OVERLAP=head_dim == 128, num_warps=4)


def scan_shape(batch_size: int, num_warps: int, total: int = 0) -> tuple:
    """_slot_row's SCAN and STRIDE (ops/_utils.py: scan_shape, at least one offset a thread).
    Over 511 rows (4 warps) two passes; before those, such batches ran the Triton kernels (H100,
    B=1024 max_L=256 D=64: forward+backward 508 us against their 641; benchmarks/NOTES.md, session
    25). (0, 1) past 32767 rows or 2^31 tokens: those calls keep the Triton kernels."""
    return _scan_shape(batch_size, num_warps, total, min_width=32 * num_warps)


def _tma_ready(x: torch.Tensor) -> bool:
    """[T, H, D] that TMA can read as a [T, H * D] matrix: heads adjacent, 16-byte aligned rows.
    (Each attribute read once: this runs on every eager call, 2.7 -> 1 us on the H100's host.)"""
    _, heads, dim = x.shape
    stride_t, stride_h, stride_d = x.stride()
    return (stride_d == 1 and (stride_h == dim or heads == 1) and stride_t * x.element_size() % 16 == 0
            and x.data_ptr() % 16 == 0 and stride_t >= heads * dim)


def hopper_inputs_supported(tensors: tuple, q_offsets: torch.Tensor, scale: float, plain_softmax: bool,
                            int32_offsets: bool, enabled: bool) -> bool:
    """What both Hopper attention kernels (this forward, attention_hopper_backward) need of their
    (validated) inputs: Gluon, an sm_90 GPU, plain softmax with a positive scale, ``tensors`` (q,
    k, v first; [T, H, D]) 16-bit of one dtype and one head dim in 32/64/128 and TMA-readable, at
    most 32767 rows (the two-pass row scan: scan_shape), at least one key, and every element offset the kernels form in
    int32 within range (``int32_offsets``: ops/attention.py's _int32_offsets)."""
    if gluon is None or not enabled or TRITON_INTERPRETER or not plain_softmax or not scale > 0:
        return False
    q, k = tensors[0], tensors[1]
    if not int32_offsets or not q.is_cuda:
        return False
    dtype, (total_q, _, head_dim), total_k = q.dtype, q.shape, k.shape[0]
    if dtype not in _DTYPES or head_dim not in _HEAD_DIMS or total_k == 0:  # a TMA descriptor needs a key
        return False
    for x in tensors:
        if x.dtype != dtype or x.shape[2] != head_dim or not _tma_ready(x):
            return False
    if scan_shape(q_offsets.numel() - 1, 4, max(total_q, total_k))[0] == 0:
        return False
    return _is_sm90(q.device)


def hopper_forward_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offsets: torch.Tensor,
                             scale: float, max_len: Optional[int], plain_softmax: bool, int32_offsets: bool) -> bool:
    """Whether the attention forward of these (validated) inputs runs on the Gluon kernel: what
    hopper_inputs_supported asks, and the shapes it was measured faster on (at D <= 64 max_len
    known: its tiles depend on it; max_len <= 128 at D=32 keeps the Triton kernel's 32 x 16
    tiles)."""
    head_dim = q.shape[2]
    if head_dim <= 64 and (max_len is None or (head_dim <= 32 and max_len <= 128)):
        return False
    return hopper_inputs_supported((q, k, v), q_offsets, scale, plain_softmax, int32_offsets, ENABLED)


def same_offsets(q_offsets: torch.Tensor, k_offsets: torch.Tensor) -> bool:
    """Whether the query and key offsets are one tensor (self-attention): the kernels' SAME_OFFSETS."""
    if q_offsets is k_offsets:
        return True
    return (q_offsets.data_ptr() == k_offsets.data_ptr() and q_offsets.dtype == k_offsets.dtype
            and q_offsets.shape == k_offsets.shape and q_offsets.stride() == k_offsets.stride())


def _descriptor(x: torch.Tensor, block: tuple) -> TmaMatrix:
    """The TMA descriptor argument of [T, H, D] ``x`` as the matrix [T, H * D] with boxes ``block``
    (_tma_ready has checked it; every caller has T > 0)."""
    tokens, heads, dim = x.shape
    return TmaMatrix(x, tokens, heads * dim, x.stride(0), block)


def box_pair(x: torch.Tensor, rows_a: int, rows_b: int) -> tuple:
    """_descriptor of ``x`` with boxes of ``rows_a`` and of ``rows_b`` rows (D columns): one object
    twice when they agree (the launch then encodes it once)."""
    a = _descriptor(x, (rows_a, x.shape[2]))
    return a, a if rows_b == rows_a else TmaMatrix(x, a.rows, a.cols, a.row_stride, (rows_b, x.shape[2]))


def attention_forward_hopper(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offsets: torch.Tensor,
                             k_offsets: torch.Tensor, causal: bool, scale: float, max_len: Optional[int],
                             out: torch.Tensor, lse: torch.Tensor) -> bool:
    """Fill ``out`` [T_q, H, D] and ``lse`` [H, T_q] (base 2) for inputs that
    hopper_forward_supported accepted. Returns False, having written nothing, if this Triton
    cannot compile the kernel (warned once per configuration); the caller then runs the Triton
    kernel."""
    total_q, heads, head_dim = q.shape
    batch_size = q_offsets.numel() - 1
    tiles = _tiles(head_dim, max_len, causal, total_q / max(batch_size, 1))
    same = same_offsets(q_offsets, k_offsets)
    key = (head_dim, causal, q.dtype, same, tuple(sorted(tiles.items())))
    if key in _FAILED:
        return False
    scan, stride = scan_shape(batch_size, tiles["num_warps"])
    grid = (batch_size + total_q // tiles["BLOCK_M"], heads)
    try:
        _attention_forward_hopper_kernel[grid](
            _descriptor(q, (tiles["BLOCK_M"], head_dim)), _descriptor(k, (tiles["BLOCK_N"], head_dim)),
            _descriptor(v, (tiles["BLOCK_N"], head_dim)), out, lse, q_offsets, k_offsets, batch_size,
            scale * 1.4426950408889634, out.stride(0), out.stride(1), lse.stride(0),
            CAUSAL=causal, HEAD_D=head_dim, SCAN=scan, STRIDE=stride, SAME_OFFSETS=same, **tiles)
    except _gluon.COMPILE_ERRORS as error:  # Gluon's API moves between releases
        return _gluon.compile_failed(_FAILED, key, "attention forward", error)
    return True
