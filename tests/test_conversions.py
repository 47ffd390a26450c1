"""jagged_to_padded_dense / dense_to_jagged: kernels (GPU, or the Triton interpreter on CPU)
against the reference, forward and gradients. Conversions are copies: results must be exact."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import jagged
from jagged import reference
from helpers import (
    DEVICE,
    FLOAT_DTYPES,
    LENGTH_PATTERNS,
    OFFSET_DTYPES,
    ON_GPU,
    assert_close,
    lengths_strategy,
    make_offsets,
    random_values,
)

FEATURE_SHAPES = [(), (3,), (2, 5)]


def check_jagged_to_padded_dense(lengths, feature_shape, dtype, offsets_dtype, max_len, padding_value=0.0):
    offsets = make_offsets(lengths, offsets_dtype)
    values = random_values((sum(lengths), *feature_shape), dtype, requires_grad=True)
    out = jagged.jagged_to_padded_dense(values, offsets, max_len, padding_value)
    ref = reference.jagged_to_padded_dense(values, offsets, max_len, padding_value)
    assert out.shape == (len(lengths), max_len, *feature_shape)
    assert_close(out, ref, exact=True)
    grad = random_values(out.shape, dtype)
    (g_out,) = torch.autograd.grad(out, values, grad, retain_graph=True)
    (g_again,) = torch.autograd.grad(out, values, grad)  # backward twice gives the same
    (g_ref,) = torch.autograd.grad(ref, values, grad)
    assert_close(g_out, g_ref, exact=True, name="grad values")
    assert_close(g_again, g_ref, exact=True, name="grad values (second backward)")


def check_dense_to_jagged(lengths, dense_len, feature_shape, dtype, offsets_dtype):
    offsets = make_offsets(lengths, offsets_dtype)
    dense = random_values((len(lengths), dense_len, *feature_shape), dtype, requires_grad=True)
    out = jagged.dense_to_jagged(dense, offsets, sum(lengths))
    ref = reference.dense_to_jagged(dense, offsets, sum(lengths))
    assert_close(out, ref, exact=True)
    grad = random_values(out.shape, dtype)
    (g_out,) = torch.autograd.grad(out, dense, grad)
    (g_ref,) = torch.autograd.grad(ref, dense, grad)
    assert_close(g_out, g_ref, exact=True, name="grad dense")


@pytest.mark.parametrize("lengths", list(LENGTH_PATTERNS.values()), ids=list(LENGTH_PATTERNS))
@pytest.mark.parametrize("feature_shape", FEATURE_SHAPES, ids=str)
@pytest.mark.parametrize("max_len_delta", [0, 3, -2], ids=["exact", "longer", "truncating"])
def test_jagged_to_padded_dense_patterns(lengths, feature_shape, max_len_delta):
    max_len = max(0, max(lengths, default=0) + max_len_delta)
    check_jagged_to_padded_dense(lengths, feature_shape, torch.float32, torch.int64, max_len, padding_value=-2.5)


@pytest.mark.parametrize("lengths", list(LENGTH_PATTERNS.values()), ids=list(LENGTH_PATTERNS))
@pytest.mark.parametrize("feature_shape", FEATURE_SHAPES, ids=str)
@pytest.mark.parametrize("dense_len_delta", [0, 3, -2], ids=["exact", "longer", "shorter-than-rows"])
def test_dense_to_jagged_patterns(lengths, feature_shape, dense_len_delta):
    dense_len = max(0, max(lengths, default=0) + dense_len_delta)
    check_dense_to_jagged(lengths, dense_len, feature_shape, torch.float32, torch.int32)


@given(
    lengths=lengths_strategy(),
    feature_shape=st.sampled_from(FEATURE_SHAPES + [(7,), (1, 2, 3)]),
    dtype=st.sampled_from(FLOAT_DTYPES),
    offsets_dtype=st.sampled_from(OFFSET_DTYPES),
    max_len_delta=st.integers(-3, 3),
    padding_value=st.sampled_from([0.0, 1.5, float("-inf")]),
)
def test_jagged_to_padded_dense_property(lengths, feature_shape, dtype, offsets_dtype, max_len_delta, padding_value):
    max_len = max(0, max(lengths, default=0) + max_len_delta)
    check_jagged_to_padded_dense(lengths, feature_shape, dtype, offsets_dtype, max_len, padding_value)


@given(
    lengths=lengths_strategy(),
    feature_shape=st.sampled_from(FEATURE_SHAPES + [(7,)]),
    dtype=st.sampled_from(FLOAT_DTYPES),
    offsets_dtype=st.sampled_from(OFFSET_DTYPES),
    dense_len_delta=st.integers(-3, 3),
)
def test_dense_to_jagged_property(lengths, feature_shape, dtype, offsets_dtype, dense_len_delta):
    dense_len = max(0, max(lengths, default=0) + dense_len_delta)
    check_dense_to_jagged(lengths, dense_len, feature_shape, dtype, offsets_dtype)


@given(lengths=lengths_strategy(), dtype=st.sampled_from(FLOAT_DTYPES))
def test_round_trip(lengths, dtype):
    offsets = make_offsets(lengths)
    values = random_values((sum(lengths), 4), dtype)
    dense = jagged.jagged_to_padded_dense(values, offsets, max(lengths, default=0))
    assert_close(jagged.dense_to_jagged(dense, offsets, sum(lengths)), values, exact=True)


def test_integer_values_are_copied():
    offsets = make_offsets([2, 0, 3])
    values = torch.arange(10, 15, device=DEVICE)
    dense = jagged.jagged_to_padded_dense(values, offsets, 3, padding_value=-1)
    expected = torch.tensor([[10, 11, -1], [-1, -1, -1], [12, 13, 14]], device=DEVICE)
    assert_close(dense, expected, exact=True)


def test_strided_inputs():
    """Transposed and sliced views go through without a wrong result."""
    lengths = [3, 0, 5, 2]
    offsets = make_offsets(lengths)
    values = random_values((6, sum(lengths)), torch.float32).t()  # [T, 6], stride (1, T)
    assert not values.is_contiguous()
    out = jagged.jagged_to_padded_dense(values, offsets, 5)
    assert_close(out, reference.jagged_to_padded_dense(values, offsets, 5), exact=True)
    dense = random_values((4, 8, 12), torch.float32)[:, 1:7, ::2]  # strided on every dim
    out = jagged.dense_to_jagged(dense, offsets, sum(lengths))
    assert_close(out, reference.dense_to_jagged(dense, offsets, sum(lengths)), exact=True)


def test_expanded_gradient():
    """A stride-0 incoming gradient (from .sum()) is read correctly by the backward kernels."""
    offsets = make_offsets([2, 4])
    values = random_values((6, 3), torch.float32, requires_grad=True)
    jagged.jagged_to_padded_dense(values, offsets, 3).sum().backward()
    expected = torch.tensor([1.0] * 5 + [0.0], device=DEVICE)[:, None].expand(6, 3)
    assert_close(values.grad, expected, exact=True)


def test_total_len_read_from_offsets():
    offsets = make_offsets([2, 3])
    dense = random_values((2, 3, 2), torch.float32)
    assert_close(jagged.dense_to_jagged(dense, offsets), reference.dense_to_jagged(dense, offsets, 5), exact=True)


def test_reference_against_rows():
    """The reference itself, against a loop over the rows."""
    lengths = [2, 0, 4, 1]
    offsets = make_offsets(lengths, device="cpu")
    values = torch.randn(7, 3)
    dense = reference.jagged_to_padded_dense(values, offsets, 3, padding_value=9.0)
    for b, row in enumerate(values.split(lengths)):
        n = min(len(row), 3)
        assert torch.equal(dense[b, :n], row[:n])
        assert bool((dense[b, n:] == 9.0).all())
    back = reference.dense_to_jagged(dense, offsets)
    for b, row in enumerate(back.split(lengths)):
        assert torch.equal(row[:3], dense[b, : len(row)])
        assert bool((row[3:] == 0).all())


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda v, o: jagged.jagged_to_padded_dense(v, o.view(1, -1), 4), ValueError, "offsets must be 1-D"),
        (lambda v, o: jagged.jagged_to_padded_dense(v, o.float(), 4), ValueError, "int32 or int64"),
        (lambda v, o: jagged.jagged_to_padded_dense(v, o[:0], 4), ValueError, "at least one entry"),
        (lambda v, o: jagged.jagged_to_padded_dense(v, o, -1), ValueError, "max_len must be >= 0"),
        (lambda v, o: jagged.jagged_to_padded_dense(v, o, 2.5), TypeError, "max_len"),
        (lambda v, o: jagged.jagged_to_padded_dense(v, o, torch.tensor(3)), TypeError, "max_len"),
        (lambda v, o: jagged.jagged_to_padded_dense(v[0, 0], o, 4), ValueError, "at least 1-D"),
        (lambda v, o: jagged.jagged_to_padded_dense(v.tolist(), o, 4), TypeError, "values must be a torch.Tensor"),
        (lambda v, o: jagged.jagged_to_padded_dense(v, o.to("meta"), 4), ValueError, "same device"),
        (lambda v, o: jagged.dense_to_jagged(v.view(2, 3, 2), o, 6), ValueError, "B\\+1=3"),
        (lambda v, o: jagged.dense_to_jagged(v[:, 0], o, 6), ValueError, "at least 2-D"),
        (lambda v, o: jagged.dense_to_jagged(v.view(3, 2, 2), o, -1), ValueError, "total_len must be >= 0"),
    ],
)
def test_bad_input(call, error, match):
    values = random_values((12, 1), torch.float32)
    offsets = make_offsets([4, 0, 8])
    with pytest.raises(error, match=match):
        call(values, offsets)


@pytest.mark.skipif(not ON_GPU, reason="sizes for the GPU")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("feature_dim", [1, 64, 200, 512])
def test_gpu_large(dtype, feature_dim):
    lengths = torch.randint(0, 300, (777,)).tolist() + [2000]
    check_jagged_to_padded_dense(lengths, (feature_dim,), dtype, torch.int32, 1024)
    check_dense_to_jagged(lengths, 1024, (feature_dim,), dtype, torch.int64)
