"""Triton helpers for the attention kernels' score tiles, shared by the forward and both backward
passes (which see the same tile transposed: every helper takes broadcastable 2-D position
tensors, so ``[M, 1]`` x ``[1, N]`` and ``[1, M]`` x ``[N, 1]`` both work).

- which (query, key) pairs attend: in-row, causal, and the HSTU masks (targets, contextual
  prefix, local window); the rules are written out in :func:`jagged.jagged_attention`'s doc and
  mirrored by :func:`jagged.reference.attention_mask`;
- the relative-position bias and the dropout keep-mask (one Philox draw per (query token, key
  token, head), so forward and backward agree whatever their tiles);
- the pointwise activations (SiLU, GELU) and their derivatives;
- the loop bounds that skip tiles no query (or key) of a block can see;
- the diagonal sums of a gradient tile, which is what the relative-position bias's gradient is.

Activation codes (the kernels' ACTIVATION constexpr): 0 softmax, 1 SiLU, 2 GELU (exact, erf).
"""

import triton
import triton.language as tl


@triton.jit
def hstu_ids(pos, k_len, n_targets, contextual_len):
    """HSTU position ids: the contextual prefix collapses to one id, and so do the targets (to the
    first target's), so that distances between ids decide visibility. Also returns the targets' id."""
    max_id = k_len - contextual_len + 1 - n_targets
    return tl.minimum(tl.maximum(pos - contextual_len + 1, 0), max_id), max_id


@triton.jit
def visible(qi, kj, q_len, k_len, n_targets, contextual_len, window, CAUSAL: tl.constexpr, HSTU_MASK: tl.constexpr,
            KEY_BOUND: tl.constexpr):
    """Mask of the (query, key) pairs that attend, for queries inside the row. ``qi``: query
    indices in the row, ``kj``: key indices, broadcastable 2-D, int32 (as are the lengths:
    per-element int64 arithmetic costs twice the instructions). Queries are aligned to the end of
    the key row (position ``qi + L_k - L_q``), as for causal attention.

    Queries past the row's end are not masked: the kernels load them as zeros (with lse = +inf
    and delta = 0 in the backward) and never store their results, so they change nothing, and
    the compare and select per score are saved. Keys past the row's end are masked only with
    KEY_BOUND, for the kernels that sum over keys (forward, dQ); dK/dV programs own their keys
    and never store the ones past the end."""
    ok = tl.full([1, 1], 1, tl.int1)
    if KEY_BOUND:
        ok = kj < k_len
    pos = qi + (k_len - q_len)
    if HSTU_MASK:
        row_id, _ = hstu_ids(pos, k_len, n_targets, contextual_len)
        col_id, _ = hstu_ids(kj, k_len, n_targets, contextual_len)
        dist = row_id - col_id
        if CAUSAL:
            seen = (dist > 0) & (dist <= window)
        else:
            seen = (dist != 0) & (dist <= window) & (dist >= -window)
        contextual_row = (pos >= 0) & (pos < contextual_len)
        seen = seen | (pos == kj) | (contextual_row & (kj < k_len - n_targets))
        ok = ok & seen
    elif CAUSAL:
        ok = ok & (kj <= pos)
    return ok


@triton.jit
def key_range(first, last, q_len, k_len, n_targets, contextual_len, window,
              CAUSAL: tl.constexpr, HSTU_MASK: tl.constexpr, BLOCK_N: tl.constexpr):
    """[start, end) of the keys that queries ``first..last`` (row indices) may see; ``start`` is
    a multiple of BLOCK_N. Tiles outside are wholly masked and skipped."""
    shift = k_len - q_len
    start = first * 0
    end = k_len
    if CAUSAL:  # keys past the last query's position are hidden from the block...
        end = tl.minimum(k_len, last + 1 + shift)
    if HSTU_MASK:
        if first + shift < contextual_len:  # ...unless it holds a contextual query, which sees all
            end = k_len
        # Window: ids below first's id - window are hidden from the whole block (ids grow with
        # position, and a key's id is at most its position - contextual_len + 1).
        first_id, _ = hstu_ids(first + shift, k_len, n_targets, contextual_len)
        low = first_id - window
        start = tl.where(low > 0, low + contextual_len - 1, 0) // BLOCK_N * BLOCK_N
    return start, end


@triton.jit
def query_range(first, last, q_len, k_len, n_targets, contextual_len, window,
                CAUSAL: tl.constexpr, HSTU_MASK: tl.constexpr, HAS_TARGETS: tl.constexpr, BLOCK_M: tl.constexpr):
    """[start, end) of the queries (row indices) that may see keys ``first..last``; ``start`` is
    a multiple of BLOCK_M."""
    shift = k_len - q_len
    start = first * 0
    end = q_len
    if CAUSAL:  # queries before the first key see none of the block...
        start = tl.maximum(first - shift, 0)
        if HSTU_MASK:
            if contextual_len > 0:  # ...except contextual queries
                start = start * 0
    if HSTU_MASK:
        if not HAS_TARGETS:  # a query more than window ids past the last key sees none of it
            end = tl.minimum(q_len, tl.maximum(last, contextual_len - 1) + window + 1 - shift)
    return start // BLOCK_M * BLOCK_M, end


@triton.jit
def full_key_tiles_end(start, end, first, q_len, k_len, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """End of the key tiles from ``start`` (a multiple of BLOCK_N, up to ``end``) that every query
    from row index ``first`` on sees whole: inside the row and, causal, at or before the first
    query's position. Those tiles need no mask (the per-score compares and selects are a
    noticeable part of a tile's work at head dim 64). Plain and causal masks only: with the HSTU
    masks the launchers compile no unmasked loop (ops/attention.py: _tiles)."""
    limit = k_len
    if CAUSAL:  # (the max keeps the division away from negatives, which Triton truncates)
        limit = tl.minimum(limit, tl.maximum(first + (k_len - q_len) + 1, 0))
    return tl.minimum(tl.maximum(limit // BLOCK_N * BLOCK_N, start), end)


@triton.jit
def full_query_tiles_start(start, end, last_key, q_len, k_len, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """Start of the query tiles (from ``start``, a multiple of BLOCK_M, up to ``end``) whose every
    query in the row sees every key up to ``last_key``: causal, those at or past the key's
    position. Queries past the row's end may share the last tile: the backward loads them as
    zeros with lse = +inf, so they add nothing unmasked. Plain and causal masks only, as above."""
    first = start
    if CAUSAL:
        first = tl.maximum(last_key - (k_len - q_len), 0)
        first = (first + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    return tl.minimum(tl.maximum(first, start), end)


@triton.jit
def relative_bias(bias_ptr, head, stride_bh, rel, max_distance):
    """bias[head, clamp(rel, -R, R) + R] (float32) for key-minus-query distances ``rel`` (int32).
    One cached load per element. Tiles that clamp wholly to -R run in a loop of their own with one
    value instead (far_tiles_end; a branch inside the one loop measured slower, benchmarks/NOTES.md
    sessions 4 and 30)."""
    rel = tl.minimum(tl.maximum(rel, -max_distance), max_distance)
    return tl.load(bias_ptr + head * stride_bh + rel + max_distance).to(tl.float32)


@triton.jit
def far_tiles_end(start, end, first_pos, max_distance, BLOCK: tl.constexpr):
    """End of the key tiles from ``start`` (a multiple of BLOCK, up to ``end``) whose every key is at
    least R = ``max_distance`` before ``first_pos``, the position of the block's first query: every
    distance of those tiles clamps to -R, so one bias value serves them all (far_bias_value). Those
    keys are in the row and before every query's position: visible to the whole block, unless
    HSTU's masks hide some."""
    limit = tl.maximum(first_pos - max_distance + 1, 0)  # the max keeps negatives from the division
    return tl.minimum(tl.maximum(limit // BLOCK * BLOCK, start), end)


@triton.jit
def far_query_tiles_start(start, end, last_key_index, max_distance, BLOCK: tl.constexpr):
    """Start of the query tiles (from ``start``, a multiple of BLOCK, up to ``end``) whose every
    query is at least R = ``max_distance`` past the block's last key, ``last_key_index`` being that
    key's position in query row indices (key index - (L_k - L_q)): every distance clamps to -R
    (far_tiles_end, seen from the keys). Queries past the row's end may share the last tile: the
    backward loads them as zeros with lse = +inf, so they add nothing."""
    first = tl.maximum(last_key_index + max_distance, 0)  # the max keeps negatives from the division
    first = (first + BLOCK - 1) // BLOCK * BLOCK
    return tl.minimum(tl.maximum(first, start), end)


@triton.jit
def far_bias_value(bias_ptr, head, stride_bh, ACTIVATION: tl.constexpr):
    """bias[head, 0], the bias of every distance at or below -R, in the scores' units (base 2 for
    softmax)."""
    value = tl.load(bias_ptr + head * stride_bh).to(tl.float32)
    if ACTIVATION == 0:
        value = value * 1.4426950408889634
    return value


@triton.jit
def dropout_keep(seed, q_tokens, k_tokens, head, dropout_p):
    """Keep-mask: one Philox draw per (query token, key token, head), broadcast 2-D tokens."""
    zero = (q_tokens * 0 + k_tokens * 0).to(tl.uint32)
    bits, _, _, _ = tl.philox(seed, (q_tokens + k_tokens * 0).to(tl.uint32), (k_tokens + q_tokens * 0).to(tl.uint32),
                              zero + head.to(tl.uint32), zero)
    return tl.uint_to_uniform_float(bits) >= dropout_p


@triton.jit
def pointwise_activation(s, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        return s * tl.sigmoid(s)
    return 0.5 * s * (1.0 + tl.math.erf(s * 0.7071067811865476))


@triton.jit
def pointwise_activation_grad(s, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        sig = tl.sigmoid(s)
        return sig * (1.0 + s * (1.0 - sig))
    return 0.5 * (1.0 + tl.math.erf(s * 0.7071067811865476)) + s * 0.3989422804014327 * tl.exp(-0.5 * s * s)


@triton.jit
def diagonal_sums(tile, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """``out[w] = sum_a tile[a, a + w - (BLOCK_M - 1)]`` for a ``[BLOCK_M, BLOCK_N]`` tile: the
    sums along its diagonals, from key-minus-query offset -(BLOCK_M - 1) (w = 0) up to BLOCK_N - 1
    (w = BLOCK_M + BLOCK_N - 2); BLOCK_W >= BLOCK_M + BLOCK_N - 1, the rest is 0."""
    row = tl.arange(0, BLOCK_M)[:, None]
    col = row + tl.arange(0, BLOCK_W)[None, :] - (BLOCK_M - 1)
    inside = (col >= 0) & (col < BLOCK_N)
    shifted = tl.gather(tile, tl.where(inside, col, 0), 1)
    return tl.sum(tl.where(inside, shifted, 0.0), 0)


@triton.jit
def accumulate_bias_grad(ds, first_rel, grad_row, max_distance, clamped_low, clamped_high,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """Add a dS tile ([queries, keys]; its top-left-most diagonal has key-minus-query distance
    ``first_rel``) to ``grad_row``, this program's own row of 2R + 1 float32 partial sums of the
    bias gradient (the launcher sums the rows in a fixed order: deterministic, and on the H100
    1.2-3x faster than float32 atomics into one row per head, which all programs contend for).

    Distances inside (-R, R) are distinct buckets: read-modify-write them. The clamped ones are
    carried in two sums that :func:`finish_bias_grad` stores once.
    """
    sums = diagonal_sums(ds, BLOCK_M, BLOCK_N, BLOCK_W)
    w = tl.arange(0, BLOCK_W)
    rel = first_rel + w
    real = w < BLOCK_M + BLOCK_N - 1
    inside = real & (rel > -max_distance) & (rel < max_distance)
    buckets = grad_row + rel + max_distance
    tl.store(buckets, tl.load(buckets, mask=inside, other=0.0) + sums, mask=inside)
    # The next tile's diagonals overlap these buckets, and other threads may own them.
    tl.debug_barrier()
    clamped_low += tl.sum(tl.where(real & (rel <= -max_distance), sums, 0.0), 0)
    clamped_high += tl.sum(tl.where(real & (rel >= max_distance) & (rel > -max_distance), sums, 0.0), 0)
    return clamped_low, clamped_high


@triton.jit
def finish_bias_grad(grad_row, max_distance, clamped_low, clamped_high):
    """Store the clamped buckets' sums of accumulate_bias_grad."""
    first = tl.arange(0, 1)
    if max_distance == 0:  # one bucket: both ends are it
        tl.store(grad_row + first, clamped_low + clamped_high)
    else:
        tl.store(grad_row + first, clamped_low)
        tl.store(grad_row + 2 * max_distance + first, clamped_high)
