"""Benchmark jagged.jagged_attention (issue 8) against what a user would write today.

Variants (self-attention on the same jagged inputs):
- softmax_bias: causal softmax attention + a learnable relative-position bias [H, 2R+1] (R=128),
  gradients into q, k, v and the bias. Methods: jagged, flex (FlexAttention, torch.compile'd, over the packed
  sequence: a score_mod adding the bias, a same-row causal block mask built outside the timed
  region), padded (pad -> masked softmax(q k^T * scale + bias) v in PyTorch -> unpad).
- hstu: HSTU's pointwise attention: SiLU, causal, the bias, 2 contextual positions and ~10%
  target positions per row (num_targets), norm = the row's length. Methods: jagged, padded.
- silu: SiLU causal attention without bias or masks (the cost of the features above is the
  difference from this row); jagged only.
- dropout: softmax_bias with dropout 0.1; jagged only.

Shapes: B=512, H=4, D=128, max_L 256 / 1024 / 4096, rows "unif" (~50% fill: half of a padded
batch is padding) and "sparse" (~5% fill: 95% padding). bf16.

Times are medians (do_bench) of eager calls; ours also as CUDA-graph replays (*_graph_ms, GPU
time alone). Peak memory is for forward + backward, above the inputs. A padded method that runs
out of memory is reported as such.

    python benchmarks/bench_generalized_attention.py [--quick] [--out results] [--no-flex]
        [--shape B,L,D[,H] ...] [--lengths unif|sparse|skew] [--dtype bfloat16|float16|float32]
"""

from __future__ import annotations

import math

import torch

import jagged
from jagged import JaggedTensor, reference
from _common import (ON_GPU, bench, bench_graph, bench_main, flex_for_packed_rows, jagged_inputs, padded_to_dense,
                     padded_to_jagged, peak_memory_mib, print_table, save)

GPU_SHAPES = [(512, 256, 128, 4), (512, 1024, 128, 4), (512, 4096, 128, 4)]
CPU_SHAPES = [(3, 24, 16, 2)]
MAX_DISTANCE = 128
CONTEXTUAL_LEN = 2


def variant_options(variant, bias, num_targets):
    """jagged_attention keyword arguments of a variant."""
    return {
        "softmax_bias": dict(causal=True, bias=bias),
        "hstu": dict(activation="silu", causal=True, bias=bias, num_targets=num_targets, contextual_len=CONTEXTUAL_LEN),
        "silu": dict(activation="silu", causal=True),
        "dropout": dict(causal=True, bias=bias, dropout_p=0.1, seed=1),
    }[variant]


class Jagged:
    def __init__(self, offsets, max_len, options):
        self.offsets, self.max_len, self.options = offsets, max_len, options

    def __call__(self, q, k, v):
        jq, jk, jv = (JaggedTensor(x, self.offsets, validate=False, max_len=self.max_len) for x in (q, k, v))
        return jagged.jagged_attention(jq, jk, jv, **self.options).values


class Padded:
    """What a user writes without this library: pad, attend with masks over [B, H, L, L], unpad."""

    def __init__(self, offsets, max_len, options):
        self.offsets, self.max_len, self.options = offsets, max_len, options
        self.mask = None
        try:
            self._build_masks()
        except torch.cuda.OutOfMemoryError:  # [B, L, L] masks at B=512, L=4096: measured as out of memory
            pass

    def _build_masks(self):
        offsets, max_len, options = self.offsets, self.max_len, self.options
        self.mask = reference.attention_mask(offsets, offsets, max_len, max_len, causal=options.get("causal", False),
                                             num_targets=options.get("num_targets"),
                                             contextual_len=options.get("contextual_len", 0))[:, None]
        position = torch.arange(max_len, device=offsets.device)
        self.buckets = (position[None, :] - position[:, None]).clamp(-MAX_DISTANCE, MAX_DISTANCE) + MAX_DISTANCE
        self.lengths = offsets.diff()[:, None, None, None]

    def __call__(self, q, k, v):
        if self.mask is None:
            raise torch.cuda.OutOfMemoryError("building the [B, L, L] masks")
        qd, kd, vd = (padded_to_dense(x, self.offsets, self.max_len).transpose(1, 2) for x in (q, k, v))
        scores = qd @ kd.transpose(-1, -2) * (1.0 / math.sqrt(q.shape[-1]))
        bias = self.options.get("bias")
        if bias is not None:
            scores = scores + bias[:, self.buckets].to(scores.dtype)
        if self.options.get("activation", "softmax") == "softmax":
            weights = torch.softmax(scores.masked_fill(~self.mask, float("-inf")), -1).nan_to_num(0.0)
        else:
            weights = torch.nn.functional.silu(scores).masked_fill(~self.mask, 0.0) / self.lengths.clamp(min=1)
        return padded_to_jagged((weights.to(vd.dtype) @ vd).transpose(1, 2), self.offsets)


class Flex:
    """FlexAttention over the packed [1, H, T, D] sequence: same-row causal block mask, bias as a
    score_mod (within a row, key index - query index is the key-minus-query distance)."""

    def __init__(self, offsets, total_len, bias):
        from torch.nn.attention.flex_attention import create_block_mask

        self.compiled, row = flex_for_packed_rows(offsets)

        def same_row_causal(b, h, q_idx, kv_idx):
            return (row[q_idx] == row[kv_idx]) & (kv_idx <= q_idx)

        def add_bias(score, b, h, q_idx, kv_idx):
            return score + bias[h, (kv_idx - q_idx).clamp(-MAX_DISTANCE, MAX_DISTANCE) + MAX_DISTANCE]

        self.score_mod = add_bias
        self.block_mask = create_block_mask(same_row_causal, None, None, total_len, total_len, device=offsets.device,
                                            _compile=True)

        # Inductor's default backward tiles need more shared memory than an H100 has at D=128 with a
        # captured bias ("out of resource"): smaller tiles, tried in turn (key names vary by version).
        self.fallbacks = [{"BLOCK_M1": 32, "BLOCK_N1": 32, "BLOCK_M2": 32, "BLOCK_N2": 32},
                          {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 32, "bwd_BLOCK_M2": 32, "bwd_BLOCK_N2": 32},
                          {"num_stages": 1}]
        self.kernel_options = None

    def __call__(self, q, k, v):
        packed = [x.transpose(0, 1)[None] for x in (q, k, v)]
        return self.compiled(*packed, score_mod=self.score_mod, block_mask=self.block_mask,
                             kernel_options=self.kernel_options)[0].transpose(0, 1)


def measure(fn, q, k, v, bias, graph):
    # The gradient from a CPU generator: a failed CUDA-graph capture would break the CUDA one.
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(0)).to(q)
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    wrt = leaves + ([bias] if bias is not None else [])
    fb = lambda: torch.autograd.grad(fn(*leaves), wrt, grad)  # noqa: E731
    try:
        while True:  # compile / warm up; a peer with smaller-tile fallbacks tries them in turn
            try:
                fb()
                break
            except Exception as error:
                if isinstance(error, torch.cuda.OutOfMemoryError) or not getattr(fn, "fallbacks", None):
                    raise
                fn.kernel_options = fn.fallbacks.pop(0)
        result = {"fwd_ms": bench(lambda: fn(q, k, v)), "fwd_bwd_ms": bench(fb), "peak_MiB": peak_memory_mib(fb)}
        if getattr(fn, "kernel_options", None):
            result["note"] = f"kernel_options={fn.kernel_options}"
        if graph and ON_GPU:
            result["fwd_graph_ms"] = bench_graph(lambda: fn(q, k, v))
            result["fwd_bwd_graph_ms"] = bench_graph(fb)
    except torch.cuda.OutOfMemoryError:
        result = {"fwd_ms": None, "fwd_bwd_ms": None, "peak_MiB": None, "note": "out of memory"}
    except Exception as error:  # a peer that cannot run this case: say why, keep going
        result = {"fwd_ms": None, "fwd_bwd_ms": None, "peak_MiB": None, "note": f"{type(error).__name__}: {error}"[:200]}
    if ON_GPU:
        torch.cuda.empty_cache()
    return result


def methods(variant, offsets, total_len, longest, options, bias, use_flex):
    fns = {"jagged": Jagged(offsets, longest, options)}
    if variant == "softmax_bias":
        if use_flex:
            fns["flex"] = Flex(offsets, total_len, bias)
    if variant in ("softmax_bias", "hstu"):
        fns["padded"] = Padded(offsets, longest, options)
    return fns


def run(quick=False, no_flex=False, out="results", shapes=None, dtypes=None, lengths=None, ops=None):
    """``ops`` picks variants (softmax_bias, hstu, silu, dropout)."""
    shapes = shapes or (CPU_SHAPES if not ON_GPU else GPU_SHAPES[:1] if quick else GPU_SHAPES)
    dtype = dtypes[0] if dtypes else torch.bfloat16 if ON_GPU else torch.float32
    variants = ops or ["softmax_bias", "hstu", "silu", "dropout"]
    rows = []
    try:
        for shape in shapes:
            batch_size, max_len, head_dim = shape[:3]
            heads = shape[3] if len(shape) > 3 else 4
            for distribution in lengths or ("sparse", "unif"):
                qkv, offsets, total_len, longest = jagged_inputs(batch_size, max_len, (3, heads, head_dim), dtype,
                                                                 distribution)
                q, k, v = (x.contiguous() for x in qkv.unbind(1))
                lengths_ = offsets.diff()
                num_targets = (lengths_ // 10).clamp(min=1).minimum(lengths_)
                bias = (0.1 * torch.randn(heads, 2 * MAX_DISTANCE + 1, generator=torch.Generator().manual_seed(1))).to(q.device)
                bias.requires_grad_(True)
                flops = 4 * float((lengths_.double() ** 2).sum()) * heads * head_dim * 0.5  # causal
                case = {"B": batch_size, "max_L": max_len, "H": heads, "D": head_dim, "lengths": distribution,
                        "T": total_len, "fill": round(total_len / (batch_size * max_len), 3)}
                work = [(variant, name, fn, options) for variant in variants
                        for options in [variant_options(variant, bias, num_targets)]
                        for name, fn in methods(variant, offsets, total_len, longest, options, bias,
                                                not no_flex and ON_GPU).items()]
                # Ours first: a peer's failure (a compile that runs out of shared memory, say) cannot
                # then disturb our measurements.
                work.sort(key=lambda item: item[1] != "jagged")
                for variant, name, fn, options in work:
                    row = {**case, "variant": variant, "method": name,
                           **measure(fn, q, k, v, options.get("bias"), graph=name.startswith("jagged"))}
                    if row["fwd_ms"]:
                        row["fwd_TFLOPs"] = flops / row["fwd_ms"] / 1e9
                        row["fwd_bwd_TFLOPs"] = 3.5 * flops / row["fwd_bwd_ms"] / 1e9
                    rows.append(row)
                    print(f"  {variant:12s} {name:10s} B={batch_size} L={max_len} {distribution}: fwd "
                          f"{row['fwd_ms']} ms, f+b {row['fwd_bwd_ms']} ms, {row['peak_MiB']} MiB "
                          f"{row.get('note', '')}", flush=True)
    finally:
        save(rows, "generalized_attention", out)
    return rows


def summarise(rows):
    keys = ("variant", "B", "max_L", "H", "D", "lengths", "fill")
    table = []
    for key in dict.fromkeys(tuple(r[k] for k in keys) for r in rows):
        by = {r["method"]: r for r in rows if tuple(r[k] for k in keys) == key}
        ours = by["jagged"]
        line = dict(zip(keys, key))
        line.update({"ours fwd ms": ours["fwd_ms"], "ours f+b ms": ours["fwd_bwd_ms"],
                     "ours f+b graph ms": ours.get("fwd_bwd_graph_ms"), "ours f+b TF": ours.get("fwd_bwd_TFLOPs"),
                     "ours MiB": ours["peak_MiB"]})
        for peer in ("flex", "padded"):
            r = by.get(peer)
            if r is None:
                continue
            if r["fwd_ms"] and ours["fwd_ms"]:
                line[f"{peer} fwd x"] = r["fwd_ms"] / ours["fwd_ms"]
                line[f"{peer} f+b x"] = r["fwd_bwd_ms"] / ours["fwd_bwd_ms"]
                line[f"{peer} MiB"] = r["peak_MiB"]
            else:
                line[f"{peer} f+b x"] = r.get("note", "failed")[:14]
        table.append(line)
    print("(x = peer time / our time: above 1 means we are faster)")
    print_table(table, list(dict.fromkeys(c for line in table for c in line)))


def main(argv=None):
    bench_main(__doc__, "generalized attention", run, summarise, argv,
               extra_flags=[("--no-flex", "skip FlexAttention (its compile takes a while)")])


if __name__ == "__main__":
    main()
