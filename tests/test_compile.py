"""The PyTorch-ecosystem contract: every kernel is a ``jagged::`` custom op that passes
``torch.library.opcheck`` (schema, fake tensor, autograd registration, AOT dispatch with dynamic
shapes); a model built from the public API compiles with ``fullgraph=True`` and matches eager,
without recompiling for every new batch; JaggedTensor passes through torch.compile,
``torch.utils.checkpoint`` and pytree utilities.

On the CPU the kernels run in Triton's interpreter and the compiled graphs use the
``aot_eager`` backend (no C++ toolchain needed); on the GPU, inductor.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

import jagged
from helpers import DEVICE, ON_GPU, assert_close
from jagged.ops.conversions import GATHER_ADD, GATHER_MUL

BACKEND = "inductor" if ON_GPU else "aot_eager"
LENGTHS = [3, 0, 6, 1, 5] if not ON_GPU else [37, 0, 130, 1, 64, 200]


def _offsets(lengths):
    return jagged.lengths_to_offsets(torch.tensor(lengths, device=DEVICE))


def _randn(*shape, grad=False):
    return torch.randn(*shape, device=DEVICE, requires_grad=grad)


def _op_cases():
    """(op name, args) covering every jagged:: op; differentiable inputs require grad so that
    opcheck exercises the autograd registration."""
    lengths = LENGTHS
    offsets = _offsets(lengths)
    total, batch, longest = sum(lengths), len(lengths), max(lengths)
    square_offsets = jagged.jagged2.square_offsets_of(offsets)
    total_square = sum(n * n for n in lengths)
    heads, dim = 2, 16
    q, k, v = (_randn(total, heads, dim, grad=True) for _ in range(3))
    out, lse = torch.ops.jagged.flash_attention_forward(q, k, v, offsets, offsets, True, 0.25, longest)
    bias = _randn(heads, 7, grad=True)
    num_targets = torch.tensor([n // 3 for n in lengths], device=DEVICE)
    y = torch.softmax(_randn(total, 8), 0)
    p = _randn(total_square)
    return [
        ("flash_attention_forward", (q, k, v, offsets, offsets, False, 0.25, None)),
        ("flash_attention_forward", (q, k, v, offsets, offsets, True, 0.25, longest)),
        ("flash_attention_backward", (_randn(total, heads, dim), q.detach(), k.detach(), v.detach(), out.detach(),
                                      lse.detach(), offsets, offsets, True, 0.25, longest)),
        # jagged_attention's features: SiLU, bias (a differentiable input), targets, contextual, window, dropout.
        ("flash_attention_forward", (q, k, v, offsets, offsets, True, 0.25, longest, 1, None, bias,
                                     num_targets, 1, 5, 0.2, 99)),
        ("flash_attention_backward", (_randn(total, heads, dim), q.detach(), k.detach(), v.detach(), out.detach(),
                                      lse[:, :0].detach(), offsets, offsets, False, 0.25, longest, 2, 3.0,
                                      bias.detach(), num_targets, 0, None, 0.0, 0, True)),
        ("jagged_dense_bmm", (_randn(total, 16, grad=True), _randn(batch, 16, 24, grad=True), offsets)),
        ("jagged_jagged_bmm", (_randn(total, 16, grad=True), _randn(total, 24, grad=True), offsets)),
        ("jagged_to_padded_dense", (_randn(total, 8, grad=True), offsets, longest, -1.0)),
        ("dense_to_jagged", (_randn(batch, longest, 8, grad=True), offsets, total)),
        ("jagged_dense_elementwise", (_randn(total, 8, grad=True), _randn(batch, 4, 8, grad=True), offsets,
                                      GATHER_ADD)),
        ("jagged_dense_elementwise", (_randn(total, 8, grad=True), _randn(batch, 4, 8, grad=True), offsets,
                                      GATHER_MUL)),
        ("jagged_pool", (_randn(total, 8, grad=True), offsets, False)),
        ("jagged_pool", (_randn(total, 8, grad=True), offsets, True)),
        ("jagged_pool_backward", (_randn(batch, 8, grad=True), offsets, total, False)),
        ("jagged_pool_backward", (_randn(batch, 8, grad=True), offsets, total, True)),
        ("jagged_softmax_forward", (_randn(total, 8, grad=True), offsets)),
        ("jagged_softmax_backward", (y, _randn(total, 8), offsets)),
        ("jagged_jagged_bmm_jagged_out", (_randn(total, 16, grad=True), _randn(total, 16, grad=True), offsets,
                                          square_offsets, total_square)),
        ("jagged2_jagged_bmm", (_randn(total_square, grad=True), _randn(total, 8, grad=True), offsets,
                                square_offsets, False)),
        ("jagged2_jagged_bmm", (_randn(total_square, grad=True), _randn(total, 8, grad=True), offsets,
                                square_offsets, True)),
        ("jagged2_to_padded_dense", (_randn(total_square, grad=True), offsets, square_offsets, longest, 0.5)),
        ("dense_to_jagged2", (_randn(batch, longest + 1, longest - 1, grad=True), offsets, square_offsets,
                              total_square)),
        ("jagged2_softmax_forward", (_randn(total_square, grad=True), offsets, square_offsets, total, True)),
        ("jagged2_softmax_backward", (torch.rand(total_square, device=DEVICE), p, offsets, square_offsets, total,
                                      False)),
    ]


OP_NAMES = sorted({name for name, _ in _op_cases()})


def test_every_registered_op_has_an_opcheck_case():
    registered = {name for name in dir(torch.ops.jagged) if not name.startswith("_") and name not in ("name",)}
    registered = {name for name in registered if isinstance(getattr(torch.ops.jagged, name),
                                                           torch._ops.OpOverloadPacket)}
    assert registered == set(OP_NAMES)


@pytest.mark.parametrize("case", range(len(_op_cases())), ids=lambda i: f"{_op_cases()[i][0]}-{i}")
def test_opcheck(case):
    torch.manual_seed(case)
    name, args = _op_cases()[case]
    torch.library.opcheck(getattr(torch.ops.jagged, name).default, args)


def test_eager_fast_path_matches_the_dispatched_op():
    """Plain eager calls skip the dispatcher (ops/_library.py); results and gradients must be the
    op's, bit for bit."""
    torch.manual_seed(2)
    offsets = _offsets(LENGTHS)
    q, k, v = (_randn(sum(LENGTHS), 2, 16, grad=True) for _ in range(3))
    grad = _randn(sum(LENGTHS), 2, 16)
    results = []
    for forward in (jagged.ops.attention._attention_forward, torch.ops.jagged.flash_attention_forward):
        out = forward(q, k, v, offsets, offsets, True, 0.25, None)[0]
        results.append([out, *torch.autograd.grad(out, (q, k, v), grad)])
    for eager, dispatched in zip(*results):
        assert torch.equal(eager, dispatched)


class _TinyRecommender(torch.nn.Module):
    """Attention block, per-row softmax-weighted pooling, a jagged x dense matmul and a
    conversion: the public ops a recommendation model strings together."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.attention = jagged.nn.JaggedMultiheadAttention(dim, heads, causal=True, device=DEVICE)
        self.gate = torch.nn.Linear(dim, dim, device=DEVICE)

    def forward(self, x: jagged.JaggedTensor, per_row: torch.Tensor):
        h = self.attention(x)
        h = h.with_values(h.values + x.values)
        weights = jagged.jagged_softmax(h.with_values(self.gate(h.values)))
        h = jagged.jagged_dense_elementwise_mul(weights, h.to_padded_dense())
        pooled = jagged.jagged_sum(h) + jagged.jagged_mean(jagged.jagged_dense_bmm(h, per_row))
        return pooled, h


def _batch(lengths, dim=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = jagged.JaggedTensor.from_list([torch.randn(n, dim, generator=generator) for n in lengths]).to(DEVICE)
    per_row = torch.randn(len(lengths), dim, dim, generator=generator).to(DEVICE) / dim ** 0.5
    return x, per_row


def _loss_and_grads(model, fn, x, per_row):
    values = x.values.detach().requires_grad_(True)
    pooled, h = fn(x.with_values(values), per_row)
    weights = torch.linspace(-1, 1, pooled.numel(), device=DEVICE).view_as(pooled)
    loss = (pooled * weights).sum() + h.values.square().mean()
    grads = torch.autograd.grad(loss, [values, *model.parameters()])
    return loss.detach(), grads


def test_model_compiles_fullgraph_and_matches_eager():
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = _TinyRecommender()
    compiled = torch.compile(model, fullgraph=True, backend=BACKEND)
    from torch._dynamo.utils import counters

    counters.clear()
    # The last three hit PyTorch's usual specialisation of sizes 0 and 1 (max_len 1, B 1, T 0):
    # they may add graphs, so the count is taken before them.
    batches = [[3, 0, 6, 1], [5, 2, 2, 7, 1], [4, 6, 0, 0, 2, 3], [2, 9], [1, 1], [8], [0, 0, 0]]
    if ON_GPU:
        batches = [[n * 17 for n in lengths] for lengths in batches[:4]] + batches[4:]
    for seed, lengths in enumerate(batches):
        if seed == 4:
            # New lengths, batch sizes and max_len must not recompile each time: one graph,
            # plus one more when dynamo turns the sizes dynamic after the first change.
            assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
        x, per_row = _batch(lengths, seed=seed)
        loss, grads = _loss_and_grads(model, model, x, per_row)
        compiled_loss, compiled_grads = _loss_and_grads(model, compiled, x, per_row)
        assert_close(compiled_loss, loss, tol="tf32" if ON_GPU else torch.float32, name="loss")
        for got, expected in zip(compiled_grads, grads):
            assert_close(got, expected, tol="tf32" if ON_GPU else torch.float32, name="gradient",
                         scale=float(expected.abs().amax()) + 1e-6 if expected.numel() else 1.0)


def test_jagged_tensor_in_and_out_of_compiled_function():
    torch._dynamo.reset()

    def double_rows(x: jagged.JaggedTensor) -> jagged.JaggedTensor:
        return x.with_values(jagged.jagged_softmax(x).values * 2)

    x, _ = _batch([4, 0, 2])
    out = torch.compile(double_rows, fullgraph=True, backend=BACKEND)(x)
    assert isinstance(out, jagged.JaggedTensor)
    assert out.offsets is x.offsets or torch.equal(out.offsets, x.offsets)
    assert_close(out.values, double_rows(x).values, tol=torch.float32)


def test_checkpoint_recomputes_to_the_same_gradients():
    torch.manual_seed(1)
    model = _TinyRecommender()
    x, per_row = _batch([5, 0, 3, 7], seed=3)

    def checkpointed(x, per_row):
        return torch.utils.checkpoint.checkpoint(model, x, per_row, use_reentrant=False)

    loss, grads = _loss_and_grads(model, model, x, per_row)
    loss_ckpt, grads_ckpt = _loss_and_grads(model, checkpointed, x, per_row)
    assert torch.equal(loss, loss_ckpt)
    for got, expected in zip(grads_ckpt, grads):
        assert torch.equal(got, expected)  # same kernels, deterministic: bit-identical


def test_pytree_round_trip():
    x, _ = _batch([2, 0, 5])
    leaves, spec = tree_flatten({"history": x, "n": 3})
    assert sum(isinstance(leaf, torch.Tensor) for leaf in leaves) == 2
    back = tree_unflatten(leaves, spec)["history"]
    assert isinstance(back, jagged.JaggedTensor) and back.max_len == x.max_len
    assert back.values is x.values and back.offsets is x.offsets

    # tree_map may put anything at the leaves (torch.utils.checkpoint maps them to devices).
    assert tree_map(lambda leaf: None, x).values is None

    s = jagged.Jagged2Tensor.from_list([torch.randn(n, n, device=DEVICE) for n in (2, 0, 3)])
    leaves, spec = tree_flatten(s)
    back = tree_unflatten(leaves, spec)
    assert isinstance(back, jagged.Jagged2Tensor) and back.total_len == s.total_len
    assert torch.equal(back.values, s.values) and torch.equal(back.square_offsets, s.square_offsets)
