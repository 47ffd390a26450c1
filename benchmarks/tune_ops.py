"""Sweep tile configs of the batched-matmul and softmax kernels on the GPU (median time of
CUDA-graph replays of the launcher: kernels of tens of us, whose eager timing would include the
host's launch cost), each config's output checked against the default config's. One line per
(shape, kernel, config); the winners go into ops/bmm.py (*_tiles) and ops/softmax.py. A config's
optional sixth entry caps the registers per thread (Triton's ``maxnreg``): more programs per SM;
a seventh runs jagged_dense_bmm's persistent kernel with that many programs per SM.

    python benchmarks/tune_ops.py [--kernel jagged_dense_bmm|jagged_jagged_bmm|softmax] [--lengths unif|skew]
                                  [--dtype bf16|fp32]
"""

import argparse

import torch

from _common import bench_graph, jagged_inputs
from jagged.ops import bmm, softmax

SHAPES = [(1024, 512, 128), (256, 1024, 256)]  # B, max_L, D (the shapes)
BMM = [  # BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages[, maxnreg (None: no cap)[, PROGRAMS_PER_SM]]
    (64, 128, 64, 4, 2), (64, 128, 64, 4, 3), (64, 128, 32, 4, 3), (128, 128, 64, 8, 3), (128, 64, 64, 4, 3),
    (64, 64, 64, 4, 4), (128, 256, 64, 8, 3), (64, 256, 64, 8, 3), (128, 128, 64, 4, 3), (32, 128, 64, 4, 3),
    (64, 128, 128, 4, 2), (64, 128, 64, 8, 2), (64, 128, 64, 8, 3), (64, 128, 32, 4, 2, 96), (64, 128, 64, 4, 2, 96),
    (64, 128, 32, 8, 3), (64, 256, 64, 8, 2), (64, 256, 32, 8, 3), (64, 256, 32, 8, 4), (128, 256, 64, 8, 2),
    (128, 256, 32, 8, 3), (128, 128, 64, 8, 2), (64, 64, 64, 4, 3, 96), (32, 256, 64, 4, 3),
    (128, 256, 64, 8, 3, None, 1), (128, 256, 64, 8, 4, None, 1), (64, 256, 64, 8, 3, None, 2),
    (64, 128, 64, 4, 3, None, 4), (64, 128, 32, 4, 4, None, 3),
]
SOFTMAX = [  # tile bytes, max columns per program, num_warps[, maxnreg]
    (16384, 64, 4), (16384, 64, 8), (16384, 64, 4, 96), (16384, 64, 4, 80), (16384, 64, 4, 64), (16384, 64, 8, 64),
    (8192, 64, 4), (8192, 64, 4, 64), (32768, 64, 8), (32768, 64, 8, 96), (16384, 128, 8), (16384, 32, 4),
    (16384, 32, 4, 64), (8192, 32, 2), (32768, 32, 4), (16384, 32, 8), (32768, 32, 8), (16384, 16, 4),
]


def sweep_bmm(kernel, values, offsets, dense, label):
    launch = bmm._launch_jagged_dense_bmm if kernel == "jagged_dense_bmm" else bmm._launch_jagged_jagged_bmm
    args = (values, dense, offsets) if kernel == "jagged_dense_bmm" else (values, values, offsets)
    flops = 2 * values.shape[0] * values.shape[1] * values.shape[1]
    expected = launch(*args).float()
    tiles_name = "_dense_bmm_tiles" if kernel == "jagged_dense_bmm" else "_jagged_bmm_tiles"
    default_tiles = getattr(bmm, tiles_name)
    for config in BMM:
        if len(config) > 6 and kernel != "jagged_dense_bmm":
            continue  # persistent configs: jagged_dense_bmm only
        setattr(bmm, tiles_name,
                lambda *_, c=config: {k: v for k, v in zip(("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages",
                                                            "maxnreg", "PROGRAMS_PER_SM"), c) if v is not None})
        try:
            err = float((launch(*args).float() - expected).norm() / expected.norm())
            ms = bench_graph(lambda: launch(*args))
            print(f"{label} {kernel} {config}: {ms * 1000:8.1f} us {flops / ms / 1e9:6.1f} TFLOP/s rel.diff {err:.1e}",
                  flush=True)
        except Exception as e:  # out of shared memory / registers for this config
            print(f"{label} {kernel} {config}: failed ({type(e).__name__})", flush=True)
        finally:
            setattr(bmm, tiles_name, default_tiles)


def with_register_cap(launch, cap):
    grid, tiles = launch
    return grid, dict(tiles, maxnreg=cap[0]) if cap else tiles


def sweep_softmax(values, offsets, max_len, label):
    """Forward and backward launchers, timed as CUDA-graph replays (kernels of tens of us: eager
    timing would measure the host's launch cost). The long-row tier keeps its rule
    (softmax.SOFTMAX_CHAIN_BYTES) over each config's tile."""
    nbytes = 2 * values.numel() * values.element_size()
    default_launch = softmax.tiered_walk_launch
    expected = softmax._softmax_forward(values, offsets, max_len).float()
    grad = torch.randn_like(values)
    for config in SOFTMAX:
        softmax.tiered_walk_launch = lambda o, v, longest, c=config, chain_bytes=0, **defaults: with_register_cap(
            default_launch(o, v, longest, tile_bytes=c[0], max_block_d=c[1], chain_bytes=chain_bytes, num_warps=c[2]),
            c[3:])
        try:
            y = softmax._softmax_forward(values, offsets, max_len)
            err = float((y.float() - expected).norm() / expected.norm())
            fwd = bench_graph(lambda: softmax._softmax_forward(values, offsets, max_len))
            bwd = bench_graph(lambda: softmax._softmax_backward(y, grad, offsets, max_len))
            print(f"{label} softmax {config}: fwd {fwd * 1000:7.1f} us {nbytes / fwd / 1e6:5.0f} GB/s, "
                  f"bwd {bwd * 1000:7.1f} us {1.5 * nbytes / bwd / 1e6:5.0f} GB/s, rel.diff {err:.1e}", flush=True)
        finally:
            softmax.tiered_walk_launch = default_launch


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kernel", choices=["jagged_dense_bmm", "jagged_jagged_bmm", "softmax"], action="append")
    parser.add_argument("--lengths", choices=["unif", "skew"], action="append")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], action="append")
    args = parser.parse_args()
    kernels = args.kernel or ["jagged_dense_bmm", "jagged_jagged_bmm", "softmax"]
    for batch, max_len, dim in SHAPES:
        for dist in args.lengths or ("unif", "skew"):
            for dtype_name in args.dtype or ["bf16"]:
                dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
                values, offsets, _, _ = jagged_inputs(batch, max_len, dim, dtype, dist)
                dense = torch.randn(batch, dim, dim, device=values.device).to(values.dtype)
                label = f"B={batch} L={max_len} D={dim} {dist} {dtype_name}"
                for kernel in kernels:
                    if kernel == "softmax":
                        sweep_softmax(values, offsets, max_len, label)
                    else:
                        sweep_bmm(kernel, values, offsets, dense, label)


if __name__ == "__main__":
    main()
