"""The main benchmark: every op's benchmark, one after another, each printing its table and
saving JSON under --out. On a machine without a GPU it runs toy sizes and says so. ``--docs``
then regenerates docs/benchmark_results.md and its plots from what was measured.

    python benchmarks/run.py [--quick] [--out results] [--only attention|conversions|ops] [--docs]
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
from _common import ON_GPU, environment  # noqa: E402

BENCHMARKS = {"attention": bench_attention, "conversions": bench_conversions, "ops": bench_ops}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--out", default="results", help="folder for JSON results")
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append", help="run only these")
    parser.add_argument("--docs", action="store_true", help="regenerate docs/benchmark_results.md from --out")
    args = parser.parse_args(argv)
    env = environment()
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}")
    if not ON_GPU:
        print("No GPU found: running toy sizes on the CPU (timings say nothing about GPU speed).")
    for name in args.only or BENCHMARKS:
        print(f"\n== {name} ==")
        BENCHMARKS[name].main((["--quick"] if args.quick else []) + ["--out", args.out])
    if args.docs:
        report.main(["--results", args.out])


if __name__ == "__main__":
    main()
