"""Benchmark jagged <-> padded dense conversions against what a user would otherwise run.

Methods, on the same jagged inputs:
- jagged: this library's Triton kernels;
- aten: PyTorch's own kernels, torch.ops.aten._jagged_to_padded_dense_forward /
  _padded_dense_to_jagged_forward (the strongest shipped peer);
- padded: plain PyTorch with a length mask (``dense[mask] = values`` / ``dense[mask]``).

GB/s counts bytes read + written once: jagged->padded reads T*D and writes B*L*D elements;
padded->jagged reads and writes T*D.

    python benchmarks/bench_conversions.py [--quick] [--out results]
"""

from __future__ import annotations


import torch

import jagged
from _common import (bench, bench_main, op_cases, padded_to_dense, padded_to_jagged, peak_memory_mib,
                     print_table, save)

# The two peer shapes, and B=512 max_L=256 D=64: short rows and narrow features, the
# other end of its range (B=256..1024, D=64..256, max_L up to 1024).
GPU_CASES = [(1024, 512, 128), (256, 1024, 256), (512, 256, 64)]
CPU_CASES = [(8, 32, 16)]


def aten_to_dense(values, offsets, max_len):
    return torch.ops.aten._jagged_to_padded_dense_forward(values, [offsets], [max_len], 0.0)


def aten_to_jagged(dense, offsets, total_len):
    return torch.ops.aten._padded_dense_to_jagged_forward(dense, [offsets], total_len)


def jagged_to_dense(values, offsets, max_len):
    return jagged.jagged_to_padded_dense(values, offsets, max_len, validate=False)  # offsets known good


def jagged_to_jagged(dense, offsets, total_len):
    return jagged.dense_to_jagged(dense, offsets, total_len, validate=False)


TO_DENSE = {"jagged": jagged_to_dense, "aten": aten_to_dense, "padded": padded_to_dense}
TO_JAGGED = {"jagged": jagged_to_jagged, "aten": aten_to_jagged, "padded": padded_to_jagged}


def measure(fn, inputs, bytes_moved):
    """Forward time, GB/s, forward+backward time (None where the method has no backward)."""
    forward_ms = bench(lambda: fn(*inputs))
    leaf = inputs[0].detach().requires_grad_(True)
    fb_ms = None
    try:
        out = fn(leaf, *inputs[1:])
        grad = torch.randn_like(out)
        fb_ms = bench(lambda: torch.autograd.grad(fn(leaf, *inputs[1:]), leaf, grad))
    except (RuntimeError, NotImplementedError):
        pass  # aten's conversions have no autograd formula in some releases
    return {
        "fwd_ms": forward_ms,
        "fwd_GBps": bytes_moved / forward_ms / 1e6,
        "fwd_bwd_ms": fb_ms,
        "peak_MiB": peak_memory_mib(lambda: fn(*inputs)),
    }


OPS = ("to_padded", "to_jagged")


def run(quick: bool = False, out: str = "results", shapes=None, dtypes=None, lengths=None, ops=None) -> list[dict]:
    if set(ops or ()) - set(OPS):
        raise SystemExit(f"--op must be among {', '.join(OPS)} here, got {ops}")
    rows = []
    shapes = [s[:3] for s in shapes] if shapes else None
    for values, offsets, total_len, case in op_cases(quick, GPU_CASES, CPU_CASES, shapes, dtypes, lengths):
        batch_size, max_len, feature_dim = case["B"], case["max_L"], case["D"]
        dense = aten_to_dense(values, offsets, max_len)
        element = values.element_size()
        for op, methods, inputs, nbytes in (
            ("to_padded", TO_DENSE, (values, offsets, max_len), (total_len + batch_size * max_len) * feature_dim * element),
            ("to_jagged", TO_JAGGED, (dense, offsets, total_len), 2 * total_len * feature_dim * element),
        ):
            if ops and op not in ops:
                continue
            for method, fn in methods.items():
                rows.append({"op": op, **case, "method": method, **measure(fn, inputs, nbytes)})
    save(rows, "conversions", out)
    return rows


def summarise(rows: list[dict]) -> None:
    """One line per (op, case): GB/s of each method and the time ratios against ours."""
    table = []
    keys = ("op", "B", "max_L", "D", "dtype", "lengths", "fill")
    for key in dict.fromkeys(tuple(r[k] for k in keys) for r in rows):
        by_method = {r["method"]: r for r in rows if tuple(r[k] for k in keys) == key}
        ours = by_method["jagged"]
        line = dict(zip(keys, key))
        for method, r in by_method.items():
            line[f"{method} GB/s"] = r["fwd_GBps"]
        line["aten/ours"] = by_method["aten"]["fwd_ms"] / ours["fwd_ms"]
        line["padded/ours"] = by_method["padded"]["fwd_ms"] / ours["fwd_ms"]
        if ours["fwd_bwd_ms"] and by_method["padded"]["fwd_bwd_ms"]:
            line["f+b padded/ours"] = by_method["padded"]["fwd_bwd_ms"] / ours["fwd_bwd_ms"]
        table.append(line)
    print_table(table, list(table[0].keys()))


def main(argv=None):
    bench_main(__doc__, "conversions", run, summarise, argv)


if __name__ == "__main__":
    main()
