"""Folding tokens into the recurrent state: S ← γ_i·S + a_i·φ(k_i) v_iᵀ,  z ← γ_i·z + a_i·φ(k_i).

Naive twins: `retentivekv_vllm.core.state.fold` (chunked) and `fold_sequential` (fused recurrent).

Both kernels give every program one tile of S [r-tile, dv-tile] (and the matching part of z) of
one head, so the state is updated in place without any other program touching the tile, and
compute φ(k) from the keys themselves (`features.feature_tile`).
"""

import triton
import triton.language as tl
from torch import Tensor

from retentivekv_vllm.core.feature_maps import FeatureMap
from retentivekv_vllm.core.state import RecurrentState

from .features import feature_args, feature_tile, feature_vector
from .paged import pow2

BLOCK_N = 32
BLOCK_R = 32
BLOCK_DV = 32


@triton.jit
def _fold_chunked_kernel(
    x_ptr,
    v_ptr,
    gamma_ptr,
    absorption_ptr,
    S_ptr,
    z_ptr,
    weight_ptr,
    sqrt_scale,
    num_tokens,
    stride_xh,
    stride_xn,
    stride_xd,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_gh,
    stride_ah,
    FEATURE: tl.constexpr,
    INPUT_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    RANK: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    head = tl.program_id(0)
    rank_offs = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    dv_tile = tl.program_id(2)
    dims_v = dv_tile * BLOCK_DV + tl.arange(0, BLOCK_DV)
    rank_valid = rank_offs < RANK
    dv_valid = dims_v < HEAD_DIM_V
    gamma_row = gamma_ptr + head.to(tl.int64) * stride_gh

    acc_S = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    acc_z = tl.zeros([BLOCK_R], tl.float32)
    # Token i is scaled by a_i·exp(Σ_{j>i} log γ_j). Chunks run from the last one back, and
    # `decay_later` holds Σ log γ_j over j > (this chunk's last token + 1); inside a chunk the sums
    # are reverse cumulative sums of log γ_{i+1}, so log γ_i is never added then subtracted.
    decay_later = 0.0
    num_chunks = tl.cdiv(num_tokens, BLOCK_N)
    for t in range(num_chunks):
        tokens = (num_chunks - 1 - t) * BLOCK_N + tl.arange(0, BLOCK_N)
        token_valid = tokens < num_tokens
        log_gamma_next = tl.log(tl.load(gamma_row + tokens + 1, mask=tokens + 1 < num_tokens, other=1.0))
        decay_after = tl.cumsum(log_gamma_next, 0, reverse=True) + decay_later
        decay_later += tl.sum(log_gamma_next, 0)
        absorption = tl.load(absorption_ptr + head.to(tl.int64) * stride_ah + tokens, mask=token_valid, other=0.0)
        weight = absorption * tl.exp(decay_after)
        phi = feature_tile(
            x_ptr + head.to(tl.int64) * stride_xh + tokens.to(tl.int64) * stride_xn, token_valid, stride_xd,
            weight_ptr, rank_offs, sqrt_scale, FEATURE, INPUT_DIM, D_PAD, RANK,
        )
        weighted_phi = weight[:, None] * phi  # [BLOCK_N, BLOCK_R]
        v = tl.load(
            v_ptr + head.to(tl.int64) * stride_vh + tokens.to(tl.int64)[:, None] * stride_vn
            + dims_v[None, :] * stride_vd,
            mask=token_valid[:, None] & dv_valid[None, :],
            other=0.0,
        ).to(tl.float32)
        acc_S += tl.dot(tl.trans(weighted_phi), v, input_precision="ieee")
        acc_z += tl.sum(weighted_phi, 0)
    # decay_later now sums log γ_j over j >= 1; the old state decays by all of them and γ_0.
    decay_total = tl.exp(decay_later + tl.log(tl.load(gamma_row, mask=num_tokens > 0, other=1.0)))

    state = head.to(tl.int64) * RANK + rank_offs
    S_ptrs = S_ptr + state[:, None] * HEAD_DIM_V + dims_v[None, :]
    S_mask = rank_valid[:, None] & dv_valid[None, :]
    tl.store(S_ptrs, decay_total * tl.load(S_ptrs, mask=S_mask, other=0.0) + acc_S, mask=S_mask)
    if dv_tile == 0:
        z = tl.load(z_ptr + state, mask=rank_valid, other=0.0)
        tl.store(z_ptr + state, decay_total * z + acc_z, mask=rank_valid)


@triton.jit
def _fold_recurrent_kernel(
    x_ptr,
    v_ptr,
    gamma_ptr,
    absorption_ptr,
    S_ptr,
    z_ptr,
    weight_ptr,
    sqrt_scale,
    num_tokens,
    stride_xh,
    stride_xn,
    stride_xd,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_gh,
    stride_ah,
    FEATURE: tl.constexpr,
    INPUT_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    RANK: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    head = tl.program_id(0)
    rank_offs = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    dv_tile = tl.program_id(2)
    dims_v = dv_tile * BLOCK_DV + tl.arange(0, BLOCK_DV)
    rank_valid = rank_offs < RANK
    dv_valid = dims_v < HEAD_DIM_V
    state = head.to(tl.int64) * RANK + rank_offs
    S_ptrs = S_ptr + state[:, None] * HEAD_DIM_V + dims_v[None, :]
    S_mask = rank_valid[:, None] & dv_valid[None, :]
    S = tl.load(S_ptrs, mask=S_mask, other=0.0)
    z = tl.load(z_ptr + state, mask=rank_valid, other=0.0)
    for i in range(num_tokens):
        gamma = tl.load(gamma_ptr + head.to(tl.int64) * stride_gh + i)
        absorption = tl.load(absorption_ptr + head.to(tl.int64) * stride_ah + i)
        phi = feature_vector(
            x_ptr + head.to(tl.int64) * stride_xh + i * stride_xn, stride_xd, weight_ptr, rank_offs,
            sqrt_scale, FEATURE, INPUT_DIM, D_PAD, RANK,
        )
        weighted_phi = absorption * phi
        v = tl.load(
            v_ptr + head.to(tl.int64) * stride_vh + i * stride_vn + dims_v * stride_vd, mask=dv_valid, other=0.0
        ).to(tl.float32)
        S = gamma * S + weighted_phi[:, None] * v[None, :]
        z = gamma * z + weighted_phi
    tl.store(S_ptrs, S, mask=S_mask)
    if dv_tile == 0:
        tl.store(z_ptr + state, z, mask=rank_valid)


def _launch(kernel, state, x, v, gamma, absorption, feature_map, **blocks) -> RecurrentState:
    num_heads, num_tokens, input_dim = x.shape
    head_dim_v = v.shape[-1]
    if not (state.S.is_contiguous() and state.z.is_contiguous()):
        raise ValueError("the state is updated in place and must be contiguous")
    features = feature_args(feature_map, input_dim, x.device)
    if state.S.shape[1] != features.rank:
        raise ValueError(f"state rank {state.S.shape[1]} != feature rank {features.rank}")
    gamma, absorption = gamma.float().contiguous(), absorption.float().contiguous()
    grid = (num_heads, triton.cdiv(features.rank, blocks["BLOCK_R"]), triton.cdiv(head_dim_v, blocks["BLOCK_DV"]))
    kernel[grid](
        x, v, gamma, absorption, state.S, state.z, features.weight, features.sqrt_scale, num_tokens,
        *x.stride(), *v.stride(), gamma.stride(0), absorption.stride(0),
        FEATURE=features.kind, INPUT_DIM=input_dim, D_PAD=pow2(input_dim), RANK=features.rank,
        HEAD_DIM_V=head_dim_v, **blocks,
    )
    return state


def fold_chunked(
    state: RecurrentState,
    x: Tensor,
    v: Tensor,
    gamma: Tensor,
    absorption: Tensor,
    feature_map: FeatureMap | None = None,
) -> RecurrentState:
    """`core.state.fold` in place: many tokens at once, decay products as sums of log γ.

    state: S [H, r, dv], z [H, r] float32 contiguous, updated in place and returned. x [H, n, d]:
    keys, mapped by feature_map in the kernel, or with feature_map None the features φ(k)
    [H, n, r] themselves; v [H, n, dv]; gamma [H, n] in (0, 1]; absorption [H, n] >= 0.
    H may run over requests and heads together.
    """
    return _launch(
        _fold_chunked_kernel, state, x, v, gamma, absorption, feature_map,
        BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, BLOCK_DV=BLOCK_DV,
    )


def fold_fused_recurrent(
    state: RecurrentState,
    x: Tensor,
    v: Tensor,
    gamma: Tensor,
    absorption: Tensor,
    feature_map: FeatureMap | None = None,
) -> RecurrentState:
    """`core.state.fold_sequential` in place: token by token with the state tile in registers,
    for folding a few tokens (no chunk setup, no decay products). Arguments as `fold_chunked`."""
    return _launch(
        _fold_recurrent_kernel, state, x, v, gamma, absorption, feature_map, BLOCK_R=BLOCK_R, BLOCK_DV=BLOCK_DV
    )
