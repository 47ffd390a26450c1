"""Where the time goes in jagged attention: per-kernel CUDA times (torch.profiler) for one
forward + backward, and each compiled Triton kernel's registers, spills and shared memory.

    python benchmarks/profile_attention.py [--B 256 --max-L 256 --H 4 --D 64 --lengths skew --causal]
"""

import argparse
import time

import torch

import jagged
from _common import add_shape_arguments, jagged_inputs


def compiled_kernels(fn):
    """(name, n_regs, n_spills, shared bytes, num_warps) of every variant of a jitted kernel."""
    for cache in getattr(fn, "device_caches", {}).values():
        for kernel in (cache[0] if isinstance(cache, tuple) else cache).values():
            yield (fn.__name__, getattr(kernel, "n_regs", "?"), getattr(kernel, "n_spills", "?"),
                   getattr(kernel.metadata, "shared", "?"), getattr(kernel.metadata, "num_warps", "?"))


def main():
    parser = argparse.ArgumentParser()
    add_shape_arguments(parser)
    parser.add_argument("--causal", action="store_true")
    args = parser.parse_args()
    from jagged.ops import attention

    qkv, offsets, total, _ = jagged_inputs(args.B, args.max_L, (3, args.H, args.D), torch.bfloat16, args.lengths)
    q, k, v = (x.contiguous().requires_grad_(True) for x in qkv.unbind(1))
    grad = torch.randn_like(q)

    def step():
        out = jagged.jagged_flash_attention_values(q, k, v, offsets, offsets, causal=args.causal, validate=False)
        torch.autograd.grad(out, (q, k, v), grad)

    def forward():
        jagged.jagged_flash_attention_values(q, k, v, offsets, offsets, causal=args.causal, validate=False)

    for _ in range(3):
        step()
    # Host time per call: many calls back to back, timed before the device catches up.
    for name, fn in (("forward", forward), ("forward+backward", step)):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(50):
            fn()
        host = time.perf_counter() - start
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
        print(f"{name}: host {host / 50 * 1e6:.0f} us/call, wall {wall / 50 * 1e6:.0f} us/call")
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    print(f"B={args.B} max_L={args.max_L} H={args.H} D={args.D} {args.lengths} causal={args.causal} T={total} "
          "; 10 steps")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
    for fn in (attention._attention_forward_kernel, attention._attention_backward_kernel):
        for row in compiled_kernels(fn):
            print("kernel %s: regs=%s spills=%s shared=%s warps=%s" % row)


if __name__ == "__main__":
    main()
