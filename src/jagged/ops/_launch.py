"""Launching Triton kernels with less host time.

Triton's ``kernel[grid](*args)`` binds and specialises every argument on every call before it
finds the compiled kernel: on the H100 machine's host ~20 us for a 16-argument kernel, of which
the launch itself is ~7 us (benchmarks/NOTES.md, session 12). At recommendation-model sizes that
is as long as the kernel runs. ``fast_launch`` keeps, for each kernel, the compiled kernels
Triton's own launch returned, keyed by everything Triton specialises on, and launches a kept
one through its ``run`` with the arguments Triton's launch would pass it (as
``CompiledKernel[grid]``, Triton's launch of an already compiled kernel, does).

The key tells apart every pair of calls that Triton could compile differently, and more:
constexpr arguments and launch options (``num_warps``, ...) by value; tensors by dtype and
16-byte alignment; TMA tensor descriptors by dtype, alignment, block shape, shared-memory layout
and padding; ints by ``== 1``, divisibility by 16 and width (Triton's i32 / i64 / u64);
bools by value; floats by kind; anything else (None, str, dtypes) by value. A finer key than
Triton's only means a few more first calls through Triton's path, never a wrong kernel. A key
seen for the first time, a grid given as a function, and the interpreter take Triton's path.
Launch hooks (profilers) still fire: the launch passes them on as Triton does. Not re-read on
every call, unlike Triton's own launch: ``TRITON_DEBUG`` and the instrumentation mode, so set
them before a kernel's first launch in the process.
"""

from __future__ import annotations

import os

import torch

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
    block_shape = getattr(value, "block_shape", None)
    if block_shape is not None:  # a TMA tensor descriptor: Triton specialises on its type only
        return (kind, value.base.dtype, value.base.data_ptr() % 16 == 0, tuple(block_shape),
                getattr(value, "layout", None), getattr(value, "padding", None))
    return value


class FastLaunch:
    """A ``@triton.jit`` kernel launched as ``kernel[grid](*args, **kwargs)``, with the host
    work of repeated launches cut (module doc). Other attributes are the kernel's."""

    def __init__(self, kernel):
        self.kernel = kernel
        params = kernel.params
        self._constexpr = tuple(p.is_constexpr for p in params)
        self._slots = {p.name: (i, p.is_constexpr) for i, p in enumerate(params)}
        self._defaults = tuple(p.default for p in params)
        self._kept = {}

    def __getattr__(self, name):
        return getattr(self.kernel, name)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    def _launch(self, grid, args, kwargs):
        if type(grid) is not tuple:
            return self.kernel[grid](*args, **kwargs)
        device = _driver.active.get_current_device()
        constexpr, slots = self._constexpr, self._slots
        key = [device, len(args)]
        for i, value in enumerate(args):
            key.append(value if constexpr[i] else argument_key(value))
        for name, value in kwargs.items():
            slot = slots.get(name)
            key.append(name)
            key.append(value if slot is None or slot[1] else argument_key(value))
        key = tuple(key)
        kept = self._kept.get(key)
        if kept is None:
            compiled = self.kernel[grid](*args, **kwargs)
            if compiled is not None and len(self._kept) < MAX_KEPT:
                # Where each keyword argument goes in the kernel's signature (None: a launch option).
                positions = tuple(slots[name][0] if name in slots else None for name in kwargs)
                self._kept[key] = (compiled, positions)
            return compiled
        compiled, positions = kept
        bound = list(self._defaults)
        bound[:len(args)] = args
        for position, value in zip(positions, kwargs.values()):
            if position is not None:
                bound[position] = value
        stream = _driver.active.get_current_stream(device)
        grid3 = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
        compiled.run(*grid3, stream, compiled.function, compiled.packed_metadata,
                     compiled.launch_metadata(grid3, stream, *bound), _knobs.runtime.launch_enter_hook,
                     _knobs.runtime.launch_exit_hook, *bound)
        return compiled


# JAGGED_FAST_LAUNCH=0 (read at import): every launch takes Triton's own path.
ENABLED = _knobs is not None and not TRITON_INTERPRETER and os.environ.get("JAGGED_FAST_LAUNCH", "1") != "0"


def fast_launch(kernel):
    """Decorator (above ``@triton.jit``): launch the kernel through :class:`FastLaunch`. Under
    the interpreter, with a Triton too old for it, or with ``JAGGED_FAST_LAUNCH=0``, the kernel
    itself."""
    if not ENABLED:
        return kernel
    return FastLaunch(kernel)
