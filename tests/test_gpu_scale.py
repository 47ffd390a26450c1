"""GPU-only scale tests: one row of 65,536 among short rows, tensors past 2^31 elements (64-bit
indexing), and attention memory that grows with T, not with B * max_len.

The ``large`` tests allocate 20-40 GB each: run them one process at a time
(``python -m pytest -m large -p no:xdist``); ``-m "not large"`` runs the rest in parallel.
"""

import math

import pytest
import torch

import jagged
from jagged import JaggedTensor, reference
from jagged.ops import attention
from helpers import ON_GPU, assert_close, make_offsets, random_values
from op_table import OPS

pytestmark = pytest.mark.skipif(not ON_GPU, reason="sizes for the GPU")
BF16 = torch.bfloat16


def attention_of_queries(q, k, v, begin, length, queries, causal, scale):
    """float64 attention of chosen queries of one self-attention row, straight from the definition."""
    rows = slice(begin, begin + length)
    qs, ks, vs = q[rows][queries].double(), k[rows].double(), v[rows].double()  # [n, H, D], [L, H, D]
    scores = torch.einsum("nhd,lhd->hnl", qs, ks) * scale
    if causal:
        scores = scores.masked_fill(torch.arange(length, device=q.device)[None, None, :] > queries[None, :, None],
                                    float("-inf"))
    return torch.einsum("hnl,lhd->nhd", torch.softmax(scores, -1), vs)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_row_of_65536_among_short_rows(causal):
    lengths = [5, 0, 65536, 1, 30, 7]
    offsets = make_offsets(lengths)
    q, k, v = (random_values((sum(lengths), 2, 64), BF16, requires_grad=True) for _ in range(3))
    out = jagged.jagged_flash_attention_values(q, k, v, offsets, offsets, causal=causal)
    scale = 1 / 8
    for b, length in enumerate(lengths):
        if length == 0:
            continue
        queries = torch.randperm(length, device=q.device)[:64]
        begin = int(offsets[b])
        expected = attention_of_queries(q, k, v, begin, length, queries, causal, scale)
        assert_close(out[begin:begin + length][queries], expected, tol=BF16, name=f"row {b}")
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert all(g.isfinite().all() for g in grads)


@pytest.mark.parametrize("op", [op for op in OPS if op.name not in ("jagged_flash_attention", "jagged2 chain")],
                         ids=lambda op: op.name)
def test_ops_row_of_65536_among_short_rows(op):
    lengths = [5, 0, 65536, 1, 30, 7]
    offsets = make_offsets(lengths)
    inputs = [random_values(shape, torch.float32, requires_grad=True) for shape in op.inputs(lengths, 32)]
    out = op.ours(offsets, *inputs)
    ref_inputs = [x.detach().double().requires_grad_(True) for x in inputs]
    ref = op.ref(offsets, *ref_inputs)
    tol = "tf32" if op.matmul else torch.float32
    assert_close(out, ref, tol=tol)
    grad = random_values(out.shape, torch.float32)
    for g, e in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref, ref_inputs, grad.double())):
        assert_close(g, e, tol=tol, name="grad")


def peak_attention_mib(lengths, heads=8, head_dim=128):
    offsets = make_offsets(lengths)
    q, k, v = (random_values((sum(lengths), heads, head_dim), BF16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = jagged.jagged_flash_attention_values(q, k, v, offsets, offsets, validate=False)
    torch.autograd.grad(out, (q, k, v), do)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def test_attention_memory_grows_with_tokens_not_padded_size():
    short = peak_attention_mib([64] * 1024)  # T = 65536, B * max_len = 65536
    skewed = peak_attention_mib([32768] + [32] * 1023)  # T = 65504, B * max_len = 33.5M
    double = peak_attention_mib([64] * 2048)  # T = 131072
    assert skewed < 1.1 * short, (short, skewed)
    assert 1.8 < double / short < 2.2, (short, double)


def free():
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


@pytest.mark.large
def test_conversions_pooling_softmax_past_2_31_elements():
    lengths = [512 - b % 7 for b in range(4096)]  # T ~ 2.09M tokens
    offsets = make_offsets(lengths)
    feature_dim = 1040  # T * D ~ 2.17e9 > 2^31
    values = random_values((sum(lengths), feature_dim), BF16)
    assert values.numel() > 2**31
    dense = jagged.jagged_to_padded_dense(values, offsets, 512, validate=False)
    assert torch.equal(jagged.dense_to_jagged(dense, offsets, values.shape[0], validate=False), values)
    last = len(lengths) - 1
    begin, length = int(offsets[last]), lengths[last]
    assert torch.equal(dense[last, :length], values[begin:begin + length])
    assert not dense[last, length:].any()
    del dense
    free()
    x = JaggedTensor(values, offsets, validate=False)
    assert_close(jagged.jagged_sum(x)[last], values[begin:begin + length].double().sum(0), tol=BF16)
    softmax = jagged.jagged_softmax(x).values[begin:begin + length]
    assert_close(softmax, torch.softmax(values[begin:begin + length].double(), 0), tol=BF16)
    del softmax
    free()
    dense_rows = random_values((len(lengths), 512, feature_dim), BF16)
    product = jagged.jagged_dense_elementwise_mul(x, dense_rows).values[begin:begin + length]
    assert torch.equal(product, values[begin:begin + length] * dense_rows[last, :length])
    y = random_values((len(lengths), feature_dim, 16), BF16)
    out = jagged.jagged_dense_bmm(x, y).values[begin:begin + length]
    assert_close(out, values[begin:begin + length].double() @ y[last].double(), tol=BF16)
    del values, dense_rows, x, product, y, out
    free()


@pytest.mark.large
def test_attention_past_2_31_elements():
    lengths = [256] * 8200  # T = 2,099,200; T * H * D ~ 2.15e9 > 2^31
    offsets = make_offsets(lengths)
    heads, head_dim = 8, 128
    q, k, v = (random_values((sum(lengths), heads, head_dim), BF16, requires_grad=True) for _ in range(3))
    assert q.numel() > 2**31
    assert not attention._int32_offsets((q,))  # the kernels' 64-bit offsets
    out = jagged.jagged_flash_attention_values(q, k, v, offsets, offsets, causal=True, validate=False)
    do = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    for b in (0, len(lengths) - 1):  # the last row lies past element 2^31
        rows = slice(int(offsets[b]), int(offsets[b + 1]))
        row_q, row_k, row_v = (x[rows].detach().double().requires_grad_(True) for x in (q, k, v))
        row_offsets = make_offsets([256])
        ref = reference.jagged_attention(row_q, row_k, row_v, row_offsets, row_offsets, causal=True,
                                         scale=1 / math.sqrt(head_dim), compute_dtype=torch.float64)
        assert_close(out[rows], ref, tol=BF16, name=f"row {b}")
        for name, g, e in zip("qkv", (dq, dk, dv), torch.autograd.grad(ref, (row_q, row_k, row_v), do[rows].double())):
            assert_close(g[rows], e, tol=BF16, name=f"grad {name} row {b}")
    del q, k, v, out, do, dq, dk, dv
    free()
