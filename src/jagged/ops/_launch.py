"""Launching Triton kernels with less host time.

Triton's ``kernel[grid](*args)`` binds and specialises every argument on every call before it
finds the compiled kernel: on the H100 machine's host ~20 us for a 16-argument kernel, of which
the launch itself is ~7 us (benchmarks/NOTES.md, session 12). At recommendation-model sizes that
is as long as the kernel runs. ``fast_launch`` keeps, for each kernel, the compiled kernels
Triton's own launch returned, keyed by everything Triton specialises on, and launches a kept
one with the arguments Triton's launch would pass it.

The key tells apart every pair of calls that Triton could compile differently, and more:
constexpr arguments and launch options (``num_warps``, ...) by value; tensors by dtype and
16-byte alignment; TMA tensor descriptors, and the TmaMatrix arguments that stand for them
(ops/_gluon.py), by dtype and block shape (plus layout and padding for descriptors); ints by
``== 1``, divisibility by 16 and width (Triton's i32 / i64 / u64); bools by value; floats by
kind; anything else (None, str, dtypes) by value. A finer key than Triton's only means a few
more first calls through Triton's path, never a wrong kernel. A key seen for the first time, a
grid given as a function, and the interpreter take Triton's path.

How a kept kernel is launched (benchmarks/NOTES.md, session 26):

- On Triton 3.6's CUDA launcher (the GPU image's), directly (``_DirectLaunch``): its generated C
  launcher is called with the arguments its Python layer would pass, each TmaMatrix encoded by
  Triton's own ``fill_tma_descriptor``. That skips building TensorDescriptor objects, the
  per-argument pass of Triton's descriptor wrapper and, while no launch hook is set, the launch
  metadata Triton 3.6 builds on every launch because its hooks are (empty) chains, never None.
  Host time per eager call on the H100 machine: attention forward -26%, backward -35%,
  jagged_dense_bmm -23%, jagged_softmax -12%.
- Otherwise (another Triton, or a launch hook set: profilers still see every launch), through the
  compiled kernel's ``run`` with hooks and metadata, as ``CompiledKernel[grid]`` does.

Not re-read on every call, unlike Triton's own launch: ``TRITON_DEBUG`` and the instrumentation
mode, so set them before a kernel's first launch in the process.
"""

from __future__ import annotations

import os
import threading

import torch

from ._gluon import TmaMatrix
from ._utils import TRITON_INTERPRETER

try:  # Triton >= 3.3 (knobs); older releases keep Triton's own launch path
    from triton import knobs as _knobs
    from triton.runtime.driver import driver as _driver
except ImportError:  # pragma: no cover - depends on the installed Triton
    _knobs = None

# Kept compiled kernels per kernel; beyond this many keys, calls take Triton's path.
MAX_KEPT = 256
_INT32_MIN, _INT32_MAX, _UINT64_FROM = -(2 ** 31), 2 ** 31 - 1, 2 ** 63


def argument_key(value):
    """What a runtime (not constexpr) argument contributes to the cache key (see module doc)."""
    kind = type(value)
    if kind is int:
        return ((value == 1) | (value % 16 == 0) << 1 | (_INT32_MIN <= value <= _INT32_MAX) << 2
                | (value >= _UINT64_FROM) << 3)
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    if kind is float:
        return float
    if kind is bool:
        return bool, value
    if kind is TmaMatrix:  # compiled as the TensorDescriptor it stands for (below)
        return TmaMatrix, value.base.dtype, value.block
    block_shape = getattr(value, "block_shape", None)
    if block_shape is not None:  # a TMA tensor descriptor: Triton specialises on its type only
        return (kind, value.base.dtype, value.base.data_ptr() % 16 == 0, tuple(block_shape),
                getattr(value, "layout", None), getattr(value, "padding", None))
    return value


class FastLaunch:
    """A ``@triton.jit`` kernel launched as ``kernel[grid](*args, **kwargs)``, with the host
    work of repeated launches cut (module doc). Other attributes are the kernel's. ``keep=False``
    (JAGGED_FAST_LAUNCH=0): every call takes Triton's path, TmaMatrix arguments made
    TensorDescriptors first."""

    def __init__(self, kernel, keep: bool = True):
        self.kernel = kernel
        params = kernel.params
        self._constexpr = tuple(p.is_constexpr for p in params)
        self._slots = {p.name: (i, p.is_constexpr) for i, p in enumerate(params)}
        self._defaults = tuple(p.default for p in params)
        self._kept = {}
        self._keep = keep

    def __getattr__(self, name):
        return getattr(self.kernel, name)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    def _launch(self, grid, args, kwargs):
        if type(grid) is not tuple or not self._keep:
            return _triton_launch(self.kernel, grid, args, kwargs)
        device = _driver.active.get_current_device()
        constexpr, slots = self._constexpr, self._slots
        key = [device, len(args)]
        for i, value in enumerate(args):
            kind = type(value)
            if constexpr[i]:
                key.append(value)
            elif kind is torch.Tensor:  # the common kinds inlined (this runs per argument per call)
                key.append((value.dtype, value.data_ptr() % 16 == 0))
            elif kind is TmaMatrix:
                key.append((TmaMatrix, value.base.dtype, value.block))
            else:
                key.append(argument_key(value))
        for name, value in kwargs.items():
            slot = slots.get(name)
            key.append(name)
            key.append(value if slot is None or slot[1] else argument_key(value))
        key = tuple(key)
        kept = self._kept.get(key)
        if kept is None:
            return self._first_launch(key, grid, args, kwargs)
        compiled, positions, direct, matrices = kept
        bound = list(self._defaults)
        bound[:len(args)] = args
        for position, value in zip(positions, kwargs.values()):
            if position is not None:
                bound[position] = value
        stream = _driver.active.get_current_stream(device)
        grid3 = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
        if matrices and device not in _CONTEXTS.__dict__:
            bind_cuda_context(device)
        runtime = _knobs.runtime
        enter_hook, exit_hook = runtime.launch_enter_hook, runtime.launch_exit_hook
        # No launch hook: None, or (Triton 3.6) an empty HookChain; a plain function is a hook.
        if direct is not None and not getattr(enter_hook, "calls", enter_hook) and not getattr(exit_hook, "calls",
                                                                                                exit_hook):
            direct(grid3, stream, bound)
            return compiled
        bound = _descriptors(bound)
        compiled.run(*grid3, stream, compiled.function, compiled.packed_metadata,
                     compiled.launch_metadata(grid3, stream, *bound), enter_hook, exit_hook, *bound)
        return compiled

    def _first_launch(self, key, grid, args, kwargs):
        compiled = _triton_launch(self.kernel, grid, args, kwargs)
        if compiled is not None and len(self._kept) < MAX_KEPT:
            # Where each keyword argument goes in the kernel's signature (None: a launch option).
            positions = tuple(self._slots[name][0] if name in self._slots else None for name in kwargs)
            matrices = [i for i, value in enumerate(args) if type(value) is TmaMatrix]
            matrices += [p for p, value in zip(positions, kwargs.values()) if type(value) is TmaMatrix]
            self._kept[key] = (compiled, positions, _direct_launch(compiled, matrices), bool(matrices))
        return compiled


_CONTEXTS = threading.local()  # per thread: the devices whose CUDA context bind_cuda_context made current


def bind_cuda_context(device: int) -> None:
    """Make ``device``'s CUDA context current on this thread, once per thread. Encoding a TMA
    descriptor (``fill_tma_descriptor``, cuTensorMapEncodeTiled) needs it, and Triton 3.6 makes
    it current only in its kernel launch, after the descriptors: a thread whose first CUDA work
    is a Gluon launch (PyTorch's autograd engine runs a backward on a thread of its own) failed
    with "invalid device context". A runtime API call on the device binds its primary context;
    this one is legal inside a CUDA-graph capture (a stream query, the first version, is not: a
    thread's first Gluon launch inside a capture failed). ``device`` is the current device."""
    if device not in _CONTEXTS.__dict__:
        torch.cuda.is_current_stream_capturing()
        _CONTEXTS.__dict__[device] = True


def _triton_launch(kernel, grid, args, kwargs):
    """Triton's own launch of ``kernel``, each TmaMatrix argument made its TensorDescriptor (with
    the context bound first: Triton encodes descriptors before its launch makes it current)."""
    if any(type(value) is TmaMatrix for value in (*args, *kwargs.values())):
        bind_cuda_context(_driver.active.get_current_device())
    return kernel[grid](*_descriptors(args), **dict(zip(kwargs, _descriptors(kwargs.values()))))


def _descriptors(values):
    """``values`` with every TmaMatrix made the TensorDescriptor Triton's own launch takes."""
    return [value.descriptor() if type(value) is TmaMatrix else value for value in values]


class _DirectLaunch:
    """Triton 3.6's launch of a compiled kernel without its Python layer: the generated C
    launcher called with the arguments CudaLauncher.__call__ and its tensor-descriptor wrapper
    would pass it, TmaMatrix arguments encoded by Triton's own ``fill_tma_descriptor`` (what
    ``make_tensordesc_arg`` does for a TensorDescriptor). H100 host: benchmarks/NOTES.md, session 26."""

    __slots__ = ("launch", "function", "metadata", "cooperative", "pdl", "matrices", "fill")

    def __init__(self, launch, compiled, run, matrices, fill):
        self.launch, self.function, self.metadata = launch, compiled.function, compiled.packed_metadata
        self.cooperative, self.pdl = run.launch_cooperative_grid, run.launch_pdl
        self.matrices, self.fill = matrices, fill

    def __call__(self, grid3, stream, bound):
        if self.matrices:
            args, start, maps = [], 0, {}
            for position, swizzle, element_size, element_type, block in self.matrices:
                args += bound[start:position]
                matrix = bound[position]
                tensor_map = maps.get(id(matrix))
                if tensor_map is None:  # one encoding per TmaMatrix object, however often passed
                    tensor_map = maps[id(matrix)] = self.fill(
                        matrix.base.data_ptr(), swizzle, element_size, element_type, block,
                        [matrix.rows, matrix.cols], [matrix.row_stride, 1], 0)
                args += (tensor_map, matrix.rows, matrix.cols, matrix.row_stride, 1)
                start = position + 1
            args += bound[start:]
            bound = args
        self.launch(*grid3, stream, self.function, self.cooperative, self.pdl, None, None, self.metadata, None, None,
                    None, *bound)


def _direct_launch(compiled, matrices: list):
    """A _DirectLaunch of ``compiled`` (a kernel whose TmaMatrix arguments sit at positions
    ``matrices``), or None: anything but Triton 3.6's CUDA launcher as it was written against (its
    argument format, its tensor-descriptor wrapper and what it closes over, no scratch memory)
    keeps Triton's own ``run``."""
    try:
        from triton.backends.nvidia import driver as nvidia
        run = compiled.run
        if (type(run) is not nvidia.CudaLauncher or nvidia._BASE_ARGS_FORMAT != "iiiKKppOOOOOO"
                or run.global_scratch_size or run.profile_scratch_size):
            return None
        launch = run.launch
        code = getattr(launch, "__code__", None)
        if code is None:  # no descriptor in the signature: the C launcher itself
            return _DirectLaunch(launch, compiled, run, (), None) if not matrices else None
        cells = dict(zip(code.co_freevars, (cell.cell_contents for cell in launch.__closure__)))
        if set(cells) != {"launcher", "tensordesc_indices", "tensordesc_meta"}:
            return None
        positions, metas = sorted(cells["tensordesc_indices"]), cells["tensordesc_meta"]
        if positions != sorted(matrices) or len(metas) != len(positions):
            return None
        matrices = []
        for position, meta in zip(positions, metas):
            # The box is the compiled kernel's (as Triton encodes it): a 128-column bf16 box is
            # loaded as two 64-column ones.
            if meta is None or meta["fp4_padded"]:
                return None
            matrices.append((position, meta["swizzle"], meta["elem_size"],
                             nvidia.TMA_DTYPE_DEVICE_TO_HOST[meta["elem_type"]], list(meta["block_size"])))
        return _DirectLaunch(cells["launcher"], compiled, run, tuple(matrices), _driver.active.utils.fill_tma_descriptor)
    except (ImportError, AttributeError, KeyError, TypeError):  # another Triton's launcher
        return None


# JAGGED_FAST_LAUNCH=0 (read at import): every launch takes Triton's own path.
ENABLED = _knobs is not None and not TRITON_INTERPRETER and os.environ.get("JAGGED_FAST_LAUNCH", "1") != "0"


def fast_launch(kernel):
    """Decorator (above ``@triton.jit`` or ``@gluon.jit``): launch the kernel through
    :class:`FastLaunch`; with ``JAGGED_FAST_LAUNCH=0``, one that keeps nothing. Under the
    interpreter or with a Triton too old for it (neither runs the Gluon kernels, whose TmaMatrix
    arguments need FastLaunch), the kernel itself."""
    if _knobs is None or TRITON_INTERPRETER:
        return kernel
    return FastLaunch(kernel, keep=ENABLED)
