"""Where the host (CPU) time of one eager jagged attention forward+backward goes: cProfile over
many calls at a short-row shape, top functions by own time and by cumulative time.

    python benchmarks/profile_host.py [--B 256 --max-L 256 --H 4 --D 64 --lengths skew] [--calls 200]
"""

import argparse
import cProfile
import pstats

import torch

import jagged
from _common import add_shape_arguments, jagged_inputs


def main():
    parser = argparse.ArgumentParser()
    add_shape_arguments(parser)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    qkv, offsets, _, longest = jagged_inputs(args.B, args.max_L, (3, args.H, args.D), torch.bfloat16, args.lengths)
    q, k, v = (x.contiguous().requires_grad_(True) for x in qkv.unbind(1))
    jt = lambda x: jagged.JaggedTensor(x, offsets, max_len=longest, validate=False)  # noqa: E731
    do = torch.randn_like(q)

    def step():
        out = jagged.jagged_flash_attention(jt(q), jt(k), jt(v)).values
        torch.autograd.grad(out, (q, k, v), do)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.calls):
        step()
    profiler.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(profiler)
    print(f"{args.calls} calls; per-call host time = total / {args.calls}")
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
