"""jagged_sum / jagged_mean: kernels against the reference, forward and gradients."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import jagged
from jagged import JaggedTensor, reference
from helpers import (DEVICE, FLOAT_DTYPES, LENGTH_PATTERNS, ON_GPU, TIER_CASES, assert_close, lengths_strategy, make_offsets,
                     jagged_with_max_len, random_values, tiered_lengths)
from jagged.ops import pooling as pooling_ops

OPS = {"sum": (jagged.jagged_sum, reference.jagged_sum), "mean": (jagged.jagged_mean, reference.jagged_mean)}


def check_pool(op, lengths, feature_shape, dtype, offsets_dtype=torch.int64, max_len="validate"):
    fn, ref_fn = OPS[op]
    values = random_values((sum(lengths), *feature_shape), dtype, requires_grad=True)
    offsets = make_offsets(lengths, offsets_dtype)
    x = jagged_with_max_len(values, offsets, max_len)
    out = fn(x)
    ref = ref_fn(x.values.double(), x.offsets)
    assert out.shape == (len(lengths), *feature_shape) and out.dtype == dtype
    assert_close(out, ref, tol=dtype)
    grad = random_values(out.shape, dtype)
    (g,) = torch.autograd.grad(out, x.values, grad)
    (g_ref,) = torch.autograd.grad(ref, x.values, grad.double())
    assert_close(g, g_ref, tol=dtype, name="grad values")


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("lengths", list(LENGTH_PATTERNS.values()), ids=list(LENGTH_PATTERNS))
@pytest.mark.parametrize("feature_shape", [(1,), (5,), (2, 3)], ids=str)
def test_pool_patterns(op, lengths, feature_shape):
    check_pool(op, lengths, feature_shape, torch.float32)


@given(op=st.sampled_from(list(OPS)), lengths=lengths_strategy(max_len=30),
       feature_dim=st.sampled_from([1, 3, 8, 17]), dtype=st.sampled_from(FLOAT_DTYPES),
       offsets_dtype=st.sampled_from([torch.int32, torch.int64]))
def test_pool_property(op, lengths, feature_dim, dtype, offsets_dtype):
    check_pool(op, lengths, (feature_dim,), dtype, offsets_dtype)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", TIER_CASES)
def test_long_and_short_row_tiers(op, dtype, case):
    # Rows longer than one tile run first, in a tier of their own, with taller, narrower tiles
    # when the longest row (if known) makes a long chain of tile steps.
    feature_dim = 5 if not ON_GPU else 200
    lengths, longest = tiered_lengths(pooling_ops._pool_launch, feature_dim, dtype, case)
    check_pool(op, lengths, (feature_dim,), dtype, max_len=longest)


@pytest.mark.parametrize("op", list(OPS))
def test_double_backward(op):
    # The backward (a broadcast, over the row's length for the mean) is itself differentiable:
    # its adjoint is the pooling again. Checked through a gradient of a gradient.
    fn, ref_fn = OPS[op]
    lengths = [3, 0, 7, 1]
    values = random_values((sum(lengths), 5), torch.float32, requires_grad=True)
    offsets = make_offsets(lengths)
    grad = random_values((len(lengths), 5), torch.float32, requires_grad=True)
    weight = random_values(values.shape, torch.float32)
    results = []
    for pool, v, g in ((lambda v: fn(JaggedTensor(v, offsets)), values, grad),
                       (lambda v: ref_fn(v, offsets), values.double(), grad.double())):
        (dv,) = torch.autograd.grad(pool(v), v, g, create_graph=True)
        results.append(torch.autograd.grad((dv * weight.to(dv.dtype)).sum(), g)[0])
    assert_close(results[0], results[1], tol=torch.float32, name="grad of grad")


def test_empty_row_gives_zero():
    x = JaggedTensor(random_values((4, 3), torch.float32), make_offsets([0, 4, 0]))
    for fn in (jagged.jagged_sum, jagged.jagged_mean):
        out = fn(x)
        assert torch.equal(out[0], torch.zeros(3, device=DEVICE)) and torch.equal(out[2], out[0])


def test_strided_values():
    base = random_values((6, 10), torch.float32)
    x = JaggedTensor(base.t(), make_offsets([4, 0, 6]))  # [10, 6], column stride 10
    assert_close(jagged.jagged_sum(x), reference.jagged_sum(x.values.double(), x.offsets), tol=torch.float32)


def test_bad_input():
    with pytest.raises(TypeError, match="x must be a jagged.JaggedTensor"):
        jagged.jagged_sum(random_values((3, 2), torch.float32))
    with pytest.raises(ValueError, match="floating-point"):
        jagged.jagged_mean(JaggedTensor(torch.arange(3, device=DEVICE)[:, None], make_offsets([3])))
    with pytest.raises(ValueError, match="at least one feature dim"):
        jagged.jagged_sum(JaggedTensor(random_values((3,), torch.float32), make_offsets([3])))


@pytest.mark.skipif(not ON_GPU, reason="sizes for the GPU")
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_gpu_large(op, dtype):
    lengths = torch.randint(0, 600, (500,)).tolist() + [5000, 0]
    check_pool(op, lengths, (200,), dtype)
