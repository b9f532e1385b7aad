"""Decode attention over the kept cache, merged with the readout of the recurrent states.

Naive twins: `retentivekv_vllm.core.merge.local_attention` (the paged part, output and LSE),
`retentivekv_vllm.core.state.readout` (φ(q)ᵀS, φ(q)ᵀz) and `merge_with_states` (the merge);
together `retentivekv_vllm.core.reference.compressed_attention` for one query token.

Two launches, split-KV as in flash-decoding. The first gives, for every (request, KV head,
split of the live keys), the softmax output and LSE of the split for all query heads of the KV
head. The second combines the splits into the local output and LSE, computes φ(q) from the
query (the feature map is fused) as e^c·φ'(q), c its largest log-feature, so that a sharp query's
features do not underflow (`merge_with_state_readouts` does the same), reads every state of the
request with φ' and merges in log space with lse − c.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from retentivekv_vllm.core.feature_maps import FeatureMap
from retentivekv_vllm.core.state import RecurrentState

from .features import feature_args, log_feature_tile
from .paged import (
    as_index,
    dot_precision,
    finish_logsumexp,
    load_paged_tile,
    online_logsumexp,
    pow2,
)

BLOCK_N = 64
BLOCK_R = 32
MAX_SPLITS = 32


@dataclass(frozen=True)
class PagedStates:
    """Recurrent states held in a pool, read per request by index.

    S [num_slots, Hkv, r, dv] and z [num_slots, Hkv, r] contiguous, float32 or bfloat16 (read as
    float32); index [R, K] int32:
    request r's k-th state (e.g. k = 0 visual, 1 text) is pool slot index[r, k], -1 for none.
    """

    S: Tensor
    z: Tensor
    index: Tensor

    @classmethod
    def of(cls, states: list[list[RecurrentState]]) -> "PagedStates":
        """The pool of the requests' states, request r's being states[r] (any number each)."""
        pool = [state for member in states for state in member]
        index = torch.full((len(states), max(map(len, states))), -1, dtype=torch.int32)
        first = 0
        for r, member in enumerate(states):
            index[r, : len(member)] = torch.arange(first, first + len(member))
            first += len(member)
        device = pool[0].S.device
        S, z = torch.stack([s.S for s in pool]), torch.stack([s.z for s in pool])
        return cls(S, z, index.to(device))


@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_table_ptr,
    live_start_ptr,
    seq_len_ptr,
    split_out_ptr,
    split_lse_ptr,
    scale,
    tiles_per_split,
    stride_qr,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_bt,
    NUM_Q_HEADS: tl.constexpr,
    SPLITS: tl.constexpr,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    DV_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    live_start = tl.load(live_start_ptr + req)
    num_keys = tl.load(seq_len_ptr + req) - live_start
    rows = tl.arange(0, G_PAD)
    row_valid = rows < GROUP
    q_heads = kv_head * GROUP + rows
    dims = tl.arange(0, D_PAD)
    q = tl.load(
        q_ptr
        + req.to(tl.int64) * stride_qr
        + q_heads[:, None] * stride_qh
        + dims[None, :] * stride_qd,
        mask=row_valid[:, None] & (dims[None, :] < HEAD_DIM),
        other=0.0,
    ).to(tl.float32)
    block_table_row_ptr = block_table_ptr + req.to(tl.int64) * stride_bt

    running_max = tl.full([G_PAD], float("-inf"), tl.float32)
    running_sum = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, DV_PAD], tl.float32)
    first_tile = split * tiles_per_split
    last_tile = tl.minimum(first_tile + tiles_per_split, tl.cdiv(num_keys, BLOCK_N))
    for tile in range(first_tile, last_tile):
        j = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        key_valid = j < num_keys
        slots = live_start + j
        k = load_paged_tile(
            k_cache_ptr,
            block_table_row_ptr,
            slots,
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
        v = load_paged_tile(
            v_cache_ptr,
            block_table_row_ptr,
            slots,
            key_valid,
            kv_head,
            stride_vb,
            stride_vs,
            stride_vh,
            stride_vd,
            BLOCK_SIZE,
            HEAD_DIM_V,
            DV_PAD,
        ).to(tl.float32)
        logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        logits = tl.where(row_valid[:, None] & key_valid[None, :], logits, float("-inf"))
        running_max, running_sum, rescale = online_logsumexp(running_max, running_sum, logits)
        shift = tl.where(running_max == float("-inf"), 0.0, running_max)
        probs = tl.exp(logits - shift[:, None])
        acc = acc * rescale[:, None] + tl.dot(probs, v, input_precision=DOT_PRECISION)

    out = acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]
    at = (req * NUM_Q_HEADS + q_heads).to(tl.int64) * SPLITS + split
    dims_v = tl.arange(0, DV_PAD)
    tl.store(
        split_out_ptr + at[:, None] * HEAD_DIM_V + dims_v[None, :],
        out,
        mask=row_valid[:, None] & (dims_v[None, :] < HEAD_DIM_V),
    )
    tl.store(split_lse_ptr + at, finish_logsumexp(running_max, running_sum), mask=row_valid)


@triton.jit
def _decode_merge_kernel(
    q_ptr,
    split_out_ptr,
    split_lse_ptr,
    state_S_ptr,
    state_z_ptr,
    state_index_ptr,
    weight_ptr,
    out_ptr,
    lse_ptr,
    sqrt_scale,
    stride_qr,
    stride_qh,
    stride_qd,
    stride_or,
    stride_oh,
    stride_od,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    SPLITS: tl.constexpr,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    DV_PAD: tl.constexpr,
    NUM_STATES: tl.constexpr,
    FEATURE: tl.constexpr,
    RANK: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    rows = tl.arange(0, G_PAD)
    row_valid = rows < GROUP
    q_heads = kv_head * GROUP + rows
    dims_v = tl.arange(0, DV_PAD)
    out_mask = row_valid[:, None] & (dims_v[None, :] < HEAD_DIM_V)

    # Combine the splits: each split's output weighted by exp(its lse - total lse).
    at = (req * NUM_Q_HEADS + q_heads).to(tl.int64) * SPLITS
    lse_max = tl.full([G_PAD], float("-inf"), tl.float32)
    for split in range(SPLITS):
        lse_max = tl.maximum(
            lse_max, tl.load(split_lse_ptr + at + split, mask=row_valid, other=float("-inf"))
        )
    shift = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weight_sum = tl.zeros([G_PAD], tl.float32)
    out_local = tl.zeros([G_PAD, DV_PAD], tl.float32)
    for split in range(SPLITS):
        w = tl.exp(tl.load(split_lse_ptr + at + split, mask=row_valid, other=float("-inf")) - shift)
        part = tl.load(
            split_out_ptr + (at + split)[:, None] * HEAD_DIM_V + dims_v[None, :],
            mask=out_mask,
            other=0.0,
        )
        out_local += w[:, None] * part
        weight_sum += w
    out_local = out_local / tl.where(weight_sum > 0, weight_sum, 1.0)[:, None]
    lse_local = tl.where(weight_sum > 0, shift + tl.log(weight_sum), float("-inf"))

    out = out_local
    if NUM_STATES > 0:
        numerator = tl.zeros([G_PAD, DV_PAD], tl.float32)
        denominator = tl.zeros([G_PAD], tl.float32)
        q_row_ptrs = q_ptr + req.to(tl.int64) * stride_qr + q_heads * stride_qh
        # φ(q) = e^c·φ'(q), c = max_r log φ_r(q) per row (a first pass over the rank tiles), so
        # φ' never underflows as a whole; the merge below then uses lse_local − c.
        shift = tl.full([G_PAD], float("-inf"), tl.float32)
        for r0 in range(0, RANK, BLOCK_R):
            rank_offs = r0 + tl.arange(0, BLOCK_R)
            log_phi_q = log_feature_tile(
                q_row_ptrs,
                row_valid,
                stride_qd,
                weight_ptr,
                rank_offs,
                sqrt_scale,
                FEATURE,
                HEAD_DIM,
                D_PAD,
                RANK,
            )
            shift = tl.maximum(shift, tl.max(log_phi_q, 1))
        shift = tl.where(shift == float("-inf"), 0.0, shift)
        for r0 in range(0, RANK, BLOCK_R):
            rank_offs = r0 + tl.arange(0, BLOCK_R)
            phi_q = tl.exp(
                log_feature_tile(
                    q_row_ptrs,
                    row_valid,
                    stride_qd,
                    weight_ptr,
                    rank_offs,
                    sqrt_scale,
                    FEATURE,
                    HEAD_DIM,
                    D_PAD,
                    RANK,
                )
                - shift[:, None]
            )
            for k in tl.static_range(NUM_STATES):
                slot = tl.load(state_index_ptr + req * NUM_STATES + k)
                state = (tl.maximum(slot, 0).to(tl.int64) * NUM_KV_HEADS + kv_head) * RANK
                # An absent state (slot -1) reads no rank: its S and z load as 0. (The bound is
                # folded into the index compare because Triton's interpreter rejects a scalar
                # mask combined with a tensor one.)
                rank_present = rank_offs < tl.where(slot >= 0, RANK, 0)
                S = tl.load(
                    state_S_ptr + (state + rank_offs)[:, None] * HEAD_DIM_V + dims_v[None, :],
                    mask=rank_present[:, None] & (dims_v[None, :] < HEAD_DIM_V),
                    other=0.0,
                ).to(tl.float32)  # a state stored in bfloat16 (beside a 16-bit cache), widened
                z = tl.load(state_z_ptr + state + rank_offs, mask=rank_present, other=0.0).to(
                    tl.float32
                )
                numerator += tl.dot(phi_q, S, input_precision="ieee")
                denominator += tl.sum(phi_q * z[None, :], 1)
        # As merge_with_states of lse_local − c: the states as a second normalised partial
        # output, lse = log den (of φ').
        has_state = denominator > 0
        safe_den = tl.where(has_state, denominator, 1.0)
        out_state = numerator / safe_den[:, None]
        lse_state = tl.where(has_state, tl.log(safe_den), float("-inf"))
        lse_shifted = lse_local - shift
        top = tl.maximum(lse_shifted, lse_state)
        weight_local = tl.exp(lse_shifted - top)
        weight_state = tl.exp(lse_state - top)
        merged = (weight_local[:, None] * out_local + weight_state[:, None] * out_state) / (
            weight_local + weight_state
        )[:, None]
        out = tl.where(has_state[:, None], merged, out_local)

    tl.store(
        out_ptr
        + req.to(tl.int64) * stride_or
        + q_heads[:, None] * stride_oh
        + dims_v[None, :] * stride_od,
        out,
        mask=out_mask,
    )
    tl.store(lse_ptr + req * NUM_Q_HEADS + q_heads, lse_local, mask=row_valid)


def decode_attention(
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    block_table: Tensor,
    live_start: Tensor,
    seq_lens: Tensor,
    scale: float,
    states: PagedStates | None = None,
    feature_map: FeatureMap | None = None,
    out: Tensor | None = None,
    max_splits: int = MAX_SPLITS,
) -> tuple[Tensor, Tensor]:
    """One query token per request over its live slots, merged with its states' readout.

    query [R, Hq, d]; key_cache, value_cache [num_blocks, block_size, Hkv, d / dv] (any strides:
    `paged.split_kv_cache`); block_table [R, max_blocks]; request r attends to its slots
    live_start[r] : seq_lens[r], all visible (they hold earlier tokens and the query's own).
    states: the request's recurrent states, read through feature_map (needed with states).
    Query head i reads KV head i // (Hq // Hkv).

    Returns out [R, Hq, dv] (query dtype, or written into `out`) and the local LSE [R, Hq] float32
    (-inf for a request with no live slot, whose local output is 0). Without states (or where a
    request's state denominators are 0) out is the local attention, bit for bit as the merge.
    max_splits: how many programs at most share one request's keys (fewer for long batches).
    """
    num_requests, num_q_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    head_dim_v = value_cache.shape[3]
    group = num_q_heads // num_kv_heads
    device = query.device
    live_start, seq_lens, block_table = (
        as_index(live_start),
        as_index(seq_lens),
        as_index(block_table),
    )
    max_keys = max(int((seq_lens - live_start).max()), 1)
    tiles = triton.cdiv(max_keys, BLOCK_N)
    tiles_per_split = triton.cdiv(tiles, max_splits)
    splits = triton.cdiv(tiles, tiles_per_split)
    split_out = torch.empty(
        num_requests, num_q_heads, splits, head_dim_v, dtype=torch.float32, device=device
    )
    split_lse = torch.empty(num_requests, num_q_heads, splits, dtype=torch.float32, device=device)
    if out is None:
        out = torch.empty(num_requests, num_q_heads, head_dim_v, dtype=query.dtype, device=device)
    lse = torch.empty(num_requests, num_q_heads, dtype=torch.float32, device=device)
    shapes = dict(
        NUM_Q_HEADS=num_q_heads,
        SPLITS=splits,
        GROUP=group,
        G_PAD=pow2(group),
        HEAD_DIM=head_dim,
        D_PAD=pow2(head_dim),
        HEAD_DIM_V=head_dim_v,
        DV_PAD=pow2(head_dim_v),
    )
    _decode_split_kernel[(num_requests, num_kv_heads, splits)](
        query,
        key_cache,
        value_cache,
        block_table,
        live_start,
        seq_lens,
        split_out,
        split_lse,
        scale,
        tiles_per_split,
        *query.stride(),
        *key_cache.stride(),
        *value_cache.stride(),
        block_table.stride(0),
        BLOCK_SIZE=key_cache.shape[1],
        BLOCK_N=BLOCK_N,
        DOT_PRECISION=dot_precision(key_cache.dtype),
        **shapes,
    )
    if states is None:
        num_states = 0
        placeholder = torch.zeros(1, dtype=torch.float32, device=device)
        S, z, index = placeholder, placeholder, as_index(placeholder)
        features = feature_args(None, head_dim, device)
    else:
        if feature_map is None:
            raise ValueError("reading states needs the feature map they were folded with")
        num_states = states.index.shape[1]
        features = feature_args(feature_map, head_dim, device)
        S, z, index = states.S.contiguous(), states.z.contiguous(), as_index(states.index)
    _decode_merge_kernel[(num_requests, num_kv_heads)](
        query,
        split_out,
        split_lse,
        S,
        z,
        index,
        features.weight,
        out,
        lse,
        features.sqrt_scale,
        *query.stride(),
        *out.stride(),
        NUM_KV_HEADS=num_kv_heads,
        NUM_STATES=num_states,
        FEATURE=features.kind,
        RANK=features.rank,
        BLOCK_R=BLOCK_R,
        **shapes,
    )
    return out, lse
