"""jagged_dense_bmm for Hopper (sm_90), written in Gluon: the kernel, its launcher, and the rule
for when ops/bmm.py's jagged_dense_bmm (forward, and its dx = dout y^T) takes it.

The kernel computes what ops/bmm.py's Triton kernel computes, with the same work slots: one
program per block of BLOCK_M tokens of one row, all N output columns (N <= 256), the row's own
[K, N] matrix. It differs in how data moves: x and y tiles arrive by TMA into a ring of
shared-memory stages guarded by mbarriers (y read as the matrix [B * K, N], or for a transposed
y, the [B * N, K] it is a view of), the matmul is an async wgmma, and the output leaves in
16-byte row vectors. TMA reads a row's last x tile whole, taking in tokens of the next row: their
output rows are computed and never stored, and no other output row reads them.

H100, bf16, CUDA-graph replay (benchmarks/NOTES.md, session 22), TFLOP/s, Triton -> Gluon:
B=1024 max_L=512 D=128 skewed 85.7 -> 89.0, uniform 121 -> 129; B=256 max_L=1024 D=256 skewed 150
-> 157, uniform 230 -> 236; dx (y transposed) at D=128 78 -> 89 and 110 -> 129. At D=128 skewed the
kernel moves its 88.5 MB faster than torch's copy of as many bytes (39.6 vs 42.5 us).
"""

from __future__ import annotations

import functools
import os

import torch

from . import _gluon
from ._gluon import DTYPES, TmaMatrix, gl, gluon, is_sm90, mbarrier, warpgroup_mma, warpgroup_mma_wait
from ._launch import fast_launch
from ._utils import TRITON_INTERPRETER, next_power_of_2, slot_search

# JAGGED_HOPPER_BMM=0 keeps every jagged_dense_bmm on the Triton kernel.
ENABLED = os.environ.get("JAGGED_HOPPER_BMM", "1") != "0"
_FAILED: set = set()
MAX_N = 256  # one column block: the wgmma's widest tile
BLOCK_M = 64
# Calls that move fewer bytes (x, y, out) stay on the Triton kernel: below ~24 MB (a ~10 us kernel)
# the Gluon kernel saves under a microsecond of GPU time, and its launch cost ~15-25 us more host
# time (session 22: Triton's launcher encoded the TMA descriptors through Python on every call;
# since session 26 ops/_launch.py encodes them directly, 2 a call). H100, B=512 max_L=256 D=64
# (20 MB): graph 14.9 -> 14.1 us, but eager (triton.testing.do_bench) 36 -> 11 TFLOP/s then
# (benchmarks/NOTES.md, session 22).
MIN_BYTES = 24 << 20

if gluon is not None:
    _tma_load = _gluon.tma_load
    _store_rows = _gluon.store_rows
    _mma_layout = _gluon.mma_layout

    @gluon.jit
    def _find_slot_row(offsets_ptr, slot, batch_size, search_stride, BLOCK: gl.constexpr, num_warps: gl.constexpr):
        """ops/_rows.py: find_slot_row (the 32-way search: 32 keys a level, 2 levels up to B =
        1024) and row_block in Gluon, int32: a work slot's row, the row's begin and length, and
        the slot's block in the row."""
        layout: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
        lane = gl.arange(0, 32, layout=layout)
        lo = slot * 0
        stride = search_stride
        while stride > 0:
            probe = lo + lane * stride
            inside = probe < batch_size
            key = gl.load(offsets_ptr + probe, mask=inside, other=0).to(gl.int32) // BLOCK + probe
            # Keys do not decrease, so the probes <= slot are a prefix (probe 0 = lo always is one).
            lo += (gl.sum((inside & (key <= slot)).to(gl.int32), 0) - 1) * stride
            stride = stride // 32
        begin = gl.load(offsets_ptr + lo).to(gl.int32)
        length = gl.load(offsets_ptr + lo + 1).to(gl.int32) - begin
        return lo, begin, length, slot - (begin // BLOCK + lo)

    @gluon.jit
    def _load_k_tile(x_desc, y_desc, x_smem, y_smem, bars, i, x_row, y_row, BLOCK_K: gl.constexpr,
                     STAGES: gl.constexpr, Y_TRANSPOSED: gl.constexpr):
        """TMA-load the i-th BLOCK_K slice of the reduction (x's columns, y's rows) into its stage."""
        stage = i % STAGES
        bar = bars.index(stage)
        mbarrier.expect(bar, x_desc.block_type.nbytes + y_desc.block_type.nbytes)
        _tma_load(x_desc, [x_row, i * BLOCK_K], bar, x_smem.index(stage))
        if Y_TRANSPOSED:  # y^T's rows: [N, BLOCK_K] boxes of the [B * N, K] matrix
            _tma_load(y_desc, [y_row, i * BLOCK_K], bar, y_smem.index(stage))
        else:
            _tma_load(y_desc, [y_row + i * BLOCK_K, 0], bar, y_smem.index(stage))

    @fast_launch
    @gluon.jit(do_not_specialize=["batch_size", "search_stride"])  # batch-varying (docs/design.md)
    def _jagged_dense_bmm_hopper_kernel(
        x_desc, y_desc, out_ptr, offsets_ptr, batch_size, search_stride, stride_ot,
        K: gl.constexpr, N: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
        STAGES: gl.constexpr, Y_TRANSPOSED: gl.constexpr, num_warps: gl.constexpr,
    ):
        row, begin, length, block = _find_slot_row(offsets_ptr, gl.program_id(0), batch_size, search_stride, BLOCK_M,
                                                   num_warps)
        if block * BLOCK_M < length:  # else a spare slot
            K_TILES: gl.constexpr = K // BLOCK_K
            x_row = begin + block * BLOCK_M
            y_row = row * (N if Y_TRANSPOSED else K)
            x_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
            y_smem = gl.allocate_shared_memory(y_desc.dtype, [STAGES] + y_desc.block_type.shape, y_desc.layout)
            bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            for i in gl.static_range(STAGES):
                mbarrier.init(bars.index(i), count=1)
            for i in gl.static_range(STAGES):
                _load_k_tile(x_desc, y_desc, x_smem, y_smem, bars, i, x_row, y_row, BLOCK_K, STAGES, Y_TRANSPOSED)
            acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=_mma_layout(num_warps, BLOCK_N))
            for i in gl.static_range(K_TILES):
                stage = i % STAGES
                mbarrier.wait(bars.index(stage), (i // STAGES) & 1)
                if Y_TRANSPOSED:
                    y_tile = y_smem.index(stage).permute((1, 0))
                else:
                    y_tile = y_smem.index(stage)
                acc = warpgroup_mma(x_smem.index(stage), y_tile, acc, is_async=True)
                if i + STAGES < K_TILES:  # the stage is refilled once its wgmma has read it
                    acc = warpgroup_mma_wait(0, deps=(acc, ))
                    _load_k_tile(x_desc, y_desc, x_smem, y_smem, bars, i + STAGES, x_row, y_row, BLOCK_K, STAGES,
                                 Y_TRANSPOSED)
            acc = warpgroup_mma_wait(0, deps=(acc, ))
            for i in gl.static_range(STAGES):
                mbarrier.invalidate(bars.index(i))
            # int64 positions: T * N may pass 2^31
            _store_rows(out_ptr, acc, block * BLOCK_M, length, begin.to(gl.int64), stride_ot, 0, BLOCK_N, N, num_warps)


@functools.lru_cache(maxsize=None)
def _tiles(k_dim: int, n_dim: int) -> dict:
    """64 tokens x all N columns (a power of two >= N), K in slices of 64 (or the largest of 32 and
    16 that divides it) through 2 stages, one warpgroup. H100, bf16 (benchmarks/NOTES.md session
    22): at D=128 the two slices are the whole reduction; at D=256 2 stages of 64 beat 4 of 32
    (157 vs 155 TFLOP/s skewed) and 128-token tiles with 8 warps (144)."""
    block_k = 64 if k_dim % 64 == 0 else 32 if k_dim % 32 == 0 else 16
    return dict(BLOCK_M=BLOCK_M, BLOCK_N=max(next_power_of_2(n_dim), 16), BLOCK_K=block_k,
                STAGES=min(2, k_dim // block_k), num_warps=4)


def _y_matrix(x: torch.Tensor, y: torch.Tensor, offsets: torch.Tensor):
    """How the kernel reads y, or None if it cannot take the call (see hopper_bmm_supported):
    (transposed, rows of the 2-D matrix it reads, their stride). y[b] is read as rows b * K.. of a
    [B * K, N] matrix, or, transposed (y[b] = m[b]^T for a [B, N, K] m), rows b * N.. of a
    [B * N, K] one."""
    if x.dtype not in DTYPES or not x.is_cuda or offsets.numel() >= 2 ** 30:
        return None
    (total, k_dim), (batch_size, _, n_dim) = x.shape, y.shape
    (x_row, x_col), (y_batch, y_row, y_col) = x.stride(), y.stride()
    if k_dim % 16 or k_dim == 0 or n_dim % 8 or n_dim > MAX_N or total == 0 or x_col != 1 or x_row % 8 \
            or x_row < k_dim:
        return None
    if (total * (k_dim + n_dim) + batch_size * k_dim * n_dim) * 2 < MIN_BYTES:
        return None
    transposed = y_col != 1
    inner, rows, row_stride = (y_row, n_dim, y_col) if transposed else (y_col, k_dim, y_row)
    if inner != 1 or row_stride % 8 or (batch_size > 1 and y_batch != rows * row_stride):
        return None
    if x.data_ptr() % 16 or y.data_ptr() % 16 or total >= 2 ** 31 - 2 * BLOCK_M or batch_size * rows >= 2 ** 31:
        return None
    if gluon is None or not ENABLED or TRITON_INTERPRETER or not is_sm90(x.device):
        return None
    return transposed, batch_size * rows, row_stride


def hopper_bmm_supported(x: torch.Tensor, y: torch.Tensor, offsets: torch.Tensor) -> bool:
    """Whether jagged_dense_bmm of these (validated) operands runs on the Gluon kernel: Gluon, an
    sm_90 GPU, 16-bit x and y, at least MIN_BYTES to move, K a positive multiple of 16, N a
    multiple of 8 up to 256, TMA-readable operands (x rows and y's matrix rows 16-byte aligned
    with unit stride; y's B matrices one after another, row-major or transposed), and every
    coordinate and position within int32."""
    return _y_matrix(x, y, offsets) is not None


def jagged_dense_bmm_hopper(x: torch.Tensor, y: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor) -> bool:
    """Fill ``out`` [T, N] with each row's x block times its y matrix, if hopper_bmm_supported
    accepts the operands and this Triton compiles the kernel (else it warns once per
    configuration). Returns whether it did; if not, it wrote nothing and the caller runs the
    Triton kernel. One function, so that the host checks the operands once (eager calls are
    host-bound at the sizes where the kernel takes 50-70 us)."""
    matrix = _y_matrix(x, y, offsets)
    if matrix is None:
        return False
    batch_size = offsets.numel() - 1
    transposed, y_rows, y_row_stride = matrix
    (total, k_dim), n_dim = x.shape, y.shape[2]
    tiles = _tiles(k_dim, n_dim)
    key = (k_dim, n_dim, x.dtype, transposed)
    if key in _FAILED:
        return False
    block_n, block_k = tiles["BLOCK_N"], tiles["BLOCK_K"]
    y_desc = TmaMatrix(y, y_rows, k_dim if transposed else n_dim, y_row_stride,
                       (block_n, block_k) if transposed else (block_k, block_n))
    x_desc = TmaMatrix(x, total, k_dim, x.stride(0), (BLOCK_M, block_k))
    try:
        _jagged_dense_bmm_hopper_kernel[(batch_size + total // BLOCK_M,)](
            x_desc, y_desc, out, offsets, batch_size, slot_search(batch_size), out.stride(0),
            K=k_dim, N=n_dim, Y_TRANSPOSED=transposed, **tiles)
    except _gluon.COMPILE_ERRORS as error:  # Gluon's API moves between releases
        return _gluon.compile_failed(_FAILED, key, "jagged_dense_bmm", error)
    return True
