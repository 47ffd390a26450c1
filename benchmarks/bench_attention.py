"""Benchmark jagged flash attention against the ways a user would otherwise attend over jagged rows.

Methods, on the same jagged self-attention inputs (q, k, v values [T, H, D] + offsets):
- jagged: this library (jagged.jagged_flash_attention_values);
- fa2_varlen: PyTorch's FlashAttention-2 varlen kernel, torch.ops.aten._flash_attention_forward /
  _flash_attention_backward with int32 cumulative offsets (the strongest peer), called directly:
  its forward + backward pays no autograd;
- fa2_varlen_attn: the same kernel through PyTorch's public torch.nn.attention.varlen.varlen_attn
  (a custom op with autograd, as ours; torch >= 2.10), what a user calls;
- flex: FlexAttention (torch.compile'd) on the packed sequence with a same-row block mask (the
  mask is built outside the timed region; its build time is reported as flex_mask_ms);
- sdpa_padded: pad -> F.scaled_dot_product_attention (flash backend) -> unpad. The flash backend
  takes no padding mask, so without causal it also attends to padded keys (a timing baseline);
- dense: pad -> masked softmax(q k^T) v in plain PyTorch -> unpad.
Padded methods include the padding and un-padding a user holding jagged data must do.

Times are medians of eager calls (do_bench), which on short rows include the host's Python and
launch cost. For jagged and the FA2 kernels the calls are also captured in a CUDA graph and
replayed (*_graph_ms: GPU time alone), and ours is also timed calling its two custom ops
directly without autograd (fwd_bwd_direct_ms: the same work as fa2_varlen's f+b).

TFLOP/s count real tokens only: 4 * sum(L_i^2) * H * D forward (half with causal), 3.5x that for
forward + backward. Peak memory is for forward + backward, above the inputs.

    python benchmarks/bench_attention.py [--quick] [--no-flex] [--out results]
        [--shape B,L,D[,H] ...] [--lengths unif|skew] [--dtype bfloat16|float16|float32] [--causal]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import jagged
from jagged.ops import attention
from _common import (ON_GPU, bench, bench_graph, bench_main, flex_for_packed_rows, jagged_inputs, padded_to_dense,
                     padded_to_jagged, peak_memory_mib, print_table, save)

# (B, max_L, H, D, lengths, causal): the shared peer-baseline shapes, then causal ones.
GPU_CASES = [
    (256, 256, 4, 64, "unif", False), (256, 512, 4, 64, "unif", False), (256, 1024, 4, 64, "unif", False),
    (64, 4096, 4, 64, "unif", False), (256, 256, 4, 64, "skew", False), (256, 512, 4, 64, "skew", False),
    (64, 2048, 4, 64, "skew", False), (64, 1024, 2, 128, "unif", False), (1024, 128, 2, 32, "skew", False),
    (256, 256, 8, 32, "unif", False), (256, 256, 4, 128, "unif", False),
    (256, 256, 4, 64, "unif", True), (64, 4096, 4, 64, "unif", True),
    # Recsys batches of over 511 rows (the kernels' two-pass row scan).
    (1024, 256, 4, 64, "unif", False), (1024, 256, 4, 64, "skew", False),
]
QUICK_CASES = [GPU_CASES[0], GPU_CASES[3], GPU_CASES[8], GPU_CASES[11]]
CPU_CASES = [(4, 32, 2, 16, "unif", False), (4, 32, 2, 16, "skew", True)]


def method_fns(q, k, v, offsets, max_len, causal, use_flex):
    """name -> forward function of (q, k, v) returning jagged output values [T, H, D]."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    fns = {"jagged": Jagged(offsets, max_len, causal, scale)}

    def padded(x):  # [T, H, D] -> [B, H, L, D]
        return padded_to_dense(x, offsets, max_len).transpose(1, 2)

    def unpadded(x):  # [B, H, L, D] -> [T, H, D]
        return padded_to_jagged(x.transpose(1, 2), offsets)

    def dense(q, k, v):
        qp, kp, vp = padded(q), padded(k), padded(v)
        scores = (qp @ kp.transpose(-1, -2)) * scale
        i = torch.arange(max_len, device=q.device)
        visible = i[None, None, :] < offsets.diff()[:, None, None]  # [B, 1, L] keys of the row
        if causal:
            visible = visible & (i[None, None, :] <= i[None, :, None])
        scores = scores.masked_fill(~visible[:, None], float("-inf"))
        return unpadded(torch.softmax(scores, -1) @ vp)

    fns["dense"] = dense

    if ON_GPU:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa_padded(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return unpadded(F.scaled_dot_product_attention(padded(q), padded(k), padded(v), is_causal=causal))

        fns["sdpa_padded"] = sdpa_padded
        fns["fa2_varlen"] = FlashVarlen(offsets.int(), max_len, causal, scale)
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:  # torch < 2.10
            varlen_attn = None
        if varlen_attn is not None and not causal:  # its causal flag's name changed between releases
            cu_seqlens = offsets.int()
            fns["fa2_varlen_attn"] = lambda q, k, v: varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len,
                                                                 scale=scale)
        if use_flex:
            try:
                fns["flex"] = Flex(offsets, q.shape[0], causal)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                fns["flex"] = None  # reported as out of memory
    return fns


class Jagged:
    """This library as a JaggedTensor user calls it (max_len known, no offsets check), and its two
    custom ops called directly for a forward + backward without autograd."""

    def __init__(self, offsets, max_len, causal, scale):
        self.offsets, self.max_len, self.causal, self.scale = offsets, max_len, causal, scale

    def __call__(self, q, k, v):
        return jagged.jagged_flash_attention_values(q, k, v, self.offsets, self.offsets, causal=self.causal,
                                                    validate=False, max_len=self.max_len)

    def forward_backward_direct(self, q, k, v, grad):
        args = (self.offsets, self.offsets, self.causal, self.scale, self.max_len)
        out, lse = attention._attention_forward(q, k, v, *args)  # the ops' eager path, as the library calls them
        return attention._attention_backward(grad, q, k, v, out, lse, *args)


class FlashVarlen:
    """FA2 varlen forward, and an explicit forward + backward (aten has no autograd for it)."""

    def __init__(self, cu_seqlens, max_len, causal, scale):
        self.args = (cu_seqlens, cu_seqlens, max_len, max_len, 0.0, causal)
        self.scale = scale

    def __call__(self, q, k, v):
        return torch.ops.aten._flash_attention_forward(q, k, v, *self.args, False, scale=self.scale)[0]

    def forward_backward(self, q, k, v, grad):
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(q, k, v, *self.args, False, scale=self.scale)
        return torch.ops.aten._flash_attention_backward(grad, q, k, v, out, lse, *self.args, rng, unused, scale=self.scale)


class Flex:
    """FlexAttention over the packed [1, H, T, D] sequence, masked to pairs in the same row."""

    def __init__(self, offsets, total_len, causal):
        from torch.nn.attention.flex_attention import create_block_mask

        self.compiled, row = flex_for_packed_rows(offsets)

        def same_row(b, h, q_idx, kv_idx):
            ok = row[q_idx] == row[kv_idx]
            return ok & (kv_idx <= q_idx) if causal else ok

        def build():  # _compile=True builds the mask block by block instead of as a T x T tensor
            return create_block_mask(same_row, None, None, total_len, total_len, device=offsets.device, _compile=True)

        self.block_mask = build()
        self.mask_ms = bench(build)

    def __call__(self, q, k, v):
        packed = [x.transpose(0, 1)[None] for x in (q, k, v)]  # [1, H, T, D]
        return self.compiled(*packed, block_mask=self.block_mask)[0].transpose(0, 1)


GRAPH_METHODS = ("jagged", "fa2_varlen", "fa2_varlen_attn")


def measure(name, fn, q, k, v):
    """Forward and forward+backward median times, and peak memory of forward+backward."""
    if fn is None:
        return {"fwd_ms": None, "fwd_bwd_ms": None, "peak_MiB": None, "note": "out of memory building the mask"}
    grad = torch.randn_like(q)
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    if isinstance(fn, FlashVarlen):
        fb = lambda: fn.forward_backward(q, k, v, grad)  # noqa: E731
    else:
        fb = lambda: torch.autograd.grad(fn(*leaves), leaves, grad)  # noqa: E731
    try:
        fb()  # compile / warm up
        result = {"fwd_ms": bench(lambda: fn(q, k, v)), "fwd_bwd_ms": bench(fb), "peak_MiB": peak_memory_mib(fb)}
        if isinstance(fn, Jagged) and ON_GPU:  # (the ops run Triton: no CPU path of their own)
            result["fwd_bwd_direct_ms"] = bench(lambda: fn.forward_backward_direct(q, k, v, grad))
        if name in GRAPH_METHODS and ON_GPU:  # no host sync inside: capturable
            result["fwd_graph_ms"] = bench_graph(lambda: fn(q, k, v))
            result["fwd_bwd_graph_ms"] = bench_graph(fb)
    except torch.cuda.OutOfMemoryError:
        result = {"fwd_ms": None, "fwd_bwd_ms": None, "peak_MiB": None, "note": "out of memory"}
    if ON_GPU:
        torch.cuda.empty_cache()
    return result


def run(quick=False, no_flex=False, causal=False, out="results", shapes=None, dtypes=None, lengths=None, ops=None):
    """``shapes`` (B, max_L, D[, H]) with ``lengths`` and ``causal`` replace the default cases;
    the first of ``dtypes`` replaces bf16 (fp32 on the CPU); ``ops`` does not apply here."""
    use_flex = not no_flex
    cases = CPU_CASES if not ON_GPU else QUICK_CASES if quick else GPU_CASES
    if shapes:
        cases = [(s[0], s[1], s[3] if len(s) > 3 else 4, s[2], dist, causal)
                 for s in shapes for dist in lengths or ("unif", "skew")]
    elif lengths:
        cases = [c for c in cases if c[4] in lengths]
    dtype = dtypes[0] if dtypes else torch.bfloat16 if ON_GPU else torch.float32
    rows = []
    try:  # an interrupted sweep (Ctrl-C, timeout -s INT) still saves what it measured
        for number, (batch_size, max_len, heads, head_dim, distribution, causal) in enumerate(cases, 1):
            print(f"[{number}/{len(cases)}]", flush=True)
            qkv, offsets, total_len, longest = jagged_inputs(batch_size, max_len, (3, heads, head_dim), dtype, distribution)
            q, k, v = (x.contiguous() for x in qkv.unbind(1))
            sum_sq = float((offsets.diff().double() ** 2).sum())
            flops = 4 * sum_sq * heads * head_dim * (0.5 if causal else 1.0)
            case = {"B": batch_size, "max_L": max_len, "H": heads, "D": head_dim, "lengths": distribution,
                    "causal": causal, "T": total_len, "fill": round(total_len / (batch_size * max_len), 2)}
            fns = method_fns(q, k, v, offsets, longest, causal, use_flex and ON_GPU)
            expected = fns["fa2_varlen"](q, k, v) if ON_GPU else None
            for name, fn in fns.items():
                row = {**case, "method": name, **measure(name, fn, q, k, v)}
                if row["fwd_ms"]:
                    row["fwd_TFLOPs"] = flops / row["fwd_ms"] / 1e9
                    row["fwd_bwd_TFLOPs"] = 3.5 * flops / row["fwd_bwd_ms"] / 1e9
                if isinstance(fn, Flex):
                    row["flex_mask_ms"] = fn.mask_ms
                if name == "jagged" and expected is not None:
                    got = fn(q, k, v).float()
                    row["rel_err_vs_fa2"] = float((got - expected.float()).norm() / expected.float().norm())
                rows.append(row)
                print(f"  {name:12s} B={batch_size} L={max_len} H={heads} D={head_dim} {distribution} causal={causal}: "
                      f"fwd {row['fwd_ms']} ms, f+b {row['fwd_bwd_ms']} ms", flush=True)
    finally:
        save(rows, "attention", out)
        plot(rows, out)
    return rows


def summarise(rows):
    keys = ("B", "max_L", "H", "D", "lengths", "causal", "fill")
    table = []
    for key in dict.fromkeys(tuple(r[k] for k in keys) for r in rows):
        by = {r["method"]: r for r in rows if tuple(r[k] for k in keys) == key}
        ours = by["jagged"]
        line = dict(zip(keys, key))
        line["ours fwd ms"] = ours["fwd_ms"]
        line["ours fwd TF"] = ours.get("fwd_TFLOPs")
        line["ours f+b TF"] = ours.get("fwd_bwd_TFLOPs")
        for peer in ("fa2_varlen", "fa2_varlen_attn", "flex", "sdpa_padded", "dense"):
            r = by.get(peer)
            if r and r["fwd_ms"]:
                line[f"{peer} fwd x"] = r["fwd_ms"] / ours["fwd_ms"]
                # aten's FA2 f+b runs without autograd: compare with our ops called the same way.
                ours_fb = ours.get("fwd_bwd_direct_ms") if peer == "fa2_varlen" else None
                line[f"{peer} f+b x"] = r["fwd_bwd_ms"] / (ours_fb or ours["fwd_bwd_ms"])
            if r and r.get("fwd_graph_ms") and ours.get("fwd_graph_ms"):
                line[f"{peer} graph fwd x"] = r["fwd_graph_ms"] / ours["fwd_graph_ms"]
                line[f"{peer} graph f+b x"] = r["fwd_bwd_graph_ms"] / ours["fwd_bwd_graph_ms"]
        if by.get("dense", {}).get("peak_MiB") and ours["peak_MiB"]:
            line["dense/ours mem"] = by["dense"]["peak_MiB"] / ours["peak_MiB"]
        table.append(line)
    print("(x = peer time / our time: above 1 means we are faster)")
    print_table(table, list(dict.fromkeys(c for line in table for c in line)))


def plot(rows, out_dir):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    if not rows:  # an interrupted run that measured nothing
        return
    cases = list(dict.fromkeys((r["B"], r["max_L"], r["H"], r["D"], r["lengths"], r["causal"]) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, len(cases) * 1.1), 8))
    for ax, metric in zip(axes, ("fwd_TFLOPs", "fwd_bwd_TFLOPs")):
        width = 0.8 / len(methods)
        for m, method in enumerate(methods):
            vals = [next((r.get(metric) or 0 for r in rows if r["method"] == method and
                          (r["B"], r["max_L"], r["H"], r["D"], r["lengths"], r["causal"]) == c), 0) for c in cases]
            ax.bar([i + m * width for i in range(len(cases))], vals, width, label=method)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
        ax.set_xticklabels([f"B{c[0]} L{c[1]}\nH{c[2]} D{c[3]}\n{c[4]}{' causal' if c[5] else ''}" for c in cases], fontsize=7)
        ax.set_ylabel(metric.replace("_", " "))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{out_dir}/attention.png", dpi=110)


def main(argv=None):
    bench_main(__doc__, "attention", run, summarise, argv,
               extra_flags=[("--no-flex", "skip FlexAttention (its compile takes a while)"),
                            ("--causal", "causal masking for the --shape cases")])


if __name__ == "__main__":
    main()
