"""Regenerate the benchmark tables and plots from the JSON results the benchmark scripts save:
``docs/benchmark_results.md`` plus PNG plots beside it (time and memory against max_L per length
distribution, throughput per case). The analysis in docs/benchmarks.md refers to them.

    python benchmarks/report.py [--results benchmarks/results] [--out docs]

For each benchmark the newest result file (``<name>*.json``, by the date it records) is used.
Plots need matplotlib (``pip install -e ".[bench]"``); without it only the tables are written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RATIO = "peer time / our time (above 1: we are faster)"


def newest(results: Path, name: str) -> dict | None:
    """The newest result of a benchmark, GPU runs first (CPU runs are toy sizes)."""
    found = [json.loads(p.read_text()) for p in sorted(results.glob(f"{name}*.json"))]
    found = [d for d in found if isinstance(d, dict) and "environment" in d]
    return max(found, key=lambda d: (not d["environment"]["device"].startswith("CPU"), d["environment"].get("date", ""))) \
        if found else None


def environment_line(env: dict, command: str) -> str:
    return (f"{env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}, "
            f"{env['date'][:10]}; command `{command}`.")


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def markdown(header: list[str], lines: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(v) for v in line) + " |" for line in lines]
    return "\n".join(out)


def grouped(rows: list[dict], keys: tuple[str, ...]) -> list[tuple[tuple, dict]]:
    """(case key, {method: row}) in first-seen order."""
    groups: dict[tuple, dict] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), {})[r["method"]] = r
    return list(groups.items())


def ratio(peer: dict | None, ours: dict, field: str):
    if not peer or not peer.get(field) or not ours.get(field):
        return None
    return peer[field] / ours[field]


# ------------------------------------------------------------------ sections
def attention_section(data: dict) -> str:
    keys = ("B", "max_L", "H", "D", "lengths", "causal", "fill")
    peers = [m for m in ("fa2_varlen", "fa2_varlen_attn", "flex", "sdpa_padded", "dense")
             if any(r["method"] == m for r in data["rows"])]
    header = [*keys, "ours fwd TF/s", "ours f+b TF/s"] + [f"{p} {w}" for p in peers for w in ("fwd", "f+b")] + \
        ["peak MiB " + " / ".join(["ours", *peers])]
    lines = []
    for key, by in grouped(data["rows"], keys):
        ours = by["jagged"]
        line = [*key, ours.get("fwd_TFLOPs"), ours.get("fwd_bwd_TFLOPs")]
        for p in peers:
            # aten's FA2 forward+backward runs without autograd: against our ops called alike.
            ours_fb = dict(ours, fwd_bwd_ms=ours.get("fwd_bwd_direct_ms") or ours["fwd_bwd_ms"]) \
                if p == "fa2_varlen" else ours
            line += [ratio(by.get(p), ours, "fwd_ms"), ratio(by.get(p), ours_fb, "fwd_bwd_ms")]
        line.append(" / ".join(fmt(by.get(m, {}).get("peak_MiB")) for m in ["jagged", *peers]))
        lines.append(line)
    return ("## Jagged flash attention\n\n" + environment_line(data["environment"], "python benchmarks/bench_attention.py")
            + f" Peer columns: {RATIO}. Plots: [time](attention_time.png), [memory](attention_memory.png).\n\n"
            + markdown(header, lines))


def fa2_section(data: dict) -> str:
    """Times in microseconds against FlashAttention-2 varlen, three ways: eager calls, eager
    calls without autograd (aten's FA2 has none; our two custom ops called directly), and
    CUDA-graph replays (GPU time alone)."""
    keys = ("B", "max_L", "H", "D", "lengths", "causal")
    header = [*keys, "fwd us ours / FA2", "fwd x", "fwd graph us ours / FA2", "fwd graph x",
              "f+b us ours direct / FA2 aten", "f+b x", "f+b us ours autograd / varlen_attn", "f+b autograd x",
              "f+b graph us ours / FA2", "f+b graph x"]
    lines = []

    def us(row, field):
        return None if not row or row.get(field) is None else 1000 * row[field]

    def pair(a, b):
        return f"{fmt(a)} / {fmt(b)}"

    for key, by in grouped(data["rows"], keys):
        ours, fa2, public = by["jagged"], by.get("fa2_varlen"), by.get("fa2_varlen_attn")
        if not fa2 or ours.get("fwd_graph_ms") is None:
            continue
        direct = ours.get("fwd_bwd_direct_ms") or ours["fwd_bwd_ms"]
        lines.append([*key, pair(us(ours, "fwd_ms"), us(fa2, "fwd_ms")), fa2["fwd_ms"] / ours["fwd_ms"],
                      pair(us(ours, "fwd_graph_ms"), us(fa2, "fwd_graph_ms")), ratio(fa2, ours, "fwd_graph_ms"),
                      pair(1000 * direct, us(fa2, "fwd_bwd_ms")), fa2["fwd_bwd_ms"] / direct,
                      pair(us(ours, "fwd_bwd_ms"), us(public, "fwd_bwd_ms")), ratio(public, ours, "fwd_bwd_ms"),
                      pair(us(ours, "fwd_bwd_graph_ms"), us(fa2, "fwd_bwd_graph_ms")),
                      ratio(fa2, ours, "fwd_bwd_graph_ms")])
    if not lines:
        return ""
    return ("### Against FlashAttention-2 varlen (issue 5)\n\n"
            "Median microseconds, ours / FA2, and FA2 time / our time (x; above 1: we are faster). *Eager*: "
            "do_bench of Python calls, host launch cost included. *Direct*: our two custom ops called without "
            "autograd, as aten's FA2 forward and backward are. *Autograd*: ours through its public function "
            "against `torch.nn.attention.varlen.varlen_attn` (FA2 with autograd; non-causal only). *Graph*: the "
            "same calls captured in a CUDA graph and replayed: GPU time alone.\n\n" + markdown(header, lines))


def generalized_section(data: dict, flex: dict | None) -> str:
    """jagged_attention (issue 8) against the padded PyTorch formulation and FlexAttention (whose
    rows may come from another run: they do not depend on our kernels)."""
    keys = ("variant", "B", "max_L", "H", "D", "lengths", "fill")
    flex_rows = {tuple(r[k] for k in keys): r for r in (flex or {}).get("rows", [])}
    header = [*keys, "ours fwd ms", "ours f+b ms", "ours f+b graph ms", "ours MiB", "padded f+b ms", "padded f+b x",
              "padded MiB", "flex fwd ms", "flex f+b ms", "flex f+b x", "flex MiB"]
    lines = []
    for key, by in grouped(data["rows"], keys):
        ours, padded, flex_row = by["jagged"], by.get("padded"), flex_rows.get(key)
        lines.append([*key, ours["fwd_ms"], ours["fwd_bwd_ms"], ours.get("fwd_bwd_graph_ms"), ours["peak_MiB"],
                      (padded or {}).get("fwd_bwd_ms") or (padded or {}).get("note"),
                      ratio(padded, ours, "fwd_bwd_ms"), (padded or {}).get("peak_MiB"),
                      (flex_row or {}).get("fwd_ms"), (flex_row or {}).get("fwd_bwd_ms"),
                      ratio(flex_row, ours, "fwd_bwd_ms"), (flex_row or {}).get("peak_MiB")])
    flex_line = f" FlexAttention: {environment_line(flex['environment'], 'the same')}" if flex else ""
    return ("## Generalized attention (issue 8)\n\n" + environment_line(
        data["environment"], "python benchmarks/bench_generalized_attention.py") + flex_line + "\n\n"
        "Causal self-attention, bf16; softmax_bias: softmax + relative-position bias [H, 257]; hstu: SiLU + bias + "
        "2 contextual positions + ~10% targets per row; silu: SiLU alone; dropout: softmax_bias with p=0.1. "
        "f+b includes the bias gradient. sparse: ~5% fill (95% of a padded batch is padding); unif: ~50%. "
        + RATIO + ".\n\n" + markdown(header, lines))


def throughput_section(title: str, data: dict, command: str) -> str:
    keys = ("op", "B", "max_L", "D", "dtype", "lengths", "fill")
    methods = list(dict.fromkeys(r["method"] for r in data["rows"]))
    peers = [m for m in methods if m != "jagged"]
    header = [*keys, "unit", "ours", "ours, graph"] + peers + [f"{p} / ours" for p in peers] + \
        [f"f+b {p} / ours" for p in peers]
    lines = []
    for key, by in grouped(data["rows"], keys):
        ours = by["jagged"]
        metric = "TFLOPs" if "fwd_TFLOPs" in ours else "GBps"
        line = [*key, "TFLOP/s" if metric == "TFLOPs" else "GB/s", ours.get(f"fwd_{metric}"),
                ours.get(f"graph_fwd_{metric}")]
        line += [by.get(p, {}).get(f"fwd_{metric}") for p in peers]
        line += [ratio(by.get(p), ours, "fwd_ms") for p in peers]
        line += [ratio(by.get(p), ours, "fwd_bwd_ms") for p in peers]
        lines.append(line)
    return (f"## {title}\n\n" + environment_line(data["environment"], command)
            + f" Ratios: {RATIO}. *ours, graph*: the call replayed from a CUDA graph (no host overhead).\n\n"
            + markdown(header, lines))


def stress_section(data: dict) -> str:
    header = ["op", "cases", "failures"]
    lines = [[op, n, data["failures"].get(op, 0)] for op, n in sorted(data["cases"].items())]
    lines.append(["total", sum(data["cases"].values()), sum(data["failures"].values())])
    return ("## Stress run\n\n" + environment_line(data["environment"], f"python benchmarks/stress.py --minutes "
                                                    f"{data['minutes']:g}") + "\n\n" + markdown(header, lines))


# ------------------------------------------------------------------ plots
def attention_plots(data: dict, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    rows = [r for r in data["rows"] if not r["causal"]]
    shapes = sorted({(r["H"], r["D"]) for r in rows}, key=lambda s: -sum(1 for r in rows if (r["H"], r["D"]) == s))
    head, dim = shapes[0]  # the shape measured at the most max_L values
    rows = [r for r in rows if (r["H"], r["D"]) == (head, dim)]
    distributions = list(dict.fromkeys(r["lengths"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    written = []
    for name, field, label in (("attention_time.png", "fwd_bwd_ms", "forward+backward, ms"),
                               ("attention_memory.png", "peak_MiB", "peak memory, MiB")):
        fig, axes = plt.subplots(1, len(distributions), figsize=(5.5 * len(distributions), 4), squeeze=False)
        for ax, dist in zip(axes[0], distributions):
            for method in methods:
                points = sorted((r["max_L"], r[field]) for r in rows
                                if r["lengths"] == dist and r["method"] == method and r.get(field))
                if points:
                    ax.plot(*zip(*points), marker="o", label=method)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("max_L")
            ax.set_ylabel(label)
            ax.set_title(f"{dist} lengths, H={head}, D={dim}")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.suptitle(f"{data['environment']['device']}, bf16", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = Path(__file__).resolve().parent
    parser.add_argument("--results", default=str(here / "results"))
    parser.add_argument("--out", default=str(here.parent / "docs"))
    args = parser.parse_args(argv)
    results, out = Path(args.results), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sections, plots = [], []
    attention = newest(results, "attention")
    if attention:
        sections.append(attention_section(attention))
        sections += [s for s in [fa2_section(attention)] if s]
        plots += attention_plots(attention, out)
    for name, title, command in (("conversions", "Conversions", "python benchmarks/bench_conversions.py"),
                                 ("ops", "Feature-interaction ops", "python benchmarks/bench_ops.py")):
        data = newest(results, name)
        if data:
            sections.append(throughput_section(title, data, command))
    generalized = newest(results, "generalized_attention_h100") or newest(results, "generalized_attention")
    if generalized and generalized["rows"] and generalized["rows"][0]["method"] != "flex":
        sections.append(generalized_section(generalized, newest(results, "generalized_attention_flex")))
    stress = newest(results, "stress")
    if stress:
        sections.append(stress_section(stress))
    text = ("# Benchmark results\n\nGenerated by `python benchmarks/report.py` from the JSON in "
            "`benchmarks/results/`; do not edit by hand. The analysis is in [benchmarks.md](benchmarks.md).\n\n"
            + "\n\n".join(sections) + "\n")
    (out / "benchmark_results.md").write_text(text)
    print(f"wrote {out / 'benchmark_results.md'}" + (f" and {', '.join(plots)}" if plots else ""))


if __name__ == "__main__":
    main()
