"""JaggedTensor: construction, validation, properties, constructors, conversions, interop."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import jagged
from jagged import JaggedTensor, reference
from jagged.ops._utils import TRITON_INTERPRETER, use_triton
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


def make(lengths, feature_shape=(3,), dtype=torch.float32, offsets_dtype=torch.int64, **kwargs):
    values = random_values((sum(lengths), *feature_shape), dtype)
    return JaggedTensor(values, make_offsets(lengths, offsets_dtype), **kwargs)


def test_kernels_are_exercised():
    """On CPU the suite must run the Triton kernels (interpreter), not only the reference."""
    assert use_triton(torch.empty(1, device=DEVICE))
    assert ON_GPU or TRITON_INTERPRETER


@pytest.mark.parametrize("lengths", list(LENGTH_PATTERNS.values()), ids=list(LENGTH_PATTERNS))
@pytest.mark.parametrize("offsets_dtype", OFFSET_DTYPES, ids=str)
def test_properties(lengths, offsets_dtype):
    jt = make(lengths, offsets_dtype=offsets_dtype)
    assert jt.batch_size == len(jt) == len(lengths)
    assert jt.total_len == sum(lengths)
    assert jt.feature_shape == (3,)
    assert jt.max_len == max(lengths, default=0)
    assert jt.lengths().tolist() == lengths
    assert jt.lengths().dtype == offsets_dtype
    assert [r.shape[0] for r in jt.unbind()] == lengths
    for row, expected in zip(jt.unbind(), jt.values.split(lengths)):
        assert torch.equal(row, expected)
    text = repr(jt)
    for part in (f"B={len(lengths)}", f"T={sum(lengths)}", "feature_shape=(3,)", "float32", str(DEVICE.type)):
        assert part in text


def test_max_len_is_cached_and_lazy():
    jt = make([2, 5, 1], validate=False)
    assert "max_len=?" in repr(jt)
    assert jt.max_len == 5
    assert jt._max_len == 5 and "max_len=5" in repr(jt)
    assert make([2, 5, 1], max_len=8).max_len == 8  # an upper bound is accepted as given


@pytest.mark.parametrize(
    "offsets, match",
    [
        ([0, 3, 2, 5], r"non-decreasing, but offsets\[1\]=3 > offsets\[2\]=2"),
        ([0, 2, 4], r"offsets\[-1\] must equal the number of values T=5, got 4"),
        ([1, 2, 5], r"offsets\[0\] must be 0, got 1"),
        ([0, -1, 5], "non-decreasing"),
    ],
)
def test_bad_offsets_values(offsets, match):
    values = random_values((5, 2), torch.float32)
    with pytest.raises(ValueError, match=match):
        JaggedTensor(values, torch.tensor(offsets, device=DEVICE))
    JaggedTensor(values, torch.tensor(offsets, device=DEVICE), validate=False)  # opt-out skips them


@pytest.mark.parametrize(
    "offsets, error, match",
    [
        (torch.tensor([[0, 5]]), ValueError, "offsets must be 1-D"),
        (torch.tensor([0.0, 5.0]), ValueError, "int32 or int64"),
        (torch.tensor([0, 5], dtype=torch.int16), ValueError, "int32 or int64"),
        (torch.tensor([], dtype=torch.int64), ValueError, "at least one entry"),
        ([0, 5], TypeError, "offsets must be a torch.Tensor"),
    ],
)
def test_bad_offsets_type(offsets, error, match):
    values = random_values((5, 2), torch.float32)
    if isinstance(offsets, torch.Tensor):
        offsets = offsets.to(DEVICE)
    with pytest.raises(error, match=match):
        JaggedTensor(values, offsets, validate=False)  # cheap checks run even without validate


def test_bad_values_and_max_len():
    offsets = make_offsets([2, 3])
    with pytest.raises(ValueError, match="same device"):
        JaggedTensor(torch.empty(5, 2, device="meta"), offsets)
    with pytest.raises(ValueError, match="at least 1-D"):
        JaggedTensor(torch.tensor(1.0, device=DEVICE), offsets)
    with pytest.raises(ValueError, match=r"max_len=2 is smaller than the longest row \(3\)"):
        JaggedTensor(random_values((5, 2), torch.float32), offsets, max_len=2)
    with pytest.raises(ValueError, match="max_len must be >= 0"):
        JaggedTensor(random_values((5, 2), torch.float32), offsets, max_len=-1)


@pytest.mark.parametrize("offsets_dtype", OFFSET_DTYPES, ids=str)
def test_from_lengths(offsets_dtype):
    lengths = torch.tensor([2, 0, 3], dtype=offsets_dtype, device=DEVICE)
    jt = JaggedTensor.from_lengths(random_values((5, 4), torch.float32), lengths)
    assert jt.offsets.tolist() == [0, 2, 2, 5] and jt.offsets.dtype == offsets_dtype
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        JaggedTensor.from_lengths(random_values((5, 4), torch.float32), torch.tensor([6, -1], device=DEVICE))
    with pytest.raises(ValueError, match="T=5"):
        JaggedTensor.from_lengths(random_values((5, 4), torch.float32), torch.tensor([2, 2], device=DEVICE))
    with pytest.raises(ValueError, match="lengths must be 1-D"):
        JaggedTensor.from_lengths(random_values((5, 4), torch.float32), torch.tensor([[5]], device=DEVICE))


def test_from_list():
    rows = [random_values((n, 2, 3), torch.float16) for n in (3, 0, 1)]
    jt = JaggedTensor.from_list(rows)
    assert jt.batch_size == 3 and jt.max_len == 3 and jt.dtype == torch.float16
    for a, b in zip(jt.unbind(), rows):
        assert torch.equal(a, b)
    empty = JaggedTensor.from_list([])
    assert empty.batch_size == 0 and empty.total_len == 0 and empty.max_len == 0
    with pytest.raises(ValueError, match=r"tensors\[1\] must have shape"):
        JaggedTensor.from_list([random_values((2, 3), torch.float32), random_values((2, 4), torch.float32)])
    with pytest.raises(ValueError, match=r"tensors\[1\] must have dtype"):
        JaggedTensor.from_list([random_values((2, 3), torch.float32), random_values((2, 3), torch.float16)])


@given(lengths=lengths_strategy(), dtype=st.sampled_from(FLOAT_DTYPES), offsets_dtype=st.sampled_from(OFFSET_DTYPES))
def test_from_dense_and_back(lengths, dtype, offsets_dtype):
    dense_len = max(lengths, default=0) + 1
    dense = random_values((len(lengths), dense_len, 2), dtype, requires_grad=True)
    jt = JaggedTensor.from_dense(dense, torch.tensor(lengths, dtype=offsets_dtype, device=DEVICE))
    assert jt.lengths().tolist() == lengths
    expected = reference.dense_to_jagged(dense, jt.offsets)
    assert_close(jt.values, expected, exact=True)
    padded = jt.to_padded_dense(dense_len, padding_value=7.0)
    mask = torch.arange(dense_len, device=DEVICE)[None, :] < torch.tensor(lengths, device=DEVICE, dtype=torch.long)[:, None]
    assert_close(padded, torch.where(mask[..., None], dense, torch.full_like(dense, 7.0)), exact=True)
    grad = random_values(padded.shape, dtype)
    (g,) = torch.autograd.grad(padded, dense, grad)
    assert_close(g, torch.where(mask[..., None], grad, torch.zeros_like(grad)), exact=True, name="grad dense")


def test_from_dense_bad_lengths():
    dense = random_values((2, 3, 1), torch.float32)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, L=3\]"):
        JaggedTensor.from_dense(dense, torch.tensor([1, 4], device=DEVICE))
    with pytest.raises(ValueError, match=r"lengths must have shape \[B\]=\[2\]"):
        JaggedTensor.from_dense(dense, torch.tensor([1, 2, 0], device=DEVICE))


def test_to_padded_dense_defaults_and_truncation():
    jt = make([1, 4, 0])
    assert jt.to_padded_dense().shape == (3, 4, 3)
    truncated = jt.to_padded_dense(max_len=2, padding_value=-1.0)
    assert_close(truncated, reference.jagged_to_padded_dense(jt.values, jt.offsets, 2, -1.0), exact=True)


def test_to_and_with_values():
    jt = make([2, 3], offsets_dtype=torch.int32)
    half = jt.to(torch.float16)
    assert half.dtype == torch.float16 and half.offsets.dtype == torch.int32
    assert half.max_len == 3 and torch.equal(half.offsets, jt.offsets)
    cpu = jt.cpu()
    assert cpu.device.type == "cpu" and cpu.offsets.device.type == "cpu"
    if ON_GPU:
        assert cpu.cuda().device.type == "cuda" and cpu.cuda().offsets.is_cuda
    with pytest.raises(ValueError, match=r"values must have shape \[T=5"):
        jt.with_values(random_values((4, 3), torch.float32))


@pytest.mark.parametrize("offsets_dtype", OFFSET_DTYPES, ids=str)
def test_nested_round_trip(offsets_dtype):
    jt = make([2, 0, 3], feature_shape=(4,), offsets_dtype=offsets_dtype)
    nt = jt.to_nested()
    assert nt.layout == torch.jagged and nt.shape[0] == 3
    for a, b in zip(nt.unbind(), jt.unbind()):
        assert torch.equal(a, b)
    back = JaggedTensor.from_nested(nt)
    assert back.offsets.tolist() == [0, 2, 2, 5] and torch.equal(back.values, jt.values)
    assert back.max_len == 3


def test_from_nested_with_holes_and_bad_input():
    values = random_values((6, 2), torch.float32)
    nt = torch.nested.nested_tensor_from_jagged(
        values, torch.tensor([0, 3, 6], device=DEVICE), lengths=torch.tensor([1, 2], device=DEVICE)
    )
    jt = JaggedTensor.from_nested(nt)
    assert jt.lengths().tolist() == [1, 2]
    assert torch.equal(jt.values, torch.cat([values[0:1], values[3:5]]))
    with pytest.raises(ValueError, match="layout=torch.jagged"):
        JaggedTensor.from_nested(values)


def test_batch_size_zero_everywhere():
    jt = JaggedTensor(random_values((0, 3), torch.float32), torch.zeros(1, dtype=torch.int64, device=DEVICE))
    assert jt.batch_size == 0 and jt.max_len == 0 and jt.unbind() == []
    assert jt.to_padded_dense().shape == (0, 0, 3)
    assert jt.to_padded_dense(max_len=4).shape == (0, 4, 3)
    assert JaggedTensor.from_dense(random_values((0, 4, 3), torch.float32), torch.zeros(0, dtype=torch.int64, device=DEVICE)).total_len == 0
    assert jagged.lengths_to_offsets(torch.zeros(0, dtype=torch.int32)).tolist() == [0]
