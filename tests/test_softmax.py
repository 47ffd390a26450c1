"""jagged_softmax: kernels against the reference, forward and gradients, numerics."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import jagged
from jagged import JaggedTensor, reference
from jagged.ops import softmax as softmax_ops
from helpers import (DEVICE, FLOAT_DTYPES, LENGTH_PATTERNS, ON_GPU, TIER_CASES, assert_close, lengths_strategy, make_offsets,
                     jagged_with_max_len, random_values, tiered_lengths)


def check_softmax(lengths, feature_shape, dtype, offsets_dtype=torch.int64, scale=1.0, max_len="validate"):
    values = (random_values((sum(lengths), *feature_shape), torch.float32) * scale).to(dtype).requires_grad_(True)
    offsets = make_offsets(lengths, offsets_dtype)
    x = jagged_with_max_len(values, offsets, max_len)
    out = jagged.jagged_softmax(x)
    ref = reference.jagged_softmax(values.double(), x.offsets)
    assert out.offsets is x.offsets and out.values.dtype == dtype
    assert_close(out.values, ref, tol=dtype)
    grad = random_values(values.shape, dtype)
    (g,) = torch.autograd.grad(out.values, values, grad)
    (g_ref,) = torch.autograd.grad(ref, values, grad.double())
    assert_close(g, g_ref, tol=dtype, name="grad values")


@pytest.mark.parametrize("lengths", list(LENGTH_PATTERNS.values()), ids=list(LENGTH_PATTERNS))
@pytest.mark.parametrize("feature_shape", [(1,), (6,), (2, 3)], ids=str)
def test_softmax_patterns(lengths, feature_shape):
    check_softmax(lengths, feature_shape, torch.float32)


@given(lengths=lengths_strategy(max_len=30), feature_dim=st.sampled_from([1, 4, 9]),
       dtype=st.sampled_from(FLOAT_DTYPES), offsets_dtype=st.sampled_from([torch.int32, torch.int64]),
       scale=st.sampled_from([1.0, 10.0]))
def test_softmax_property(lengths, feature_dim, dtype, offsets_dtype, scale):
    check_softmax(lengths, (feature_dim,), dtype, offsets_dtype, scale)


def test_rows_sum_to_one_and_large_equal_values_are_stable():
    values = torch.full((7, 3), 1e4, device=DEVICE)
    out = jagged.jagged_softmax(JaggedTensor(values, make_offsets([3, 4])))
    expected = torch.tensor([1 / 3] * 3 + [1 / 4] * 4, device=DEVICE)[:, None].expand(7, 3)
    assert_close(out.values, expected, tol=torch.float32)


@pytest.mark.parametrize("long_rows", [False, True], ids=["short", "long"])
def test_infinities_and_nan_propagate_like_torch(long_rows):
    # Long rows take several chunks (of 4 tokens under the interpreter, 64-256 on the GPU): the
    # running max passes through chunks all -inf in a column.
    first, second = (2, 3) if not long_rows else (300, 301)
    values = random_values((first + second, 3), torch.float32)
    values[0:first, 0] = float("-inf")               # row 0, column 0 all -inf -> NaN, as torch.softmax
    values[first, 1] = float("-inf")                 # one -inf in row 1 -> weight 0 there
    values[first + 1, 2] = float("nan")              # NaN in row 1, column 2 -> that column NaN
    values[first + 2:first + second - 1, 0] = float("-inf")  # row 1, column 0 -inf but at the ends
    x = JaggedTensor(values, make_offsets([first, second]))
    out = jagged.jagged_softmax(x).values
    expected = torch.cat([torch.softmax(values[:first], 0), torch.softmax(values[first:], 0)])
    assert torch.equal(out.isnan(), expected.isnan())
    ok = ~expected.isnan()
    assert_close(out[ok], expected[ok], tol=torch.float32)


def test_bad_input():
    with pytest.raises(TypeError, match="x must be a jagged.JaggedTensor"):
        jagged.jagged_softmax(random_values((3, 2), torch.float32))
    with pytest.raises(ValueError, match="floating-point"):
        jagged.jagged_softmax(JaggedTensor(torch.arange(3, device=DEVICE)[:, None], make_offsets([3])))


@pytest.mark.skipif(not ON_GPU, reason="sizes for the GPU")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_gpu_large(dtype):
    lengths = torch.randint(0, 600, (500,)).tolist() + [5000, 0]
    check_softmax(lengths, (200,), dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", TIER_CASES)
def test_long_and_short_row_tiers(dtype, case):
    # Rows longer than one tile run in a tier of their own, with taller, narrower tiles in the
    # forward when the longest row (if known) makes a long chain of tile steps, and no long tier
    # when the longest row is known to fit one tile; a feature dim that leaves partial column
    # blocks in both tiers.
    feature_dim = 5 if not ON_GPU else 200
    lengths, longest = tiered_lengths(lambda o, v, n: softmax_ops._softmax_launch(o, v, n, True), feature_dim,
                                      dtype, case)
    check_softmax(lengths, (feature_dim,), dtype, max_len=longest)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_prefetching_walk(dtype, monkeypatch):
    # The forward's walk prefetches the next chunk when the long tier keeps full tiles and the
    # longest row spans SOFTMAX_PREFETCH_TILES of them; no halving here, so the walk is reached.
    monkeypatch.setattr(softmax_ops, "SOFTMAX_CHAIN_BYTES", 0)
    feature_dim = 5 if not ON_GPU else 200
    probe = random_values((1, feature_dim), dtype)
    s = softmax_ops._softmax_launch(make_offsets([1]), probe, 1, True)[1]["SHORT_T"]
    lengths = [2, s + 1, 0, softmax_ops.SOFTMAX_PREFETCH_TILES * s + 3, 1, 3 * s - 1, s]
    tiles = softmax_ops._softmax_launch(make_offsets(lengths), probe, max(lengths), True)[1]
    assert tiles["LONG_T"] == s and softmax_ops._prefetches(tiles, max(lengths))
    check_softmax(lengths, (feature_dim,), dtype, max_len=max(lengths))
