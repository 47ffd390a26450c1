"""Benchmark the jagged feature-interaction ops against what a user would otherwise run.

Methods, on the same jagged inputs:
- jagged: this library;
- segment_reduce: torch.segment_reduce with offsets (sum, mean), the strongest shipped peer;
- aten: torch.ops.aten._padded_dense_to_jagged_forward + the op (elementwise add/mul);
- padded: pad -> torch op with a length mask -> (unpad), as a user without this library writes it.

GB/s counts bytes read + written once: pooling reads T*D and writes B*D; softmax reads and
writes T*D; elementwise reads x and the dense positions it uses and writes T*D. The matmuls
(jagged_dense_bmm: [T, D] x [B, D, D]; jagged_jagged_bmm: [T, D] x [T, D] -> [B, D, D]) report
TFLOP/s on real work, 2*T*D*D, against pad -> torch.bmm -> unpad. jagged2_attention is the
unfused chain jagged_jagged_bmm_jagged_out -> jagged2_softmax -> jagged2_jagged_bmm (one head,
q = k = v = x), 4*sum(L^2)*D FLOPs, against the padded chain bmm -> masked softmax -> bmm.

    python benchmarks/bench_ops.py [--quick] [--out results]
"""

from __future__ import annotations


import torch

import jagged
from _common import (bench, bench_graph, bench_main, DEVICE, length_mask, op_cases, padded_to_dense, padded_to_jagged,
                     peak_memory_mib, print_table, save)

# The two peer shapes, and B=512 max_L=256 D=64: short rows and narrow features, the
# other end of its range (B=256..1024, D=64..256, max_L up to 1024).
GPU_CASES = [(1024, 512, 128), (256, 1024, 256), (512, 256, 64)]
OPS = ("sum", "mean", "softmax", "elementwise_add", "elementwise_mul", "jagged_dense_bmm", "jagged_jagged_bmm",
       "jagged2_attention")
CPU_CASES = [(8, 32, 16)]


def padded_pool(values, offsets, max_len, mean):
    total = padded_to_dense(values, offsets, max_len).float().sum(1)
    if mean:
        total = total / offsets.diff().clamp(min=1)[:, None]
    return total.to(values.dtype)


def padded_softmax(values, offsets, max_len):
    dense = padded_to_dense(values, offsets, max_len)
    dense = dense.masked_fill(~length_mask(offsets, max_len)[..., None], float("-inf"))
    return padded_to_jagged(torch.softmax(dense.float(), dim=1).to(values.dtype), offsets)


def padded_attention(values, offsets, max_len):
    dense = padded_to_dense(values, offsets, max_len)
    scores = torch.bmm(dense, dense.transpose(1, 2)).float()
    scores = scores.masked_fill(~length_mask(offsets, max_len)[:, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(values.dtype)
    return padded_to_jagged(torch.bmm(weights, dense), offsets)


def jagged2_attention(x):
    weights = jagged.jagged2_softmax(jagged.jagged_jagged_bmm_jagged_out(x, x))
    return jagged.jagged2_jagged_bmm(weights, x).values


def methods(op, offsets, max_len, dense_operand, dense_rows):
    jt = lambda v: jagged.JaggedTensor(v, offsets, max_len=max_len, validate=False)  # noqa: E731
    if op.startswith("elementwise"):
        add = op.endswith("add")
        apply = (lambda a, b: a + b) if add else (lambda a, b: a * b)
        fn = jagged.jagged_dense_elementwise_add if add else jagged.jagged_dense_elementwise_mul
        aten_gather = lambda v: torch.ops.aten._padded_dense_to_jagged_forward(dense_rows, [offsets], v.shape[0])  # noqa: E731
        return {"jagged": lambda v: fn(jt(v), dense_rows).values,
                "aten": lambda v: apply(v, aten_gather(v)),
                "padded": lambda v: apply(v, padded_to_jagged(dense_rows, offsets))}
    if op == "jagged2_attention":
        return {"jagged": lambda v: jagged2_attention(jt(v)),
                "padded": lambda v: padded_attention(v, offsets, max_len)}
    if op == "jagged_dense_bmm":
        return {"jagged": lambda v: jagged.jagged_dense_bmm(jt(v), dense_operand).values,
                "padded": lambda v: padded_to_jagged(torch.bmm(padded_to_dense(v, offsets, max_len), dense_operand), offsets)}
    if op == "jagged_jagged_bmm":
        return {"jagged": lambda v: jagged.jagged_jagged_bmm(jt(v), jt(v)),
                "padded": lambda v: torch.bmm(padded_to_dense(v, offsets, max_len).transpose(1, 2),
                                              padded_to_dense(v, offsets, max_len))}
    if op == "softmax":
        return {"jagged": lambda v: jagged.jagged_softmax(jt(v)).values,
                "padded": lambda v: padded_softmax(v, offsets, max_len)}
    mean = op == "mean"
    return {"jagged": lambda v: (jagged.jagged_mean if mean else jagged.jagged_sum)(jt(v)),
            "segment_reduce": lambda v: torch.segment_reduce(v, op, offsets=offsets, axis=0, initial=0),
            "padded": lambda v: padded_pool(v, offsets, max_len, mean)}


def run(quick=False, out="results", shapes=None, dtypes=None, lengths=None, ops=None):
    unknown = set(ops or ()) - set(OPS)
    if unknown:
        raise SystemExit(f"--op must be among {', '.join(OPS)}; got {', '.join(sorted(unknown))}")
    rows = []
    shapes = [s[:3] for s in shapes] if shapes else None
    for values, offsets, total_len, case in op_cases(quick, GPU_CASES, CPU_CASES, shapes, dtypes, lengths):
        batch_size, max_len, feature_dim = case["B"], case["max_L"], case["D"]
        e = values.element_size()
        dense_operand = torch.randn(batch_size, feature_dim, feature_dim, device=DEVICE).to(values.dtype)
        dense_rows = torch.randn(batch_size, max_len, feature_dim, device=DEVICE).to(values.dtype)
        lengths = offsets.diff()
        for op in ops or OPS:
            nbytes = {"softmax": 2 * total_len, "elementwise_add": 3 * total_len,
                      "elementwise_mul": 3 * total_len}.get(op, total_len + batch_size) * feature_dim * e
            flops = 2 * total_len * feature_dim * feature_dim
            if op == "jagged2_attention":
                flops = 4 * int((lengths * lengths).sum()) * feature_dim
            for name, fn in methods(op, offsets, max_len, dense_operand, dense_rows).items():
                leaf = values.detach().requires_grad_(True)
                grad = torch.randn_like(fn(leaf))
                row = {"op": op, **case, "method": name, "fwd_ms": bench(lambda: fn(values))}
                # Our ops do not synchronise (but jagged_jagged_bmm_jagged_out, which sizes its
                # output): their graph replay shows the kernels' own speed.
                capturable = name == "jagged" and op != "jagged2_attention"
                row["graph_fwd_ms"] = bench_graph(lambda: fn(values)) if capturable else None
                for timing in ("fwd", "graph_fwd"):
                    ms = row[f"{timing}_ms"]
                    if ms and (op.endswith("bmm") or op == "jagged2_attention"):
                        row[f"{timing}_TFLOPs"] = flops / ms / 1e9
                    elif ms:
                        row[f"{timing}_GBps"] = nbytes / ms / 1e6
                try:
                    row["fwd_bwd_ms"] = bench(lambda: torch.autograd.grad(fn(leaf), leaf, grad))
                except (RuntimeError, NotImplementedError):
                    row["fwd_bwd_ms"] = None
                row["peak_MiB"] = peak_memory_mib(lambda: fn(values))
                rows.append(row)
    save(rows, "ops", out)
    return rows


def summarise(rows):
    keys = ("op", "B", "max_L", "D", "dtype", "lengths", "fill")
    table = []
    for key in dict.fromkeys(tuple(r[k] for k in keys) for r in rows):
        by = {r["method"]: r for r in rows if tuple(r[k] for k in keys) == key}
        ours = by["jagged"]
        line = dict(zip(keys, key))
        for name, r in by.items():
            metric = "TFLOPs" if "fwd_TFLOPs" in r else "GBps"
            unit = "TFLOP/s" if metric == "TFLOPs" else "GB/s"
            line[f"{name} {unit}"] = r[f"fwd_{metric}"]
            if r.get(f"graph_fwd_{metric}"):
                line[f"graph {unit}"] = r[f"graph_fwd_{metric}"]
        for name, r in by.items():
            if name != "jagged":
                line[f"{name}/ours"] = r["fwd_ms"] / ours["fwd_ms"]
                if r["fwd_bwd_ms"] and ours["fwd_bwd_ms"]:
                    line[f"f+b {name}/ours"] = r["fwd_bwd_ms"] / ours["fwd_bwd_ms"]
        table.append(line)
    print_table(table, list(dict.fromkeys(c for line in table for c in line)))


def main(argv=None):
    bench_main(__doc__, "feature-interaction ops", run, summarise, argv)


if __name__ == "__main__":
    main()
