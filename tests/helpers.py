"""Shared test helpers: devices, dtypes, the tolerance table, one assert, input makers,
hypothesis strategies for length patterns, a launcher call counter and a CUDA-graph replay check."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# The Gluon (Hopper) kernels run on sm_90 only.
SM90 = ON_GPU and torch.cuda.get_device_capability()[0] == 9

# bf16 only on the GPU: the Triton interpreter's bf16 tl.dot is wrong (triton 3.6 and 3.9).
FLOAT_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
OFFSET_DTYPES = [torch.int32, torch.int64]

# One tolerance per dtype (relative and absolute, for O(1) values), against a higher-precision
# reference. "tf32" is the matrix units' float32 mode, Triton's default for a float32 tl.dot.
TOLERANCES = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-5, 1e-5),
    "tf32": (2e-3, 2e-3),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}

# Readable length patterns: empty row, one row, equal rows, long among short, B == 0.
LENGTH_PATTERNS = {
    "B=0": [],
    "[0]": [0],
    "[1]": [1],
    "[0,5,0]": [0, 5, 0],
    "[3,3,3]": [3, 3, 3],
    "[1,17,2]": [1, 17, 2],
    "[9,0,0,4,1]": [9, 0, 0, 4, 1],
}


def assert_close(actual, expected, *, tol=None, exact=False, name="output", scale=None):
    """Compare ``actual`` with ``expected`` (cast to float64). ``tol`` is a key of TOLERANCES
    (default: actual's dtype) or an (rtol, atol) pair; ``exact`` demands bit-equality (copies, gathers). The absolute
    tolerance is relative to ``scale``, by default the reference's largest magnitude (pass the
    magnitude of the summed terms where results cancel, e.g. sums of signed values). On failure,
    prints the worst positions."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if exact:
        assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
        same = (actual == expected) | (actual.isnan() & expected.isnan()) if actual.is_floating_point() else actual == expected
        if not bool(same.all()):
            bad = (~same).nonzero()[:5].tolist()
            raise AssertionError(f"{name}: {int((~same).sum())} positions differ, first {bad}: "
                                 f"{[actual[tuple(i)].item() for i in bad]} vs {[expected[tuple(i)].item() for i in bad]}")
        return
    rtol, atol = tol if isinstance(tol, tuple) else TOLERANCES[tol if tol is not None else actual.dtype]
    a, e = actual.detach().double(), expected.detach().double()
    # atol is relative to the reference's largest magnitude (gradients of long rows grow).
    if scale is None:
        scale = float(e.abs().max()) if e.numel() else 1.0
    atol = atol * max(1.0, scale)
    assert not a.isnan().any() or a.isnan().eq(e.isnan()).all(), f"{name}: NaN where the reference has none"
    err = (a - e).abs() - (atol + rtol * e.abs())
    if bool((err > 0).any()):
        worst = err.flatten().topk(min(5, err.numel())).indices
        idx = [list(torch.unravel_index(i, err.shape)) for i in worst]
        rows = [f"  at {[int(j) for j in i]}: {a[tuple(i)].item():.6g} vs {e[tuple(i)].item():.6g}" for i in idx]
        raise AssertionError(f"{name}: {int((err > 0).sum())}/{err.numel()} positions outside "
                             f"rtol={rtol}, atol={atol}; worst:\n" + "\n".join(rows))


def random_values(shape, dtype, device=DEVICE, requires_grad=False):
    """Standard-normal values (never zeros), made in float32 then cast."""
    x = torch.randn(shape, device=device).to(dtype)
    return x.requires_grad_(requires_grad)


def make_offsets(lengths, dtype=torch.int64, device=DEVICE):
    return torch.tensor([0] + list(lengths), dtype=torch.int64).cumsum(0).to(dtype=dtype, device=device)


@st.composite
def lengths_strategy(draw, max_batch=6, max_len=12):
    """Length vectors: random (zeros included), all equal, one row, very skewed, all empty."""
    kind = draw(st.sampled_from(["random", "equal", "one", "skewed", "empty"]))
    if kind == "one":
        return [draw(st.integers(0, max_len))]
    batch = draw(st.integers(0, max_batch))
    if kind == "random":
        return draw(st.lists(st.integers(0, max_len), min_size=batch, max_size=batch))
    if kind == "equal":
        return [draw(st.integers(1, max_len))] * batch
    if kind == "empty":
        return [0] * batch
    short = draw(st.lists(st.integers(0, 2), min_size=batch, max_size=batch))
    return short + [max_len]


TIER_CASES = ["exact", "bound", "unknown", "short rows only", "one long tile", "understated"]


def jagged_with_max_len(values, offsets, max_len="validate"):
    """A JaggedTensor validated (max_len computed), or holding the given max_len unchecked (None:
    unknown), as tiered_lengths' cases need."""
    from jagged import JaggedTensor

    if max_len == "validate":
        return JaggedTensor(values, offsets)
    return JaggedTensor(values, offsets, max_len=max_len, validate=False)


def tiered_lengths(launch, feature_dim, dtype, case):
    """Row lengths around both tiles' edges for a row-walking kernel launched in tiers
    (ops/_utils.py: tiered_walk_launch; ``launch(offsets, values, longest)`` returns its grid and
    tiles), and the max_len to give the JaggedTensor for ``case`` (one of TIER_CASES). Checks
    that the launch halves the long tier's tile for a long chain, starts the rows of several
    long tiles first when there are any (WALKERS_FIRST: the long tier's column blocks twice),
    and drops the long tier when the longest row is said to fit one tile ("understated": said
    so wrongly, with validate=False; the kernels must still be right)."""
    from jagged.ops._utils import cdiv

    probe = random_values((1, feature_dim), dtype)
    grid, tiers = launch(make_offsets([1]), probe, 1 << 20)
    s, l = tiers["SHORT_T"], tiers["LONG_T"]
    short_blocks = cdiv(feature_dim, tiers["SHORT_D"])
    long_blocks = cdiv(feature_dim, tiers["LONG_D"])
    assert (l, tiers["LONG_D"]) == (2 * s, tiers["SHORT_D"] // 2)
    assert tiers["WALKERS_FIRST"] and grid[1] == 2 * long_blocks + short_blocks
    lengths = [0, 1, s - 1, s, s + 1, l - 1, l, l + 1, 0, 2 * l + 3, 6 * s + 1, 3]
    if case == "short rows only":
        lengths = [n for n in lengths if n <= s]
    if case == "one long tile":
        lengths = [n for n in lengths if n <= l]
    longest = {"bound": 4 * max(lengths), "unknown": None, "understated": 1}.get(case, max(lengths))
    if longest is not None:
        grid, tiles = launch(make_offsets(lengths), random_values((sum(lengths), feature_dim), dtype), longest)
        short_only = case in ("short rows only", "understated")
        walkers = tiles["WALKERS_FIRST"]
        # Whether walks start first is each op's choice by chain length; these cases pin it.
        if case == "bound":
            assert walkers
        if short_only or case == "one long tile":
            assert not walkers
        assert grid[1] == short_blocks + (0 if short_only else long_blocks * (2 if walkers else 1))
        assert all(tiles[k] == tiers[k] for k in ("SHORT_T", "SHORT_D", "LONG_T", "LONG_D"))
    return lengths, longest


def count_calls(monkeypatch, module, name):
    """Wrap ``module.name`` (a launcher returning whether it served the call, or a rule) to record
    each result; returns the record."""
    calls = []
    launch = getattr(module, name)

    def counted(*args, **kwargs):
        served = launch(*args, **kwargs)
        calls.append(served)
        return served

    monkeypatch.setattr(module, name, counted)
    return calls


def check_graph_replay(run, changed):
    """Capture ``run`` (a tensor or a tuple of them out) in a CUDA graph after a warm-up on a side
    stream, give ``changed`` (one of its inputs) new values and replay: the replay must recompute,
    bit for bit what an eager call gives. ``run`` is called four times."""
    expected = run()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    changed.copy_(random_values(changed.shape, changed.dtype))
    graph.replay()
    torch.cuda.synchronize()
    as_tuple = (lambda x: x if isinstance(x, tuple) else (x,))
    assert not torch.equal(as_tuple(captured)[0], as_tuple(expected)[0]), "the replay did not recompute"
    for got, want in zip(as_tuple(captured), as_tuple(run())):
        assert torch.equal(got, want)
