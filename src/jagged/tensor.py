"""JaggedTensor: a batch of variable-length rows as ``values`` + ``offsets``."""

from __future__ import annotations

from typing import Sequence

import torch

from .ops._utils import check_max_len, check_offsets, check_offsets_content, check_tensor
from .ops.conversions import dense_to_jagged, jagged_to_padded_dense


class RowLayout:
    """What a batch stored row by row has, whatever it stores per row: values, ``offsets``
    ``[B+1]`` over the rows and the longest row's length (known or computed once). Shared by
    :class:`JaggedTensor` and :class:`jagged.Jagged2Tensor`."""

    __slots__ = ()

    @property
    def values(self) -> torch.Tensor:
        return self._values

    @property
    def offsets(self) -> torch.Tensor:
        return self._offsets

    @property
    def batch_size(self) -> int:
        return self._offsets.numel() - 1

    @property
    def dtype(self) -> torch.dtype:
        return self._values.dtype

    @property
    def device(self) -> torch.device:
        return self._values.device

    @property
    def max_len(self) -> int:
        """Length of the longest row (or the bound given at construction). Computed on first use
        (one device synchronisation) and cached."""
        if self._max_len is None:
            lengths = self.lengths()
            self._max_len = int(lengths.max()) if lengths.numel() else 0
        return self._max_len

    @property
    def known_max_len(self) -> int | None:
        """:attr:`max_len` if it is known already (given, or computed before), else None; never
        synchronises. Kernels that pick tiles by row length read this."""
        return self._max_len

    def lengths(self) -> torch.Tensor:
        """Row lengths ``[B]``, with the offsets' dtype and device."""
        return self._offsets.diff()

    def __len__(self) -> int:
        return self.batch_size


class JaggedTensor(RowLayout):
    """A batch of B rows of different lengths, stored without padding.

    ``values`` ``[T, *F]`` holds all rows concatenated along dim 0 (any trailing feature dims,
    any dtype); ``offsets`` ``[B+1]`` (int32 or int64, same device) marks where each row starts:
    row ``b`` is ``values[offsets[b]:offsets[b+1]]``. Zero-length rows and ``B == 0`` are legal.

    Args:
        values: ``[T, *F]`` tensor.
        offsets: ``[B+1]`` int32/int64 tensor with ``offsets[0] == 0``, non-decreasing,
            ``offsets[-1] == T``.
        max_len: the longest row's length, if the caller knows it (or an upper bound on it).
            Carrying it avoids the device synchronisation that computing it costs, which is
            what keeps kernel launches sync-free.
        validate: check the offsets' values (one device synchronisation). Pass ``False`` on hot
            paths whose offsets are known to be good; the cheap checks (shape, dtype, device)
            always run.

    Raises:
        TypeError: values or offsets is not a tensor.
        ValueError: a check above fails; the message names the argument and the expectation.

    Example::

        >>> jt = JaggedTensor.from_list([torch.ones(2, 4), torch.ones(0, 4), torch.ones(3, 4)])
        >>> jt
        JaggedTensor(B=3, T=5, feature_shape=(4,), dtype=torch.float32, device=cpu, max_len=3)
        >>> jt.offsets
        tensor([0, 2, 2, 5])
        >>> jt.to_padded_dense().shape
        torch.Size([3, 3, 4])
    """

    __slots__ = ("_values", "_offsets", "_max_len")

    def __init__(
        self,
        values: torch.Tensor,
        offsets: torch.Tensor,
        *,
        max_len: int | None = None,
        validate: bool = True,
    ) -> None:
        check_tensor(values, "values")
        if values.dim() < 1:
            raise ValueError("values must be at least 1-D [T, *F], got a 0-d tensor")
        check_offsets(offsets, device=values.device)
        if max_len is not None:
            max_len = check_max_len(max_len)
        if validate:
            longest = check_offsets_content(offsets, values.shape[0], max_len=max_len)
            if max_len is None:
                max_len = longest
        self._values = values
        self._offsets = offsets
        self._max_len = max_len

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_lengths(
        cls, values: torch.Tensor, lengths: torch.Tensor, *, max_len: int | None = None, validate: bool = True
    ) -> "JaggedTensor":
        """Build from ``values`` ``[T, *F]`` and per-row ``lengths`` ``[B]`` (int32/int64).

        The offsets get ``lengths``' dtype. With ``validate=True`` negative lengths and
        ``sum(lengths) != T`` raise ValueError.
        """
        check_tensor(lengths, "lengths")
        if lengths.dim() != 1:
            raise ValueError(f"lengths must be 1-D [B], got shape {tuple(lengths.shape)}")
        if lengths.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"lengths must have dtype int32 or int64, got {lengths.dtype}")
        if validate and lengths.numel() and bool((lengths < 0).any()):
            raise ValueError(f"lengths must be >= 0, got a negative length at row {int((lengths < 0).nonzero()[0, 0])}")
        offsets = lengths_to_offsets(lengths)
        return cls(values, offsets, max_len=max_len, validate=validate)

    @classmethod
    def from_list(cls, tensors: Sequence[torch.Tensor]) -> "JaggedTensor":
        """Concatenate rows ``[L_i, *F]`` (same ``F``, dtype and device) into a JaggedTensor.

        An empty list gives ``B == 0`` with float32 values of shape ``[0]`` on the CPU.
        Offsets are int64; no synchronisation (lengths come from the shapes).
        """
        tensors = list(tensors)
        if not tensors:
            return cls(torch.empty(0), torch.zeros(1, dtype=torch.int64), max_len=0, validate=False)
        first = tensors[0]
        for i, t in enumerate(tensors):
            check_tensor(t, f"tensors[{i}]")
            if t.dim() < 1 or t.shape[1:] != first.shape[1:]:
                raise ValueError(
                    f"tensors[{i}] must have shape [L, *{tuple(first.shape[1:])}] like tensors[0], "
                    f"got {tuple(t.shape)}"
                )
            if t.dtype != first.dtype or t.device != first.device:
                raise ValueError(
                    f"tensors[{i}] must have dtype {first.dtype} on {first.device} like tensors[0], "
                    f"got {t.dtype} on {t.device}"
                )
        lengths = [t.shape[0] for t in tensors]
        offsets = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(first.device)
        return cls(torch.cat(tensors), offsets, max_len=max(lengths), validate=False)

    @classmethod
    def from_dense(
        cls, dense: torch.Tensor, lengths: torch.Tensor, *, validate: bool = True
    ) -> "JaggedTensor":
        """Take the first ``lengths[b]`` positions of each row of ``dense`` ``[B, L, *F]``.

        ``lengths`` ``[B]`` int32/int64 on ``dense``'s device, each in ``[0, L]`` (checked when
        ``validate``). Differentiable w.r.t. ``dense``. Synchronises once to learn T.
        """
        check_tensor(dense, "dense")
        if dense.dim() < 2:
            raise ValueError(f"dense must be at least 2-D [B, L, *F], got shape {tuple(dense.shape)}")
        check_tensor(lengths, "lengths")
        if lengths.shape != dense.shape[:1]:
            raise ValueError(
                f"lengths must have shape [B]=[{dense.shape[0]}] to match dense, got {tuple(lengths.shape)}"
            )
        if lengths.device != dense.device:
            raise ValueError(f"lengths must be on dense's device ({dense.device}), got {lengths.device}")
        if validate and lengths.numel() and bool(((lengths < 0) | (lengths > dense.shape[1])).any()):
            raise ValueError(f"lengths must lie in [0, L={dense.shape[1]}], got {lengths.tolist()}")
        offsets = lengths_to_offsets(lengths)
        total_len = int(offsets[-1])
        values = dense_to_jagged(dense, offsets, total_len, validate=False)
        # from lengths <= L, the longest row is at most L (an upper bound, no extra sync).
        return cls(values, offsets, max_len=dense.shape[1], validate=False)

    @classmethod
    def from_nested(cls, nt: torch.Tensor) -> "JaggedTensor":
        """Build from a ``torch.nested`` tensor with ``layout=torch.jagged`` (shares memory when
        the nested tensor is contiguous; a nested tensor with holes is compacted)."""
        check_tensor(nt, "nt")
        if not nt.is_nested or nt.layout != torch.jagged:
            raise ValueError(f"nt must be a nested tensor with layout=torch.jagged, got layout {nt.layout}")
        if nt._lengths is not None:  # offsets + lengths: rows have holes between them
            return cls.from_list(nt.unbind())
        max_len = getattr(nt, "_maybe_max_seqlen", None)  # cached by torch.nested, if known
        return cls(nt.values(), nt.offsets(), max_len=max_len, validate=False)

    # ------------------------------------------------------------------ properties
    @property
    def total_len(self) -> int:
        """T, the number of values (all rows together)."""
        return self._values.shape[0]

    @property
    def feature_shape(self) -> torch.Size:
        return self._values.shape[1:]

    def __repr__(self) -> str:
        max_len = "?" if self._max_len is None else self._max_len
        return (
            f"JaggedTensor(B={self.batch_size}, T={self.total_len}, feature_shape={tuple(self.feature_shape)}, "
            f"dtype={self.dtype}, device={self.device}, max_len={max_len})"
        )

    # ------------------------------------------------------------------ conversions
    def with_values(self, values: torch.Tensor) -> "JaggedTensor":
        """The same rows (offsets, max_len) holding new ``values`` ``[T, *F']``; no sync."""
        check_tensor(values, "values")
        if values.dim() < 1 or values.shape[0] != self.total_len:
            raise ValueError(f"values must have shape [T={self.total_len}, ...], got {tuple(values.shape)}")
        offsets = self._offsets
        if offsets.device != values.device:
            offsets = offsets.to(values.device)
        # The offsets and max_len were checked when self was built: not again (this runs on the
        # host path of every op that returns a JaggedTensor).
        return _unflatten_jagged([values, offsets], self._max_len)

    def to(self, *args, **kwargs) -> "JaggedTensor":
        """``values.to(*args, **kwargs)``; the offsets follow the device only (keep their dtype)."""
        return self.with_values(self._values.to(*args, **kwargs))

    def cuda(self, device=None, non_blocking: bool = False) -> "JaggedTensor":
        return self.with_values(self._values.cuda(device, non_blocking=non_blocking))

    def cpu(self) -> "JaggedTensor":
        return self.with_values(self._values.cpu())

    def unbind(self) -> list[torch.Tensor]:
        """The rows as a list of B views ``[L_i, *F]`` (one synchronisation for the lengths)."""
        return list(self._values.split(self.lengths().tolist()))

    def to_padded_dense(self, max_len: int | None = None, padding_value: float = 0.0) -> torch.Tensor:
        """``[B, max_len, *F]``, padded with ``padding_value``; rows longer than ``max_len`` are
        truncated. ``max_len`` defaults to :attr:`max_len`. Differentiable w.r.t. ``values``."""
        if max_len is None:
            max_len = self.max_len
        return jagged_to_padded_dense(self._values, self._offsets, max_len, padding_value, validate=False)

    def to_nested(self) -> torch.Tensor:
        """A ``torch.nested`` tensor (``layout=torch.jagged``) sharing these values. torch.nested
        wants int64 offsets, so int32 offsets are converted."""
        return torch.nested.nested_tensor_from_jagged(
            self._values, self._offsets.long(), max_seqlen=self._max_len
        )


def lengths_to_offsets(lengths: torch.Tensor) -> torch.Tensor:
    """``[B]`` lengths -> ``[B+1]`` offsets (same dtype and device), with no synchronisation."""
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0, dtype=lengths.dtype)])


def _flatten_jagged(jt: JaggedTensor):
    return [jt._values, jt._offsets], jt._max_len


def _unflatten_jagged(children, max_len) -> JaggedTensor:
    # No checks: pytree utilities rebuild containers around arbitrary leaves (tree_map with a
    # function returning None or device types, as torch.utils.checkpoint does), and with_values
    # reuses offsets checked before.
    jt = JaggedTensor.__new__(JaggedTensor)
    (jt._values, jt._offsets), jt._max_len = children, max_len
    return jt


# A pytree node (children: values, offsets; context: max_len), so that pytree-based tools
# (torch.export, tree_map over batches, ...) see through it; torch.compile traces it either way.
torch.utils._pytree.register_pytree_node(
    JaggedTensor, _flatten_jagged, _unflatten_jagged, serialized_type_name="jagged.JaggedTensor")
