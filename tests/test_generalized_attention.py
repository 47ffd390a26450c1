"""jagged_attention (issue 8): pointwise activations, relative-position bias (with its gradient),
HSTU target / contextual / window masks, dropout, deterministic bias gradient; against the padded
float64 reference, forward and the gradients of q, k, v and the bias."""

import math
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import jagged
from jagged import JaggedTensor, reference
from helpers import DEVICE, ON_GPU, assert_close, count_calls, lengths_strategy, make_offsets, random_values

ACTIVATIONS = ["softmax", "silu", "gelu"]
LENGTHS = [5, 0, 23, 40, 1]  # empty and one-token rows; under the interpreter (16 x 16 tiles) several blocks


def make_inputs(q_lengths, k_lengths, heads, head_dim, dtype, self_attention, max_distance=None):
    q_offsets = make_offsets(q_lengths)
    k_offsets = q_offsets if self_attention else make_offsets(k_lengths)
    q = random_values((sum(q_lengths), heads, head_dim), dtype, requires_grad=True)
    k = random_values((sum(k_lengths), heads, head_dim), dtype, requires_grad=True)
    v = random_values((sum(k_lengths), heads, head_dim), dtype, requires_grad=True)
    bias = None
    if max_distance is not None:
        bias = random_values((heads, 2 * max_distance + 1), torch.float32, requires_grad=True)
    return q, k, v, q_offsets, k_offsets, bias


def run_both(q, k, v, q_offsets, k_offsets, bias, options, dtype, dropout_keep=None, max_len=None):
    """Output and gradients (q, k, v, bias) of the kernel and of the float64 reference. max_len:
    the JaggedTensors' longest-row hint (it picks the GPU's tiles)."""
    jq, jk, jv = (JaggedTensor(x, o, max_len=max_len) for x, o in ((q, q_offsets), (k, k_offsets), (v, k_offsets)))
    out = jagged.jagged_attention(jq, jk, jv, bias=bias, **options).values
    ref_options = {name: value for name, value in options.items() if name not in ("seed", "deterministic")}
    ref = reference.jagged_attention(q.double(), k.double(), v.double(), q_offsets, k_offsets,
                                     compute_dtype=torch.float64, bias=None if bias is None else bias.double(),
                                     dropout_keep=dropout_keep, **ref_options)
    inputs = [x for x in (q, k, v, bias) if x is not None]
    grad = random_values(out.shape, dtype)
    grads = torch.autograd.grad(out, inputs, grad) if out.numel() else [torch.zeros_like(x) for x in inputs]
    grads_ref = torch.autograd.grad(ref, inputs, grad.double(), allow_unused=True) if ref.numel() else grads
    return out, ref, grads, grads_ref


def check(q_lengths, k_lengths, options, *, heads=2, head_dim=16, dtype=torch.float32, self_attention=True,
          max_distance=None, dropout_keep=None, max_len=None):
    q, k, v, q_offsets, k_offsets, bias = make_inputs(q_lengths, k_lengths, heads, head_dim, dtype, self_attention,
                                                      max_distance)
    if options.get("num_targets") == "random":
        options = dict(options, num_targets=torch.tensor([min(n, 1 + n // 3) for n in k_lengths], dtype=torch.int64, device=DEVICE))
    out, ref, grads, grads_ref = run_both(q, k, v, q_offsets, k_offsets, bias, options, dtype, dropout_keep, max_len)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, tol=dtype)
    for name, g, gr in zip("qkvb", grads, grads_ref):
        gr = torch.zeros_like(g, dtype=torch.float64) if gr is None else gr
        # The bias gradient sums dL/ds over many pairs whose terms cancel within each query row
        # (softmax: sum_j dS_ij = 0), so its rounding error grows like sqrt(rows summed) times a
        # term's (float16, one bias entry over 116 rows: ~0.02 against an exact 0): compare on
        # that scale.
        scale = None
        if name == "b":
            scale = (float(gr.abs().max()) if gr.numel() else 0.0) + math.sqrt(max(1, q.shape[0]))
        assert_close(g, gr, tol=dtype, name=f"grad {name}", scale=scale)
    return out, grads


MASKS = {
    "plain": {},
    "targets": dict(num_targets="random"),
    "contextual": dict(contextual_len=3),
    "window": dict(window=7),
    "window=1": dict(window=1),  # the tightest window: a block's first query sees the previous block's last key
    "all": dict(num_targets="random", contextual_len=2, window=5),
}


@pytest.mark.parametrize("mask", list(MASKS), ids=list(MASKS))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activations_and_masks(activation, causal, mask):
    check(LENGTHS, LENGTHS, dict(activation=activation, causal=causal, **MASKS[mask]))


@pytest.mark.parametrize("max_distance", [0, 3, 50])
@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_relative_bias_and_its_gradient(activation, deterministic, max_distance):
    check(LENGTHS, LENGTHS, dict(activation=activation, causal=activation != "softmax", deterministic=deterministic),
          max_distance=max_distance)


def test_everything_at_once_cross_attention():
    """Cross attention (queries end-aligned to the keys) with bias, masks and norm."""
    check([3, 20, 0, 33], [17, 2, 5, 40], dict(activation="silu", causal=True, norm=7.5, contextual_len=1, window=9),
          self_attention=False, max_distance=6)
    check([3, 20, 0, 33], [17, 2, 5, 40], dict(activation="softmax", causal=False, window=4), self_attention=False,
          max_distance=2)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_dropout_matches_reference_with_its_mask(activation):
    q, k, v, q_offsets, k_offsets, bias = make_inputs(LENGTHS, LENGTHS, 2, 16, torch.float32, True, 4)
    jq, jk = JaggedTensor(q, q_offsets), JaggedTensor(k, k_offsets)
    keep = jagged.attention_dropout_mask(jq, jk, dropout_p=0.3, seed=1234)
    options = dict(activation=activation, causal=True, dropout_p=0.3, seed=1234, num_targets=None)
    out, ref, grads, grads_ref = run_both(q, k, v, q_offsets, k_offsets, bias, options, torch.float32, keep)
    assert_close(out, ref)
    for name, g, gr in zip("qkvb", grads, grads_ref):
        assert_close(g, gr, name=f"grad {name}", scale=float(gr.abs().max()) + 1.0 if name == "b" else None)
    # Same seed: the same result; another seed: another mask.
    again = jagged.jagged_attention(jq, jk, JaggedTensor(v, k_offsets), bias=bias, **options).values
    assert torch.equal(out, again)
    other = jagged.attention_dropout_mask(jq, jk, dropout_p=0.3, seed=1235)
    assert not torch.equal(keep, other)


def test_dropout_keeps_the_right_fraction():
    lengths = [64, 48]
    x = JaggedTensor(random_values((sum(lengths), 2, 16), torch.float32), make_offsets(lengths))
    for p in (0.1, 0.5):
        keep = jagged.attention_dropout_mask(x, x, dropout_p=p, seed=7)
        inside = reference.attention_mask(x.offsets, x.offsets, 64, 64)[:, None].expand_as(keep)
        assert not bool(keep[~inside].any())
        kept = float(keep[inside].float().mean())
        assert abs(kept - (1 - p)) < 0.02, (p, kept)  # ~13k draws: 4 sigma is < 0.02


@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_is_bitwise_reproducible(deterministic):
    """Always (no atomics anywhere); ``deterministic=True`` is accepted and changes nothing."""
    lengths = [300, 7, 129] if ON_GPU else LENGTHS
    q, k, v, q_offsets, k_offsets, bias = make_inputs(lengths, lengths, 2, 64 if ON_GPU else 16, torch.float32, True, 5)
    jq, jk, jv = (JaggedTensor(x, o) for x, o in ((q, q_offsets), (k, k_offsets), (v, k_offsets)))
    grads = []
    for _ in range(2):
        out = jagged.jagged_attention(jq, jk, jv, activation="silu", causal=True, bias=bias,
                                      deterministic=deterministic)
        grads.append(torch.autograd.grad(out.values.sum(), (q, k, v, bias)))
    for first, second in zip(*grads):
        assert torch.equal(first, second)


def test_flash_attention_is_the_softmax_fast_path():
    q, k, v, q_offsets, k_offsets, _ = make_inputs(LENGTHS, LENGTHS, 2, 16, torch.float32, True)
    jq, jk, jv = (JaggedTensor(x, o) for x, o in ((q, q_offsets), (k, k_offsets), (v, k_offsets)))
    for causal in (False, True):
        a = jagged.jagged_flash_attention(jq, jk, jv, causal=causal).values
        b = jagged.jagged_attention(jq, jk, jv, causal=causal).values
        assert torch.equal(a, b)


def hstu_valid_attn_mask(lengths, causal, num_targets, max_attn_len, contextual_len):
    """HSTU's _get_valid_attn_mask (generative-recommenders), written out from its definition for
    [B, N, N] padded self-attention, to check that our mask means what HSTU's does."""
    n = max(lengths)
    ids = torch.arange(n).view(1, n)
    max_ids = torch.tensor(lengths).view(-1, 1)
    if contextual_len > 0:
        ids = (ids - contextual_len + 1).clamp(min=0)
        max_ids = max_ids - contextual_len + 1
    if num_targets is not None:
        max_ids = max_ids - num_targets.view(-1, 1)
        ids = torch.minimum(ids, max_ids)
    else:
        ids = ids.expand(len(lengths), n)
    dist = ids[:, :, None] - ids[:, None, :]
    if not causal:
        dist = dist.abs()
    valid = torch.eye(n, dtype=torch.bool)[None] | (dist > 0)
    if max_attn_len:
        valid = valid & (dist <= max_attn_len)
    if contextual_len > 0:
        valid = valid | ((ids[:, :, None] == 0) & (ids[:, None, :] < max_ids[:, :, None]))
    inside = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    return valid & inside[:, :, None] & inside[:, None, :]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("targets, contextual_len, window", [(None, 0, 3), ([2, 0, 1], 0, 0), ([1, 3, 0], 2, 0),
                                                              ([2, 1, 4], 3, 2), (None, 1, 0)])
def test_mask_is_hstus(causal, targets, contextual_len, window):
    lengths = [9, 6, 12]
    offsets = make_offsets(lengths, device="cpu")
    num_targets = None if targets is None else torch.tensor(targets)
    ours = reference.attention_mask(offsets, offsets, 12, 12, causal=causal, num_targets=num_targets,
                                    contextual_len=contextual_len, window=window or None)
    assert torch.equal(ours, hstu_valid_attn_mask(lengths, causal, num_targets, window, contextual_len))


@settings(max_examples=20, deadline=None)
@given(lengths=lengths_strategy(max_batch=4, max_len=36), activation=st.sampled_from(ACTIVATIONS),
       causal=st.booleans(), targets=st.booleans(), contextual_len=st.sampled_from([0, 1, 4]),
       window=st.sampled_from([None, 1, 6]), max_distance=st.sampled_from([None, 0, 2, 40]),
       deterministic=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16]))
def test_generalized_attention_property(lengths, activation, causal, targets, contextual_len, window, max_distance,
                                        deterministic, dtype):
    options = dict(activation=activation, causal=causal, contextual_len=contextual_len, window=window,
                   deterministic=deterministic, num_targets="random" if targets else None)
    check(lengths, lengths, options, dtype=dtype, max_distance=max_distance)


def bad_call(**overrides):
    x = JaggedTensor(random_values((7, 2, 16), torch.float32), make_offsets([3, 4]))
    options = dict(overrides)
    jagged.jagged_attention(x, x, x, **options)


@pytest.mark.parametrize("overrides, error, words", [
    (dict(activation="relu"), ValueError, "activation"),
    (dict(norm=2.0), ValueError, "norm"),
    (dict(activation="silu", norm=0.0), ValueError, "norm"),
    (dict(bias=torch.zeros(2, 4, device=DEVICE)), ValueError, "bias"),
    (dict(bias=torch.zeros(3, 5, device=DEVICE)), ValueError, "bias"),
    (dict(bias=torch.zeros(2, 5, dtype=torch.int32, device=DEVICE)), ValueError, "bias"),
    (dict(num_targets=torch.zeros(3, dtype=torch.int64, device=DEVICE)), ValueError, "num_targets"),
    (dict(num_targets=torch.zeros(2, device=DEVICE)), ValueError, "num_targets"),
    (dict(contextual_len=-1), ValueError, "contextual_len"),
    (dict(contextual_len=1.5), TypeError, "contextual_len"),
    (dict(window=0), ValueError, "window"),
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
    (dict(dropout_p=0.1, seed=-3), ValueError, "seed"),
    (dict(deterministic=1), TypeError, "deterministic"),
    (dict(scale=float("nan")), ValueError, "scale"),
])
def test_bad_arguments_raise(overrides, error, words):
    with pytest.raises(error, match=words):
        bad_call(**overrides)


@pytest.mark.skipif(not ON_GPU, reason="sizes and bfloat16 for the GPU")
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_recsys_shapes(activation, dtype):
    """Rows of a few hundred tokens with every feature on, in half precision, so the real tiles
    (64 x 32/64, the short-row bucket) and the bias diagonals span many blocks."""
    lengths = [300, 0, 17, 511, 128, 64]
    check(lengths, lengths, dict(activation=activation, causal=True, num_targets="random", contextual_len=2,
                                 window=100, deterministic=True), heads=4, head_dim=64, dtype=dtype, max_distance=64)


@pytest.mark.skipif(not ON_GPU, reason="the GPU's tiles; the interpreter has one set")
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("head_dim, max_len", [(32, 128), (32, 512), (64, 256), (64, 1024)])
def test_gpu_tile_buckets(activation, head_dim, max_len):
    """Every feature on, with the max_len hint set, so that each length bucket's tiles (the
    smallest forward tiles at D <= 32 and rows up to 128 among them) run the bias, mask and
    dropout-free paths on rows that fill the bucket."""
    lengths = torch.randint(1, max_len + 1, (8,)).tolist() + [max_len, 0, 1]
    check(lengths, lengths, dict(activation=activation, causal=True, num_targets="random", contextual_len=2,
                                 window=max_len // 3, deterministic=True), heads=2, head_dim=head_dim,
          dtype=torch.bfloat16, max_distance=32, max_len=max_len)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("activation", ["softmax", "silu"])
def test_triton_backward_program_order(monkeypatch, activation, causal):
    """The Triton backward alternates its dK/dV and dQ programs in self-attention on rows up to 512
    (attention._interleaves, its size floor lifted here), as the Gluon one does; each program computes what it
    did with every dK/dV program first, so the gradients (and the bias gradient's fixed-order sums)
    are bitwise equal. Every feature on; plain softmax kept off the Gluon kernel on the GPU."""
    from jagged.ops import attention, attention_hopper_backward

    monkeypatch.setattr(attention_hopper_backward, "hopper_backward_supported", lambda *args: False)
    monkeypatch.setattr(attention, "TRITON_INTERLEAVE_MIN_BYTES", 0)  # these heads are small
    orders = count_calls(monkeypatch, attention_hopper_backward, "interleaves")
    if ON_GPU:
        lengths = [0, 64, 1, 500, 129] + torch.randint(0, 300, (20,)).tolist()
        head_dim, dtype = 64, torch.bfloat16
    else:  # the interpreter's 16 x 16 tiles: rows of one, several and a partial block
        lengths = [5, 0, 40, 16, 1, 33]
        head_dim, dtype = 16, torch.float32
    features = {} if activation == "softmax" else dict(num_targets="random", contextual_len=1, window=20,
                                                      dropout_p=0.2, seed=5, deterministic=True)
    q, k, v, offsets, _, bias = make_inputs(lengths, lengths, 2, head_dim, dtype, True,
                                            None if activation == "softmax" else 8)
    if features:
        features["num_targets"] = torch.tensor([min(n, 1 + n // 3) for n in lengths], device=DEVICE)
    jq, jk, jv = (JaggedTensor(x, offsets, max_len=max(lengths)) for x in (q, k, v))
    out = jagged.jagged_attention(jq, jk, jv, activation=activation, causal=causal, bias=bias, **features).values
    grad = random_values(out.shape, dtype)
    inputs = [x for x in (q, k, v, bias) if x is not None]
    interleaved = torch.autograd.grad(out, inputs, grad, retain_graph=True)
    monkeypatch.setattr(attention_hopper_backward, "INTERLEAVE", False)
    split = torch.autograd.grad(out, inputs, grad)
    assert orders == [True, False]
    for name, got, want in zip("qkvb", interleaved, split):
        assert torch.equal(got, want), name


def test_triton_backward_interleave_rule():
    """The Triton backward interleaves where the Gluon rule holds and a head's Q, K, V, O and dO
    reach the size floor (bytes from the shapes: 2 * D_qk + 3 * D_v elements a token)."""
    from jagged.ops import attention

    tiles = dict(KV_BLOCK_N=64, Q_BLOCK_M=64)
    offsets, other = make_offsets([3, 4]), make_offsets([4, 3])
    floor = attention.TRITON_INTERLEAVE_MIN_BYTES
    tokens = floor // (5 * 32 * 2)  # bf16, D=32: just under the floor, then one more token
    q = torch.empty((tokens, 1, 32), dtype=torch.bfloat16, device="meta")
    q_more = torch.empty((tokens + 1, 1, 32), dtype=torch.bfloat16, device="meta")
    assert not attention._interleaves(q, q, offsets, offsets, tiles, 512)
    assert attention._interleaves(q_more, q_more, offsets, offsets, tiles, 512)
    assert not attention._interleaves(q_more, q_more, offsets, other, tiles, 512)  # cross-attention
    assert not attention._interleaves(q_more, q_more, offsets, offsets, tiles, 513)
    assert not attention._interleaves(q_more, q_more, offsets, offsets, tiles, None)
    assert not attention._interleaves(q_more, q_more, offsets, offsets, dict(tiles, Q_BLOCK_M=32), 512)
    q_float = torch.empty((tokens, 1, 32), dtype=torch.float32, device="meta")  # twice the bytes
    assert attention._interleaves(q_float, q_float, offsets, offsets, tiles, 512)


@pytest.mark.parametrize("far_tiles", [False, True], ids=["per-score", "far-tiles"])
@pytest.mark.parametrize("variant", ["softmax", "hstu", "cross"])
def test_far_bias_tiles(monkeypatch, far_tiles, variant):
    """With a bias, the tiles at least R from every query (key) of a block may run with one bias
    value (FAR_TILES, a launch choice): forward, dQ, dK/dV and the bias gradient must match the
    reference either way, with rows many tiles past R, rows shorter than R, empty rows, HSTU masks
    and cross-attention (queries end-aligned to longer or shorter key rows)."""
    from jagged.ops import attention

    monkeypatch.setattr(attention, "_far_tiles", lambda *args: far_tiles)
    if ON_GPU:
        q_lengths, k_lengths, head_dim, dtype, max_distance = [300, 0, 1, 129, 64, 500], [250, 5, 1, 400, 64, 20], 64, \
            torch.bfloat16, 32
    else:
        q_lengths, k_lengths, head_dim, dtype, max_distance = [40, 0, 1, 33, 16], [29, 5, 1, 50, 16], 16, \
            torch.float32, 6
    options = dict(causal=True)
    if variant == "hstu":
        options = dict(activation="silu", causal=True, num_targets="random", contextual_len=2)
    cross = variant == "cross"
    check(q_lengths, k_lengths if cross else q_lengths, options, head_dim=head_dim, dtype=dtype,
          self_attention=not cross, max_distance=max_distance,
          max_len=max(q_lengths + (k_lengths if cross else [])))
