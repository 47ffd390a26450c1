"""The example model runs at toy size and its jagged and padded loss curves agree; the benchmark
CLI runs what it is asked for."""

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "sequential_recommender.py"


def test_sequential_recommender_toy_curves_agree():
    spec = importlib.util.spec_from_file_location("sequential_recommender", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    gap = module.main(["--toy", "--steps", "4", "--batch", "8"])
    assert gap < 1e-3


def test_benchmark_cli_runs_the_selected_ops_and_shapes(tmp_path):
    """benchmarks/run.py with --only/--op/--shape/--dtype/--lengths: toy sizes on the CPU (the
    reference path), one JSON per benchmark holding exactly what was asked for."""
    import json
    import subprocess
    import sys

    run = EXAMPLE.parent.parent / "benchmarks" / "run.py"
    subprocess.run([sys.executable, str(run), "--out", str(tmp_path), "--only", "ops", "--only", "conversions",
                    "--op", "softmax", "--op", "to_jagged", "--shape", "4,9,8", "--dtype", "float32",
                    "--lengths", "skew"], check=True, capture_output=True, timeout=600)
    ops = json.loads((tmp_path / "ops.json").read_text())["rows"]
    conversions = json.loads((tmp_path / "conversions.json").read_text())["rows"]
    assert {r["op"] for r in ops} == {"softmax"} and {r["op"] for r in conversions} == {"to_jagged"}
    for r in ops + conversions:
        assert (r["B"], r["max_L"], r["D"], r["dtype"], r["lengths"]) == (4, 9, 8, "float32", "skew")
