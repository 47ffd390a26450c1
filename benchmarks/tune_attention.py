"""Sweep tile configs of the attention kernels on the GPU: GPU time of the forward and of the
backward launcher (median of CUDA-graph replays, so that short rows are not measured as host
launch cost), with each config's outputs checked against the default config's, and FA2 varlen's
forward / backward on the same inputs for scale. Prints one line per (shape, config); the
winners go into ops/attention.py::_tiles. A config may end with a dict of extra launch options
(e.g. {"maxnreg": 80}: Triton's register cap, for more programs per SM).

    python benchmarks/tune_attention.py [--kernel backward|forward] [--short] [--causal]
        [--shape B,L,H,D,unif|skew ...] [--configs "(64, 32, 4, 3)" ...]
"""

import argparse
import ast
import math

import torch
from _common import bench_graph, jagged_inputs
from jagged.ops import attention

SHAPES = [(64, 4096, 4, 64, "unif"), (256, 256, 4, 64, "skew"), (256, 256, 4, 64, "unif"), (256, 512, 4, 64, "unif"),
          (1024, 128, 2, 32, "skew"), (256, 256, 4, 128, "skew"), (256, 256, 4, 128, "unif"),
          (64, 1024, 2, 128, "unif")]
BACKWARD = [  # KV_BLOCK_M, KV_BLOCK_N, Q_BLOCK_M, Q_BLOCK_N, num_warps, num_stages[, UNMASKED_TILES]
    (32, 64, 64, 32, 4, 2), (32, 64, 64, 32, 8, 2), (32, 128, 128, 32, 8, 2), (16, 64, 64, 16, 4, 2),
    (64, 64, 64, 64, 4, 2), (32, 64, 64, 32, 4, 3), (64, 128, 128, 64, 8, 2), (16, 128, 128, 16, 8, 2),
    (16, 32, 32, 16, 4, 3), (32, 32, 32, 32, 4, 3), (16, 32, 32, 16, 2, 3), (16, 64, 64, 16, 4, 3),
]
FORWARD = [  # BLOCK_M, BLOCK_N, num_warps, num_stages[, UNMASKED_TILES]
    (64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 2), (128, 64, 4, 2),
    (64, 128, 4, 2), (32, 64, 4, 3), (32, 32, 4, 3), (32, 32, 2, 3), (16, 64, 2, 3), (16, 32, 2, 3),
    (128, 32, 8, 2), (64, 32, 8, 2), (64, 16, 4, 3), (64, 32, 4, 2), (64, 32, 4, 4), (128, 64, 8, 2),
]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kernel", choices=["backward", "forward"], default="backward")
    parser.add_argument("--short", action="store_true", help="only the shapes with max_L <= 512")
    parser.add_argument("--causal", action="store_true", help="causal attention (FA2 causal too)")
    parser.add_argument("--shape", action="append", help="B,L,H,D,lengths replacing the built-in shapes")
    parser.add_argument("--configs", nargs="+", help="Python tuples replacing the built-in list")
    args = parser.parse_args()
    shapes = SHAPES
    if args.shape:
        shapes = [tuple(int(f) for f in s.split(",")[:4]) + (s.split(",")[4],) for s in args.shape]
    configs = [ast.literal_eval(c) for c in args.configs] if args.configs else (
        BACKWARD if args.kernel == "backward" else FORWARD)
    default_tiles = attention._tiles
    for batch, max_len, heads, head_dim, dist in shapes:
        if args.short and max_len > 512:
            continue
        qkv, offsets, total, _ = jagged_inputs(batch, max_len, (3, heads, head_dim), torch.bfloat16, dist)
        q, k, v = (x.contiguous() for x in qkv.unbind(1))
        scale = 1 / math.sqrt(head_dim)
        longest = int(offsets.diff().max())
        out, lse = attention._attention_forward(q, k, v, offsets, offsets, args.causal, scale, longest)
        do = torch.randn_like(out)
        expected = attention._attention_backward(do, q, k, v, out, lse, offsets, offsets, args.causal, scale,
                                                 longest)
        cu = offsets.int()
        fa_args = (cu, cu, longest, longest, 0.0, args.causal)
        fa_out, fa_lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(q, k, v, *fa_args, False, scale=scale)
        fa2_us = 1000 * bench_graph(
            (lambda: torch.ops.aten._flash_attention_backward(do, q, k, v, fa_out, fa_lse, *fa_args, rng, unused,
                                                              scale=scale)) if args.kernel == "backward" else
            (lambda: torch.ops.aten._flash_attention_forward(q, k, v, *fa_args, False, scale=scale)))
        print(f"B={batch} L={max_len} H={heads} D={head_dim} {dist} causal={args.causal} {args.kernel} "
              f"FA2 varlen: {fa2_us:8.1f} us", flush=True)
        for config in configs:
            def tiles(kernel, d, dv, max_len=None, hstu_mask=False, plain=False, config=config):
                base = default_tiles(kernel, d, dv, max_len, hstu_mask, plain)
                if kernel != args.kernel:
                    return base
                if kernel == "backward":
                    keys = ("KV_BLOCK_M", "KV_BLOCK_N", "Q_BLOCK_M", "Q_BLOCK_N", "num_warps", "num_stages",
                            "UNMASKED_TILES")
                else:
                    keys = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "UNMASKED_TILES")
                extra = config[-1] if isinstance(config[-1], dict) else {}
                sizes = config[:-1] if extra else config
                return {**base, **dict(zip(keys, sizes)), **extra}

            attention._tiles = tiles
            try:
                if args.kernel == "backward":
                    fn = lambda: attention._attention_backward(do, q, k, v, out, lse, offsets, offsets,  # noqa: E731
                                                              args.causal, scale, longest)
                    got = fn()
                    err = max(float((a.float() - b.float()).norm() / b.float().norm()) for a, b in zip(got, expected))
                else:
                    fn = lambda: attention._attention_forward(  # noqa: E731
                        q, k, v, offsets, offsets, args.causal, scale, longest)
                    err = float((fn()[0].float() - out.float()).norm() / out.float().norm())
                ms = bench_graph(fn)
                print(f"B={batch} L={max_len} H={heads} D={head_dim} {dist} {args.kernel} {config}: "
                      f"{ms * 1000:8.1f} us  rel.diff {err:.1e}", flush=True)
            except Exception as e:  # out of shared memory / registers for this config
                print(f"B={batch} L={max_len} H={heads} D={head_dim} {dist} {args.kernel} {config}: failed "
                      f"({type(e).__name__})", flush=True)
            finally:
                attention._tiles = default_tiles


if __name__ == "__main__":
    main()
