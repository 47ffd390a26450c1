"""The main benchmark: every op's benchmark, one after another, each printing its table and
saving JSON under --out. On a machine without a GPU it runs toy sizes and says so. ``--docs``
then regenerates docs/benchmark_results.md and its plots from what was measured.

    python benchmarks/run.py [--quick] [--out results] [--only attention|conversions|ops] [--docs]
        [--shape B,L,D[,H] ...] [--dtype bfloat16|float16|float32 ...] [--lengths unif|skew ...]
        [--op NAME ...]

--shape / --dtype / --lengths replace the default sweep of every benchmark run; --op picks ops
within the ops and conversions benchmarks and skips the attention one (e.g. --op softmax --op
jagged_dense_bmm).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bench_attention  # noqa: E402
import bench_conversions  # noqa: E402
import bench_ops  # noqa: E402
import report  # noqa: E402
from _common import ON_GPU, add_selection_arguments, environment  # noqa: E402

BENCHMARKS = {"attention": bench_attention, "conversions": bench_conversions, "ops": bench_ops}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--out", default="results", help="folder for JSON results")
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append", help="run only these")
    parser.add_argument("--docs", action="store_true", help="regenerate docs/benchmark_results.md from --out")
    add_selection_arguments(parser)
    args = parser.parse_args(argv)
    passed = []
    for flag in ("shape", "dtype", "lengths"):
        for value in getattr(args, flag) or []:
            passed += [f"--{flag}", value]
    env = environment()
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}")
    if not ON_GPU:
        print("No GPU found: running toy sizes on the CPU (timings say nothing about GPU speed).")
    known = {op for name in ("conversions", "ops") for op in BENCHMARKS[name].OPS}
    if set(args.op or ()) - known:
        parser.error(f"--op must be among {', '.join(sorted(known))}")
    for name in args.only or BENCHMARKS:
        ops = [] if name == "attention" else [op for op in args.op or [] if op in BENCHMARKS[name].OPS]
        if args.op and not ops:
            continue  # --op names none of this benchmark's ops
        print(f"\n== {name} ==")
        ops = [x for op in ops for x in ("--op", op)]
        BENCHMARKS[name].main((["--quick"] if args.quick else []) + ["--out", args.out] + passed + ops)
    if args.docs:
        report.main(["--results", args.out])


if __name__ == "__main__":
    main()
