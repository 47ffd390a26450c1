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


def jagged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor,
    k_offsets: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Padded, masked softmax attention per row: q ``[T_q, H, D]``, k ``[T_k, H, D]``, v
    ``[T_k, H, D_v]`` -> ``[T_q, H, D_v]`` in q's dtype, computed in ``compute_dtype``.

    Causal: query i sees key j iff ``j <= i + (L_k - L_q)``. A query that sees no key gets 0.
    This is also the "dense attention" a user would write on padded inputs.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    max_q = int(q_offsets.diff().max()) if q_offsets.numel() > 1 else 0
    max_k = int(k_offsets.diff().max()) if k_offsets.numel() > 1 else 0
    qd = jagged_to_padded_dense(q.to(compute_dtype), q_offsets, max_q).transpose(1, 2)  # [B, H, Lq, D]
    kd = jagged_to_padded_dense(k.to(compute_dtype), k_offsets, max_k).transpose(1, 2)
    vd = jagged_to_padded_dense(v.to(compute_dtype), k_offsets, max_k).transpose(1, 2)
    q_len = q_offsets.diff().long()[:, None, None]
    k_len = k_offsets.diff().long()[:, None, None]
    i = torch.arange(max_q, device=q.device)[None, :, None]
    j = torch.arange(max_k, device=q.device)[None, None, :]
    visible = (j < k_len) & (i < q_len)  # [B, Lq, Lk]
    if causal:
        visible = visible & (j <= i + (k_len - q_len))
    scores = (qd @ kd.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    # A row with no visible key: softmax of all -inf is NaN; such queries output 0.
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = (probs @ vd).transpose(1, 2)  # [B, Lq, H, Dv]
    return dense_to_jagged(out, q_offsets, q.shape[0]).to(q.dtype)


def _row_sums(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """float32 sums over each row's positions, ``[B, *F]``."""
    rows, _ = _row_and_position(offsets, values.shape[0])
    zeros = torch.zeros((offsets.numel() - 1, *values.shape[1:]), dtype=torch.float32, device=values.device)
    return zeros.index_add(0, rows, values.float())


def jagged_sum(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """values ``[T, *F]`` -> ``[B, *F]``: sum over each row (0 for an empty row)."""
    return _row_sums(values, offsets).to(values.dtype)


def jagged_mean(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """values ``[T, *F]`` -> ``[B, *F]``: mean over each row (0 for an empty row)."""
    lengths = offsets.diff().clamp(min=1).to(torch.float32)
    return (_row_sums(values, offsets) / lengths.view(-1, *[1] * (values.dim() - 1))).to(values.dtype)


def jagged_softmax(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """values ``[T, *F]`` -> ``[T, *F]``: softmax over each row's positions, per column."""
    rows = values.split(offsets.diff().tolist())
    return torch.cat([torch.softmax(r.float(), dim=0) for r in rows]).to(values.dtype) if rows else values.clone()


def jagged_dense_bmm(values: torch.Tensor, offsets: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """values ``[T, K]``, dense ``[B, K, N]`` -> ``[T, N]``: row b times ``dense[b]``."""
    rows = values.split(offsets.diff().tolist())
    out = [row @ dense[b] for b, row in enumerate(rows)]
    # B == 0: an empty product that still depends on both inputs (for autograd).
    return torch.cat(out) if out else values[:0] @ dense.sum(0)


def jagged_jagged_bmm(x: torch.Tensor, y: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x ``[T, M]``, y ``[T, N]`` (same rows) -> ``[B, M, N]``: ``x_b^T @ y_b`` per row."""
    lengths = offsets.diff().tolist()
    out = [a.t() @ b for a, b in zip(x.split(lengths), y.split(lengths))]
    return torch.stack(out) if out else (x[:0].t() @ y[:0])[None][:0]


def jagged_dense_elementwise_add(values: torch.Tensor, offsets: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """values ``[T, *F]`` + dense ``[B, L, *F]`` at each row's positions (dense reads 0 past L)."""
    return values + dense_to_jagged(dense, offsets, values.shape[0])


def jagged_dense_elementwise_mul(values: torch.Tensor, offsets: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """values ``[T, *F]`` * dense ``[B, L, *F]`` at each row's positions (dense reads 0 past L)."""
    return values * dense_to_jagged(dense, offsets, values.shape[0])
