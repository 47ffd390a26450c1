"""Hardening across every public op: bad input raises with a message naming the argument, odd
layouts (strided, transposed) give the contiguous answer, backward passes are bit-identical from
run to run, numerics at the edges (fp16 scores, NaN/-inf) behave as PyTorch's own ops."""

import pytest
import torch

import jagged
from jagged import Jagged2Tensor, JaggedTensor, reference
from helpers import DEVICE, ON_GPU, assert_close, make_offsets, random_values
from op_table import OPS

IDS = [op.name for op in OPS]
LENGTHS = [3, 0, 17, 1, 9]


def make_inputs(op, lengths, dim, dtype):
    return [random_values(shape, dtype) for shape in op.inputs(lengths, dim)]


def grads(out, inputs, grad):
    return torch.autograd.grad(out, inputs, grad, allow_unused=True)


# ------------------------------------------------------------------ bad offsets, every entry point
GOOD = [0, 2, 5]
BAD_OFFSETS = {
    "not 1-D": (lambda: make_offsets([2, 3]).view(1, 3), r"must be 1-D"),
    "float": (lambda: make_offsets([2, 3]).float(), r"int32 or int64"),
    "empty": (lambda: make_offsets([2, 3])[:0], r"at least one entry|1-D"),
    "negative length": (lambda: torch.tensor([0, -1, 5], device=DEVICE), r"non-decreasing"),
    "decreasing": (lambda: torch.tensor([0, 6, 5], device=DEVICE), r"non-decreasing"),
    "first != 0": (lambda: torch.tensor([1, 2, 5], device=DEVICE), r"\[0\] must be 0, got 1"),
    "last != T": (lambda: torch.tensor([0, 2, 4], device=DEVICE), r"\[-1\] must equal the number of values T=5, got 4"),
}


def entry_points():
    values = random_values((5, 3), torch.float32)
    dense = random_values((2, 4, 3), torch.float32)
    qkv = random_values((5, 2, 8), torch.float32)
    return {
        "JaggedTensor": lambda off: JaggedTensor(values, off),
        "jagged_to_padded_dense": lambda off: jagged.jagged_to_padded_dense(values, off, 4),
        "dense_to_jagged": lambda off: jagged.dense_to_jagged(dense, off, 5),
        "jagged_flash_attention_values": lambda off: jagged.jagged_flash_attention_values(qkv, qkv, qkv, off, off),
        "Jagged2Tensor": lambda off: Jagged2Tensor(random_values(13, torch.float32), off),
    }


@pytest.mark.parametrize("kind", list(BAD_OFFSETS))
@pytest.mark.parametrize("entry", list(entry_points()))
def test_bad_offsets_raise_value_error_naming_offsets(entry, kind):
    make, match = BAD_OFFSETS[kind]
    offsets = make()
    if entry == "Jagged2Tensor" and kind == "last != T":
        offsets = torch.tensor([0, 2, 4], device=DEVICE)  # S = 4 + 4 = 8 != 13
        match = r"S = sum L_b\^2 = 8 entries, got 13"
    with pytest.raises(ValueError, match=match) as info:
        entry_points()[entry](offsets)
    assert "offsets" in str(info.value) or "S = " in str(info.value)


@pytest.mark.parametrize("entry", list(entry_points()))
def test_offsets_of_another_type_raise_type_error(entry):
    with pytest.raises(TypeError, match="offsets"):
        entry_points()[entry](GOOD)


def test_mismatches_name_the_argument_and_both_values():
    x = JaggedTensor(random_values((5, 4), torch.float32), make_offsets([2, 3]))
    q = random_values((5, 2, 8), torch.float32)
    cases = [
        (lambda: jagged.jagged_dense_bmm(x, random_values((3, 4, 2), torch.float32)), r"y must be \[B=2, K=4, N\], got shape \(3, 4, 2\)"),
        (lambda: jagged.jagged_dense_elementwise_add(x, random_values((3, 4, 4), torch.float32)), r"y must be \[B=2, L, \*\(4,\)\].*got shape \(3, 4, 4\)"),
        (lambda: jagged.jagged_dense_bmm(x, random_values((2, 4, 2), torch.float16)), r"dtype.*float32.*float16"),
        (lambda: jagged.jagged_flash_attention_values(q, q, q, make_offsets([2, 3]), make_offsets([5])), r"same batch size, got 2 and 1"),
        (lambda: jagged.jagged_flash_attention_values(q, q.half(), q, make_offsets([2, 3]), make_offsets([2, 3])), r"k must have q's dtype.*float16"),
        (lambda: jagged.jagged_flash_attention_values(*[random_values((5, 2, 300), torch.float32)] * 3, make_offsets([2, 3]), make_offsets([2, 3])), r"head dim must be in \[1, 256\], got 300"),
        (lambda: jagged.jagged_flash_attention_values(q[0], q, q, make_offsets([2, 3]), make_offsets([2, 3])), r"q values must be 3-D"),
        (lambda: jagged.jagged_jagged_bmm(x, JaggedTensor(random_values((5, 4), torch.float32), make_offsets([3, 2]))), r"y must have x's rows"),
        (lambda: jagged.jagged_softmax(JaggedTensor(random_values(5, torch.float32), make_offsets([2, 3]))), r"x.values must be \[T, \*F\]"),
        (lambda: JaggedTensor(random_values((5, 4), torch.float32), make_offsets([2, 3]).to("meta")), r"offsets must be on the same device"),
        (lambda: jagged.jagged_dense_bmm(x, random_values((2, 4, 2), torch.float32).to("meta")), r"dtype and device"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


# ------------------------------------------------------------------ layouts
def strided(x):
    """x's values in a view whose last dim has stride 2 (every other element of a wider tensor)."""
    base = torch.empty((*x.shape[:-1], 2 * x.shape[-1]), dtype=x.dtype, device=x.device)
    base[..., ::2] = x
    return base[..., ::2]


def transposed(x):
    """x's values with its first two dims' memory order swapped (e.g. a column-major [T, D])."""
    return x.transpose(0, 1).contiguous().transpose(0, 1) if x.dim() >= 2 else x


@pytest.mark.parametrize("layout", [strided, transposed], ids=["strided", "transposed"])
@pytest.mark.parametrize("op", OPS, ids=IDS)
def test_non_contiguous_inputs(op, layout):
    offsets = make_offsets(LENGTHS)
    inputs = make_inputs(op, LENGTHS, 8, torch.float32)
    views = [layout(x).requires_grad_(True) for x in inputs]
    assert any(not v.is_contiguous() for v in views)
    out = op.ours(offsets, *views)
    ref_inputs = [x.double().requires_grad_(True) for x in inputs]
    ref = op.ref(offsets, *ref_inputs)
    tol = "tf32" if op.matmul else torch.float32
    assert_close(out, ref, tol=tol)
    grad = random_values(out.shape, torch.float32)
    for g, e in zip(grads(out, views, grad), grads(ref, ref_inputs, grad.double())):
        assert_close(g, e, tol=tol, name="grad")


# ------------------------------------------------------------------ determinism
@pytest.mark.parametrize("op", OPS, ids=IDS)
def test_backward_is_bit_identical_across_runs(op):
    offsets = make_offsets(LENGTHS if not ON_GPU else [300, 0, 1000, 7, 64] * 20)
    inputs = [x.requires_grad_(True) for x in make_inputs(op, offsets.diff().tolist(), 32, torch.float32)]
    grad = None
    results = []
    for _ in range(3):
        out = op.ours(offsets, *inputs)
        grad = random_values(out.shape, torch.float32) if grad is None else grad
        results.append((out.detach(), grads(out, inputs, grad)))
    for out, gs in results[1:]:
        assert torch.equal(out, results[0][0])
        for g, g0 in zip(gs, results[0][1]):
            assert torch.equal(g, g0), f"{op.name}: a second backward differs (not deterministic)"


# ------------------------------------------------------------------ numerics
@pytest.mark.parametrize("causal", [False, True])
def test_fp16_attention_with_large_inputs_does_not_overflow(causal):
    lengths = [40, 1, 0, 25] if not ON_GPU else [400, 1, 0, 250, 1000]
    offsets = make_offsets(lengths)
    q, k, v = ((random_values((sum(lengths), 2, 64), torch.float32) * 10).half().requires_grad_(True) for _ in range(3))
    out = jagged.jagged_flash_attention_values(q, k, v, offsets, offsets, causal=causal)
    assert out.isfinite().all()
    ref = reference.jagged_attention(q.double(), k.double(), v.double(), offsets, offsets, causal=causal,
                                     compute_dtype=torch.float64)
    # Scores reach ~10 * 10 * 64 / 8 = 800: weights are near one-hot, so compare with the fp16
    # tolerance scaled by v's magnitude.
    assert_close(out, ref, tol=torch.float16)
    gq, gk, gv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert all(g.isfinite().all() for g in (gq, gk, gv))


def test_nan_in_one_row_stays_in_that_row():
    offsets = make_offsets([4, 5])
    q, k, v = (random_values((9, 2, 16), torch.float32) for _ in range(3))
    k[6, 1, 3] = float("nan")  # row 1, head 1
    out = jagged.jagged_flash_attention_values(q, k, v, offsets, offsets)
    ref = reference.jagged_attention(q.double(), k.double(), v.double(), offsets, offsets, compute_dtype=torch.float64)
    assert torch.equal(out.isnan(), ref.isnan()) and out[4:, 1].isnan().all() and not out[:4].isnan().any()
    x = random_values((9, 3), torch.float32)
    x[0, 0], x[5, 1], x[6, 2] = float("-inf"), float("nan"), float("inf")
    for ours, ref_fn in ((jagged.jagged_sum, reference.jagged_sum), (jagged.jagged_mean, reference.jagged_mean)):
        got, expected = ours(JaggedTensor(x, offsets)), ref_fn(x, offsets)
        assert torch.equal(got.isnan(), expected.isnan()) and torch.equal(got.isinf(), expected.isinf())


# ------------------------------------------------------------------ edge shapes
def test_max_len_far_above_every_row():
    x = JaggedTensor(random_values((6, 2, 8), torch.float32), make_offsets([2, 4]), max_len=1000)
    assert x.to_padded_dense().shape == (2, 1000, 2, 8)
    out = jagged.jagged_flash_attention(x, x, x)
    ref = reference.jagged_attention(x.values.double(), x.values.double(), x.values.double(), x.offsets, x.offsets,
                                     compute_dtype=torch.float64)
    assert_close(out.values, ref, tol=torch.float32)
