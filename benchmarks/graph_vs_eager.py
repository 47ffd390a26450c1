"""Forward+backward of jagged attention and FA2 varlen timed three ways on one shape: do_bench
(eager), a synchronised wall clock over back-to-back eager calls, and replays of a captured CUDA
graph (device time without host launch cost).

    python benchmarks/graph_vs_eager.py [--B 256 --max-L 256 --H 4 --D 64 --lengths skew]
"""

import argparse
import math
import time

import torch
import triton.testing

import jagged
from _common import add_shape_arguments, bench_graph, jagged_inputs


def wall_us(fn, n=200):
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1e6


def main():
    parser = argparse.ArgumentParser()
    add_shape_arguments(parser)
    args = parser.parse_args()
    qkv, offsets, total, longest = jagged_inputs(args.B, args.max_L, (3, args.H, args.D), torch.bfloat16, args.lengths)
    q, k, v = (x.contiguous().requires_grad_(True) for x in qkv.unbind(1))
    grad = torch.randn_like(q)
    cu = offsets.int()
    scale = 1 / math.sqrt(args.D)
    fa_args = (cu, cu, longest, longest, 0.0, False)

    def ours():
        out = jagged.jagged_flash_attention_values(q, k, v, offsets, offsets, validate=False)
        return torch.autograd.grad(out, (q, k, v), grad)

    def fa2():
        qd, kd, vd = q.detach(), k.detach(), v.detach()
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(qd, kd, vd, *fa_args, False, scale=scale)
        return torch.ops.aten._flash_attention_backward(grad, qd, kd, vd, out, lse, *fa_args, rng, unused, scale=scale)

    print(f"B={args.B} max_L={args.max_L} H={args.H} D={args.D} {args.lengths} T={total}: forward+backward, us")
    for name, fn in (("jagged", ours), ("fa2_varlen", fa2)):
        bench = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1000
        print(f"  {name:10s} do_bench {bench:7.1f}   wall {wall_us(fn):7.1f}   cuda graph {bench_graph(fn) * 1000:7.1f}")


if __name__ == "__main__":
    main()
