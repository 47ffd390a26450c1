"""Stress run: random ops, shapes, dtypes and length patterns against the float64 references,
forward and gradients, for a fixed time. Prints cases run and failures per op; writes every
failure (op, lengths, dim, dtype, message) to OUT/stress.json.

    python benchmarks/stress.py [--minutes 5] [--seed 0] [--out results]

On a machine without a GPU it runs the Triton interpreter on toy sizes (set TRITON_INTERPRET=1).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import TOLERANCES, assert_close, make_offsets  # noqa: E402
from op_table import OPS  # noqa: E402

from _common import ON_GPU, environment  # noqa: E402

PATTERNS = ("random", "equal", "one", "skewed", "empty", "long")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
QUADRATIC = ("jagged_flash_attention", "jagged2 chain")  # references hold B * L^2 floats


def draw_lengths(rng: random.Random, pattern: str, op: str) -> list[int]:
    small = not ON_GPU
    max_len = rng.choice([8, 40] if small else [16, 128, 512, 2048])
    batch = rng.randint(0, 6 if small else 64)
    if pattern == "one":
        return [rng.randint(0, max_len)]
    if pattern == "equal":
        return [rng.randint(1, max_len)] * batch
    if pattern == "empty":
        return [0] * batch
    if pattern == "skewed":
        return [min(max_len, int(rng.expovariate(5.0 / max_len))) for _ in range(batch)]
    if pattern == "long":  # one long row among short ones
        long_len = 60 if small else (4096 if op in QUADRATIC else 65536)
        return [rng.randint(0, 3) for _ in range(batch)] + [long_len]
    return [rng.randint(0, max_len) for _ in range(batch)]


def fits(op: str, lengths: list[int], dim: int) -> bool:
    """Keep the padded float64 references of the quadratic ops under ~2 GB."""
    if op in QUADRATIC:
        return len(lengths) * max(lengths, default=0) ** 2 * 2 * 8 < 2**31
    return True


def run_case(op, lengths, dim, dtype, seed):
    torch.manual_seed(seed)
    device = "cuda" if ON_GPU else "cpu"
    offsets = make_offsets(lengths, random.Random(seed).choice([torch.int32, torch.int64]), device)
    inputs = [torch.randn(shape, device=device).to(dtype).requires_grad_(True) for shape in op.inputs(lengths, dim)]
    out = op.ours(offsets, *inputs)
    ref_inputs = [x.detach().double().requires_grad_(True) for x in inputs]
    ref = op.ref(offsets, *ref_inputs)
    tol = "tf32" if op.matmul and dtype == torch.float32 else dtype
    if op.roundings > 1 and dtype != torch.float32:
        tol = tuple(op.roundings * t for t in TOLERANCES[dtype])
    scale = None
    if op.signed_sum and ref.numel():
        scale = float(op.ref(offsets, *(x.detach().abs() for x in ref_inputs)).max())
    assert_close(out, ref, tol=tol, scale=scale)
    if out.numel() == 0:
        return
    grad = torch.randn(out.shape, device=device).to(dtype)
    got = torch.autograd.grad(out, inputs, grad, allow_unused=True)
    expected = torch.autograd.grad(ref, ref_inputs, grad.double(), allow_unused=True)
    for i, (g, e) in enumerate(zip(got, expected)):
        if e is None:
            continue
        assert_close(g, e, tol=tol, name=f"grad of input {i}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    deadline = time.monotonic() + args.minutes * 60
    cases, failures, records = Counter(), Counter(), []
    next_report = time.monotonic() + 30
    while time.monotonic() < deadline:
        op = rng.choice(OPS)
        pattern = rng.choice(PATTERNS)
        lengths = draw_lengths(rng, pattern, op.name)
        dim = rng.choice([1, 8, 16, 32, 64, 100, 128] if op.name != "jagged_flash_attention" else [16, 32, 64, 128])
        if not fits(op.name, lengths, dim):
            continue
        dtype = rng.choice(DTYPES)
        seed = rng.randrange(2**31)
        cases[op.name] += 1
        try:
            run_case(op, lengths, dim, dtype, seed)
        except Exception as error:  # a failed comparison or a crash: record it and go on
            failures[op.name] += 1
            records.append({"op": op.name, "pattern": pattern, "B": len(lengths), "lengths": lengths[:50],
                            "max_len": max(lengths, default=0), "dim": dim, "dtype": str(dtype), "seed": seed,
                            "error": "".join(traceback.format_exception_only(error)).strip()[:2000]})
            print(f"FAIL {op.name} {pattern} B={len(lengths)} max_len={max(lengths, default=0)} dim={dim} {dtype}: "
                  f"{records[-1]['error'][:300]}", flush=True)
        if time.monotonic() > next_report:
            print(f"... {sum(cases.values())} cases, {sum(failures.values())} failures", flush=True)
            next_report = time.monotonic() + 30
    print(f"\n{'op':28s} {'cases':>6s} {'failures':>8s}")
    for name in sorted(cases):
        print(f"{name:28s} {cases[name]:6d} {failures[name]:8d}")
    print(f"{'total':28s} {sum(cases.values()):6d} {sum(failures.values()):8d}  ({args.minutes} min, seed {args.seed})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stress.json").write_text(json.dumps({"environment": environment(), "minutes": args.minutes,
                                                 "cases": dict(cases), "failures": dict(failures),
                                                 "failed_cases": records}, indent=1))
    return 1 if records else 0


if __name__ == "__main__":
    sys.exit(main())
