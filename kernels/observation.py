"""Observation-window scores over the paged cache: accumulated attention α and entropy potential H.

Naive twins: `retentivekv_vllm.core.scores.attention_probs` (with `masked_logits`' causality),
`accumulated_attention` and `entropy_potential`.

Two launches. The first streams each request's keys once per (KV head, split of the keys) and
keeps, per query row, the log-sum-exp over all visible keys and over the visible keys of the
subset. The second recomputes each tile of logits and turns them into

    α_j = Σ_q exp(l_qj − lse_q)          H_j = −Σ_q p_q(j) log p_q(j),  log p_q(j) = l_qj −
    lse_subset_q

(rows run over the observation queries of every query head of the KV head), so neither the
probabilities nor the restricted-and-renormalised rows are ever stored.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from .paged import (
    as_index,
    dot_precision,
    finish_logsumexp,
    load_paged_tile,
    logaddexp,
    online_logsumexp,
    pow2,
)

BLOCK_N = 64
MAX_SPLITS = 16


@triton.jit
def _query_rows(
    q_ptr,
    q_start,
    num_rows,
    kv_head,
    stride_qt,
    stride_qh,
    stride_qd,
    GROUP: tl.constexpr,
    M_PAD: tl.constexpr,
    ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
):
    """The observation rows of a KV head's query heads, stacked: row i is observation query
    i % M_PAD of query head kv_head·GROUP + i // M_PAD. Returns q [ROWS, D_PAD] float32, the
    row mask and each row's observation index."""
    rows = tl.arange(0, ROWS)
    member = rows // M_PAD
    t = rows % M_PAD
    valid = (member < GROUP) & (t < num_rows)
    dims = tl.arange(0, D_PAD)
    ptrs = (
        q_ptr
        + (q_start + t).to(tl.int64)[:, None] * stride_qt
        + (kv_head * GROUP + member)[:, None] * stride_qh
        + dims[None, :] * stride_qd
    )
    q = tl.load(ptrs, mask=valid[:, None] & (dims[None, :] < HEAD_DIM), other=0.0).to(tl.float32)
    return q, valid, t


@triton.jit
def _logits_tile(
    q,
    q_positions,
    row_valid,
    k_cache_ptr,
    block_table_row_ptr,
    key_meta_offset,
    key_pos_ptr,
    subset_ptr,
    tile,
    live_start,
    num_keys,
    kv_head,
    scale,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_KEY_POSITIONS: tl.constexpr,
    HAS_SUBSET: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Logits [ROWS, BLOCK_N] of key tile `tile` (-inf where hidden, as `masked_logits`), which keys
    of the tile exist, and which (row, key) pairs are visible keys of the subset."""
    j = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    key_valid = j < num_keys
    k = load_paged_tile(
        k_cache_ptr,
        block_table_row_ptr,
        live_start + j,
        key_valid,
        kv_head,
        stride_kb,
        stride_ks,
        stride_kh,
        stride_kd,
        BLOCK_SIZE,
        HEAD_DIM,
        D_PAD,
    ).to(tl.float32)
    if HAS_KEY_POSITIONS:
        k_positions = tl.load(key_pos_ptr + key_meta_offset + j, mask=key_valid, other=0)
    else:
        k_positions = live_start + j
    visible = (
        row_valid[:, None] & key_valid[None, :] & (k_positions[None, :] <= q_positions[:, None])
    )
    logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
    logits = tl.where(visible, logits, float("-inf"))
    if HAS_SUBSET:
        in_subset = tl.load(subset_ptr + key_meta_offset + j, mask=key_valid, other=0) != 0
        visible_subset = visible & in_subset[None, :]
    else:
        visible_subset = visible
    return logits, key_valid, visible_subset, j


@triton.jit
def _observation_lse_kernel(
    q_ptr,
    q_start_ptr,
    q_pos_ptr,
    k_cache_ptr,
    block_table_ptr,
    live_start_ptr,
    seq_len_ptr,
    key_pos_ptr,
    subset_ptr,
    lse_all_ptr,
    lse_subset_ptr,
    scale,
    tiles_per_split,
    max_keys,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_bt,
    NUM_KV_HEADS: tl.constexpr,
    SPLITS: tl.constexpr,
    GROUP: tl.constexpr,
    M_PAD: tl.constexpr,
    ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_KEY_POSITIONS: tl.constexpr,
    HAS_SUBSET: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(q_start_ptr + req)
    num_rows = tl.load(q_start_ptr + req + 1) - q_start
    live_start = tl.load(live_start_ptr + req)
    num_keys = tl.load(seq_len_ptr + req) - live_start
    q, row_valid, t = _query_rows(
        q_ptr,
        q_start,
        num_rows,
        kv_head,
        stride_qt,
        stride_qh,
        stride_qd,
        GROUP,
        M_PAD,
        ROWS,
        HEAD_DIM,
        D_PAD,
    )
    q_positions = tl.load(q_pos_ptr + q_start + t, mask=row_valid, other=0)
    block_table_row_ptr = block_table_ptr + req.to(tl.int64) * stride_bt
    key_meta_offset = (req * NUM_KV_HEADS + kv_head).to(tl.int64) * max_keys

    max_all = tl.full([ROWS], float("-inf"), tl.float32)
    sum_all = tl.zeros([ROWS], tl.float32)
    max_subset = tl.full([ROWS], float("-inf"), tl.float32)
    sum_subset = tl.zeros([ROWS], tl.float32)
    first_tile = split * tiles_per_split
    last_tile = tl.minimum(first_tile + tiles_per_split, tl.cdiv(num_keys, BLOCK_N))
    for tile in range(first_tile, last_tile):
        logits, _, visible_subset, _ = _logits_tile(
            q,
            q_positions,
            row_valid,
            k_cache_ptr,
            block_table_row_ptr,
            key_meta_offset,
            key_pos_ptr,
            subset_ptr,
            tile,
            live_start,
            num_keys,
            kv_head,
            scale,
            stride_kb,
            stride_ks,
            stride_kh,
            stride_kd,
            BLOCK_SIZE,
            HEAD_DIM,
            D_PAD,
            BLOCK_N,
            HAS_KEY_POSITIONS,
            HAS_SUBSET,
            DOT_PRECISION,
        )
        max_all, sum_all, _ = online_logsumexp(max_all, sum_all, logits)
        max_subset, sum_subset, _ = online_logsumexp(
            max_subset, sum_subset, tl.where(visible_subset, logits, float("-inf"))
        )
    rows = tl.arange(0, ROWS)
    out = ((req * NUM_KV_HEADS + kv_head) * SPLITS + split).to(tl.int64) * ROWS + rows
    tl.store(lse_all_ptr + out, finish_logsumexp(max_all, sum_all))
    tl.store(lse_subset_ptr + out, finish_logsumexp(max_subset, sum_subset))


@triton.jit
def _observation_scores_kernel(
    q_ptr,
    q_start_ptr,
    q_pos_ptr,
    k_cache_ptr,
    block_table_ptr,
    live_start_ptr,
    seq_len_ptr,
    key_pos_ptr,
    subset_ptr,
    lse_all_ptr,
    lse_subset_ptr,
    log_subset_size_ptr,
    alpha_ptr,
    entropy_ptr,
    scale,
    max_keys,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_bt,
    NUM_KV_HEADS: tl.constexpr,
    SPLITS: tl.constexpr,
    GROUP: tl.constexpr,
    M_PAD: tl.constexpr,
    ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_KEY_POSITIONS: tl.constexpr,
    HAS_SUBSET: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    tile = tl.program_id(2)
    live_start = tl.load(live_start_ptr + req)
    num_keys = tl.load(seq_len_ptr + req) - live_start
    if tile * BLOCK_N >= num_keys:
        return
    q_start = tl.load(q_start_ptr + req)
    num_rows = tl.load(q_start_ptr + req + 1) - q_start
    q, row_valid, t = _query_rows(
        q_ptr,
        q_start,
        num_rows,
        kv_head,
        stride_qt,
        stride_qh,
        stride_qd,
        GROUP,
        M_PAD,
        ROWS,
        HEAD_DIM,
        D_PAD,
    )
    q_positions = tl.load(q_pos_ptr + q_start + t, mask=row_valid, other=0)
    head = req * NUM_KV_HEADS + kv_head
    rows = tl.arange(0, ROWS)
    lse_all = tl.full([ROWS], float("-inf"), tl.float32)
    lse_subset = tl.full([ROWS], float("-inf"), tl.float32)
    for split in range(SPLITS):
        at = (head * SPLITS + split).to(tl.int64) * ROWS + rows
        lse_all = logaddexp(lse_all, tl.load(lse_all_ptr + at))
        lse_subset = logaddexp(lse_subset, tl.load(lse_subset_ptr + at))

    key_meta_offset = head.to(tl.int64) * max_keys
    logits, key_valid, visible_subset, j = _logits_tile(
        q,
        q_positions,
        row_valid,
        k_cache_ptr,
        block_table_ptr + req.to(tl.int64) * stride_bt,
        key_meta_offset,
        key_pos_ptr,
        subset_ptr,
        tile,
        live_start,
        num_keys,
        kv_head,
        scale,
        stride_kb,
        stride_ks,
        stride_kh,
        stride_kd,
        BLOCK_SIZE,
        HEAD_DIM,
        D_PAD,
        BLOCK_N,
        HAS_KEY_POSITIONS,
        HAS_SUBSET,
        DOT_PRECISION,
    )
    # A row with no visible key has lse -inf and only -inf logits: shift by 0, exp gives 0.
    shift_all = tl.where(lse_all == float("-inf"), 0.0, lse_all)
    alpha = tl.sum(tl.exp(logits - shift_all[:, None]), 0)
    log_p = logits - lse_subset[:, None]
    has_mass = visible_subset & (lse_subset[:, None] > float("-inf"))
    entropy = -tl.sum(tl.where(has_mass, tl.exp(log_p) * log_p, 0.0), 0)
    entropy = entropy / tl.load(log_subset_size_ptr + head)
    tl.store(alpha_ptr + key_meta_offset + j, alpha, mask=key_valid)
    tl.store(entropy_ptr + key_meta_offset + j, entropy, mask=key_valid)


def observation_scores(
    queries: Tensor,
    query_start_loc: Tensor,
    query_positions: Tensor,
    key_cache: Tensor,
    block_table: Tensor,
    live_start: Tensor,
    seq_lens: Tensor,
    scale: float,
    key_positions: Tensor | None = None,
    subset: Tensor | None = None,
    max_splits: int = MAX_SPLITS,
) -> tuple[Tensor, Tensor]:
    """Accumulated attention α and entropy potential H of every request's live keys.

    queries [T, Hq, d]: the observation rows of all requests, request r's at rows
    query_start_loc[r] : query_start_loc[r + 1] ([R + 1]), at positions query_positions [T].
    key_cache [num_blocks, block_size, Hkv, d] (any strides; `paged.split_kv_cache`), block_table
    [R, max_blocks]; request r's live keys are its slots live_start[r] : seq_lens[r].
    key_positions [R, Hkv, max_n] (optional, default: slot index): position of the key j slots
    after live_start, per head (a compacted cache keeps different tokens per head).
    subset [R, Hkv, max_n] bool (optional, default all keys): the keys H is restricted to.
    Query head i reads KV head i // (Hq // Hkv); a KV head's rows are all of its query heads.
    max_splits: how many programs at most share one request's keys.

    Returns α, H [R, Hkv, max_n] float32, max_n the longest live range; zero past a request's
    keys. Per request and head these equal `accumulated_attention(probs)` and
    `entropy_potential(probs, subset)` of `attention_probs(q_grouped, k, scale, q_pos, k_pos)`.
    """
    num_requests = block_table.shape[0]
    _, num_q_heads, head_dim = queries.shape
    num_kv_heads = key_cache.shape[2]
    group = num_q_heads // num_kv_heads
    device = queries.device
    live_start, seq_lens = as_index(live_start), as_index(seq_lens)
    query_start_loc = as_index(query_start_loc)
    live = seq_lens - live_start
    max_keys = max(int(live.max()), 1)
    max_rows = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    key_mask = torch.arange(max_keys, device=device) < live[:, None]  # [R, max_n]
    if subset is None:
        subset_size = live[:, None].expand(num_requests, num_kv_heads)
    else:
        subset = subset[..., :max_keys]
        subset_size = (subset & key_mask[:, None, :]).sum(-1)
        subset = subset.to(torch.int8).contiguous()
    log_subset_size = subset_size.clamp(min=2).float().log().contiguous()
    if key_positions is not None:
        key_positions = as_index(key_positions[..., :max_keys])

    m_pad = triton.next_power_of_2(max(max_rows, 1))
    rows = pow2(triton.next_power_of_2(group) * m_pad)
    tiles = triton.cdiv(max_keys, BLOCK_N)
    tiles_per_split = triton.cdiv(tiles, max_splits)
    splits = triton.cdiv(tiles, tiles_per_split)
    lse_all = torch.empty(
        num_requests, num_kv_heads, splits, rows, dtype=torch.float32, device=device
    )
    lse_subset = torch.empty_like(lse_all)
    alpha = torch.zeros(num_requests, num_kv_heads, max_keys, dtype=torch.float32, device=device)
    entropy = torch.zeros_like(alpha)
    placeholder = torch.zeros(1, dtype=torch.int32, device=device)
    block_table = as_index(block_table)
    common = dict(
        NUM_KV_HEADS=num_kv_heads,
        SPLITS=splits,
        GROUP=group,
        M_PAD=m_pad,
        ROWS=rows,
        HEAD_DIM=head_dim,
        D_PAD=pow2(head_dim),
        BLOCK_SIZE=key_cache.shape[1],
        BLOCK_N=BLOCK_N,
        HAS_KEY_POSITIONS=key_positions is not None,
        HAS_SUBSET=subset is not None,
        DOT_PRECISION=dot_precision(key_cache.dtype),
    )
    inputs = (
        queries,
        query_start_loc,
        as_index(query_positions),
        key_cache,
        block_table,
        live_start,
        seq_lens,
        placeholder if key_positions is None else key_positions,
        placeholder if subset is None else subset,
        lse_all,
        lse_subset,
    )
    strides = (*queries.stride(), *key_cache.stride(), block_table.stride(0))
    _observation_lse_kernel[(num_requests, num_kv_heads, splits)](
        *inputs, scale, tiles_per_split, max_keys, *strides, **common
    )
    _observation_scores_kernel[(num_requests, num_kv_heads, tiles)](
        *inputs, log_subset_size, alpha, entropy, scale, max_keys, *strides, **common
    )
    return alpha, entropy
