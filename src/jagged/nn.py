"""Modules for model code, taking and returning JaggedTensors."""

from __future__ import annotations

import torch

from .ops.attention import jagged_flash_attention
from .tensor import JaggedTensor


class JaggedMultiheadAttention(torch.nn.Module):
    """Multi-head attention over jagged rows, a drop-in for ``torch.nn.MultiheadAttention`` on
    jagged data: q/k/v/out projections around :func:`jagged.jagged_flash_attention`.

    Args:
        embed_dim: E, the model width; ``embed_dim % num_heads == 0``.
        num_heads: H; each head has ``E / H`` dims (at most 256).
        bias: add biases in the four projections.
        causal: default causal masking (within each row, end-aligned for cross-attention).
        kdim, vdim: key / value input widths for cross-attention (default E).
        device, dtype: of the parameters.

    Forward:
        ``query`` JaggedTensor ``[T_q, E]``; ``key`` ``[T_k, kdim]`` and ``value`` ``[T_k, vdim]``
        JaggedTensors with the same rows (default: ``key = query``, ``value = key``, i.e.
        self-attention); ``causal`` overrides the module's default. Returns a JaggedTensor
        ``[T_q, E]`` with the query's offsets.

    Example::

        >>> mha = jagged.nn.JaggedMultiheadAttention(256, 4, causal=True).cuda()
        >>> x = jagged.JaggedTensor.from_list([torch.randn(n, 256, device="cuda") for n in (7, 0, 30)])
        >>> mha(x).values.shape
        torch.Size([37, 256])
    """

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True, causal: bool = False,
                 kdim: int | None = None, vdim: int | None = None, device=None, dtype=None) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"embed_dim must be a positive multiple of num_heads, got {embed_dim} and {num_heads}")
        factory = dict(device=device, dtype=dtype)
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.causal = causal
        self.q_proj = torch.nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = torch.nn.Linear(kdim or embed_dim, embed_dim, bias=bias, **factory)
        self.v_proj = torch.nn.Linear(vdim or embed_dim, embed_dim, bias=bias, **factory)
        self.out_proj = torch.nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

    def _heads(self, proj: torch.nn.Linear, x: JaggedTensor, name: str) -> JaggedTensor:
        if not isinstance(x, JaggedTensor):
            raise TypeError(f"{name} must be a jagged.JaggedTensor, got {type(x).__name__}")
        if x.values.dim() != 2 or x.values.shape[1] != proj.in_features:
            raise ValueError(f"{name} values must be [T, {proj.in_features}], got {tuple(x.values.shape)}")
        return x.with_values(proj(x.values).view(x.total_len, self.num_heads, self.head_dim))

    def forward(self, query: JaggedTensor, key: JaggedTensor | None = None, value: JaggedTensor | None = None,
                *, causal: bool | None = None) -> JaggedTensor:
        key = query if key is None else key
        value = key if value is None else value
        q = self._heads(self.q_proj, query, "query")
        k = self._heads(self.k_proj, key, "key")
        v = self._heads(self.v_proj, value, "value")
        out = jagged_flash_attention(q, k, v, causal=self.causal if causal is None else causal)
        return query.with_values(self.out_proj(out.values.reshape(query.total_len, self.embed_dim)))
