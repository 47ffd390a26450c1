"""Every public differentiable op as (our call, reference call, input shapes), on the same
offsets: one table for the cross-cutting tests (layouts, determinism, stress).

An entry's ``inputs(lengths, dim)`` gives the shapes of its float inputs; ``ours(offsets, *xs)``
and ``ref(offsets, *xs)`` return one tensor (the reference runs in the inputs' dtype, float64 in
the tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jagged
from jagged import JaggedTensor, reference


@dataclass(frozen=True)
class Op:
    name: str
    inputs: Callable  # (lengths, dim) -> list of shapes
    ours: Callable  # (offsets, *xs) -> tensor
    ref: Callable  # (offsets, *xs) -> tensor
    matmul: bool = False  # tolerance of a float32 tl.dot chain ("tf32" bound for the 3-op chain)
    # Ops rounding to the dtype in sequence: a 16-bit result is held to this many times one op's
    # tolerance against an unrounded float64 chain.
    roundings: int = 1
    # Results are sums of signed terms: rounding error follows the terms' magnitudes, not the
    # (possibly cancelled) result's.
    signed_sum: bool = False


def _jt(offsets, x):
    return JaggedTensor(x, offsets, validate=False)


def _total(lengths):
    return sum(lengths)


def _longest(lengths):
    return max(lengths, default=0)


def _chain_ours(offsets, x, y, v):
    # Scaled like attention scores (1/sqrt(d)): the chain stores scores and weights in the
    # inputs' dtype between ops, so unscaled bf16 scores of size ~sqrt(d) * 4 lose ~1% to rounding.
    x = x * x.shape[1] ** -0.5
    s = jagged.jagged_jagged_bmm_jagged_out(_jt(offsets, x), _jt(offsets, y))
    return jagged.jagged2_jagged_bmm(jagged.jagged2_softmax(s, causal=True), _jt(offsets, v)).values


def _chain_ref(offsets, x, y, v):
    s = reference.jagged_jagged_bmm_jagged_out(x * x.shape[1] ** -0.5, y, offsets)
    return reference.jagged2_jagged_bmm(reference.jagged2_softmax(s, offsets, causal=True), offsets, v)


OPS = [
    Op("jagged_to_padded_dense", lambda n, d: [(_total(n), d)],
       lambda o, x: jagged.jagged_to_padded_dense(x, o, int(o.diff().max()) + 2 if o.numel() > 1 else 2, 0.5,
                                                  validate=False),
       lambda o, x: reference.jagged_to_padded_dense(x, o, int(o.diff().max()) + 2 if o.numel() > 1 else 2, 0.5)),
    Op("dense_to_jagged", lambda n, d: [(len(n), max(_longest(n) - 1, 0), d)],
       lambda o, x: jagged.dense_to_jagged(x, o, int(o[-1]), validate=False),
       lambda o, x: reference.dense_to_jagged(x, o, int(o[-1]))),
    Op("jagged_sum", lambda n, d: [(_total(n), d)], lambda o, x: jagged.jagged_sum(_jt(o, x)),
       lambda o, x: reference.jagged_sum(x, o), signed_sum=True),
    Op("jagged_mean", lambda n, d: [(_total(n), d)], lambda o, x: jagged.jagged_mean(_jt(o, x)),
       lambda o, x: reference.jagged_mean(x, o), signed_sum=True),
    Op("jagged_softmax", lambda n, d: [(_total(n), d)], lambda o, x: jagged.jagged_softmax(_jt(o, x)).values,
       lambda o, x: reference.jagged_softmax(x, o)),
    Op("jagged_dense_elementwise_mul", lambda n, d: [(_total(n), d), (len(n), _longest(n), d)],
       lambda o, x, y: jagged.jagged_dense_elementwise_mul(_jt(o, x), y).values,
       lambda o, x, y: reference.jagged_dense_elementwise_mul(x, o, y)),
    Op("jagged_dense_bmm", lambda n, d: [(_total(n), d), (len(n), d, d + 3)],
       lambda o, x, y: jagged.jagged_dense_bmm(_jt(o, x), y).values,
       lambda o, x, y: reference.jagged_dense_bmm(x, o, y), matmul=True),
    Op("jagged_jagged_bmm", lambda n, d: [(_total(n), d), (_total(n), d + 3)],
       lambda o, x, y: jagged.jagged_jagged_bmm(_jt(o, x), _jt(o, y)),
       lambda o, x, y: reference.jagged_jagged_bmm(x, y, o), matmul=True),
    Op("jagged_flash_attention", lambda n, d: [(_total(n), 2, d)] * 3,
       lambda o, q, k, v: jagged.jagged_flash_attention_values(q, k, v, o, o, causal=True, validate=False),
       lambda o, q, k, v: reference.jagged_attention(q, k, v, o, o, causal=True, compute_dtype=q.dtype), matmul=True),
    Op("jagged2 chain", lambda n, d: [(_total(n), d)] * 3, _chain_ours, _chain_ref, matmul=True, roundings=2),
]
