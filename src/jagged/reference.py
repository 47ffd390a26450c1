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


def attention_mask(q_offsets: torch.Tensor, k_offsets: torch.Tensor, max_q: int, max_k: int, *, causal: bool = False,
                   num_targets: torch.Tensor | None = None, contextual_len: int = 0,
                   window: int | None = None) -> torch.Tensor:
    """``[B, max_q, max_k]`` bool: which (query i, key j) pairs of each row attend (the rules of
    :func:`jagged.jagged_attention`). Queries sit at key positions ``p = i + L_k - L_q``.

    Plain: every in-row pair; causal: ``j <= p``. With ``num_targets``, ``contextual_len`` or
    ``window`` (HSTU's masks): ids ``id(x) = min(max(x - c + 1, 0), L_k - c + 1 - t)`` (the
    contextual prefix shares one id, so do the targets); the pair attends if ``j == p``, or
    ``0 < id(p) - id(j) <= window`` (causal; ``0 < |id(p) - id(j)| <= window`` otherwise), or
    ``p`` is contextual (``0 <= p < c``) and ``j`` is not a target (``j < L_k - t``).
    """
    q_len = q_offsets.diff().long()[:, None, None]
    k_len = k_offsets.diff().long()[:, None, None]
    i = torch.arange(max_q, device=q_offsets.device)[None, :, None]
    j = torch.arange(max_k, device=q_offsets.device)[None, None, :]
    pos = i + (k_len - q_len)
    inside = (j < k_len) & (i < q_len)
    if num_targets is None and contextual_len == 0 and window is None:
        return inside & (j <= pos) if causal else inside
    targets = torch.zeros_like(k_len) if num_targets is None else num_targets.long()[:, None, None]
    targets = torch.minimum(targets.clamp(min=0), k_len)
    max_id = k_len - contextual_len + 1 - targets

    def ids(x):
        return torch.minimum((x - contextual_len + 1).clamp(min=0), max_id)

    dist = ids(pos) - ids(j)
    window = 2 ** 30 if window is None else window
    seen = (dist > 0) & (dist <= window) if causal else (dist != 0) & (dist.abs() <= window)
    contextual_query = (pos >= 0) & (pos < contextual_len)
    seen = seen | (pos == j) | (contextual_query & (j < k_len - targets))
    return inside & seen


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
    activation: str = "softmax",
    norm: float | None = None,
    bias: torch.Tensor | None = None,
    num_targets: torch.Tensor | None = None,
    contextual_len: int = 0,
    window: int | None = None,
    dropout_p: float = 0.0,
    dropout_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Padded, masked attention per row: q ``[T_q, H, D]``, k ``[T_k, H, D]``, v ``[T_k, H, D_v]``
    -> ``[T_q, H, D_v]`` in q's dtype, computed in ``compute_dtype``. The arguments are those of
    :func:`jagged.jagged_attention`; the mask is :func:`attention_mask`.

    Scores ``scale * q k^T + bias[h, clamp(j - p, -R, R) + R]``. Softmax: a query with no visible
    key gets 0. Pointwise (``"silu"``, ``"gelu"``): ``act(scores) / norm`` where visible, ``norm``
    defaulting to the row's key count. Dropout: ``dropout_keep`` ``[B, H, max L_q, max L_k]``
    (bool) says which weights survive; kept ones are scaled by ``1 / (1 - dropout_p)``.
    This is also the "dense attention" a user would write on padded inputs.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    max_q = int(q_offsets.diff().max()) if q_offsets.numel() > 1 else 0
    max_k = int(k_offsets.diff().max()) if k_offsets.numel() > 1 else 0
    qd = jagged_to_padded_dense(q.to(compute_dtype), q_offsets, max_q).transpose(1, 2)  # [B, H, Lq, D]
    kd = jagged_to_padded_dense(k.to(compute_dtype), k_offsets, max_k).transpose(1, 2)
    vd = jagged_to_padded_dense(v.to(compute_dtype), k_offsets, max_k).transpose(1, 2)
    visible = attention_mask(q_offsets, k_offsets, max_q, max_k, causal=causal, num_targets=num_targets,
                             contextual_len=contextual_len, window=window)  # [B, Lq, Lk]
    scores = (qd @ kd.transpose(-1, -2)) * scale
    if bias is not None:
        radius = (bias.shape[1] - 1) // 2
        q_len = q_offsets.diff().long()[:, None, None]
        k_len = k_offsets.diff().long()[:, None, None]
        rel = (torch.arange(max_k, device=q.device)[None, None, :]
               - torch.arange(max_q, device=q.device)[None, :, None] - (k_len - q_len))
        buckets = rel.clamp(-radius, radius) + radius  # [B, Lq, Lk]
        scores = scores + bias.to(compute_dtype)[:, buckets].permute(1, 0, 2, 3)
    if activation == "softmax":
        scores = scores.masked_fill(~visible[:, None], float("-inf"))
        # A query with no visible key: softmax of all -inf is NaN; such queries output 0. (NaN from
        # NaN inputs stays NaN, as in torch's own attention.)
        weights = torch.softmax(scores, dim=-1).masked_fill(~visible.any(-1)[:, None, :, None], 0.0)
    else:
        act = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu}[activation]
        denominator = k_offsets.diff().to(compute_dtype).clamp(min=1)[:, None, None, None] if norm is None else norm
        weights = act(scores).masked_fill(~visible[:, None], 0.0) / denominator
    if dropout_keep is not None:
        weights = weights * dropout_keep.to(compute_dtype) / (1.0 - dropout_p)
    out = (weights @ vd).transpose(1, 2)  # [B, Lq, H, Dv]
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


# Jagged2: one row-major L_b x L_b block per row, concatenated into a 1-D tensor [sum L_b^2].


def _square_blocks(values: torch.Tensor, offsets: torch.Tensor) -> list[torch.Tensor]:
    lengths = offsets.diff().tolist()
    return [m.view(n, n) for m, n in zip(values.split([n * n for n in lengths]), lengths)]


def _flatten_blocks(blocks: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
    """Blocks -> ``[sum L_b^2]``; ``empty`` (a 0-element tensor made from the inputs, so that
    autograd still connects them) when B == 0."""
    return torch.cat([b.reshape(-1) for b in blocks]) if blocks else empty


def jagged_jagged_bmm_jagged_out(x: torch.Tensor, y: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x, y ``[T, K]`` (same rows) -> ``[sum L_b^2]``: the blocks ``x_b @ y_b^T``."""
    lengths = offsets.diff().tolist()
    blocks = [a @ b.t() for a, b in zip(x.split(lengths), y.split(lengths))]
    return _flatten_blocks(blocks, (x[:0] @ y[:0].t()).reshape(-1))


def jagged2_softmax(values: torch.Tensor, offsets: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
    """Softmax along each line of every block (float32 math); causal: over ``j <= i``, 0 above."""
    blocks = []
    for m in _square_blocks(values, offsets):
        scores = m.float()
        if causal:
            scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
        blocks.append(torch.softmax(scores, dim=-1).to(values.dtype))
    return _flatten_blocks(blocks, values[:0])


def jagged2_to_padded_dense(values: torch.Tensor, offsets: torch.Tensor, max_len: int,
                            padding_value: float = 0.0) -> torch.Tensor:
    """Blocks -> ``[B, max_len, max_len]`` (cut to the top-left corner, padded elsewhere)."""
    dense = []
    for m in _square_blocks(values, offsets):
        n = min(m.shape[0], max_len)
        dense.append(torch.nn.functional.pad(m[:n, :n], (0, max_len - n, 0, max_len - n), value=padding_value))
    return torch.stack(dense) if dense else values[:0].reshape(0, 1, 1).expand(0, max_len, max_len)


def dense_to_jagged2(dense: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``[B, N, M]`` -> blocks: the top-left ``L_b x L_b`` of ``dense[b]``, 0 past N or M."""
    blocks = []
    for b, n in enumerate(offsets.diff().tolist()):
        lines, cols = min(n, dense.shape[1]), min(n, dense.shape[2])
        blocks.append(torch.nn.functional.pad(dense[b, :lines, :cols], (0, n - cols, 0, n - lines)))
    return _flatten_blocks(blocks, dense.reshape(-1)[:0])


def jagged2_jagged_bmm(p: torch.Tensor, offsets: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Blocks ``p`` and v ``[T, N]`` -> ``[T, N]``: ``p_b @ v_b`` per row."""
    lengths = offsets.diff().tolist()
    out = [m @ r for m, r in zip(_square_blocks(p, offsets), v.split(lengths))]
    return torch.cat(out) if out else p[:0, None] * v[:0]
