"""Triton helpers shared by kernels: where a jagged row lies, which row a token or work slot
belongs to, and loading a chunk of a row."""

import triton
import triton.language as tl


@triton.jit
def _row_key(offsets_ptr, row, mask, SLOT_BLOCK: tl.constexpr, INT32: tl.constexpr):
    """The search key of row(s) ``row`` (where ``mask``): offsets[row], or its work-slot start
    (see find_row); in int32 arithmetic if INT32 (the caller guarantees offsets < 2^31)."""
    key = tl.load(offsets_ptr + row, mask=mask, other=0)
    if INT32:
        key = key.to(tl.int32)
        row = row.to(tl.int32)
    else:
        key = key.to(tl.int64)
    if SLOT_BLOCK > 0:
        key = key // SLOT_BLOCK + row
    return key


@triton.jit
def find_row(offsets_ptr, target, batch_size, search_steps, SLOT_BLOCK: tl.constexpr):
    """Row b in [0, B) with key(b) <= target < key(b+1), by ``search_steps`` = ceil(log2 B)
    halvings, for a scalar or a vector of int64 targets.

    SLOT_BLOCK == 0: key(b) = offsets[b], so ``target`` is a token index.
    SLOT_BLOCK > 0: key(b) = offsets[b] // SLOT_BLOCK + b, so ``target`` is a work slot. Row b owns
    ``offsets[b+1] // SLOT_BLOCK - offsets[b] // SLOT_BLOCK + 1 >= cdiv(length_b, SLOT_BLOCK)``
    slots, enough for its blocks, and the grid needs ``B + T // SLOT_BLOCK`` slots in all: a grid
    over real work, known on the host without a device synchronisation. The slot search runs
    in int32 (half the instructions of int64 in a program's serial prologue; H100, attention
    B=256 max_L=256 D=64: forward 26.9 -> 26.1 us, D=32 25.5 -> 23.8), so its callers (the
    attention kernels) require fewer than 2^31 tokens. Token searches (SLOT_BLOCK == 0) and the
    32-way slot search (find_slot_row: the matmuls, jagged2) stay int64.
    """
    if SLOT_BLOCK > 0:
        target = target.to(tl.int32)
    lo = target * 0
    hi = lo + batch_size
    for _ in range(search_steps):
        mid = (lo + hi) // 2
        go_right = _row_key(offsets_ptr, mid, mid < hi, SLOT_BLOCK, SLOT_BLOCK > 0) <= target
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    return lo


@triton.jit
def find_slot_row(offsets_ptr, slot, batch_size, search_stride, SLOT_BLOCK: tl.constexpr):
    """find_row for one scalar work slot, by a 32-way search: each level loads 32 keys at once
    and keeps the last one <= slot, so B = 1024 rows take 2 dependent loads instead of 10 (a
    program's first instructions wait on them). ``search_stride`` = 32^(levels - 1) with 32^levels
    >= B (ops/_utils.py: slot_search)."""
    lo = slot * 0
    stride = search_stride + lo
    while stride > 0:
        probe = lo + tl.arange(0, 32).to(tl.int64) * stride
        inside = probe < batch_size
        below = inside & (_row_key(offsets_ptr, probe, inside, SLOT_BLOCK, False) <= slot)
        # Keys do not decrease, so the probes <= slot are a prefix (probe 0 = lo always is one).
        lo += (tl.sum(below.to(tl.int64), 0) - 1) * stride
        stride = stride // 32
    return lo


@triton.jit
def row_span(offsets_ptr, row):
    """Begin and length (int64) of a row."""
    begin = tl.load(offsets_ptr + row).to(tl.int64)
    return begin, tl.load(offsets_ptr + row + 1).to(tl.int64) - begin


@triton.jit
def tiered_row(offsets_ptr, feature_dim, SHORT_T: tl.constexpr, SHORT_D: tl.constexpr, LONG_T: tl.constexpr,
               WALKERS_FIRST: tl.constexpr):
    """The work of a program in a grid (rows, long-tier column blocks + short-tier column blocks):
    the last ``cdiv(feature_dim, SHORT_D)`` column-block slots are the short-row tier (rows of at
    most SHORT_T tokens, in column blocks of SHORT_D), the slots before them the long-row tier
    (the other rows; none if the host knows there are none). The GPU starts programs with the
    first grid axis fastest, so every long-row program starts before any short-row one. Without
    a long tier the short tier takes every row (so a wrong "no long rows" from the host costs
    speed, not correctness: the short tier's code walks rows of any length). WALKERS_FIRST (the
    long tier's tile is taller than the short one's, LONG_T > SHORT_T): the long tier has two
    halves of column blocks, the first for the rows longer than LONG_T (whose programs walk
    several tiles), the second for the rows of one long tile, so that every walk starts before
    any one-tile program. Returns whether the program has work (its row is of its tier),
    whether it is of the long tier, its column block within the tier, and its row's begin and
    length."""
    slot = tl.program_id(1)
    long_slots = tl.num_programs(1) - tl.cdiv(feature_dim, SHORT_D)
    long_tier = slot < long_slots
    begin, length = row_span(offsets_ptr, tl.program_id(0).to(tl.int64))
    if WALKERS_FIRST:
        long_blocks = long_slots // 2
        walker = slot < long_blocks
        long_active = tl.where(walker, length > LONG_T, (length > SHORT_T) & (length <= LONG_T))
        active = tl.where(long_tier, long_active, length <= SHORT_T)
        block = tl.where(walker, slot, tl.where(long_tier, slot - long_blocks, slot - long_slots))
    else:
        active = ((length > SHORT_T) == long_tier) | (long_slots == 0)
        block = tl.where(long_tier, slot, slot - long_slots)
    return active, long_tier, block, begin, length


@triton.jit
def load_row_chunk_native(ptr, begin, start, length, cols, col_ok, stride_t, other, BLOCK_T: tl.constexpr,
                          EVICTION: tl.constexpr = tl.constexpr("")):
    """load_row_chunk in the data's own dtype: a load whose registers are not read until the
    caller converts them, so a walk can issue the next chunk's load before it reduces this one
    (a chunk past the row's end is all masked and reads nothing)."""
    pos = start + tl.arange(0, BLOCK_T)
    in_row = pos < length
    tile = tl.load(ptr + (begin + pos)[:, None] * stride_t + cols[None, :],
                   mask=in_row[:, None] & col_ok[None, :], other=other, eviction_policy=EVICTION)
    return tile, in_row


@triton.jit
def load_row_chunk(ptr, begin, start, length, cols, col_ok, stride_t, other, BLOCK_T: tl.constexpr,
                   EVICTION: tl.constexpr = tl.constexpr("")):
    """Tokens [start, start + BLOCK_T) of a row (masked to the row) x feature columns ``cols``
    (unit stride), as float32; ``other`` outside. Returns the tile and its row mask. EVICTION:
    the load's L2 eviction policy ("evict_first" for a kernel's last read of the data; the
    default is a constexpr, not a str: Triton's calls between jit functions take a str default
    for a runtime value)."""
    tile, in_row = load_row_chunk_native(ptr, begin, start, length, cols, col_ok, stride_t, other, BLOCK_T, EVICTION)
    return tile.to(tl.float32), in_row


@triton.jit
def row_block(offsets_ptr, slot, batch_size, row_search, BLOCK: tl.constexpr, WIDE_SEARCH: tl.constexpr):
    """For a work slot (see find_row): its row, the row's begin and length, and the index of the
    slot's block in that row (>= the row's block count for a spare slot, which does nothing).
    ``row_search`` = ops/_utils.py: slot_search(B, WIDE_SEARCH): the 32-way search's first stride,
    or the binary search's steps (the attention kernels kept it: measured faster there)."""
    if WIDE_SEARCH:
        row = find_slot_row(offsets_ptr, slot, batch_size, row_search, BLOCK)
    else:
        row = find_row(offsets_ptr, slot, batch_size, row_search, BLOCK)
    begin, length = row_span(offsets_ptr, row)
    return row, begin, length, slot - (begin // BLOCK + row)


@triton.jit
def _scan_combine(count_a, begin_a, end_a, count_b, begin_b, end_b):
    return count_a + count_b, tl.maximum(begin_a, begin_b), tl.minimum(end_a, end_b)


@triton.jit
def scan_row_block(offsets_ptr, slot, batch_size, BLOCK: tl.constexpr, SCAN: tl.constexpr, STRIDE: tl.constexpr = 1):
    """row_block by one parallel pass instead of a search: the program loads all B + 1 offsets
    at once (SCAN >= B + 1, a power of two) and reduces them: the row is the count of keys <=
    slot (see find_row) less one, its begin the largest offset among those keys, its end the
    smallest among the others. One load latency instead of a search's ceil(log2 B) dependent
    ones, which held a short-row attention program ~26% of its life (ncu, H100). With STRIDE > 1
    (ops/_utils.py: scan_shape), two passes: over every STRIDE-th offset (SCAN of them), which
    finds the last sampled row whose key is <= slot (the keys grow with the row), then over the
    2 * STRIDE offsets from there. Runs in int32: offsets < 2^31 (scan_shape checks the token
    count); returns int64 like row_block."""
    slot32 = slot.to(tl.int32)
    first = 0
    index = tl.arange(0, SCAN)
    if STRIDE > 1:
        index = index * STRIDE
        inside = index <= batch_size
        offsets = tl.load(offsets_ptr + index, mask=inside, other=0).to(tl.int32)
        first = (tl.sum((inside & (offsets // BLOCK + index <= slot32)).to(tl.int32), 0) - 1) * STRIDE
        index = first + tl.arange(0, 2 * STRIDE)
    inside = index <= batch_size
    offsets = tl.load(offsets_ptr + index, mask=inside, other=0).to(tl.int32)
    below = inside & (offsets // BLOCK + index <= slot32)
    count, begin, end = tl.reduce((below.to(tl.int32), tl.where(below, offsets, 0),
                                   tl.where(below | ~inside, 2147483647, offsets)), 0, _scan_combine)
    row = (first + count - 1).to(tl.int64)
    begin = begin.to(tl.int64)
    return row, begin, end.to(tl.int64) - begin, slot - (begin // BLOCK + row)


@triton.jit
def slot_row_block(offsets_ptr, slot, batch_size, row_search, BLOCK: tl.constexpr, WIDE_SEARCH: tl.constexpr,
                   SCAN: tl.constexpr, SCAN_STRIDE: tl.constexpr = 1):
    """row_block, by one (or, SCAN_STRIDE > 1, two) parallel passes over the offsets when
    SCAN > 0 (ops/_utils.py: scan_shape), else by the search; the row in int64 either way."""
    if SCAN > 0:
        row, begin, length, block = scan_row_block(offsets_ptr, slot, batch_size, BLOCK, SCAN, SCAN_STRIDE)
    else:
        row, begin, length, block = row_block(offsets_ptr, slot, batch_size, row_search, BLOCK, WIDE_SEARCH)
        row = row.to(tl.int64)
    return row, begin, length, block


@triton.jit
def square_tile_offsets(square_begin, length, rows, cols, TRANSPOSE: tl.constexpr):
    """Flat offsets of the entries (rows x cols) of a row's ``length x length`` jagged2 block
    (row-major from ``square_begin``); TRANSPOSE gives entry (cols, rows) instead: the
    transposed matrix without a copy."""
    if TRANSPOSE:
        return square_begin + cols[None, :] * length + rows[:, None]
    return square_begin + rows[:, None] * length + cols[None, :]


@triton.jit
def square_block_lines(offsets_ptr, square_offsets_ptr, slot, batch_size, row_search, BLOCK_M: tl.constexpr):
    """For a work slot over blocks of BLOCK_M lines (see find_row): whether it has lines (a
    spare slot has none), its row's begin and length, where the row's jagged2 block starts, and
    the slot's line indices."""
    row, begin, length, block = row_block(offsets_ptr, slot, batch_size, row_search, BLOCK_M, True)
    square_begin = tl.load(square_offsets_ptr + row)
    return block * BLOCK_M < length, begin, length, square_begin, block * BLOCK_M + tl.arange(0, BLOCK_M)
