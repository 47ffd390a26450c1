"""The row searches every slot-gridded kernel starts with (ops/_rows.py), checked directly
against torch.searchsorted: a wrong row would send a program to another row's data."""

import pytest
import torch
import triton
import triton.language as tl

from helpers import DEVICE, make_offsets
from jagged.ops._rows import row_block
from jagged.ops._utils import slot_search


@triton.jit
def _row_block_kernel(offsets_ptr, out_ptr, batch_size, row_search, BLOCK: tl.constexpr, WIDE_SEARCH: tl.constexpr):
    slot = tl.program_id(0).to(tl.int64)
    row, begin, length, block = row_block(offsets_ptr, slot, batch_size, row_search, BLOCK, WIDE_SEARCH)
    tl.store(out_ptr + 2 * slot, row)
    tl.store(out_ptr + 2 * slot + 1, block)


def expected_slots(lengths, block):
    """(row, block) of every work slot: row b owns offsets[b+1]//block - offsets[b]//block + 1."""
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    slots = []
    for b in range(len(lengths)):
        count = offsets[b + 1] // block - offsets[b] // block + 1
        slots += [(b, j) for j in range(count)]
    return slots


@pytest.mark.parametrize("batch_size", [1, 2, 31, 32, 33, 100, 1023, 1025, 1100])
@pytest.mark.parametrize("block", [4, 16])
@pytest.mark.parametrize("wide", [True, False], ids=["32-way", "binary"])
def test_row_block_finds_every_slot_row(batch_size, block, wide):
    generator = torch.Generator().manual_seed(batch_size * block)
    lengths = torch.randint(0, 3 * block, (batch_size,), generator=generator)
    lengths[torch.rand(batch_size, generator=generator) < 0.3] = 0  # empty rows own a spare slot
    lengths = lengths.tolist()
    slots = expected_slots(lengths, block)
    offsets = make_offsets(lengths)
    assert len(slots) == batch_size + sum(lengths) // block  # the grid every launcher uses
    out = torch.full((len(slots), 2), -1, dtype=torch.int64, device=DEVICE)
    _row_block_kernel[(len(slots),)](offsets, out, batch_size, slot_search(batch_size, wide), BLOCK=block,
                                     WIDE_SEARCH=wide)
    assert out.cpu().tolist() == [list(s) for s in slots]


def test_search_levels():
    assert [slot_search(b) for b in (1, 32, 33, 1024, 1025, 32768, 32769)] == [1, 1, 32, 32, 1024, 1024, 32768]
    assert [slot_search(b, wide=False) for b in (1, 2, 3, 1024, 1025)] == [0, 1, 2, 10, 11]
