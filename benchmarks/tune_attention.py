"""Sweep tile configs of the attention kernels on the GPU: time of the forward and of the
backward launcher (median, do_bench), with each config's gradients checked against the default
config's. Prints one line per (shape, config); the winners go into ops/attention.py::_tiles.

    python benchmarks/tune_attention.py [--kernel backward|forward]
"""

import argparse
import math

import torch
import triton.testing

from _common import jagged_inputs
from jagged.ops import attention

SHAPES = [(64, 4096, 4, 64, "unif"), (256, 256, 4, 64, "skew"), (256, 512, 4, 64, "unif"),
          (1024, 128, 2, 32, "skew"), (256, 256, 4, 128, "unif"), (64, 1024, 2, 128, "unif")]
BACKWARD = [  # KV_BLOCK_M, KV_BLOCK_N, Q_BLOCK_M, Q_BLOCK_N, num_warps, num_stages
    (32, 64, 64, 32, 4, 2), (32, 64, 64, 32, 8, 2), (32, 128, 128, 32, 8, 2), (16, 64, 64, 16, 4, 2),
    (64, 64, 64, 64, 4, 2), (32, 64, 64, 32, 4, 3), (64, 128, 128, 64, 8, 2), (16, 128, 128, 16, 8, 2),
]
FORWARD = [  # BLOCK_M, BLOCK_N, num_warps, num_stages
    (64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 2), (128, 64, 4, 2),
    (64, 128, 4, 2), (32, 64, 4, 3),
]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kernel", choices=["backward", "forward"], default="backward")
    args = parser.parse_args()
    default_tiles = attention._tiles
    for batch, max_len, heads, head_dim, dist in SHAPES:
        qkv, offsets, total, _ = jagged_inputs(batch, max_len, (3, heads, head_dim), torch.bfloat16, dist)
        q, k, v = (x.contiguous() for x in qkv.unbind(1))
        scale = 1 / math.sqrt(head_dim)
        out, lse = attention._attention_forward(q, k, v, offsets, offsets, False, scale)
        do = torch.randn_like(out)
        expected = attention._attention_backward(do, q, k, v, out, lse, offsets, offsets, False, scale)
        for config in (BACKWARD if args.kernel == "backward" else FORWARD):
            def tiles(kernel, d, dv, config=config):
                base = default_tiles(kernel, d, dv)
                if kernel != args.kernel:
                    return base
                if kernel == "backward":
                    keys = ("KV_BLOCK_M", "KV_BLOCK_N", "Q_BLOCK_M", "Q_BLOCK_N", "num_warps", "num_stages")
                else:
                    keys = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
                return {**base, **dict(zip(keys, config))}

            attention._tiles = tiles
            try:
                if args.kernel == "backward":
                    fn = lambda: attention._attention_backward(do, q, k, v, out, lse, offsets, offsets, False, scale)  # noqa: E731
                    got = fn()
                    err = max(float((a.float() - b.float()).norm() / b.float().norm()) for a, b in zip(got, expected))
                else:
                    fn = lambda: attention._attention_forward(q, k, v, offsets, offsets, False, scale)  # noqa: E731
                    err = float((fn()[0].float() - out.float()).norm() / out.float().norm())
                ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                print(f"B={batch} L={max_len} H={heads} D={head_dim} {dist} {args.kernel} {config}: "
                      f"{ms * 1000:8.1f} us  rel.diff {err:.1e}", flush=True)
            except Exception as e:  # out of shared memory / registers for this config
                print(f"B={batch} L={max_len} H={heads} D={head_dim} {dist} {args.kernel} {config}: failed "
                      f"({type(e).__name__})", flush=True)
            finally:
                attention._tiles = default_tiles


if __name__ == "__main__":
    main()
