"""Triton helpers shared by the softmax kernels (jagged_softmax over rows, jagged2_softmax over
lines): the online max / rescaled-sum update and the final weights, in base 2 (exp2 of a
pre-scaled input is one fast instruction; exp is several)."""

import triton
import triton.language as tl


@triton.jit
def online_softmax_step(m, total, x, AXIS: tl.constexpr):
    """Fold tile ``x`` (-inf where masked; any float dtype, computed in float32) into the running
    base-2 max ``m`` and float32 sum ``total`` of ``2^(x * log2 e - m)`` along AXIS. A 16-bit tile
    (the prefetching softmax walk's) takes its max before the float32 scaling (the same value:
    rounding is monotone), so it is not held as float32 across the reduction: H100, bf16, B=1024
    max_L=1024 D=128 skewed 61.4 -> 58.7 us with the prefetch (benchmarks/NOTES.md, session 14);
    float32 tiles keep the scaled max (the other order cost up to 3% where nothing is prefetched)."""
    if x.dtype == tl.float32:
        x2 = x * 1.4426950408889634  # log2(e)
        m_new = tl.maximum(m, tl.max(x2, AXIS))
    else:
        m_new = tl.maximum(m, tl.max(x, AXIS).to(tl.float32) * 1.4426950408889634)
        x2 = x.to(tl.float32) * 1.4426950408889634
    # -inf so far (an all-masked or all -inf line): shift by 0, never inf - inf. Such a line ends
    # with total = 0, so its weights are 0/0 = NaN, as torch.softmax gives.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    total = total * tl.exp2(m - m_safe) + tl.sum(tl.exp2(x2 - tl.expand_dims(m_safe, AXIS)), AXIS)
    return m_new, total


@triton.jit
def softmax_weights(x, m, total, AXIS: tl.constexpr):
    """``exp(x) / sum exp`` (float32) for tile ``x`` (any float dtype) given the final ``m`` and
    ``total`` of online_softmax_step: one reciprocal per line, a multiply per element."""
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    inv_total = 1.0 / total
    return tl.exp2(x.to(tl.float32) * 1.4426950408889634 - tl.expand_dims(m_safe, AXIS)) * tl.expand_dims(inv_total,
                                                                                                          AXIS)
