"""jagged_dense_elementwise_add / _mul: kernels against the reference, forward and gradients,
including rows longer than the dense length (dense reads 0 there)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import jagged
from jagged import JaggedTensor, reference
from helpers import DEVICE, FLOAT_DTYPES, LENGTH_PATTERNS, ON_GPU, assert_close, lengths_strategy, make_offsets, random_values

OPS = {"add": (jagged.jagged_dense_elementwise_add, reference.jagged_dense_elementwise_add),
       "mul": (jagged.jagged_dense_elementwise_mul, reference.jagged_dense_elementwise_mul)}


def check_elementwise(op, lengths, dense_len, feature_shape, dtype, offsets_dtype=torch.int64):
    fn, ref_fn = OPS[op]
    x = JaggedTensor(random_values((sum(lengths), *feature_shape), dtype, requires_grad=True),
                     make_offsets(lengths, offsets_dtype))
    y = random_values((len(lengths), dense_len, *feature_shape), dtype, requires_grad=True)
    out = fn(x, y)
    ref = ref_fn(x.values.double(), x.offsets, y.double())
    assert out.offsets is x.offsets and out.values.dtype == dtype
    assert_close(out.values, ref, tol=dtype)
    grad = random_values(out.values.shape, dtype)
    got = torch.autograd.grad(out.values, (x.values, y), grad)
    expected = torch.autograd.grad(ref, (x.values, y), grad.double())
    for name, g, e in zip(("x", "y"), got, expected):
        assert_close(g, e, tol=dtype, name=f"grad {name}")


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("lengths", list(LENGTH_PATTERNS.values()), ids=list(LENGTH_PATTERNS))
@pytest.mark.parametrize("dense_len_delta", [0, 2, -2], ids=["exact", "longer", "shorter-than-rows"])
def test_elementwise_patterns(op, lengths, dense_len_delta):
    check_elementwise(op, lengths, max(0, max(lengths, default=0) + dense_len_delta), (5,), torch.float32)


@given(op=st.sampled_from(list(OPS)), lengths=lengths_strategy(max_len=20), dense_len_delta=st.integers(-3, 3),
       feature_shape=st.sampled_from([(1,), (7,), (2, 3)]), dtype=st.sampled_from(FLOAT_DTYPES),
       offsets_dtype=st.sampled_from([torch.int32, torch.int64]))
def test_elementwise_property(op, lengths, dense_len_delta, feature_shape, dtype, offsets_dtype):
    dense_len = max(0, max(lengths, default=0) + dense_len_delta)
    check_elementwise(op, lengths, dense_len, feature_shape, dtype, offsets_dtype)


def test_positions_past_dense_length():
    x = JaggedTensor(random_values((5, 2), torch.float32), make_offsets([5]))
    y = random_values((1, 3, 2), torch.float32)
    assert torch.equal(jagged.jagged_dense_elementwise_add(x, y).values[3:], x.values[3:])
    assert torch.equal(jagged.jagged_dense_elementwise_mul(x, y).values[3:], torch.zeros(2, 2, device=DEVICE))


def test_bad_input():
    x = JaggedTensor(random_values((5, 2), torch.float32), make_offsets([2, 3]))
    with pytest.raises(ValueError, match=r"y must be \[B=2, L, \*\(2,\)\]"):
        jagged.jagged_dense_elementwise_add(x, random_values((3, 4, 2), torch.float32))
    with pytest.raises(ValueError, match=r"y must be \[B=2, L, \*\(2,\)\]"):
        jagged.jagged_dense_elementwise_mul(x, random_values((2, 4, 3), torch.float32))
    with pytest.raises(ValueError, match="one dtype and device"):
        jagged.jagged_dense_elementwise_add(x, random_values((2, 4, 2), torch.float16))
    with pytest.raises(TypeError, match="x must be a jagged.JaggedTensor"):
        jagged.jagged_dense_elementwise_add(x.values, random_values((2, 4, 2), torch.float32))


@pytest.mark.skipif(not ON_GPU, reason="sizes for the GPU")
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_gpu_large(op, dtype):
    lengths = torch.randint(0, 600, (500,)).tolist() + [3000, 0]
    check_elementwise(op, lengths, 512, (128,), dtype)
