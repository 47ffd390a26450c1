"""Host (CPU) time of each piece of a jagged attention call, and of the feature-interaction ops'
public calls (bench_ops's B=256 max_L=1024 D=256 bf16 skewed shape), to find launch overhead.
Each piece is called many times back to back; the device is synchronised only around the batch.
An op whose host time exceeds do_bench's cache flush (~85 us on an H100) shows it in the eager
columns of the benchmarks (docs/benchmarks.md).

    python benchmarks/host_overhead.py
"""

import math
import time

import torch

import jagged
from _common import jagged_inputs
from jagged.ops import attention


def host_us(fn, n=300):
    fn()
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - start) / n * 1e6
    torch.cuda.synchronize()
    return host


def main():
    qkv, offsets, total, longest = jagged_inputs(256, 256, (3, 4, 64), torch.bfloat16, "skew")
    q, k, v = (x.contiguous() for x in qkv.unbind(1))
    scale = 1 / math.sqrt(64)
    out, lse = attention._attention_forward(q, k, v, offsets, offsets, False, scale)
    do = torch.randn_like(out)
    qg, kg, vg = (x.detach().requires_grad_(True) for x in (q, k, v))
    cu = offsets.int()
    pieces = {
        "torch.empty x1": lambda: torch.empty((total, 4, 64), dtype=q.dtype, device=q.device),
        "input checks": lambda: attention._check_attention_inputs(q, k, v, offsets, offsets),
        "forward launcher (2 empty + 1 launch)": lambda: attention._attention_forward(q, k, v, offsets, offsets, False, scale),
        "public forward, no grad": lambda: jagged.jagged_flash_attention_values(q, k, v, offsets, offsets, validate=False),
        "public forward, with grad": lambda: jagged.jagged_flash_attention_values(qg, kg, vg, offsets, offsets, validate=False),
        "forward custom op, implementation called directly": lambda: attention._attention_forward.impl(
            q, k, v, offsets, offsets, False, scale, longest),
        "backward custom op, implementation called directly": lambda: attention._attention_backward.impl(
            do, q, k, v, out, lse, offsets, offsets, False, scale, longest),
        "backward launcher (4 empty + 2 launches)": lambda: attention._attention_backward(do, q, k, v, out, lse, offsets, offsets, False, scale),
        "forward+backward via autograd": lambda: torch.autograd.grad(
            jagged.jagged_flash_attention_values(qg, kg, vg, offsets, offsets, validate=False), (qg, kg, vg), do),
        "FA2 varlen forward (aten)": lambda: torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, longest, longest, 0.0, False, False, scale=scale),
    }
    try:
        from torch.nn.attention.varlen import varlen_attn as varlen
    except ImportError:
        varlen = None
    if varlen is not None:  # PyTorch's public FA2 varlen, with autograd (torch >= 2.10)
        pieces["FA2 varlen_attn forward+backward (autograd)"] = lambda: torch.autograd.grad(
            varlen(qg, kg, vg, cu, cu, longest, longest), (qg, kg, vg), do)
        pieces["FA2 varlen_attn forward"] = lambda: varlen(q, k, v, cu, cu, longest, longest)

    class Identity(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return g

    pieces["autograd engine alone (identity Function)"] = lambda: torch.autograd.grad(Identity.apply(qg), qg, q)

    def forward_backward_single_thread():
        # The engine runs CUDA backward on a per-device worker thread; this keeps it on ours.
        with torch.autograd.set_multithreading_enabled(False):
            return torch.autograd.grad(
                jagged.jagged_flash_attention_values(qg, kg, vg, offsets, offsets, validate=False), (qg, kg, vg), do)

    pieces["forward+backward via autograd, engine on this thread"] = forward_backward_single_thread
    pieces["forward+backward launchers, no autograd"] = lambda: attention._attention_backward(
        do, q, k, v, *attention._attention_forward(q, k, v, offsets, offsets, False, scale), offsets, offsets, False,
        scale)

    def backward_on_thread():
        import threading

        t = threading.Thread(target=lambda: [attention._attention_backward(do, q, k, v, out, lse, offsets, offsets, False, scale) for _ in range(100)])
        t.start()
        t.join()

    pieces["backward launcher x100 on another thread (/100)"] = lambda: backward_on_thread()
    pieces.update(op_pieces())
    for name, fn in pieces.items():
        batched = "x100" in name  # one call is 100 launches
        us = host_us(fn, 10 if batched else 300) / (100 if batched else 1)
        print(f"{name:50s} {us:8.1f} us")


def op_pieces() -> dict:
    """The feature-interaction ops' public calls, no gradient, and a plain torch op for scale."""
    values, offsets, _, longest = jagged_inputs(256, 1024, (256,), torch.bfloat16, "skew")
    x = jagged.JaggedTensor(values, offsets, max_len=longest)
    y = torch.randn(256, 256, 256, device=values.device, dtype=values.dtype)
    return {
        "op: jagged_sum": lambda: jagged.jagged_sum(x),
        "op: jagged_mean": lambda: jagged.jagged_mean(x),
        "op: jagged_softmax": lambda: jagged.jagged_softmax(x),
        "op: jagged_dense_bmm (Gluon kernel)": lambda: jagged.jagged_dense_bmm(x, y),
        "op: torch.Tensor.add (for scale)": lambda: values.add(1.0),
    }


if __name__ == "__main__":
    main()
