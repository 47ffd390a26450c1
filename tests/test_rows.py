"""The row searches every slot-gridded kernel starts with (ops/_rows.py), checked directly
against torch.searchsorted: a wrong row would send a program to another row's data."""

import pytest
import torch
import triton
import triton.language as tl

from helpers import DEVICE, ON_GPU, make_offsets
from jagged.ops._rows import slot_row_block
from jagged.ops._utils import SCAN_OFFSETS_PER_THREAD, next_power_of_2, scan_shape, scan_width, slot_search


@triton.jit
def _row_block_kernel(offsets_ptr, out_ptr, batch_size, row_search, BLOCK: tl.constexpr, WIDE_SEARCH: tl.constexpr,
                      SCAN: tl.constexpr, SCAN_STRIDE: tl.constexpr):
    slot = tl.program_id(0).to(tl.int64)
    row, begin, length, block = slot_row_block(offsets_ptr, slot, batch_size, row_search, BLOCK, WIDE_SEARCH, SCAN,
                                               SCAN_STRIDE)
    tl.store(out_ptr + 4 * slot, row)
    tl.store(out_ptr + 4 * slot + 1, block)
    tl.store(out_ptr + 4 * slot + 2, begin)
    tl.store(out_ptr + 4 * slot + 3, length)


def expected_slots(lengths, block):
    """(row, block, row begin, row length) of every work slot: row b owns offsets[b+1]//block -
    offsets[b]//block + 1."""
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    slots = []
    for b in range(len(lengths)):
        count = offsets[b + 1] // block - offsets[b] // block + 1
        slots += [(b, j, offsets[b], lengths[b]) for j in range(count)]
    return slots


@pytest.mark.parametrize("batch_size", [1, 2, 31, 32, 33, 100, 1023, 1025, 1100])
@pytest.mark.parametrize("block", [4, 16])
@pytest.mark.parametrize("finder", ["32-way", "binary", "scan", "two-pass scan"])
def test_row_block_finds_every_slot_row(batch_size, block, finder):
    if finder in ("scan", "two-pass scan") and batch_size > 100 and not ON_GPU:
        # A 2048-wide scan (or two 64-wide ones) in each of ~2,000 programs takes minutes in the
        # interpreter (its reduction combines element by element); the GPU suite runs these sizes.
        pytest.skip("the interpreter: a 2048-wide scan per program; run on the GPU")
    generator = torch.Generator().manual_seed(batch_size * block)
    lengths = torch.randint(0, 3 * block, (batch_size,), generator=generator)
    lengths[torch.rand(batch_size, generator=generator) < 0.3] = 0  # empty rows own a spare slot
    lengths = lengths.tolist()
    slots = expected_slots(lengths, block)
    offsets = make_offsets(lengths)
    assert len(slots) == batch_size + sum(lengths) // block  # the grid every launcher uses
    out = torch.full((len(slots), 4), -1, dtype=torch.int64, device=DEVICE)
    wide = finder == "32-way"
    scan, stride = (next_power_of_2(batch_size + 1) if finder == "scan" else 0), 1
    if finder == "two-pass scan":  # small strides, so that short batches take both passes too
        stride = 32 if batch_size > 100 else 4
        scan = next_power_of_2(-(-(batch_size + 1) // stride))
    _row_block_kernel[(len(slots),)](offsets, out, batch_size, slot_search(batch_size, wide), BLOCK=block,
                                     WIDE_SEARCH=wide, SCAN=scan, SCAN_STRIDE=stride)
    assert out.cpu().tolist() == [list(s) for s in slots]


def test_scan_width():
    """The scan's width: a power of two >= B + 1, at most SCAN_OFFSETS_PER_THREAD offsets a
    thread and fewer than 2^31 tokens; else 0 (the search)."""
    assert SCAN_OFFSETS_PER_THREAD == 4
    assert [scan_width(b, 4, 100) for b in (0, 1, 255, 256, 511, 512)] == [1, 2, 256, 512, 512, 0]
    assert scan_width(255, 2, 100) == 256 and scan_width(256, 2, 100) == 0 and scan_width(1023, 8, 100) == 1024
    assert scan_width(100, 4, 2 ** 31 - 1) == 128 and scan_width(100, 4, 2 ** 31) == 0


def test_scan_shape():
    """One pass up to SCAN_OFFSETS_PER_THREAD offsets a thread; then two: every (16 * warps)-th
    offset, at most 4 a thread, and a window of twice that; past that, or 2^31 tokens, the search."""
    assert [scan_shape(b, 4, 100) for b in (0, 1, 511)] == [(1, 1), (2, 1), (512, 1)]
    assert [scan_shape(b, 4, 100) for b in (512, 1023, 8192, 32767)] == [(16, 64), (16, 64), (256, 64), (512, 64)]
    assert scan_shape(32768, 4, 100) == (0, 1) and scan_shape(1000, 4, 2 ** 31) == (0, 1)
    assert scan_shape(255, 2, 100) == (256, 1) and scan_shape(256, 2, 100) == (16, 32)
    assert scan_shape(0, 4, 100, min_width=128) == (128, 1) and scan_shape(600, 4, 100, min_width=128) == (128, 64)
    for batch_size in (512, 999, 4096, 32767):  # the sampled offsets reach B
        width, stride = scan_shape(batch_size, 4, 100)
        assert width * stride >= batch_size + 1


def test_search_levels():
    assert [slot_search(b) for b in (1, 32, 33, 1024, 1025, 32768, 32769)] == [1, 1, 32, 32, 1024, 1024, 32768]
    assert [slot_search(b, wide=False) for b in (1, 2, 3, 1024, 1025)] == [0, 1, 2, 10, 11]
