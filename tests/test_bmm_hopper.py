"""The Gluon jagged_dense_bmm for Hopper (ops/bmm_hopper.py): taken where it should be (the
forward and the dx of the backward, whose y is transposed), equal to the float64 reference and
close to the Triton kernel, rows isolated from each other's non-finite values, capturable in a
CUDA graph, and not taken where it does not apply. The interpreter cannot run Gluon: these run on
an sm_90 GPU only (tests/test_kernel_compile.py compiles the kernel on the CPU)."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import jagged
from jagged import JaggedTensor, reference
from jagged.ops import bmm, bmm_hopper
from helpers import (LENGTH_PATTERNS, SM90, assert_close, check_graph_replay, count_calls, lengths_strategy,
                     make_offsets, random_values)

gpu_only = pytest.mark.skipif(not SM90, reason="Gluon's Hopper kernel needs an sm_90 GPU")


def _count_bmm_calls(monkeypatch):
    """Record whether the Gluon kernel served each jagged_dense_bmm launch, with the size floor
    off (the tests' operands are small)."""
    monkeypatch.setattr(bmm_hopper, "MIN_BYTES", 0)
    return count_calls(monkeypatch, bmm_hopper, "jagged_dense_bmm_hopper")


@pytest.fixture
def bmm_calls(monkeypatch):
    return _count_bmm_calls(monkeypatch)


def _operands(lengths, k_dim, n_dim, dtype, transposed_y, offsets_dtype=torch.int64):
    x = JaggedTensor(random_values((sum(lengths), k_dim), dtype, requires_grad=True),
                     make_offsets(lengths, offsets_dtype))
    if transposed_y:
        y = random_values((len(lengths), n_dim, k_dim), dtype).transpose(1, 2)
    else:
        y = random_values((len(lengths), k_dim, n_dim), dtype)
    return x, y.requires_grad_(True)


def check_hopper_bmm(lengths, k_dim, n_dim, dtype, transposed_y, monkeypatch, bmm_calls,
                     offsets_dtype=torch.int64):
    """Forward on the Gluon kernel (it must serve it) against the float64 reference and the Triton
    kernel; the gradients (dx on the Gluon kernel again, y transposed) against the reference."""
    x, y = _operands(lengths, k_dim, n_dim, dtype, transposed_y, offsets_dtype)
    out = jagged.jagged_dense_bmm(x, y)
    served = list(bmm_calls)
    ref = reference.jagged_dense_bmm(x.values.double(), x.offsets, y.double())
    assert_close(out.values, ref, tol=dtype)
    monkeypatch.setattr(bmm_hopper, "ENABLED", False)
    triton_out = bmm._launch_jagged_dense_bmm(x.values.detach(), y.detach(), x.offsets)
    monkeypatch.setattr(bmm_hopper, "ENABLED", True)
    bmm_calls.clear()
    # Both accumulate in float32; the reduction's order may differ by a rounding of the output.
    assert_close(out.values, triton_out, tol=dtype, name="against the Triton kernel")
    grad = random_values(out.values.shape, dtype)
    got = torch.autograd.grad(out.values, (x.values, y), grad)
    expected = torch.autograd.grad(ref, (x.values, y), grad.double())
    for name, g, e in zip(("x", "y"), got, expected):
        assert_close(g, e, tol=dtype, name=f"grad {name}")
    if sum(lengths):  # the forward, and dx where its K (= N) and N (= K) qualify
        dx_served = n_dim % 16 == 0 and k_dim <= bmm_hopper.MAX_N and k_dim % 8 == 0
        assert served == [True] and bmm_calls == [dx_served], (served, bmm_calls)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("transposed_y", [False, True], ids=["y", "y^T"])
@pytest.mark.parametrize("dims", [(16, 8), (48, 24), (64, 64), (128, 128), (256, 256), (64, 200), (128, 96),
                                  (512, 32)], ids=str)
def test_hopper_bmm_shapes(dims, transposed_y, dtype, monkeypatch, bmm_calls):
    # rows of 1 to 3 tiles, an empty row, a row past a tile by one token
    check_hopper_bmm([70, 0, 1, 129, 64, 5], *dims, dtype, transposed_y, monkeypatch, bmm_calls)


@gpu_only
@pytest.mark.parametrize("lengths", list(LENGTH_PATTERNS.values()), ids=list(LENGTH_PATTERNS))
def test_hopper_bmm_patterns(lengths, monkeypatch, bmm_calls):
    check_hopper_bmm(lengths, 64, 64, torch.bfloat16, False, monkeypatch, bmm_calls)


@gpu_only
@settings(deadline=None, max_examples=30)
@given(lengths=lengths_strategy(max_batch=40, max_len=300), k_dim=st.sampled_from([16, 32, 80, 128]),
       n_dim=st.sampled_from([8, 40, 64, 128, 256]), transposed_y=st.booleans(),
       offsets_dtype=st.sampled_from([torch.int32, torch.int64]))
def test_hopper_bmm_property(lengths, k_dim, n_dim, transposed_y, offsets_dtype):
    with pytest.MonkeyPatch.context() as monkeypatch:
        check_hopper_bmm(lengths, k_dim, n_dim, torch.bfloat16, transposed_y, monkeypatch,
                         _count_bmm_calls(monkeypatch), offsets_dtype)


@gpu_only
@pytest.mark.parametrize("batch_size", [33, 1100], ids=str)  # the row search's 2 and 3 levels
def test_hopper_bmm_many_rows(batch_size, monkeypatch, bmm_calls):
    generator = torch.Generator().manual_seed(batch_size)
    lengths = torch.randint(0, 150, (batch_size,), generator=generator).tolist()
    check_hopper_bmm(lengths, 64, 128, torch.bfloat16, False, monkeypatch, bmm_calls)


@gpu_only
@pytest.mark.parametrize("transposed_y", [False, True], ids=["y", "y^T"])
def test_hopper_bmm_rows_isolated(transposed_y, bmm_calls):
    """TMA reads a row's last tile whole, tokens of the next row included: an inf in the next
    row's x and a NaN in its y must stay in that row's output."""
    lengths = [3, 70, 2]
    x, y = _operands(lengths, 64, 40, torch.bfloat16, transposed_y)
    x_values, y = x.values.detach().clone(), y.detach().clone()
    x_values[3] = float("inf")  # row 1's first token, inside row 0's TMA tile
    y[1, 5, 7] = float("nan")
    out = bmm._launch_jagged_dense_bmm(x_values, y, x.offsets)
    ref = reference.jagged_dense_bmm(x_values.double(), x.offsets, y.double())
    assert bmm_calls == [True]
    for rows in (slice(0, 3), slice(73, 75)):  # rows 0 and 2
        assert torch.isfinite(out[rows]).all()
        assert_close(out[rows], ref[rows], tol=torch.bfloat16)


@gpu_only
def test_hopper_bmm_graph_replay(bmm_calls):
    x, y = _operands([40, 0, 130, 7], 128, 128, torch.bfloat16, False)
    values = x.values.detach()
    check_graph_replay(lambda: bmm._launch_jagged_dense_bmm(values, y.detach(), x.offsets), values)
    assert bmm_calls == [True] * 4


@gpu_only
def test_hopper_bmm_strided_operands(bmm_calls):
    """x a column slice of a wider tensor; y's matrices with padded rows (row stride > N)."""
    lengths = [20, 90]
    offsets = make_offsets(lengths)
    wide = random_values((110, 96), torch.bfloat16)
    x_values = wide[:, 16:80]
    y = random_values((2, 64, 48), torch.bfloat16)[:, :, :40]
    out = bmm._launch_jagged_dense_bmm(x_values, y, offsets)
    assert bmm_calls == [True]
    assert_close(out, reference.jagged_dense_bmm(x_values.double(), offsets, y.double()), tol=torch.bfloat16)


@gpu_only
def test_unsupported_bmm_keeps_the_triton_kernel(bmm_calls):
    lengths = [20, 90]
    offsets = make_offsets(lengths)
    cases = [
        (random_values((110, 64), torch.float32), random_values((2, 64, 64), torch.float32)),  # float32
        (random_values((110, 24), torch.bfloat16), random_values((2, 24, 64), torch.bfloat16)),  # K % 16
        (random_values((110, 64), torch.bfloat16), random_values((2, 64, 264), torch.bfloat16)),  # N > 256
        (random_values((110, 64), torch.bfloat16), random_values((2, 64, 36), torch.bfloat16)),  # N % 8
        # y's matrices not one after another (batch stride != K * row stride)
        (random_values((110, 64), torch.bfloat16), random_values((2, 70, 64), torch.bfloat16)[:, :64]),
        (random_values((64, 110), torch.bfloat16).t(), random_values((2, 64, 64), torch.bfloat16)),  # x column-major
    ]
    for x_values, y in cases:
        assert not bmm_hopper.hopper_bmm_supported(x_values, y, offsets)
        out = bmm._launch_jagged_dense_bmm(x_values, y, offsets)
        assert_close(out, reference.jagged_dense_bmm(x_values.double(), offsets, y.double()),
                     tol="tf32" if x_values.dtype == torch.float32 else x_values.dtype)
    assert bmm_calls == [False] * len(cases)


@gpu_only
def test_small_bmm_keeps_the_triton_kernel(monkeypatch):
    """Below MIN_BYTES the Triton kernel serves (the Gluon launch's host time would cost more than
    its GPU time saves); at it, the Gluon kernel."""
    calls = count_calls(monkeypatch, bmm_hopper, "jagged_dense_bmm_hopper")
    rows = (bmm_hopper.MIN_BYTES - 2 * 128 * 128) // (2 * (128 + 128))  # x, out and one 128 x 128 y: the floor
    offsets = make_offsets([rows])
    x_values, y = random_values((rows, 128), torch.bfloat16), random_values((1, 128, 128), torch.bfloat16)
    small = bmm._launch_jagged_dense_bmm(x_values[:-1], y, make_offsets([rows - 1]))
    at_floor = bmm._launch_jagged_dense_bmm(x_values, y, offsets)
    assert calls == [False, True]
    assert_close(small, at_floor[:-1], tol=torch.bfloat16)


class _BrokenKernel:
    """A Gluon kernel whose launch fails as a Triton with another Gluon API would."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise AttributeError("module 'tma' has no attribute 'async_load'")
        return launch


@gpu_only
def test_failed_compile_falls_back_to_triton_with_one_warning(monkeypatch, bmm_calls):
    monkeypatch.setattr(bmm_hopper, "_jagged_dense_bmm_hopper_kernel", _BrokenKernel())
    monkeypatch.setattr(bmm_hopper, "_FAILED", set())
    offsets = make_offsets([20, 90])
    x_values, y = random_values((110, 64), torch.bfloat16), random_values((2, 64, 64), torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="jagged_dense_bmm kernel did not compile"):
        out = bmm._launch_jagged_dense_bmm(x_values, y, offsets)
    assert_close(out, reference.jagged_dense_bmm(x_values.double(), offsets, y.double()), tol=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: the configuration is not tried again
        bmm._launch_jagged_dense_bmm(x_values, y, offsets)
    assert bmm_calls == [False, False]
