"""Helpers shared by every op: backend choice, input validation, launch arithmetic.

Validation here is cheap (shape, dtype, device: no device synchronisation). The one
synchronising check, :func:`check_offsets_content`, is called only where the caller asked for it
(``JaggedTensor(..., validate=True)``, the default there).
"""

from __future__ import annotations

import functools
import inspect
import math
import operator
import os

import torch
import triton.language as tl

# Triton decides at ``@triton.jit`` time whether kernels run in its CPU interpreter, from this
# variable; reading it at import time (when our kernels are decorated) gives the same answer.
TRITON_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"

# tl.range(..., flatten=True) (Triton >= 3.3): the persistent kernels need it; older Triton gets
# the one-program-per-tile launch instead.
RANGE_FLATTEN = "flatten" in inspect.signature(tl.range).parameters

OFFSET_DTYPES = (torch.int32, torch.int64)
MATMUL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def use_triton(tensor: torch.Tensor) -> bool:
    """True where the Triton kernel runs: CUDA tensors, or any tensor under the interpreter."""
    return tensor.is_cuda or TRITON_INTERPRETER


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def multiprocessor_count(device: torch.device) -> int:
    """SMs of a CUDA device (the size of a persistent grid); 4 elsewhere (the interpreter), so
    that a test's tiles are spread over several programs."""
    if device.type != "cuda":
        return 4
    return _multiprocessor_count(torch.cuda.current_device() if device.index is None else device.index)


def binary_search_steps(batch_size: int) -> int:
    """Halvings needed to find a token's row among ``batch_size`` rows."""
    return 0 if batch_size <= 1 else math.ceil(math.log2(batch_size))


def slot_search(batch_size: int, wide: bool = True) -> int:
    """The ``row_search`` argument of ops/_rows.py: row_block over ``batch_size`` rows: for the
    32-way search (``wide``), its first level's stride 32^(levels - 1), the fewest levels with
    32^levels >= batch_size; else the binary search's steps."""
    if not wide:
        return binary_search_steps(batch_size)
    stride = 1
    while stride * 32 < batch_size:
        stride *= 32
    return stride


# Kernels find a work slot's row by one parallel pass over the offsets (ops/_rows.py:
# scan_row_block) when that is at most this many offsets a thread, else by a search. H100, bf16,
# graph replay, attention forward (benchmarks/NOTES.md, session 17): at 4 a thread (B=256, 4
# warps) 25.4 -> 23.9 us skewed, 47.8 -> 45.8 uniform; at 32 (B=1024, 2 warps) 20.4 -> 25.4.
SCAN_OFFSETS_PER_THREAD = 4


def scan_shape(batch_size: int, num_warps: int, total: int, min_width: int = 1) -> tuple:
    """The SCAN and SCAN_STRIDE constexprs of ops/_rows.py: slot_row_block (and of the Gluon
    kernels' twin, ops/attention_hopper.py: _slot_row). Up to SCAN_OFFSETS_PER_THREAD offsets a
    thread, one pass over all B + 1 (SCAN a power of two >= B + 1, at least ``min_width``;
    stride 1). Beyond, two: every STRIDE-th offset (STRIDE = 16 * num_warps; up to
    SCAN_OFFSETS_PER_THREAD of them a thread, so B + 1 <= 2048 * num_warps^2: B <= 32767 at 4
    warps), then a window of 2 * STRIDE, one offset a thread. (0, 1), the search, past that or
    with ``total`` tokens past int32."""
    if total >= 2 ** 31:
        return 0, 1
    threads = 32 * num_warps
    limit = SCAN_OFFSETS_PER_THREAD * threads
    if batch_size + 1 <= limit:
        return max(next_power_of_2(batch_size + 1), min_width), 1
    stride = threads // 2
    width = max(next_power_of_2(-(-(batch_size + 1) // stride)), min_width)
    return (width, stride) if width <= limit else (0, 1)


def scan_width(batch_size: int, num_warps: int, total: int) -> int:
    """The one-pass scan's width (scan_shape), or 0 (the search) where it would take two passes:
    for the kernels without the two-pass scan (the batched matmuls, which search 32 ways)."""
    width, stride = scan_shape(batch_size, num_warps, total)
    return width if stride == 1 else 0


def check_tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def check_offsets(offsets, *, name: str = "offsets", device: torch.device | None = None) -> None:
    """Cheap checks on an offsets tensor: 1-D, int32/int64, non-empty, on ``device``."""
    check_tensor(offsets, name)
    if offsets.dim() != 1:
        raise ValueError(f"{name} must be 1-D with B+1 entries, got shape {tuple(offsets.shape)}")
    if offsets.dtype not in OFFSET_DTYPES:
        raise ValueError(f"{name} must have dtype int32 or int64, got {offsets.dtype}")
    if offsets.numel() == 0:
        raise ValueError(f"{name} must have at least one entry (offsets[0] == 0), got an empty tensor")
    if device is not None and offsets.device != device:
        raise ValueError(
            f"{name} must be on the same device as the values ({device}), got {offsets.device}"
        )


def check_offsets_content(
    offsets: torch.Tensor, total_len: int, *, name: str = "offsets", max_len: int | None = None
) -> int:
    """Full check of the offsets' values (one device synchronisation). Returns the longest row.

    Raises ValueError unless ``offsets[0] == 0``, offsets are non-decreasing, ``offsets[-1] ==
    total_len`` and (if given) ``max_len`` is at least the longest row.
    """
    lengths = offsets.diff()
    longest = lengths.max() if lengths.numel() else offsets.new_zeros(())
    first, last, longest_value, any_decrease = torch.stack(
        [offsets[0].long(), offsets[-1].long(), longest.long(), (lengths < 0).any().long()]
    ).tolist()
    if first != 0:
        raise ValueError(f"{name}[0] must be 0, got {first}")
    if any_decrease:
        i = int((lengths < 0).nonzero()[0, 0])
        raise ValueError(
            f"{name} must be non-decreasing, but {name}[{i}]={int(offsets[i])} > "
            f"{name}[{i + 1}]={int(offsets[i + 1])}"
        )
    if last != total_len:
        raise ValueError(
            f"{name}[-1] must equal the number of values T={total_len}, got {last}"
        )
    if max_len is not None and max_len < longest_value:
        raise ValueError(
            f"max_len={max_len} is smaller than the longest row ({longest_value}); pass the true "
            "maximum or an upper bound"
        )
    return int(longest_value)


def check_max_len(max_len, name: str = "max_len") -> int:
    """A non-negative Python int (numpy and Sym ints too). A tensor is refused: reading it would
    hide a device synchronisation."""
    if type(max_len) is int:  # the common case, first: this runs on every call's host path
        if max_len < 0:
            raise ValueError(f"{name} must be >= 0, got {max_len}")
        return max_len
    if isinstance(max_len, torch.Tensor):
        raise TypeError(f"{name} must be a Python int, got a tensor (call .item() yourself if a sync is fine)")
    if isinstance(max_len, bool):
        raise TypeError(f"{name} must be an int, got bool")
    if not torch.compiler.is_compiling():
        # (Under torch.compile the value may be symbolic: operator.index would specialise the
        # graph on it and recompile for every new max_len.)
        try:
            max_len = operator.index(max_len)
        except TypeError:
            raise TypeError(f"{name} must be an int, got {type(max_len).__name__} {max_len!r}") from None
    if max_len < 0:
        raise ValueError(f"{name} must be >= 0, got {max_len}")
    return max_len


def flatten_features(x: torch.Tensor, leading: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """View ``x`` as ``[*x.shape[:leading], D]`` with D the product of the trailing dims.

    Returns the flattened tensor and the trailing shape, to restore it after the kernel. Copies
    only when the trailing dims cannot be merged into one strided dim.
    """
    lead_shape = tuple(x.shape[:leading])
    feature_shape = tuple(x.shape[leading:])
    if len(feature_shape) == 1:  # nothing to merge (and no reshape for torch.compile to trip on)
        return x, feature_shape
    return x.reshape(*lead_shape, math.prod(feature_shape)), feature_shape


def unflatten_features(x: torch.Tensor, feature_shape: tuple[int, ...]) -> torch.Tensor:
    """Undo :func:`flatten_features` on a kernel output ``[..., D]``. A single feature dim is
    left as is (no view: torch.compile's dynamic shapes trip on views of empty tensors)."""
    if len(feature_shape) == 1:
        return x
    return x.view(*x.shape[:-1], *feature_shape)


def memory_tile(feature_dim: int, element_size: int, tile_bytes: int = 16384,
                max_block_d: int = 256) -> tuple[int, int]:
    """Block sizes (rows, features) for a memory-bound pass over ``[*, feature_dim]`` rows.

    The feature block covers the row up to ``max_block_d`` elements (so one program moves whole,
    contiguous rows), and the row block brings a tile to about ``tile_bytes``. Kernels that walk
    a whole row per program pass a smaller ``max_block_d`` to get more programs.
    """
    block_d = min(next_power_of_2(feature_dim), max_block_d)
    if TRITON_INTERPRETER:
        # Tiny tiles, so that the small inputs of CPU tests still span several programs, several
        # feature blocks and several loop iterations: the paths that indexing bugs hide in.
        return 4, min(block_d, 4)
    block_rows = max(1, min(256, tile_bytes // (block_d * element_size)))
    return next_power_of_2(block_rows), block_d


_JAGGED_TENSOR_TYPE: list = []


def jagged_tensor_type():
    """jagged.JaggedTensor, imported on first use (jagged.tensor imports this module) and then
    kept: an import statement in a function costs ~0.5 us on every call's host path."""
    if not _JAGGED_TENSOR_TYPE:
        from ..tensor import JaggedTensor

        _JAGGED_TENSOR_TYPE.append(JaggedTensor)
    return _JAGGED_TENSOR_TYPE[0]


def check_float_features(x, op: str) -> None:
    """``x`` must be a JaggedTensor with floating values ``[T, *F]``, F at least one dim."""
    if not isinstance(x, jagged_tensor_type()):
        raise TypeError(f"x must be a jagged.JaggedTensor, got {type(x).__name__}")
    if not x.values.is_floating_point():
        raise ValueError(f"{op} needs floating-point values, got {x.dtype}")
    if x.values.dim() < 2:
        raise ValueError(f"x.values must be [T, *F] with at least one feature dim, got shape {tuple(x.values.shape)}")


def unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its last dim is contiguous (other strides are passed to kernels), else a
    contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def rows_as_matrix(values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """values ``[T, *F]`` as ``[T, D]`` with unit column stride (copied only if needed), and F."""
    values2d, feature_shape = flatten_features(values, 1)
    return unit_last_stride(values2d), feature_shape


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: float32 follows PyTorch's own matmul switch (off by default: IEEE
    float32); 16-bit inputs use the tensor cores as they are."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def check_same_rows(a, b, name_a: str, name_b: str) -> None:
    """JaggedTensors ``a`` and ``b`` must have the same rows: the same offsets tensor (free), or
    equal offsets (compared on the device: one synchronisation)."""
    if a.offsets is b.offsets:
        return
    if a.offsets.shape != b.offsets.shape or not torch.equal(a.offsets, b.offsets.to(a.offsets.device)):
        raise ValueError(f"{name_a} must have {name_b}'s rows (the same offsets)")


def tiered_walk_launch(offsets: torch.Tensor, values2d: torch.Tensor, longest: int, *, tile_bytes: int,
                       max_block_d: int, chain_bytes: int, walkers_first_tiles: int = 0,
                       num_warps: int = 4) -> tuple[tuple[int, int], dict]:
    """Grid and tiles for kernels where one program walks a row for a block of columns (pooling,
    softmax), in two tiers (ops/_rows.py: tiered_row): rows of at most one tile (SHORT_T x SHORT_D,
    ``tile_bytes`` and at most ``max_block_d`` columns), and longer rows, which the grid starts
    first. A long row's walk is a chain of tile steps no other program shortens; when the
    longest row's chain is the longer part of the work, ``cdiv(longest, SHORT_T) * chain_bytes``
    above the input's bytes (0: never), the long tier takes tiles twice as tall and half as wide
    (twice the programs per row, half the steps each), if a token still moves at least 64 bytes.
    With halved tiles and a longest row of at least ``walkers_first_tiles`` long tiles (0: never),
    the rows that walk several long tiles start before those of one (tiered_row: WALKERS_FIRST).
    ``longest``: the longest row or a bound on it, 0 if unknown; a known ``longest`` within one
    tile drops the long tier."""
    total, feature_dim = values2d.shape
    element_size = values2d.element_size()
    block_t, block_d = memory_tile(feature_dim, element_size, tile_bytes=tile_bytes, max_block_d=max_block_d)
    long_t, long_d = block_t, block_d
    # The interpreter's 4 x 4 tiles halve too, so that CPU tests run both tiers' shapes.
    wide = block_d * element_size >= 128 or TRITON_INTERPRETER
    if wide and block_d > 1 and cdiv(longest, block_t) * chain_bytes > total * feature_dim * element_size:
        long_t, long_d = 2 * block_t, block_d // 2
    long_blocks = 0 if 0 < longest <= block_t else cdiv(feature_dim, long_d)
    walkers_first = long_t > block_t and walkers_first_tiles > 1 and cdiv(longest, long_t) >= walkers_first_tiles
    grid = (offsets.numel() - 1, long_blocks * (2 if walkers_first else 1) + cdiv(feature_dim, block_d))
    return grid, dict(SHORT_T=block_t, SHORT_D=block_d, LONG_T=long_t, LONG_D=long_d, WALKERS_FIRST=walkers_first,
                      num_warps=num_warps)


def check_jagged2(s, name: str) -> None:
    """``s`` must be a Jagged2Tensor with floating values."""
    from ..jagged2 import Jagged2Tensor

    if not isinstance(s, Jagged2Tensor):
        raise TypeError(f"{name} must be a jagged.Jagged2Tensor, got {type(s).__name__}")
    if not s.values.is_floating_point():
        raise ValueError(f"{name} must have floating-point values, got {s.dtype}")


def check_jagged_matrix(x, name: str, dtype=None, device=None) -> None:
    """``x`` must be a JaggedTensor with 2-D float16/bfloat16/float32 values (and, if given,
    ``dtype`` on ``device``)."""
    if not isinstance(x, jagged_tensor_type()):
        raise TypeError(f"{name} must be a jagged.JaggedTensor, got {type(x).__name__}")
    if x.values.dim() != 2:
        raise ValueError(f"{name}.values must be 2-D [T, D], got shape {tuple(x.values.shape)}")
    if x.dtype not in MATMUL_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
    if dtype is not None and (x.dtype != dtype or x.device != device):
        raise ValueError(f"{name} must have dtype {dtype} on {device}, got {x.dtype} on {x.device}")
