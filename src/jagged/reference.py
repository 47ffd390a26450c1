"""Plain-PyTorch reference implementations of every public op.

They are written to be obviously correct rather than fast, are differentiable through PyTorch's
own autograd, and serve three purposes: the tests compare the kernels against them, the
benchmarks use them as the "padded PyTorch" baseline where that is what a user would write, and
they are the CPU path when the Triton interpreter is off.

Every function takes raw tensors (values + offsets), like the kernels' public forms.
"""

from __future__ import annotations

import torch


def _row_and_position(offsets: torch.Tensor, total_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every token t of the values: its row b and its position t - offsets[b] in that row."""
    offsets = offsets.long()
    lengths = offsets.diff()
    rows = torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), lengths)
    if rows.numel() != total_len:
        raise ValueError(f"offsets describe {rows.numel()} values, but there are {total_len}")
    positions = torch.arange(total_len, device=offsets.device) - offsets[:-1][rows]
    return rows, positions


def jagged_to_padded_dense(
    values: torch.Tensor, offsets: torch.Tensor, max_len: int, padding_value: float = 0.0
) -> torch.Tensor:
    """values ``[T, *F]`` -> dense ``[B, max_len, *F]``; rows longer than max_len are cut."""
    batch_size = offsets.numel() - 1
    rows, positions = _row_and_position(offsets, values.shape[0])
    keep = positions < max_len
    dense = values.new_full((batch_size, max_len, *values.shape[1:]), padding_value)
    # index_put (not in-place on a leaf) keeps this differentiable w.r.t. values.
    return dense.index_put((rows[keep], positions[keep]), values[keep])


def dense_to_jagged(dense: torch.Tensor, offsets: torch.Tensor, total_len: int | None = None) -> torch.Tensor:
    """dense ``[B, L, *F]`` -> values ``[T, *F]``; positions a row has beyond L are 0."""
    if total_len is None:
        total_len = int(offsets[-1])
    rows, positions = _row_and_position(offsets, total_len)
    inside = positions < dense.shape[1]
    values = dense.new_zeros((total_len, *dense.shape[2:]))
    return values.index_put((inside.nonzero()[:, 0],), dense[rows[inside], positions[inside]])
