"""Gluon (Hopper, sm_90) pieces shared by the library's Gluon kernels (ops/attention_hopper.py,
ops/attention_hopper_backward.py, ops/bmm_hopper.py): Triton's Gluon modules (``gluon`` is None
without them), the TMA load, cp.async and CTA barrier under each Triton release's name, the wgmma
and store layouts, the 16-byte row store, TMA descriptors, and the sm_90 test.

Gluon is Triton's experimental layer and its API has changed between releases (Triton 3.6 names
the TMA load ``async_copy_global_to_shared``, 3.9 ``async_load``): every launcher catches a
failed compile, warns once and leaves the call to its Triton kernel.
"""

from __future__ import annotations

import warnings

import torch
import triton
from triton.compiler.errors import CompilationError

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # a Triton without Gluon: the Triton kernels serve every call
    gluon = gl = async_copy = fence_async_shared = mbarrier = tma = warpgroup_mma = warpgroup_mma_wait = None
    TensorDescriptor = None

DTYPES = (torch.bfloat16, torch.float16)
# What a Gluon kernel's first launch raises when this Triton's Gluon API differs from the one the
# kernel was written for.
COMPILE_ERRORS = (CompilationError, AttributeError, TypeError, ValueError)


def compile_failed(failed: set, key, kernel_name: str, error: Exception) -> bool:
    """Record that launch configuration ``key`` of a Gluon kernel did not compile (it is not tried
    again) and warn once: the caller keeps the library working on its Triton kernel. Returns
    False (the launcher's "not served")."""
    failed.add(key)
    warnings.warn(f"jagged: the Hopper {kernel_name} kernel did not compile with Triton {triton.__version__} "
                  f"({type(error).__name__}: {str(error)[:200]}); using the Triton kernel", RuntimeWarning,
                  stacklevel=4)
    return False


if gluon is not None:
    tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
    # cp.async (per-thread global -> shared copies, any 4-byte alignment, masked lanes zero-filled),
    # and the arrive on an mbarrier once a thread's copies have landed: 3.9 / 3.6 names.
    async_load = async_copy.async_load if hasattr(async_copy, "async_load") else async_copy.async_copy_global_to_shared
    async_copy_arrive = async_copy.mbarrier_arrive
    cta_barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier  # 3.9 / 3.6 names

    @gluon.constexpr_function
    def store_layout(columns, num_warps):
        # 8 elements (16 bytes) a thread, a warp's threads along whole rows
        per_row = min(columns // 8, 32)
        return gl.BlockedLayout([1, 8], [32 // per_row, per_row], [num_warps, 1], [1, 0])

    @gluon.constexpr_function
    def mma_layout(num_warps, columns):
        """The wgmma accumulator layout of a [16 * num_warps, columns] tile."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, columns, 16])

    @gluon.jit
    def store_rows(ptr, acc, first, length, begin, stride_t, col, BLOCK: gl.constexpr, N_COLS: gl.constexpr,
                   num_warps: gl.constexpr):
        """Store a [rows, BLOCK] float32 accumulator in 16-byte vectors: tile row r as row
        ``begin + first + r`` (stride ``stride_t``), from column ``col`` on; the rows at or past
        ``length`` (first + r >= length) and the tile columns at or past N_COLS left out."""
        layout: gl.constexpr = store_layout(BLOCK, num_warps)
        values = gl.convert_layout(acc.to(ptr.dtype.element_ty), layout)
        rows = first + gl.arange(0, acc.shape[0], layout=gl.SliceLayout(1, layout))
        cols = gl.arange(0, BLOCK, layout=gl.SliceLayout(0, layout))
        offs = gl.expand_dims((begin + rows) * stride_t + col, 1) + gl.expand_dims(cols, 0)
        mask = gl.expand_dims(rows < length, 1)
        if N_COLS < BLOCK:
            mask = mask & gl.expand_dims(cols < N_COLS, 0)
        gl.store(ptr + offs, values, mask=mask)


_SM90: dict = {}


def is_sm90(device: torch.device) -> bool:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM90:
        _SM90[index] = torch.cuda.get_device_capability(index)[0] == 9
    return _SM90[index]


_TEMPLATES: dict = {}


class TmaMatrix:
    """A Gluon kernel's TMA-descriptor argument, as the launcher describes it: the matrix ``rows``
    x ``cols`` at ``base``'s data, rows ``row_stride`` elements apart, unit column stride, read in
    ``block`` boxes (a tuple). ops/_launch.py keys it by dtype and block (what Triton compiles
    for), and on Triton 3.6 encodes it straight into the launch (no TensorDescriptor object, no
    per-argument pass of Triton's launcher: benchmarks/NOTES.md, session 26); elsewhere it becomes
    the TensorDescriptor of :meth:`descriptor`. The callers have checked alignment and strides,
    and rows > 0."""

    __slots__ = ("base", "rows", "cols", "row_stride", "block")

    def __init__(self, base: torch.Tensor, rows: int, cols: int, row_stride: int, block: tuple):
        self.base, self.rows, self.cols, self.row_stride, self.block = base, rows, cols, row_stride, block

    def descriptor(self) -> "TensorDescriptor":
        return matrix_descriptor(self.base, [self.rows, self.cols], self.row_stride, list(self.block))


def matrix_descriptor(base: torch.Tensor, shape: list, row_stride: int, block: list) -> "TensorDescriptor":
    """A TMA descriptor of the matrix ``shape`` (rows, columns) at ``base``'s data, rows
    ``row_stride`` elements apart, unit column stride, with boxes ``block``. The first one of a
    dtype and block is built (and validated) by TensorDescriptor; later ones copy it with the new
    tensor, shape and strides, skipping the validation (about 3 us a descriptor on the CPU
    machine, several a call): the callers have checked alignment and strides, and shape[0] > 0."""
    key = (base.dtype, *block)
    strides = [row_stride, 1]
    template = _TEMPLATES.get(key)
    if template is None:
        element = gl.bfloat16 if base.dtype == torch.bfloat16 else gl.float16
        descriptor = TensorDescriptor(base, shape, strides, block,
                                      gl.NVMMASharedLayout.get_default_for(block, element))
        template = _TEMPLATES[key] = object.__new__(TensorDescriptor)
        template.__dict__.update(descriptor.__dict__, base=None)  # no reference kept to base
        return descriptor
    descriptor = object.__new__(TensorDescriptor)
    descriptor.__dict__.update(template.__dict__)
    descriptor.base, descriptor.shape, descriptor.strides = base, shape, strides
    return descriptor
