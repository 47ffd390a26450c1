"""Shared benchmark plumbing: devices, jagged inputs, timing, memory, environment, output."""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def random_lengths(batch_size: int, max_len: int, distribution: str, generator: torch.Generator) -> torch.Tensor:
    """Row lengths in [1, max_len]: "unif" (uniform, ~50% fill) or "skew" (exponential with
    mean max_len/5, ~20% fill), as in the shared peer baselines; "sparse" (exponential with mean
    max_len/20, ~5% fill: 95% of a padded batch would be padding)."""
    if distribution == "unif":
        lengths = torch.randint(1, max_len + 1, (batch_size,), generator=generator)
    elif distribution in ("skew", "sparse"):
        mean = max_len / (5.0 if distribution == "skew" else 20.0)
        lengths = torch.empty(batch_size).exponential_(1.0 / mean, generator=generator).long() + 1
    else:
        raise ValueError(f"distribution must be 'unif', 'skew' or 'sparse', got {distribution!r}")
    return lengths.clamp_(1, max_len)


def add_shape_arguments(parser, batch=256, max_len=256, heads=4, head_dim=64, lengths="skew"):
    """--B, --max-L, --H, --D, --lengths for scripts that look at one attention shape."""
    parser.add_argument("--B", type=int, default=batch)
    parser.add_argument("--max-L", type=int, default=max_len)
    parser.add_argument("--H", type=int, default=heads)
    parser.add_argument("--D", type=int, default=head_dim)
    parser.add_argument("--lengths", default=lengths, choices=["unif", "skew"])


def jagged_inputs(batch_size, max_len, feature_shape, dtype, distribution, seed=0):
    """values [T, *feature_shape] (standard normal, never zeros), offsets [B+1] int64, T, and
    the longest row."""
    generator = torch.Generator().manual_seed(seed)
    lengths = random_lengths(batch_size, max_len, distribution, generator)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(DEVICE)
    total_len = int(lengths.sum())
    shape = (feature_shape,) if isinstance(feature_shape, int) else tuple(feature_shape)
    values = torch.randn(total_len, *shape, generator=generator).to(DEVICE, dtype)
    return values, offsets, total_len, int(lengths.max())


def length_mask(offsets, max_len):
    """[B, max_len] bool: True at a row's real positions."""
    return torch.arange(max_len, device=offsets.device)[None, :] < offsets.diff()[:, None]


def padded_to_dense(values, offsets, max_len):
    """What a user without this library writes to pad: a length mask and an index_put."""
    dense = values.new_zeros(offsets.numel() - 1, max_len, *values.shape[1:])
    return dense.index_put((length_mask(offsets, max_len),), values)


def padded_to_jagged(dense, offsets, total_len=None):
    return dense[length_mask(offsets, dense.shape[1])]


def op_cases(quick, gpu_cases, cpu_cases, shapes=None, dtypes=None, lengths=None):
    """(values, offsets, total_len, case dict) over shapes x dtypes (bf16 and fp32 on the GPU) x
    length distributions, for the memory- and matmul-bound op benchmarks. ``shapes`` ((B, max_L,
    D) tuples), ``dtypes`` and ``lengths`` replace the defaults when given (the CLI's --shape,
    --dtype, --lengths). Prints progress."""
    cases = shapes or (cpu_cases if not ON_GPU else gpu_cases[:1] if quick else gpu_cases)
    dtypes = dtypes or ([torch.bfloat16, torch.float32] if ON_GPU else [torch.float32])
    distributions = lengths or ("unif", "skew")
    total, done = len(cases) * len(dtypes) * len(distributions), 0
    for batch_size, max_len, feature_dim in cases:
        for dtype in dtypes:
            for distribution in distributions:
                done += 1
                print(f"  [{done}/{total}] B={batch_size} max_L={max_len} D={feature_dim} {dtype} {distribution}",
                      flush=True)
                values, offsets, total_len, _ = jagged_inputs(batch_size, max_len, feature_dim, dtype, distribution)
                yield values, offsets, total_len, {
                    "B": batch_size, "max_L": max_len, "D": feature_dim, "dtype": str(dtype).replace("torch.", ""),
                    "lengths": distribution, "fill": round(total_len / (batch_size * max_len), 2)}


_COMPILED_FLEX = []


def flex_for_packed_rows(offsets):
    """FlexAttention compiled once per process (one compile per shape: the sweeps' shapes all
    differ, so recompiles are allowed), and each token's row [T] for same-row masks over the
    packed sequence."""
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    if not _COMPILED_FLEX:
        torch._dynamo.config.recompile_limit = 64
        warnings.filterwarnings("ignore", message="_compile flag on create_block_mask")
        _COMPILED_FLEX.append(torch.compile(flex_attention, dynamic=False))
    row = torch.repeat_interleave(torch.arange(offsets.numel() - 1, device=offsets.device), offsets.diff())
    return _COMPILED_FLEX[0], row


def bench(fn, *, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median time of fn() in milliseconds: triton.testing.do_bench on the GPU (CUDA events,
    cache flushed between runs), a host clock on the CPU."""
    if ON_GPU:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    deadline = time.perf_counter() + rep_ms / 1000
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def bench_graph(fn) -> float | None:
    """Median time in ms of fn() captured in a CUDA graph and replayed: the GPU time without the
    host's Python and launch overhead (what a user who captures their model gets). None on the
    CPU. fn must not synchronise with the host: a failed capture can leave CUDA state that
    later calls trip over, so callers pass only capturable functions."""
    if not ON_GPU:
        return None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench(graph.replay)


def peak_memory_mib(fn) -> float | None:
    """Peak GPU memory allocated during fn(), above what was allocated before, in MiB. Garbage
    is collected first: a reference cycle of an earlier case freed during fn() would otherwise
    lower the figure (it did: 17.9 MiB for a forward+backward that allocates 66)."""
    if not ON_GPU:
        return None
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def environment() -> dict:
    import triton

    # The device machine's copy of the tree may lack or misreport .git: JAGGED_COMMIT wins.
    commit = os.environ.get("JAGGED_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).parent, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit = ""
    return {
        "device": torch.cuda.get_device_name() if ON_GPU else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "commit": commit or "unknown",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "interpreter": os.environ.get("TRITON_INTERPRET", "0") == "1",
    }


def print_table(rows: list[dict], columns: list[str]) -> None:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def save(rows: list[dict], name: str, out_dir: str | os.PathLike) -> Path:
    """Write rows with the environment to OUT/<name>.json and append them to OUT/<name>.jsonl."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    (out / f"{name}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    with open(out / f"{name}.jsonl", "a") as f:
        for row in rows:
            f.write(json.dumps({**env, **row}) + "\n")
    return out / f"{name}.json"


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def add_selection_arguments(parser) -> None:
    """--shape, --dtype, --lengths, --op: what to measure instead of the default sweep."""
    parser.add_argument("--shape", action="append", metavar="B,L,D[,H]",
                        help="batch, max_L, feature / head dim (attention: and heads, default 4); repeatable")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="repeatable")
    parser.add_argument("--lengths", action="append", choices=["unif", "skew", "sparse"], help="repeatable")
    parser.add_argument("--op", action="append", help="only these ops (ops / conversions benchmarks); repeatable")


def selection(args: dict) -> dict:
    """The run() keyword arguments for the parsed selection options (None: the default)."""
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.pop("shape") or []]
    for shape in shapes:
        if len(shape) not in (3, 4) or min(shape) < 1:
            raise SystemExit(f"--shape wants B,L,D or B,L,D,H of positive ints, got {shape}")
    dtypes = [DTYPES[d] for d in args.pop("dtype") or []]
    return {"shapes": shapes or None, "dtypes": dtypes or None, "lengths": args.pop("lengths") or None,
            "ops": args.pop("op") or None}


def bench_main(doc: str, label: str, run, summarise, argv=None, extra_flags=()) -> None:
    """The command line every op benchmark shares: --quick, --out, the selection options (and
    extra boolean flags, passed to run() by name); prints the device, runs, prints the summary
    table."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--out", default="results", help="folder for JSON results (and plots)")
    add_selection_arguments(parser)
    for flag, help_text in extra_flags:
        parser.add_argument(flag, action="store_true", help=help_text)
    args = vars(parser.parse_args(argv))
    args.update(selection(args))
    print(f"jagged {label} on {DEVICE.type.upper()}" + ("" if ON_GPU else " (no GPU: toy sizes, reference path)"))
    summarise(run(**{k.replace("-", "_"): v for k, v in args.items()}))
