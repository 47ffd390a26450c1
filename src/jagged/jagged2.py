"""Jagged2Tensor: one square ``L_b x L_b`` matrix per row of a jagged batch (pairwise scores,
attention weights), stored without padding."""

from __future__ import annotations

from typing import Sequence

import torch

from .ops._utils import check_max_len, check_offsets, check_offsets_content, check_tensor
from .tensor import RowLayout


def square_offsets_of(offsets: torch.Tensor) -> torch.Tensor:
    """Row offsets ``[B+1]`` -> offsets of the rows' ``L_b x L_b`` blocks ``[B+1]``, always int64
    (``sum L_b^2`` passes 2^31 long before T does). No synchronisation."""
    lengths = offsets.diff().long()
    return torch.cat([lengths.new_zeros(1), (lengths * lengths).cumsum(0)])


class Jagged2Tensor(RowLayout):
    """B square matrices of sizes ``L_b x L_b``, flattened row-major and concatenated.

    Entry ``(i, j)`` of row b is ``values[square_offsets[b] + i * L_b + j]``. The row lengths
    ``L_b`` come from ``offsets``: the offsets of the JaggedTensor the matrices belong to (e.g.
    the queries whose pairwise scores they hold), so jagged2 results line up with jagged
    operands without conversion.

    Args:
        values: ``[S]`` tensor, ``S = sum L_b^2``.
        offsets: ``[B+1]`` int32/int64 row offsets over ``L_b`` (the jagged rows).
        square_offsets: ``[B+1]`` int64 offsets over ``L_b^2``; computed from ``offsets`` (on
            the device, no sync) when not given.
        max_len: the longest row (or an upper bound), if known: saves a sync later.
        total_len: ``T = sum L_b`` (the lines), if known: saves a sync later.
        validate: check the offsets' contents and ``S`` (one synchronisation).

    Raises:
        TypeError: a non-tensor argument.
        ValueError: values not 1-D; bad offsets; ``square_offsets`` not ``[B+1]`` int64 on the
            values' device; with ``validate``: offsets not a valid jagged layout, or
            ``S != sum L_b^2``, or ``square_offsets`` inconsistent with ``offsets``.

    Example::

        >>> s = Jagged2Tensor.from_list([torch.ones(2, 2), torch.ones(3, 3)])
        >>> s.values.shape, s.offsets.tolist(), s.square_offsets.tolist()
        (torch.Size([13]), [0, 2, 5], [0, 4, 13])
    """

    __slots__ = ("_values", "_offsets", "_square_offsets", "_max_len", "_total_len")

    def __init__(self, values: torch.Tensor, offsets: torch.Tensor, *, square_offsets: torch.Tensor | None = None,
                 max_len: int | None = None, total_len: int | None = None, validate: bool = True) -> None:
        check_tensor(values, "values")
        if values.dim() != 1:
            raise ValueError(f"values must be 1-D [S = sum L_b^2], got shape {tuple(values.shape)}")
        check_offsets(offsets, device=values.device)
        given = square_offsets is not None
        if not given:
            square_offsets = square_offsets_of(offsets)
        check_tensor(square_offsets, "square_offsets")
        if square_offsets.shape != offsets.shape or square_offsets.dtype != torch.int64 \
                or square_offsets.device != values.device:
            raise ValueError(f"square_offsets must be int64 [B+1]={tuple(offsets.shape)} on {values.device}, got "
                             f"{square_offsets.dtype} {tuple(square_offsets.shape)} on {square_offsets.device}")
        if max_len is not None:
            max_len = check_max_len(max_len)
        if total_len is not None:
            total_len = check_max_len(total_len, "total_len")
        if validate:
            last = int(offsets[-1])
            if total_len is not None and total_len != last:
                raise ValueError(f"total_len must be offsets[-1] = {last}, got {total_len}")
            total_len = last
            longest = check_offsets_content(offsets, total_len, max_len=max_len)
            max_len = longest if max_len is None else max_len
            if given and not torch.equal(square_offsets, square_offsets_of(offsets)):
                raise ValueError("square_offsets must be the running sum of the squared row lengths")
            total_square = int(square_offsets[-1])
            if total_square != values.numel():
                raise ValueError(f"values must have S = sum L_b^2 = {total_square} entries, got {values.numel()}")
        self._values = values
        self._offsets = offsets
        self._square_offsets = square_offsets
        self._max_len = max_len
        self._total_len = total_len

    @classmethod
    def from_list(cls, matrices: Sequence[torch.Tensor]) -> "Jagged2Tensor":
        """From square matrices ``[L_b, L_b]`` of one dtype and device (int64 offsets; no sync)."""
        matrices = list(matrices)
        for i, m in enumerate(matrices):
            check_tensor(m, f"matrices[{i}]")
            if m.dim() != 2 or m.shape[0] != m.shape[1]:
                raise ValueError(f"matrices[{i}] must be square [L, L], got shape {tuple(m.shape)}")
            if m.dtype != matrices[0].dtype or m.device != matrices[0].device:
                raise ValueError(f"matrices[{i}] must have dtype {matrices[0].dtype} on {matrices[0].device}, "
                                 f"got {m.dtype} on {m.device}")
        if not matrices:
            return cls(torch.empty(0), torch.zeros(1, dtype=torch.int64), max_len=0, total_len=0, validate=False)
        lengths = [m.shape[0] for m in matrices]
        offsets = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(matrices[0].device)
        values = torch.cat([m.reshape(-1) for m in matrices])
        return cls(values, offsets, max_len=max(lengths), total_len=sum(lengths), validate=False)

    @classmethod
    def from_dense(cls, dense: torch.Tensor, offsets: torch.Tensor, *, max_len: int | None = None) -> "Jagged2Tensor":
        """The top-left ``L_b x L_b`` block of each ``dense[b]`` (``[B, N, N]``); entries past N
        are 0. Differentiable w.r.t. ``dense``. See :func:`jagged.dense_to_jagged2`."""
        from .ops.jagged2_conversions import dense_to_jagged2

        return dense_to_jagged2(dense, offsets, max_len=max_len)

    @property
    def square_offsets(self) -> torch.Tensor:
        return self._square_offsets

    @property
    def total_len(self) -> int:
        """``T = sum L_b``, the number of lines (the jagged rows' total length); computed once (one
        sync) if not given, and cached."""
        if self._total_len is None:
            self._total_len = int(self._offsets[-1])
        return self._total_len

    def __repr__(self) -> str:
        max_len = "?" if self._max_len is None else self._max_len
        return (f"Jagged2Tensor(B={self.batch_size}, S={self._values.numel()}, dtype={self.dtype}, "
                f"device={self.device}, max_len={max_len})")

    def with_values(self, values: torch.Tensor) -> "Jagged2Tensor":
        """The same layout holding new ``values`` ``[S]``; no sync."""
        check_tensor(values, "values")
        if values.shape != self._values.shape:
            raise ValueError(f"values must have shape {tuple(self._values.shape)}, got {tuple(values.shape)}")
        return Jagged2Tensor(values, self._offsets, square_offsets=self._square_offsets, max_len=self._max_len,
                             total_len=self._total_len, validate=False)

    def unbind(self) -> list[torch.Tensor]:
        """The matrices as a list of B views ``[L_b, L_b]`` (one sync for the lengths)."""
        lengths = self.lengths().tolist()
        return [m.view(n, n) for m, n in zip(self._values.split([n * n for n in lengths]), lengths)]

    def to_padded_dense(self, max_len: int | None = None, padding_value: float = 0.0) -> torch.Tensor:
        """``[B, max_len, max_len]``; see :func:`jagged.jagged2_to_padded_dense`."""
        from .ops.jagged2_conversions import jagged2_to_padded_dense

        return jagged2_to_padded_dense(self, max_len, padding_value)


def _flatten_jagged2(s: Jagged2Tensor):
    return [s._values, s._offsets, s._square_offsets], (s._max_len, s._total_len)


def _unflatten_jagged2(children, context) -> Jagged2Tensor:
    # No checks, as for JaggedTensor: the leaves may be anything (tree_map).
    s = Jagged2Tensor.__new__(Jagged2Tensor)
    (s._values, s._offsets, s._square_offsets), (s._max_len, s._total_len) = children, context
    return s


# A pytree node like JaggedTensor (see tensor.py).
torch.utils._pytree.register_pytree_node(
    Jagged2Tensor, _flatten_jagged2, _unflatten_jagged2, serialized_type_name="jagged.Jagged2Tensor")
