"""Jagged2 (one L_b x L_b block per row): the container, the four ops against the float64
reference (forward and gradients), and their composition into attention."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import jagged
from jagged import Jagged2Tensor, JaggedTensor, reference
from helpers import (DEVICE, FLOAT_DTYPES, LENGTH_PATTERNS, OFFSET_DTYPES, ON_GPU, assert_close, lengths_strategy,
                     make_offsets, random_values)

PATTERNS = pytest.mark.parametrize("lengths", list(LENGTH_PATTERNS.values()), ids=list(LENGTH_PATTERNS))


def squares(lengths):
    return sum(n * n for n in lengths)


def random_jagged2(lengths, dtype, offsets_dtype=torch.int64, scale=1.0):
    values = (random_values(squares(lengths), torch.float32) * scale).to(dtype).requires_grad_(True)
    return Jagged2Tensor(values, make_offsets(lengths, offsets_dtype))


def check_grads(out, ref, inputs, dtype, names):
    grad = random_values(out.shape, dtype)
    got = torch.autograd.grad(out, inputs, grad)
    expected = torch.autograd.grad(ref, inputs, grad.double())
    for name, g, e in zip(names, got, expected):
        assert_close(g, e, tol=dtype, name=f"grad {name}")


def check_scores(lengths, k_dim, dtype, offsets_dtype=torch.int64):
    x = JaggedTensor(random_values((sum(lengths), k_dim), dtype, requires_grad=True), make_offsets(lengths, offsets_dtype))
    y = x.with_values(random_values((sum(lengths), k_dim), dtype, requires_grad=True))
    s = jagged.jagged_jagged_bmm_jagged_out(x, y)
    ref = reference.jagged_jagged_bmm_jagged_out(x.values.double(), y.values.double(), x.offsets)
    assert isinstance(s, Jagged2Tensor) and s.offsets is x.offsets and s.dtype == dtype
    assert s.square_offsets.tolist() == make_offsets([n * n for n in lengths]).tolist()
    assert_close(s.values, ref, tol=dtype)
    check_grads(s.values, ref, (x.values, y.values), dtype, "xy")


def check_weighted_sum(lengths, n_dim, dtype, offsets_dtype=torch.int64):
    p = random_jagged2(lengths, dtype, offsets_dtype)
    v = JaggedTensor(random_values((sum(lengths), n_dim), dtype, requires_grad=True), p.offsets)
    out = jagged.jagged2_jagged_bmm(p, v)
    ref = reference.jagged2_jagged_bmm(p.values.double(), p.offsets, v.values.double())
    assert out.offsets is v.offsets and out.values.dtype == dtype
    assert_close(out.values, ref, tol=dtype)
    check_grads(out.values, ref, (p.values, v.values), dtype, "pv")


def check_softmax(lengths, causal, dtype, offsets_dtype=torch.int64, scale=1.0):
    s = random_jagged2(lengths, dtype, offsets_dtype, scale)
    out = jagged.jagged2_softmax(s, causal=causal)
    ref = reference.jagged2_softmax(s.values.double(), s.offsets, causal=causal)
    assert out.offsets is s.offsets and out.dtype == dtype
    assert_close(out.values, ref, tol=dtype)
    check_grads(out.values, ref, (s.values,), dtype, "s")


def check_to_padded_dense(lengths, max_len, padding_value, dtype, offsets_dtype=torch.int64):
    s = random_jagged2(lengths, dtype, offsets_dtype)
    dense = jagged.jagged2_to_padded_dense(s, max_len, padding_value)
    ref = reference.jagged2_to_padded_dense(s.values.detach(), s.offsets, max_len, padding_value)
    assert_close(dense, ref, exact=True)
    grad = random_values(dense.shape, dtype)
    (g,) = torch.autograd.grad(dense, s.values, grad)
    # The gradient is the dense gradient read back at the kept entries (cut entries get 0).
    assert_close(g, reference.dense_to_jagged2(grad, s.offsets), exact=True, name="grad values")


def check_dense_to_jagged2(lengths, lines, cols, dtype, offsets_dtype=torch.int64):
    dense = random_values((len(lengths), lines, cols), dtype, requires_grad=True)
    s = jagged.dense_to_jagged2(dense, make_offsets(lengths, offsets_dtype))
    assert_close(s.values, reference.dense_to_jagged2(dense.detach(), s.offsets), exact=True)
    grad = random_values(s.values.shape, dtype)
    (g,) = torch.autograd.grad(s.values, dense, grad)
    (expected,) = torch.autograd.grad(reference.dense_to_jagged2(dense, s.offsets), dense, grad)
    assert_close(g, expected, exact=True, name="grad dense")


@PATTERNS
@pytest.mark.parametrize("k_dim", [1, 16, 37])
def test_scores_patterns(lengths, k_dim):
    check_scores(lengths, k_dim, torch.float32)


@PATTERNS
@pytest.mark.parametrize("n_dim", [1, 16, 37])
def test_weighted_sum_patterns(lengths, n_dim):
    check_weighted_sum(lengths, n_dim, torch.float32)


@PATTERNS
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_softmax_patterns(lengths, causal):
    check_softmax(lengths, causal, torch.float32)


@PATTERNS
@pytest.mark.parametrize("max_len", [0, 1, 5, 19])
def test_to_padded_dense_patterns(lengths, max_len):
    check_to_padded_dense(lengths, max_len, -3.5, torch.float32)


@PATTERNS
@pytest.mark.parametrize("shape", [(0, 0), (4, 4), (3, 9), (20, 18)], ids=str)
def test_dense_to_jagged2_patterns(lengths, shape):
    check_dense_to_jagged2(lengths, *shape, torch.float32)


@given(lengths=lengths_strategy(max_len=40), dim=st.sampled_from([1, 8, 24, 40]),
       dtype=st.sampled_from([torch.float32, torch.float16]), offsets_dtype=st.sampled_from(OFFSET_DTYPES))
def test_matmuls_property(lengths, dim, dtype, offsets_dtype):
    check_scores(lengths, dim, dtype, offsets_dtype)
    check_weighted_sum(lengths, dim, dtype, offsets_dtype)


@given(lengths=lengths_strategy(max_len=40), causal=st.booleans(), dtype=st.sampled_from(FLOAT_DTYPES),
       offsets_dtype=st.sampled_from(OFFSET_DTYPES), scale=st.sampled_from([1.0, 30.0]))
def test_softmax_property(lengths, causal, dtype, offsets_dtype, scale):
    check_softmax(lengths, causal, dtype, offsets_dtype, scale)


@given(lengths=lengths_strategy(max_len=25), max_len=st.integers(0, 30), lines=st.integers(0, 30),
       cols=st.integers(0, 30), dtype=st.sampled_from(FLOAT_DTYPES), offsets_dtype=st.sampled_from(OFFSET_DTYPES))
def test_conversions_property(lengths, max_len, lines, cols, dtype, offsets_dtype):
    check_to_padded_dense(lengths, max_len, 1.25, dtype, offsets_dtype)
    check_dense_to_jagged2(lengths, lines, cols, dtype, offsets_dtype)


def test_causal_softmax_is_zero_above_the_diagonal_and_lines_sum_to_one():
    s = random_jagged2([6, 0, 3], torch.float32, scale=5.0)
    blocks = jagged.jagged2_softmax(s, causal=True).unbind()
    for block in blocks:
        assert torch.equal(block.triu(1), torch.zeros_like(block))
        assert_close(block.sum(1), torch.ones(block.shape[0], device=DEVICE, dtype=torch.float64), tol=torch.float32)


def test_softmax_of_equal_large_values_is_stable():
    s = Jagged2Tensor(torch.full((squares([3, 5]),), 3e4, device=DEVICE), make_offsets([3, 5]))
    blocks = jagged.jagged2_softmax(s).unbind()
    for block in blocks:
        assert_close(block, torch.full_like(block, 1 / block.shape[0]), tol=torch.float32)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_composition_is_attention(causal, dtype):
    """scores -> softmax -> weighted sum is jagged attention: it must match the flash kernel and
    the padded reference, output and gradients."""
    lengths = [5, 0, 33, 1, 17] if not ON_GPU else [5, 0, 330, 1, 170, 64]
    head_dim, scale = 16, 0.25
    offsets = make_offsets(lengths)
    q, k, v = (random_values((sum(lengths), head_dim), dtype, requires_grad=True) for _ in range(3))
    qj, kj, vj = (JaggedTensor(t, offsets) for t in (q, k, v))
    scores = jagged.jagged_jagged_bmm_jagged_out(qj.with_values(q * scale), kj)
    composed = jagged.jagged2_jagged_bmm(jagged.jagged2_softmax(scores, causal=causal), vj).values
    flash = jagged.jagged_flash_attention(qj.with_values(q[:, None]), kj.with_values(k[:, None]),
                                          vj.with_values(v[:, None]), causal=causal, scale=scale).values[:, 0]
    ref = reference.jagged_attention(q.double()[:, None], k.double()[:, None], v.double()[:, None], offsets, offsets,
                                     causal=causal, scale=scale, compute_dtype=torch.float64)[:, 0]
    # The unfused chain rounds scores and weights to the dtype between ops: float32 gets the
    # tf32 bound, 16-bit types their own.
    tol = "tf32" if dtype == torch.float32 else dtype
    assert_close(composed, ref, tol=tol)
    assert_close(composed, flash.double(), tol=tol, name="composed vs flash")
    grad = random_values(composed.shape, dtype)
    got = torch.autograd.grad(composed, (q, k, v), grad)
    expected = torch.autograd.grad(ref, (q, k, v), grad.double())
    for name, g, e in zip("qkv", got, expected):
        assert_close(g, e, tol=tol, name=f"grad {name}")


def test_container():
    blocks = [random_values((n, n), torch.float32) for n in (2, 0, 3)]
    s = Jagged2Tensor.from_list(blocks)
    assert s.batch_size == len(s) == 3 and s.max_len == 3 and s.total_len == 5
    assert s.offsets.tolist() == [0, 2, 2, 5] and s.square_offsets.tolist() == [0, 4, 4, 13]
    for got, block in zip(s.unbind(), blocks):
        assert torch.equal(got, block)
    again = Jagged2Tensor(s.values, s.offsets)
    assert again.max_len == 3 and again.total_len == 5 and torch.equal(again.square_offsets, s.square_offsets)
    assert torch.equal(s.to_padded_dense()[2], blocks[2])
    assert "Jagged2Tensor(B=3, S=13" in repr(s)
    empty = Jagged2Tensor.from_list([])
    assert empty.batch_size == 0 and empty.values.numel() == 0


def test_bad_input():
    offsets = make_offsets([2, 3])
    with pytest.raises(ValueError, match=r"values must be 1-D"):
        Jagged2Tensor(random_values((13, 1), torch.float32), offsets)
    with pytest.raises(ValueError, match=r"S = sum L_b\^2 = 13 entries, got 12"):
        Jagged2Tensor(random_values(12, torch.float32), offsets)
    with pytest.raises(ValueError, match="square_offsets must be int64"):
        Jagged2Tensor(random_values(13, torch.float32), offsets, square_offsets=offsets.int())
    with pytest.raises(ValueError, match="running sum of the squared row lengths"):
        Jagged2Tensor(random_values(13, torch.float32), offsets, square_offsets=torch.tensor([0, 5, 13], device=DEVICE))
    with pytest.raises(ValueError, match="must be square"):
        Jagged2Tensor.from_list([random_values((2, 3), torch.float32)])
    s = Jagged2Tensor(random_values(13, torch.float32), offsets)
    x = JaggedTensor(random_values((5, 4), torch.float32), offsets)
    with pytest.raises(TypeError, match="s must be a jagged.Jagged2Tensor"):
        jagged.jagged2_softmax(x)
    with pytest.raises(TypeError, match="p must be a jagged.Jagged2Tensor"):
        jagged.jagged2_jagged_bmm(x, x)
    with pytest.raises(ValueError, match="v must have p's rows"):
        jagged.jagged2_jagged_bmm(s, JaggedTensor(random_values((5, 4), torch.float32), make_offsets([3, 2])))
    with pytest.raises(ValueError, match="v must have dtype"):
        jagged.jagged2_jagged_bmm(s, x.to(torch.float16))
    with pytest.raises(ValueError, match=r"y.values must be \[T, K=4\]"):
        jagged.jagged_jagged_bmm_jagged_out(x, x.with_values(random_values((5, 3), torch.float32)))
    with pytest.raises(ValueError, match="dense must be 3-D"):
        jagged.dense_to_jagged2(random_values((2, 3), torch.float32), offsets)
    with pytest.raises(ValueError, match="offsets must have B\\+1 = 4 entries"):
        jagged.dense_to_jagged2(random_values((3, 3, 3), torch.float32), offsets)
    with pytest.raises(TypeError, match="max_len must be a Python int"):
        jagged.jagged2_to_padded_dense(s, torch.tensor(3))


@pytest.mark.skipif(not ON_GPU, reason="sizes and bfloat16 for the GPU")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_gpu_sizes(dtype):
    lengths = torch.randint(0, 300, (40,)).tolist() + [1100, 0, 1]
    check_scores(lengths, 128, dtype)
    check_weighted_sum(lengths, 96, dtype)
    for causal in (False, True):
        check_softmax(lengths, causal, dtype, scale=4.0)
    check_to_padded_dense(lengths, 700, 0.5, dtype)
    check_dense_to_jagged2(lengths, 800, 1200, dtype)
