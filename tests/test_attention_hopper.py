"""The Gluon attention forward and backward for Hopper (ops/attention_hopper.py,
ops/attention_hopper_backward.py): taken where they should be, equal to the Triton kernels and the
float64 reference (output, log-sum-exp, gradients), rows isolated from each other's non-finite
values, capturable in a CUDA graph. The interpreter cannot run Gluon: these run on an sm_90 GPU
only (tests/test_kernel_compile.py compiles the kernels on the CPU)."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import jagged
from jagged import reference
from jagged.ops import attention, attention_hopper, attention_hopper_backward
from helpers import ON_GPU, SM90, assert_close, check_graph_replay, count_calls, make_offsets, random_values

gpu_only = pytest.mark.skipif(not SM90, reason="Gluon's Hopper kernel needs an sm_90 GPU")


@pytest.fixture
def hopper_calls(monkeypatch):
    """The forward calls the Gluon kernel served."""
    return count_calls(monkeypatch, attention_hopper, "attention_forward_hopper")


@pytest.fixture
def backward_calls(monkeypatch):
    """The backward calls the Gluon kernel served."""
    return count_calls(monkeypatch, attention_hopper_backward, "attention_backward_hopper")


def _forward(q, k, v, q_offsets, k_offsets, causal, max_len, hopper, monkeypatch):
    monkeypatch.setattr(attention_hopper, "ENABLED", hopper)
    scale = 1 / math.sqrt(q.shape[2])
    return attention._attention_forward(q, k, v, q_offsets, k_offsets, causal, scale, max_len)


def check_hopper(q_lengths, k_lengths, heads, head_dim, dtype, causal, max_len, monkeypatch, hopper_calls,
                 backward_calls, self_attention=False):
    """Forward on both kernels (the Gluon one must serve it), against each other and the float64
    reference; then the gradients through the public call (the Gluon backward must serve it)
    against the reference and the Triton backward's."""
    q_offsets = make_offsets(q_lengths)
    k_offsets = q_offsets if self_attention else make_offsets(k_lengths)
    q = random_values((sum(q_lengths), heads, head_dim), dtype, requires_grad=True)
    k = random_values((sum(k_lengths), heads, head_dim), dtype, requires_grad=True)
    v = random_values((sum(k_lengths), heads, head_dim), dtype, requires_grad=True)
    with torch.no_grad():
        out, lse = _forward(q, k, v, q_offsets, k_offsets, causal, max_len, True, monkeypatch)
        assert hopper_calls == [True], "the Gluon kernel did not serve a call it supports"
        out_triton, lse_triton = _forward(q, k, v, q_offsets, k_offsets, causal, max_len, False, monkeypatch)
        assert len(hopper_calls) == 1
    ref = reference.jagged_attention(q.double(), k.double(), v.double(), q_offsets, k_offsets, causal=causal,
                                     compute_dtype=torch.float64)
    assert_close(out, ref, tol=dtype)
    assert_close(out, out_triton, tol=dtype, name="output vs the Triton kernel")
    finite = torch.isfinite(lse_triton)
    assert torch.equal(finite, torch.isfinite(lse)), "queries that see no key differ"
    assert_close(lse[finite], lse_triton[finite], tol=torch.float32, name="log-sum-exp")
    monkeypatch.setattr(attention_hopper, "ENABLED", True)
    out = jagged.jagged_flash_attention_values(q, k, v, q_offsets, k_offsets, causal=causal, max_len=max_len)
    grad = random_values(out.shape, dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    assert backward_calls == [True], "the Gluon backward did not serve a call it supports"
    grads_ref = torch.autograd.grad(ref, (q, k, v), grad.double())
    monkeypatch.setattr(attention_hopper_backward, "ENABLED", False)
    out = jagged.jagged_flash_attention_values(q, k, v, q_offsets, k_offsets, causal=causal, max_len=max_len)
    grads_triton = torch.autograd.grad(out, (q, k, v), grad)
    assert len(backward_calls) == 1
    for name, g, gr, gt in zip("qkv", grads, grads_ref, grads_triton):
        assert_close(g, gr, tol=dtype, name=f"grad {name}")
        assert_close(g, gt, tol=dtype, name=f"grad {name} vs the Triton backward")
    assert hopper_calls == [True, True, True]


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
# Rows over 512 take 64-key tiles (test_forward_tile_families covers the 128-query ones).
@pytest.mark.parametrize("head_dim, max_len", [(32, 200), (32, 500), (64, 200), (64, 500), (64, 1000), (128, 200),
                                               (128, 1000)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_self_attention(dtype, head_dim, max_len, causal, monkeypatch, hopper_calls, backward_calls):
    # Rows of one token, exactly one and several 32/64-key tiles, a partial last tile, the longest.
    lengths = torch.randint(1, max_len + 1, (12,)).tolist() + [1, 32, 64, 65, max_len, 0]
    check_hopper(lengths, lengths, 2, head_dim, dtype, causal, max_len, monkeypatch, hopper_calls, backward_calls,
                 self_attention=True)


@gpu_only
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cross_attention(causal, head_dim, monkeypatch, hopper_calls, backward_calls):
    # Empty key rows, L_q > L_k (causal: the first queries see nothing), L_k - L_q off a block edge.
    q_lengths = [3, 20, 0, 1, 70, 33, 100]
    k_lengths = [17, 0, 5, 40, 7, 34, 131]
    check_hopper(q_lengths, k_lengths, 3, head_dim, torch.bfloat16, causal, 131, monkeypatch, hopper_calls,
                 backward_calls)


@gpu_only
@given(lengths=st.lists(st.integers(0, 300), min_size=1, max_size=40), heads=st.integers(1, 3),
       head_dim=st.sampled_from([32, 64, 128]), causal=st.booleans(), data=st.data())
def test_property(lengths, heads, head_dim, causal, data):
    if not any(lengths) or (head_dim == 32 and max(lengths) <= 128):
        lengths = lengths + [129]  # a call the Gluon kernel takes
    skew = data.draw(st.booleans())
    if skew:  # one long row among short ones
        lengths[data.draw(st.integers(0, len(lengths) - 1))] = 900 if head_dim == 128 else 500
    with pytest.MonkeyPatch.context() as monkeypatch:
        calls = count_calls(monkeypatch, attention_hopper, "attention_forward_hopper")
        backward_calls = count_calls(monkeypatch, attention_hopper_backward, "attention_backward_hopper")
        check_hopper(lengths, lengths, heads, head_dim, torch.bfloat16, causal, max(lengths), monkeypatch, calls,
                     backward_calls, self_attention=True)


@gpu_only
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim, max_len", [(32, 300), (64, 200), (128, 200)])
def test_self_attention_offsets_shared_or_loaded(causal, head_dim, max_len, hopper_calls, backward_calls):
    """Self-attention with one offsets tensor takes each row's key span from the row scan
    (SAME_OFFSETS); with an equal copy as k_offsets the kernels load it. Same outputs and
    gradients, bit for bit."""
    lengths = [max_len - 3, 0, 1, 64, 65, max_len, 17]
    offsets = make_offsets(lengths)
    assert attention_hopper.same_offsets(offsets, offsets)
    assert not attention_hopper.same_offsets(offsets, offsets.clone())
    q, k, v, do = (random_values((sum(lengths), 2, head_dim), torch.bfloat16) for _ in range(4))
    results = []
    for k_offsets in (offsets, offsets.clone()):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = jagged.jagged_flash_attention_values(*leaves, offsets, k_offsets, causal=causal, max_len=max_len)
        results.append((out, *torch.autograd.grad(out, leaves, do)))
    assert hopper_calls == [True, True] and backward_calls == [True, True]
    for name, shared, loaded in zip(("out", "dq", "dk", "dv"), *results):
        assert torch.equal(shared, loaded), name


@gpu_only
def test_strided_qkv_from_fused_projection(monkeypatch, hopper_calls, backward_calls):
    """q, k, v as views of one [T, 3, H, D] tensor: TMA reads rows 3 * H * D apart."""
    lengths = [60, 0, 130, 7]
    offsets = make_offsets(lengths)
    qkv = random_values((sum(lengths), 3, 2, 64), torch.bfloat16, requires_grad=True)
    q, k, v = qkv.unbind(1)
    out = jagged.jagged_flash_attention_values(q, k, v, offsets, offsets, causal=True, max_len=130)
    assert hopper_calls == [True]
    ref = reference.jagged_attention(q.double(), k.double(), v.double(), offsets, offsets, causal=True,
                                     compute_dtype=torch.float64)
    assert_close(out, ref, tol=torch.bfloat16)
    grad = random_values(out.shape, torch.bfloat16)
    (grad_qkv,) = torch.autograd.grad(out, qkv, grad)
    assert backward_calls == [True]
    (grad_ref,) = torch.autograd.grad(ref, qkv, grad.double())
    assert_close(grad_qkv, grad_ref, tol=torch.bfloat16, name="grad qkv")


@gpu_only
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("batch_size", [512, 700, 2500])
def test_many_rows_two_pass_scan(batch_size, causal, monkeypatch, hopper_calls, backward_calls):
    """Over 511 rows the kernels find a program's row in two passes (every 64th offset, then a
    window of 128): rows on both sides of the sampled offsets, runs of empty rows across them,
    the last row, against the reference and the Triton kernels."""
    assert attention_hopper.scan_shape(batch_size, 4)[1] == 64
    lengths = torch.randint(0, 40, (batch_size,))
    lengths[torch.randint(0, batch_size, (8,))] = 300
    lengths[60:70] = 0  # empty rows around the sampled offsets 64 and 128
    lengths[120:200] = 0
    lengths[-1] = 129
    lengths = lengths.tolist()
    check_hopper(lengths, lengths, 2, 64, torch.bfloat16, causal, max(lengths), monkeypatch, hopper_calls,
                 backward_calls, self_attention=True)


# The long-row tile families of attention_hopper._tiles, forced whatever the shape would pick: the
# kernel's indexing and masks must hold for each (two warpgroups sharing the K/V tiles on 8 warps;
# 64-key tiles, overlapped or not).
LONG_ROW_TILES = {
    "128x64_8warps": dict(BLOCK_M=128, BLOCK_N=64, STAGES=2, OVERLAP=False, num_warps=8),
    "64x64": dict(BLOCK_M=64, BLOCK_N=64, STAGES=3, OVERLAP=False, num_warps=4),
    "64x64_overlapped": dict(BLOCK_M=64, BLOCK_N=64, STAGES=3, OVERLAP=True, num_warps=4),
}


def force_tiles(monkeypatch, name):
    monkeypatch.setattr(attention_hopper, "_tiles", lambda *args: dict(LONG_ROW_TILES[name]))


@gpu_only
@pytest.mark.parametrize("tiles", list(LONG_ROW_TILES))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_forward_tile_families(tiles, causal, head_dim, monkeypatch, hopper_calls, backward_calls):
    # Rows shorter than one 128-query tile, ending on and off tile edges, empty, and long.
    lengths = [700, 1, 0, 64, 127, 128, 129, 200] + torch.randint(1, 900, (5,)).tolist()
    force_tiles(monkeypatch, tiles)
    check_hopper(lengths, lengths, 2, head_dim, torch.bfloat16, causal, max(lengths), monkeypatch, hopper_calls,
                 backward_calls, self_attention=True)


@gpu_only
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_forward_tile_families_cross_attention(causal, monkeypatch, hopper_calls, backward_calls):
    q_lengths = [3, 600, 0, 1, 70, 133, 100]
    k_lengths = [17, 520, 5, 40, 0, 34, 231]
    force_tiles(monkeypatch, "128x64_8warps")
    check_hopper(q_lengths, k_lengths, 3, 64, torch.bfloat16, causal, 600, monkeypatch, hopper_calls, backward_calls)


@gpu_only
def test_forward_8_warps_two_pass_scan(monkeypatch, hopper_calls, backward_calls):
    """8 warps scan 256 offsets at a time: one pass up to 1023 rows, then every 128th offset and a
    window of 256; rows on both sides of the sampled offsets and runs of empty rows across them.
    (The float64 reference pads to [B, H, L, L]: rows kept short for the parallel suite's memory.)"""
    batch_size = 1300
    assert attention_hopper.scan_shape(batch_size, 8)[1] == 128
    lengths = torch.randint(0, 40, (batch_size,))
    lengths[torch.randint(0, batch_size, (8,))] = 200
    lengths[120:140] = 0  # empty rows around the sampled offset 128
    lengths[250:520] = 0
    lengths[-1] = 129
    force_tiles(monkeypatch, "128x64_8warps")
    check_hopper(lengths.tolist(), lengths.tolist(), 2, 64, torch.bfloat16, False, 200, monkeypatch, hopper_calls,
                 backward_calls, self_attention=True)


def test_forward_tiles_by_shape():
    """Rows up to 512 take 64 x 32 tiles; longer ones 64-key tiles, with 128 queries on 8 warps only
    where rows are long on average and not causal (measured: benchmarks/NOTES.md, session 28)."""
    tiles = attention_hopper._tiles
    for head_dim in (32, 64, 128):
        short = tiles(head_dim, 512, False, 400.0)
        assert (short["BLOCK_M"], short["BLOCK_N"], short["num_warps"]) == (64, 32, 4)
        assert tiles(head_dim, 4096, True, 2000.0) == LONG_ROW_TILES["64x64_overlapped" if head_dim == 128 else "64x64"]
        assert tiles(head_dim, 2048, False, 430.0)["num_warps"] == 4
    assert tiles(64, 4096, False, 2000.0) == LONG_ROW_TILES["128x64_8warps"]
    assert tiles(128, 1024, False, 512.0) == LONG_ROW_TILES["128x64_8warps"]
    assert tiles(128, None, False, 0.0) == LONG_ROW_TILES["64x64_overlapped"]
    assert tiles(32, 4096, False, 2000.0) == LONG_ROW_TILES["64x64"]


@gpu_only
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim, max_len", [(32, 300), (64, 300), (128, 300)])
def test_running_max_jumps_mid_row(causal, head_dim, max_len, monkeypatch, hopper_calls):
    """Scores that grow along each row, steeply for some runs of queries and mildly for others:
    the running max of a steep query jumps in every key tile, so the accumulator must be
    rescaled there (a forward that skipped it would be wrong), while the mild ones' barely moves."""
    lengths = [max_len, 97, 0, 250, 33, 180]
    offsets = make_offsets(lengths)
    q, k, v = (random_values((sum(lengths), 2, head_dim), torch.bfloat16) for _ in range(3))
    position = torch.cat([torch.arange(n, device=q.device) for n in lengths]).float()
    # Keys grow with their position. Queries come in runs of 16 (one warp's rows of a 64-query
    # block): every third run is steep, the others mild.
    k = (k.float() + (position / 16.0)[:, None, None]).to(torch.bfloat16)
    steep = ((position // 16) % 3 == 0)[:, None, None]
    q = (q.float().abs() * torch.where(steep, 8.0, 0.05)).to(torch.bfloat16)
    with torch.no_grad():
        out, lse = _forward(q, k, v, offsets, offsets, causal, max_len, True, monkeypatch)
        assert hopper_calls == [True]
        out_triton, lse_triton = _forward(q, k, v, offsets, offsets, causal, max_len, False, monkeypatch)
    ref = reference.jagged_attention(q.double(), k.double(), v.double(), offsets, offsets, causal=causal,
                                     compute_dtype=torch.float64)
    assert_close(out, ref, tol=torch.bfloat16)
    assert_close(out, out_triton, tol=torch.bfloat16, name="output vs the Triton kernel")
    assert_close(lse, lse_triton, tol=torch.float32, name="log-sum-exp")


@gpu_only
@pytest.mark.parametrize("tiles", [None, *LONG_ROW_TILES])
@pytest.mark.parametrize("tensor", ["q", "k", "v"])
def test_rows_isolated_from_non_finite_neighbours(tensor, tiles, monkeypatch, hopper_calls):
    """TMA loads a row's last tile whole, rows of the next row included: inf and NaN there must
    not reach this row's outputs (masked scores; zeroed V rows, as 0 * inf is NaN)."""
    if tiles is not None:
        force_tiles(monkeypatch, tiles)
    lengths = [40, 50, 3]  # row 0's last 32-key (or 64-key) tile reaches 24 tokens into row 1
    offsets = make_offsets(lengths)
    q, k, v = (random_values((sum(lengths), 2, 64), torch.bfloat16) for _ in range(3))
    clean = jagged.jagged_flash_attention_values(q, k, v, offsets, offsets, max_len=50)
    poisoned = dict(q=q.clone(), k=k.clone(), v=v.clone())
    poisoned[tensor][40:45] = float("inf")
    poisoned[tensor][45:50] = float("nan")
    out = jagged.jagged_flash_attention_values(poisoned["q"], poisoned["k"], poisoned["v"], offsets, offsets,
                                               max_len=50)
    assert hopper_calls == [True, True]
    assert torch.equal(out[:40], clean[:40]) and torch.equal(out[90:], clean[90:])


@gpu_only
@pytest.mark.parametrize("tensor", ["q", "k", "v", "do"])
def test_backward_rows_isolated_from_non_finite_neighbours(tensor, hopper_calls, backward_calls):
    """The backward's TMA tiles reach into the next row too (row 0's last 32-query dK/dV tile and
    its last 32-key dQ tile): inf and NaN in row 1's q, k, v or output gradient must leave the
    other rows' gradients bit for bit as they were."""
    lengths = [40, 50, 3]
    offsets = make_offsets(lengths)
    clean = dict(q=random_values((sum(lengths), 2, 64), torch.bfloat16), k=random_values((93, 2, 64), torch.bfloat16),
                 v=random_values((93, 2, 64), torch.bfloat16), do=random_values((93, 2, 64), torch.bfloat16))
    poisoned = {name: x.clone() for name, x in clean.items()}
    poisoned[tensor][40:45] = float("inf")
    poisoned[tensor][45:50] = float("nan")
    grads = []
    for inputs in (clean, poisoned):
        q, k, v = (inputs[name].clone().requires_grad_() for name in "qkv")
        out = jagged.jagged_flash_attention_values(q, k, v, offsets, offsets, max_len=50)
        grads.append(torch.autograd.grad(out, (q, k, v), inputs["do"]))
    assert hopper_calls == [True, True] and backward_calls == [True, True]
    for name, g_clean, g_poisoned in zip("qkv", *grads):
        assert torch.equal(g_poisoned[:40], g_clean[:40]) and torch.equal(g_poisoned[90:], g_clean[90:]), name


@gpu_only
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_backward_cuda_graph_capture(causal, backward_calls):
    lengths = torch.randint(1, 257, (64,)).tolist()
    offsets = make_offsets(lengths)
    q, k, v, do = (random_values((sum(lengths), 4, 64), torch.bfloat16) for _ in range(4))
    scale = 0.125
    out, lse = attention._attention_forward(q, k, v, offsets, offsets, causal, scale, 256)

    def backward():
        return attention._attention_backward(do, q, k, v, out, lse, offsets, offsets, causal, scale, 256)[:3]

    check_graph_replay(backward, do)
    assert backward_calls == [True] * 4


@gpu_only
@pytest.mark.parametrize("head_dim, max_len, fused", [(32, 300, True), (64, 500, True), (64, 600, False),
                                                       (128, 200, False)])
def test_backward_makes_delta_on_short_rows(head_dim, max_len, fused, monkeypatch):
    """D <= 64 on rows of at most 512: the Gluon backward makes delta from O (no delta kernel);
    elsewhere it reads the delta kernel's. Both give the gradients of the unfused path."""
    deltas = []
    launch = attention_hopper_backward.attention_backward_hopper

    def recorded(do, q, k, v, lse, delta, *args, **kwargs):
        deltas.append(delta is None)
        return launch(do, q, k, v, lse, delta, *args, **kwargs)

    monkeypatch.setattr(attention_hopper_backward, "attention_backward_hopper", recorded)
    lengths = [max_len - 37, 0, max_len, 70]
    offsets = make_offsets(lengths)
    q, k, v, do = (random_values((sum(lengths), 2, head_dim), torch.bfloat16) for _ in range(4))
    scale = 1 / math.sqrt(head_dim)
    out, lse = attention._attention_forward(q, k, v, offsets, offsets, True, scale, max_len)
    grads = attention._attention_backward(do, q, k, v, out, lse, offsets, offsets, True, scale, max_len)[:3]
    monkeypatch.setattr(attention_hopper_backward, "FUSED_DELTA", False)
    unfused = attention._attention_backward(do, q, k, v, out, lse, offsets, offsets, True, scale, max_len)[:3]
    assert deltas == [fused, False]
    for name, got, want in zip(("dq", "dk", "dv"), grads, unfused):
        assert_close(got, want, tol=torch.bfloat16, name=name)


@gpu_only
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim, batch_size", [(32, 9), (64, 9), (128, 9), (64, 700)])
def test_backward_program_order(head_dim, batch_size, causal, monkeypatch):
    """Self-attention on rows up to 512 alternates the dK/dV and dQ programs (interleaves); each
    program computes what it did with every dK/dV program first, so the gradients are bitwise
    equal (empty rows, rows shorter than a block, on block edges; 700 rows: the two-pass scan)."""
    orders = count_calls(monkeypatch, attention_hopper_backward, "interleaves")
    lengths = torch.randint(0, 300, (batch_size,))
    lengths[:5] = torch.tensor([0, 64, 1, 500, 129])
    lengths = lengths.tolist()
    offsets = make_offsets(lengths)
    q, k, v, do = (random_values((sum(lengths), 2, head_dim), torch.bfloat16) for _ in range(4))
    scale = 1 / math.sqrt(head_dim)
    out, lse = attention._attention_forward(q, k, v, offsets, offsets, causal, scale, 500)
    interleaved = attention._attention_backward(do, q, k, v, out, lse, offsets, offsets, causal, scale, 500)[:3]
    monkeypatch.setattr(attention_hopper_backward, "INTERLEAVE", False)
    split = attention._attention_backward(do, q, k, v, out, lse, offsets, offsets, causal, scale, 500)[:3]
    assert orders == [True, False]
    for name, got, want in zip(("dq", "dk", "dv"), interleaved, split):
        assert torch.equal(got, want), name


def test_backward_interleave_rule(monkeypatch):
    """Interleaved only in self-attention, with as many keys a dK/dV program as queries a dQ
    program, on rows of at most 512 (known); INTERLEAVE = False turns it off."""
    rule = attention_hopper_backward.interleaves
    for head_dim in (32, 64, 128):
        for causal in (False, True):
            tiles = attention_hopper_backward._tiles(head_dim, causal, not causal and head_dim <= 64)
            assert rule(True, tiles, 512) and rule(True, tiles, 1)
            assert not rule(False, tiles, 256) and not rule(True, tiles, 513) and not rule(True, tiles, None)
    tiles = dict(attention_hopper_backward._tiles(64, False, True), Q_BLOCK_M=32)
    assert not rule(True, tiles, 256)
    monkeypatch.setattr(attention_hopper_backward, "INTERLEAVE", False)
    assert not rule(True, attention_hopper_backward._tiles(64, False, True), 256)


@gpu_only
def test_unsupported_backward_keeps_the_triton_kernel(monkeypatch, backward_calls):
    lengths = [30, 100]
    offsets = make_offsets(lengths)
    for dims, max_len in (((130, 2, 32), 100), ((130, 2, 48), 100)):  # D=32 on rows <= 128; D=48
        q, k, v = (random_values(dims, torch.bfloat16, requires_grad=True) for _ in range(3))
        out = jagged.jagged_flash_attention_values(q, k, v, offsets, offsets, max_len=max_len)
        out.sum().backward()
    q, k, v = (random_values((130, 2, 64), torch.float32, requires_grad=True) for _ in range(3))
    jagged.jagged_flash_attention_values(q, k, v, offsets, offsets, max_len=100).sum().backward()
    q, k, v = (x.detach().bfloat16().requires_grad_() for x in (q, k, v))
    monkeypatch.setattr(attention_hopper_backward, "ENABLED", False)
    jagged.jagged_flash_attention_values(q, k, v, offsets, offsets, max_len=100).sum().backward()
    assert backward_calls == []


@gpu_only
def test_cuda_graph_capture(monkeypatch, hopper_calls):
    lengths = torch.randint(1, 257, (64,)).tolist()
    offsets = make_offsets(lengths)
    q, k, v = (random_values((sum(lengths), 4, 64), torch.bfloat16) for _ in range(3))
    def attend():  # without validation: checking the offsets' values synchronises
        return jagged.jagged_flash_attention_values(q, k, v, offsets, offsets, max_len=256, validate=False)

    check_graph_replay(attend, q)
    assert hopper_calls == [True] * 4


@gpu_only
def test_unsupported_calls_keep_the_triton_kernel(monkeypatch, hopper_calls):
    lengths = [30, 200]
    offsets = make_offsets(lengths)
    q, k, v = (random_values((230, 2, 64), torch.bfloat16) for _ in range(3))
    # max_len unknown at D=64 (a validated call would learn it from the offsets)
    jagged.jagged_flash_attention_values(q, k, v, offsets, offsets, validate=False)
    jagged.jagged_flash_attention_values(q.float(), k.float(), v.float(), offsets, offsets, max_len=200)
    jagged.jagged_flash_attention_values(q, k, v, offsets, offsets, max_len=200, scale=-0.1)
    monkeypatch.setattr(attention_hopper, "ENABLED", False)
    jagged.jagged_flash_attention_values(q, k, v, offsets, offsets, max_len=200)
    assert hopper_calls == []


def test_scan_shape():
    """The row scan's shape: one pass over all offsets up to 511 rows (4 warps), then every 64th
    offset and a 128-wide window, up to 32767 rows; past that none (the Triton kernels)."""
    assert [attention_hopper.scan_shape(b, 4) for b in (0, 200, 511)] == [(128, 1), (256, 1), (512, 1)]
    assert [attention_hopper.scan_shape(b, 4) for b in (512, 8191, 8192, 32767)] == [
        (128, 64), (128, 64), (256, 64), (512, 64)]
    assert attention_hopper.scan_shape(32768, 4)[0] == 0 and attention_hopper.scan_shape(100, 4, 2 ** 31)[0] == 0
    for b in (512, 1000, 4095, 20000, 32767):  # the sampled offsets and the last window cover B + 1
        scan, stride = attention_hopper.scan_shape(b, 4)
        assert scan * stride >= b + 1 and 2 * stride == 128


def test_not_taken_without_an_sm90_gpu():
    lengths = [5, 9]
    offsets = make_offsets(lengths)
    q = random_values((14, 2, 64), torch.bfloat16 if ON_GPU else torch.float32)
    expected = SM90 and q.dtype == torch.bfloat16
    assert attention_hopper.hopper_forward_supported(q, q, q, offsets, 0.1, 9, True, True) == expected
    assert not attention_hopper.hopper_forward_supported(q, q, q, offsets, 0.1, 9, False, True)
    assert not attention_hopper.hopper_forward_supported(q, q, q, offsets, 0.1, 9, True, False)
    backward_supported = attention_hopper_backward.hopper_backward_supported
    assert backward_supported(q, q, q, q, offsets, 0.1, 9, True, True) == expected
    assert not backward_supported(q, q, q, q, offsets, 0.1, 9, False, True)
    assert not backward_supported(q, q, q, q, offsets, 0.1, 9, True, False)
    assert not backward_supported(q, q, q, q, offsets, -0.1, 9, True, True)
