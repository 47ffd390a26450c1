"""jagged_flash_attention: kernels against the padded float64 reference, forward and the
gradients of q, k and v; self and cross, causal, empty rows, head dims, the nn module."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import jagged
from jagged import JaggedTensor, reference
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


def tolerance(dtype):
    # float32 dots use full precision (torch.backends.cuda.matmul.allow_tf32 is off by default).
    return dtype


def check_attention(q_lengths, k_lengths, heads, head_dim, head_dim_v, dtype, causal,
                    scale=None, offsets_dtype=torch.int64, self_attention=False, max_len=None, key_gain=None):
    """key_gain: an optional [T_k, heads] factor on the keys (scores that grow along a row)."""
    q_offsets = make_offsets(q_lengths, offsets_dtype)
    k_offsets = q_offsets if self_attention else make_offsets(k_lengths, offsets_dtype)
    q = random_values((sum(q_lengths), heads, head_dim), dtype, requires_grad=True)
    k = random_values((sum(k_lengths), heads, head_dim), dtype)
    if key_gain is not None:
        k = (k.float() * key_gain.to(k.device)[:, :, None]).to(dtype)
    k.requires_grad_(True)
    v = random_values((sum(k_lengths), heads, head_dim_v), dtype, requires_grad=True)
    out = jagged.jagged_flash_attention_values(q, k, v, q_offsets, k_offsets, causal=causal, scale=scale,
                                               max_len=max_len)
    ref = reference.jagged_attention(q.double(), k.double(), v.double(), q_offsets, k_offsets,
                                     causal=causal, scale=scale, compute_dtype=torch.float64)
    assert out.dtype == dtype and out.shape == (sum(q_lengths), heads, head_dim_v)
    assert_close(out, ref, tol=tolerance(dtype))
    grad = random_values(out.shape, dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
    again = torch.autograd.grad(out, (q, k, v), grad)
    grads_ref = torch.autograd.grad(ref, (q, k, v), grad.double())
    for name, g, g2, gr in zip("qkv", grads, again, grads_ref):
        assert_close(g, gr, tol=tolerance(dtype), name=f"grad {name}")
        assert torch.equal(g, g2), f"grad {name}: second backward differs (not deterministic)"


@pytest.mark.parametrize("lengths", list(LENGTH_PATTERNS.values()), ids=list(LENGTH_PATTERNS))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_self_attention_patterns(lengths, causal, dtype):
    check_attention(lengths, lengths, 2, 16, 16, dtype, causal, self_attention=True)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(
    "q_lengths, k_lengths",
    [([3, 20, 0, 1], [17, 2, 5, 0]), ([33], [7]), ([0, 4], [9, 0]), ([1, 1, 1], [40, 1, 2]),
     ([32, 20], [33, 37])],
    # Lk - Lq = 1 and 17: the causal window starts one key past a block boundary.
    ids=["mixed", "Lq>Lk", "empty-sides", "one-query", "shift-by-one"],
)
def test_cross_attention(q_lengths, k_lengths, causal):
    check_attention(q_lengths, k_lengths, 2, 32, 16, torch.float32, causal, offsets_dtype=torch.int32)


@pytest.mark.parametrize("head_dim, head_dim_v", [(1, 1), (8, 24), (100, 40), (256, 16)])
def test_head_dims(head_dim, head_dim_v):
    check_attention([5, 19], [5, 19], 1, head_dim, head_dim_v, torch.float32, False, self_attention=True)


@given(
    q_lengths=lengths_strategy(max_batch=4, max_len=40),
    data=st.data(),
    heads=st.integers(1, 3),
    head_dims=st.sampled_from([(16, 16), (24, 40), (32, 32), (64, 16)]),
    dtype=st.sampled_from(FLOAT_DTYPES if not ON_GPU else [torch.float32, torch.float16]),
    causal=st.booleans(),
    scale=st.sampled_from([None, 0.05, 1.0]),
    offsets_dtype=st.sampled_from(OFFSET_DTYPES),
)
def test_attention_property(q_lengths, data, heads, head_dims, dtype, causal, scale, offsets_dtype):
    self_attention = data.draw(st.booleans(), label="self_attention")
    k_lengths = q_lengths if self_attention else data.draw(
        st.lists(st.integers(0, 40), min_size=len(q_lengths), max_size=len(q_lengths)), label="k_lengths")
    check_attention(q_lengths, k_lengths, heads, *head_dims, dtype, causal, scale, offsets_dtype, self_attention)


@pytest.mark.parametrize("scale", [-0.3, 0.0, 0.2], ids=["negative", "zero", "positive"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_scale_signs(scale, causal):
    """The forward folds a positive scale into the exponent after the row max; a negative or zero
    scale (where that would be wrong: the max of -s is not -max s, and -inf * 0 is NaN) takes the
    scale-first path. Rows span several key tiles, with masked ends."""
    check_attention([37, 5, 0, 18], [37, 5, 0, 18], 2, 16, 16, torch.float32, causal, scale=scale,
                    self_attention=True)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_growing_scores(dtype, causal):
    """Scores that grow along the row, so that every key tile raises the forward's running max:
    by ~20 in base 2 a 16-key tile at head 0 (past float16's range over the row: a forward that
    skipped rescaling its accumulator would overflow) and by ~1 at head 1 (a skipped rescale
    gives wrong weights); the third row's scores shrink instead."""
    lengths = [45, 3, 40, 0]
    position = torch.cat([torch.arange(n, dtype=torch.float32) for n in lengths])
    shrink = torch.cat([torch.full((n,), float(b == 2)) for b, n in enumerate(lengths)])
    position = torch.where(shrink.bool(), lengths[2] - position, position)
    gain = torch.stack([1 + position, 1 + position / 16], 1)
    check_attention(lengths, lengths, 2, 16, 16, dtype, causal, self_attention=True, key_gain=gain)


def test_query_with_no_key_gets_zero_and_no_nan():
    q_offsets, k_offsets = make_offsets([3, 4]), make_offsets([0, 5])
    q = random_values((7, 2, 16), torch.float32, requires_grad=True)
    k = random_values((5, 2, 16), torch.float32, requires_grad=True)
    v = random_values((5, 2, 16), torch.float32, requires_grad=True)
    for causal in (False, True):
        out = jagged.jagged_flash_attention_values(q, k, v, q_offsets, k_offsets, causal=causal)
        assert torch.equal(out[:3], torch.zeros_like(out[:3]))
        (gq,) = torch.autograd.grad(out.sum(), q)
        assert torch.equal(gq[:3], torch.zeros_like(gq[:3])) and not gq.isnan().any()
    # causal with L_q > L_k: the first L_q - L_k queries see nothing (end-aligned).
    out = jagged.jagged_flash_attention_values(q[3:], k[:2], v[:2], make_offsets([4]), make_offsets([2]), causal=True)
    assert torch.equal(out[:2], torch.zeros_like(out[:2])) and not bool((out[2:] == 0).all())


def test_log_sum_exp_output_is_not_differentiable():
    """The forward op's second output (the base-2 log-sum-exp, saved for the backward) is marked
    non-differentiable: asking a gradient through it raises instead of silently giving zero, and
    the output's own gradient still matches the reference's (the backward is not handed a
    materialised zero for the log-sum-exp)."""
    from jagged.ops import attention

    offsets = make_offsets([3, 0, 6])
    q, k, v = (random_values((9, 2, 16), torch.float32, requires_grad=True) for _ in range(3))
    out, lse = attention._attention_forward(q, k, v, offsets, offsets, False, 0.25, 6)
    assert out.requires_grad and not lse.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        torch.autograd.grad(lse.sum(), q)
    grad = random_values(out.shape, torch.float32)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want_out = reference.jagged_attention(q, k, v, offsets, offsets, causal=False, scale=0.25)
    want = torch.autograd.grad(want_out, (q, k, v), grad)
    for name, g, w in zip("qkv", got, want):
        assert_close(g, w, name=f"d{name}")


def test_strided_qkv_from_fused_projection():
    """q, k, v as strided views of one fused tensor: outputs and gradients (which are allocated
    contiguous) must be right."""
    lengths = [6, 0, 21]
    offsets = make_offsets(lengths)
    qkv = random_values((sum(lengths), 3, 2, 32), torch.float32, requires_grad=True)
    q, k, v = qkv.unbind(1)
    assert not q.is_contiguous()
    out = jagged.jagged_flash_attention_values(q, k, v, offsets, offsets, causal=True)
    ref = reference.jagged_attention(q.double(), k.double(), v.double(), offsets, offsets, causal=True,
                                     compute_dtype=torch.float64)
    assert_close(out, ref, tol=torch.float32)
    grad = random_values(out.shape, torch.float32)
    (g,) = torch.autograd.grad(out, qkv, grad)
    (g_ref,) = torch.autograd.grad(ref, qkv, grad.double())
    assert_close(g, g_ref, tol=torch.float32, name="grad qkv")


def test_jagged_tensor_api():
    x = JaggedTensor(random_values((12, 2, 16), torch.float32), make_offsets([5, 0, 7]))
    out = jagged.jagged_flash_attention(x, x, x, causal=True)
    assert isinstance(out, JaggedTensor) and out.offsets is x.offsets and out.values.shape == (12, 2, 16)
    ref = reference.jagged_attention(x.values, x.values, x.values, x.offsets, x.offsets, causal=True)
    assert_close(out.values, ref, tol=torch.float32)
    v_same_rows = JaggedTensor(x.values.clone(), x.offsets.clone())  # equal offsets, other tensor
    jagged.jagged_flash_attention(x, x, v_same_rows)
    with pytest.raises(ValueError, match="v must have k's rows"):
        jagged.jagged_flash_attention(x, x, JaggedTensor(x.values, make_offsets([6, 0, 6])))
    with pytest.raises(TypeError, match="q must be a jagged.JaggedTensor"):
        jagged.jagged_flash_attention(x.values, x, x)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(q=lambda t: t[:, 0]), ValueError, "q values must be 3-D"),
        (dict(k=lambda t: t.half()), ValueError, "k must have q's dtype"),
        (dict(q=lambda t: t.long(), k=lambda t: t.long(), v=lambda t: t.long()), ValueError, "float16, bfloat16 or float32"),
        (dict(k=lambda t: t[:, :1], v=lambda t: t[:, :1]), ValueError, "same heads and head dim"),
        (dict(v=lambda t: t[:-1]), ValueError, r"k and v must have the same \[T_k, H\]"),
        (dict(q=lambda t: t.new_ones(t.shape[0], 2, 300), k=lambda t: t.new_ones(t.shape[0], 2, 300)), ValueError, "head dim must be in"),
        # 2^31 tokens as a stride-0 view (no memory): the kernels' row search is int32.
        (dict(k=lambda t: t[:1].expand(2 ** 31, 2, 16), v=lambda t: t[:1].expand(2 ** 31, 2, 16)), ValueError,
         "k has 2147483648 tokens"),
        (dict(k_offsets=lambda o: o[:-1]), ValueError, "same batch size"),
        (dict(q_offsets=lambda o: o.float()), ValueError, "q_offsets must have dtype int32 or int64"),
        (dict(q_offsets=lambda o: o.to("meta")), ValueError, "q_offsets must be on the same device"),
        (dict(v=lambda t: t.tolist()), TypeError, "v must be a torch.Tensor"),
    ],
)
def test_bad_input(change, error, match):
    args = dict(q=random_values((9, 2, 16), torch.float32), k=random_values((9, 2, 16), torch.float32),
                v=random_values((9, 2, 16), torch.float32), q_offsets=make_offsets([4, 5]), k_offsets=make_offsets([4, 5]))
    for name, fn in change.items():
        args[name] = fn(args[name])
    with pytest.raises(error, match=match):
        jagged.jagged_flash_attention_values(args["q"], args["k"], args["v"], args["q_offsets"], args["k_offsets"])


@pytest.mark.parametrize("max_len", [None, 4, 600, 10_000])
def test_max_len_picks_tiles_not_results(max_len):
    """max_len only chooses the tiles (short-row ones up to 512 on the GPU), even when it is
    wrong: every choice must match the reference, forward and backward."""
    lengths = [3, 0, 700, 40] if ON_GPU else [3, 0, 21, 9]
    offsets = make_offsets(lengths)
    q, k, v = (random_values((sum(lengths), 2, 64), torch.float32, requires_grad=True) for _ in range(3))
    out = jagged.jagged_flash_attention_values(q, k, v, offsets, offsets, causal=True, max_len=max_len,
                                               validate=False)
    ref = reference.jagged_attention(*(x.double() for x in (q, k, v)), offsets, offsets, causal=True)
    assert_close(out, ref, tol=tolerance(torch.float32))
    grad = torch.randn_like(out)
    for got, expected in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        assert_close(got, expected, tol=tolerance(torch.float32), name="gradient")


@pytest.mark.parametrize("unmasked_tiles", [False, True], ids=["masked-only", "unmasked-first"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_unmasked_tile_loops(monkeypatch, unmasked_tiles, causal, cross):
    """The kernels may run the tiles every query sees whole without a mask (UNMASKED_TILES, a
    tile choice): both settings must match the reference, with rows of several whole tiles, a
    partial last tile, L_q > L_k and L_q < L_k (the causal diagonal off a tile boundary)."""
    from jagged.ops import attention

    default_tiles = attention._tiles
    monkeypatch.setattr(attention, "_tiles",
                        lambda *args, **kwargs: {**default_tiles(*args, **kwargs), "UNMASKED_TILES": unmasked_tiles})
    q_lengths = [200, 7, 0, 129, 64] if ON_GPU else [40, 7, 0, 33, 16]
    k_lengths = [150, 7, 3, 190, 64] if ON_GPU else [29, 7, 3, 50, 16]
    check_attention(q_lengths, k_lengths if cross else q_lengths, 2, 32, 32, torch.float32, causal,
                    self_attention=not cross)


def test_no_unmasked_loop_with_hstu_masks_or_bias():
    """Both kernels compile the unmasked loop only without the HSTU masks (full_key_tiles_end
    knows none) and without a bias (measured slower there)."""
    from jagged.ops import attention

    for kernel in ("forward", "backward"):
        assert attention._tiles(kernel, 64, 64, 1024)["UNMASKED_TILES"]
        assert not attention._tiles(kernel, 64, 64, 1024, hstu_mask=True)["UNMASKED_TILES"]
        assert not attention._tiles(kernel, 64, 64, 1024, bias=True)["UNMASKED_TILES"]


def test_bad_max_len():
    x = random_values((9, 2, 16), torch.float32)
    offsets = make_offsets([4, 5])
    with pytest.raises(ValueError, match="max_len must be >= 0"):
        jagged.jagged_flash_attention_values(x, x, x, offsets, offsets, max_len=-1)
    with pytest.raises(TypeError, match="max_len must be an int"):
        jagged.jagged_flash_attention_values(x, x, x, offsets, offsets, max_len=2.5)


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_multihead_attention_module(cross):
    torch.manual_seed(0)
    mha = jagged.nn.JaggedMultiheadAttention(32, 2, causal=True, kdim=24 if cross else None,
                                             vdim=24 if cross else None).to(DEVICE)
    x = JaggedTensor(random_values((23, 32), torch.float32, requires_grad=True), make_offsets([3, 0, 20]))
    y = JaggedTensor(random_values((17, 24), torch.float32), make_offsets([9, 4, 4])) if cross else None
    out = mha(x, y)
    src = y if cross else x
    q = mha.q_proj(x.values).view(23, 2, 16)
    k = mha.k_proj(src.values).view(-1, 2, 16)
    v = mha.v_proj(src.values).view(-1, 2, 16)
    ref = mha.out_proj(reference.jagged_attention(q, k, v, x.offsets, src.offsets, causal=True).reshape(23, 32))
    assert out.offsets is x.offsets
    assert_close(out.values, ref, tol=torch.float32)
    grad = random_values(ref.shape, torch.float32)
    params = [x.values, mha.q_proj.weight, mha.k_proj.weight, mha.v_proj.bias, mha.out_proj.weight]
    for g, gr, name in zip(torch.autograd.grad(out.values, params, grad), torch.autograd.grad(ref, params, grad),
                           ["x", "q_proj.weight", "k_proj.weight", "v_proj.bias", "out_proj.weight"]):
        assert_close(g, gr, tol=torch.float32, name=f"grad {name}")
    with pytest.raises(ValueError, match=r"query values must be \[T, 32\]"):
        mha(JaggedTensor(random_values((4, 8), torch.float32), make_offsets([4])))
    with pytest.raises(ValueError, match="positive multiple"):
        jagged.nn.JaggedMultiheadAttention(30, 4)


@pytest.mark.skipif(not ON_GPU, reason="sizes and bfloat16 for the GPU")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128, 256])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gpu_sizes(dtype, head_dim, causal):
    lengths = torch.randint(0, 300, (37,)).tolist() + [1000, 0, 1]
    check_attention(lengths, lengths, 3, head_dim, head_dim, dtype, causal, self_attention=True)
    k_lengths = torch.randint(0, 400, (len(lengths),)).tolist()
    check_attention(lengths, k_lengths, 2, head_dim, head_dim, dtype, causal)


@pytest.mark.skipif(not ON_GPU, reason="the GPU's tiles; the interpreter has one set")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
@pytest.mark.parametrize("max_len", [128, 256, 512, 2048])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gpu_tile_buckets(dtype, head_dim, max_len, causal):
    """Each length bucket's tiles (ops/attention.py: _block_sizes, picked by the max_len hint)
    against the reference, forward and backward, with rows that fill the bucket: the longest
    exactly max_len, others spread below it, a one-token and an empty row."""
    lengths = torch.randint(1, max_len + 1, (6 if max_len > 512 else 14,)).tolist() + [max_len, 0, 1]
    check_attention(lengths, lengths, 2, head_dim, head_dim, dtype, causal, self_attention=True, max_len=max_len)
    k_lengths = torch.randint(0, max_len + 1, (len(lengths),)).tolist()
    check_attention(lengths, k_lengths, 2, head_dim, head_dim, dtype, causal, max_len=max(lengths + k_lengths))


@pytest.mark.parametrize("row_finder", ["scan", "two-pass scan", "search"])
@pytest.mark.parametrize("int32_offsets", [False, True], ids=["int64", "int32"])
def test_offset_widths(monkeypatch, int32_offsets, row_finder):
    """The kernels narrow row positions to int32 when every element offset fits
    (INT32_OFFSETS); both widths must match the reference (the large GPU test in
    tests/test_gpu_scale.py reaches int64 with real tensors past 2^31 elements). Each with
    every way of finding a program's row: the scan over all offsets (small batches), the
    two-pass scan (over 511 rows; here forced, with a stride of 2) and the binary search."""
    from jagged.ops import attention

    monkeypatch.setattr(attention, "_int32_offsets", lambda *args: int32_offsets)
    if row_finder == "search":
        monkeypatch.setattr(attention, "scan_shape", lambda *args: (0, 1))
    elif row_finder == "two-pass scan":  # 6 offsets: every second one (4), then windows of 4
        monkeypatch.setattr(attention, "scan_shape", lambda *args: (4, 2))
    q_lengths = [40, 7, 0, 33, 1]
    check_attention(q_lengths, q_lengths, 2, 32, 16, torch.float32, True, self_attention=True)
    check_attention(q_lengths, [29, 0, 3, 50, 16], 2, 16, 32, torch.float16, False)


def test_int32_offsets_decision():
    """INT32_OFFSETS only when the farthest element, plus the spare rows a block's masked lanes
    address, stays below 2^31, for [T, H, D] tensors (strided views included) and [H, T] ones."""
    from jagged.ops.attention import _SPARE_ROWS, _int32_offsets

    def meta(*shape, stride=None):
        x = torch.empty(shape, device="meta")
        return x if stride is None else x.as_strided(shape, stride)

    last_ok = 2 ** 31 - _SPARE_ROWS  # tokens of a [T, 1, 1] tensor: (T - 1) + spare = 2^31 - 1
    assert _int32_offsets((meta(last_ok, 1, 1),))
    assert not _int32_offsets((meta(last_ok + 1, 1, 1),))
    assert _int32_offsets((meta(1000, 8, 128),), (meta(8, 1000),))
    assert not _int32_offsets((meta(2 ** 21, 8, 128),))  # 2^31 elements
    # A view of a packed [T, 3, H, D] tensor: its token stride is 3 H D.
    assert not _int32_offsets((meta(2 ** 20, 8, 128, stride=(3 * 8 * 128, 128, 1)),))
    assert _int32_offsets((meta(2 ** 19, 8, 128, stride=(3 * 8 * 128, 128, 1)),))
    # [H, T]: the last head's row starts at (H - 1) T.
    assert not _int32_offsets((), (meta(8, 2 ** 28),))
    assert _int32_offsets((), (meta(7, 2 ** 28),))
    assert _int32_offsets((meta(0, 4, 64),), (meta(4, 0),))
    # Contiguous tensors given by shape alone (the backward's gradients) decide as the tensors do.
    for shape in ((last_ok, 1, 1), (last_ok + 1, 1, 1), (2 ** 21, 8, 128), (2 ** 21 - 300, 8, 128), (1000, 8, 128)):
        assert _int32_offsets((), (), (shape,)) == _int32_offsets((meta(*shape),)), shape
    assert not _int32_offsets((meta(1000, 8, 128),), (meta(8, 1000),), ((1000, 8, 128), (2 ** 21, 8, 128)))
