"""jagged_dense_bmm / jagged_jagged_bmm: kernels against the float64 reference, forward and the
gradients of both operands."""

from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import jagged
from jagged import JaggedTensor, reference
from jagged.ops import bmm
from helpers import FLOAT_DTYPES, LENGTH_PATTERNS, ON_GPU, assert_close, lengths_strategy, make_offsets, random_values


def check_jagged_dense_bmm(lengths, k_dim, n_dim, dtype, offsets_dtype=torch.int64, transposed_y=False):
    x = JaggedTensor(random_values((sum(lengths), k_dim), dtype, requires_grad=True), make_offsets(lengths, offsets_dtype))
    y = random_values((len(lengths), n_dim, k_dim), dtype).transpose(1, 2) if transposed_y else \
        random_values((len(lengths), k_dim, n_dim), dtype)
    y.requires_grad_(True)
    out = jagged.jagged_dense_bmm(x, y)
    ref = reference.jagged_dense_bmm(x.values.double(), x.offsets, y.double())
    assert out.offsets is x.offsets and out.values.dtype == dtype
    assert_close(out.values, ref, tol=dtype)
    grad = random_values(out.values.shape, dtype)
    got = torch.autograd.grad(out.values, (x.values, y), grad)
    expected = torch.autograd.grad(ref, (x.values, y), grad.double())
    for name, g, e in zip(("x", "y"), got, expected):
        assert_close(g, e, tol=dtype, name=f"grad {name}")


def check_jagged_jagged_bmm(lengths, m_dim, n_dim, dtype, offsets_dtype=torch.int64):
    offsets = make_offsets(lengths, offsets_dtype)
    x = JaggedTensor(random_values((sum(lengths), m_dim), dtype, requires_grad=True), offsets)
    y = x.with_values(random_values((sum(lengths), n_dim), dtype, requires_grad=True))
    out = jagged.jagged_jagged_bmm(x, y)
    ref = reference.jagged_jagged_bmm(x.values.double(), y.values.double(), offsets)
    assert out.shape == (len(lengths), m_dim, n_dim) and out.dtype == dtype
    assert_close(out, ref, tol=dtype)
    grad = random_values(out.shape, dtype)
    got = torch.autograd.grad(out, (x.values, y.values), grad)
    expected = torch.autograd.grad(ref, (x.values, y.values), grad.double())
    for name, g, e in zip(("x", "y"), got, expected):
        assert_close(g, e, tol=dtype, name=f"grad {name}")


@pytest.mark.parametrize("lengths", list(LENGTH_PATTERNS.values()), ids=list(LENGTH_PATTERNS))
@pytest.mark.parametrize("dims", [(16, 16), (5, 33), (40, 7)], ids=str)
def test_jagged_dense_bmm_patterns(lengths, dims):
    check_jagged_dense_bmm(lengths, *dims, torch.float32)


@pytest.mark.parametrize("lengths", list(LENGTH_PATTERNS.values()), ids=list(LENGTH_PATTERNS))
@pytest.mark.parametrize("dims", [(16, 16), (5, 33), (40, 7)], ids=str)
def test_jagged_jagged_bmm_patterns(lengths, dims):
    check_jagged_jagged_bmm(lengths, *dims, torch.float32)


@given(lengths=lengths_strategy(max_len=40), k_dim=st.sampled_from([1, 8, 16, 24, 48]), n_dim=st.sampled_from([3, 16, 40]),
       dtype=st.sampled_from([torch.float32, torch.float16]), offsets_dtype=st.sampled_from([torch.int32, torch.int64]),
       transposed_y=st.booleans())
def test_jagged_dense_bmm_property(lengths, k_dim, n_dim, dtype, offsets_dtype, transposed_y):
    check_jagged_dense_bmm(lengths, k_dim, n_dim, dtype, offsets_dtype, transposed_y)


@given(lengths=lengths_strategy(max_len=40), m_dim=st.sampled_from([1, 8, 16, 24, 48]), n_dim=st.sampled_from([3, 16, 40]),
       dtype=st.sampled_from([torch.float32, torch.float16]), offsets_dtype=st.sampled_from([torch.int32, torch.int64]))
def test_jagged_jagged_bmm_property(lengths, m_dim, n_dim, dtype, offsets_dtype):
    check_jagged_jagged_bmm(lengths, m_dim, n_dim, dtype, offsets_dtype)


@given(lengths=lengths_strategy(max_len=40), k_dim=st.sampled_from([8, 24, 32]), n_dim=st.sampled_from([3, 40]),
       programs_per_sm=st.sampled_from([1, 3]))
def test_jagged_dense_bmm_persistent(lengths, k_dim, n_dim, programs_per_sm):
    # The persistent kernel (a fixed grid looping over tiles, spare slots included) with small
    # tiles: fewer programs than tiles, so each program runs several, of different rows. K = 32:
    # BLOCK_K divides K (x unmasked on k); the backward's dx runs it with a transposed y.
    tiles = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, PROGRAMS_PER_SM=programs_per_sm)
    with mock.patch.object(bmm, "_dense_bmm_tiles", lambda *args: tiles):
        check_jagged_dense_bmm(lengths, k_dim, n_dim, torch.float32)


@pytest.mark.parametrize("row_finder", ["scan", "search"])
def test_jagged_dense_bmm_row_finders(row_finder):
    # A program of the one-per-tile kernel finds its row by a scan over all offsets in small
    # batches (every interpreter test) and by the 32-way search in large ones: both here.
    scan_width = bmm.scan_width if row_finder == "scan" else (lambda *args: 0)
    with mock.patch.object(bmm, "scan_width", scan_width):
        check_jagged_dense_bmm([5, 0, 40, 1, 17, 33, 0], 24, 40, torch.float32, transposed_y=True)


def test_bad_input():
    x = JaggedTensor(random_values((9, 4), torch.float32), make_offsets([4, 5]))
    with pytest.raises(ValueError, match=r"y must be \[B=2, K=4, N\]"):
        jagged.jagged_dense_bmm(x, random_values((3, 4, 2), torch.float32))
    with pytest.raises(ValueError, match=r"y must be \[B=2, K=4, N\]"):
        jagged.jagged_dense_bmm(x, random_values((2, 5, 2), torch.float32))
    with pytest.raises(ValueError, match="x's dtype"):
        jagged.jagged_dense_bmm(x, random_values((2, 4, 2), torch.float16))
    with pytest.raises(TypeError, match="x must be a jagged.JaggedTensor"):
        jagged.jagged_dense_bmm(x.values, random_values((2, 4, 2), torch.float32))
    with pytest.raises(ValueError, match=r"x.values must be 2-D"):
        jagged.jagged_dense_bmm(x.with_values(random_values((9, 2, 2), torch.float32)), random_values((2, 4, 2), torch.float32))
    with pytest.raises(ValueError, match="y must have x's rows"):
        jagged.jagged_jagged_bmm(x, JaggedTensor(random_values((9, 3), torch.float32), make_offsets([5, 4])))
    with pytest.raises(ValueError, match="y must have dtype"):
        jagged.jagged_jagged_bmm(x, x.to(torch.float16))


@pytest.mark.skipif(not ON_GPU, reason="sizes and bfloat16 for the GPU")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("dims", [(64, 64), (128, 256), (256, 128), (100, 72), (200, 300)], ids=str)
@pytest.mark.parametrize("spread", ["skewed", "even"])
def test_gpu_sizes(dtype, dims, spread):
    # 16-bit N > 128: the persistent kernel (300: two column blocks, the second partial)
    # skewed: the mean row is under bmm.SKEWED_FILL of the longest (other jagged_jagged_bmm tiles)
    low = 0 if spread == "skewed" else 250
    lengths = torch.randint(low, 300, (60,)).tolist() + ([1500, 0] if spread == "skewed" else [])
    check_jagged_dense_bmm(lengths, *dims, dtype)
    check_jagged_jagged_bmm(lengths, *dims, dtype)


def test_skewed_tile_hint_needs_a_known_longest_row():
    values = random_values((103, 8), torch.float32)
    offsets = make_offsets([1, 1, 1, 100])
    assert bmm._skewed(JaggedTensor(values, offsets))  # validation finds the longest row
    assert not bmm._skewed(JaggedTensor(values, offsets, validate=False))  # unknown: no sync for a hint
    assert not bmm._skewed(JaggedTensor(values, make_offsets([25, 26, 26, 26])))
