"""The feature maps of `retentivekv_vllm.core.feature_maps`, computed inside the kernels.

Kernels take a FEATURE constexpr: GIVEN (the input already holds φ(x)), ELU (φ = elu(x) + 1, rank
= head dim) or PRF (positive random features exp(W x̃ − ‖x̃‖²/2)/√r, x̃ = x·√scale), so keys and
queries go from the cache to φ without a round trip through memory.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from retentivekv_vllm.core.feature_maps import EluPlusOne, FeatureMap, PositiveRandomFeatures

GIVEN = tl.constexpr(0)
ELU = tl.constexpr(1)
PRF = tl.constexpr(2)


@dataclass(frozen=True)
class FeatureArgs:
    """What a kernel needs to evaluate a feature map: kind (GIVEN, ELU or PRF), rank, the PRF
    projection [rank, input dim] float32 (a 1-element placeholder otherwise) and √scale."""

    kind: int
    rank: int
    weight: Tensor
    sqrt_scale: float


KERNEL_FEATURE_MAPS = (EluPlusOne, PositiveRandomFeatures)


def supports_feature_map(feature_map: FeatureMap) -> bool:
    """Whether the kernels evaluate `feature_map` themselves; callers use the torch twins for
    any other map (e.g. a wrapper that reads states with fixed query features)."""
    return isinstance(feature_map, KERNEL_FEATURE_MAPS)


def feature_args(
    feature_map: FeatureMap | None, input_dim: int, device: torch.device
) -> FeatureArgs:
    """Kernel arguments for `feature_map` applied to inputs of size input_dim; None: the inputs
    already are features (rank = input_dim)."""
    placeholder = torch.zeros(1, dtype=torch.float32, device=device)
    if feature_map is None:
        return FeatureArgs(GIVEN.value, input_dim, placeholder, 1.0)
    if isinstance(feature_map, EluPlusOne):
        if feature_map.rank != input_dim:
            raise ValueError(
                f"elu+1 of rank {feature_map.rank} applied to inputs of size {input_dim}"
            )
        return FeatureArgs(ELU.value, input_dim, placeholder, 1.0)
    if isinstance(feature_map, PositiveRandomFeatures):
        weight = feature_map.weight.to(device=device, dtype=torch.float32).contiguous()
        if weight.shape[1] != input_dim:
            raise ValueError(
                f"random features over size {weight.shape[1]} applied to inputs of size {input_dim}"
            )
        return FeatureArgs(PRF.value, feature_map.rank, weight, feature_map.scale**0.5)
    raise TypeError(f"no kernel for feature map {type(feature_map).__name__}")


@triton.jit
def log_feature_tile(
    row_ptrs,
    row_valid,
    stride_dim,
    weight_ptr,
    rank_offs,
    sqrt_scale,
    FEATURE: tl.constexpr,
    INPUT_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    RANK: tl.constexpr,
):
    """log φ of N input rows at feature indices rank_offs [BLOCK_R] -> [N, BLOCK_R] float32,
    -inf for invalid rows and indices >= RANK (`FeatureMap.log_features`). A readout subtracts
    each row's maximum before exponentiating, so a large-norm query's features do not underflow
    to 0 together."""
    rank_valid = rank_offs < RANK
    if FEATURE == PRF:
        dims = tl.arange(0, D_PAD)
        x = (
            tl.load(
                row_ptrs[:, None] + dims[None, :] * stride_dim,
                mask=row_valid[:, None] & (dims[None, :] < INPUT_DIM),
                other=0.0,
            ).to(tl.float32)
            * sqrt_scale
        )
        w = tl.load(
            weight_ptr + rank_offs[:, None] * INPUT_DIM + dims[None, :],
            mask=rank_valid[:, None] & (dims[None, :] < INPUT_DIM),
            other=0.0,
        )
        projection = tl.dot(x, tl.trans(w), input_precision="ieee")
        log_phi = projection - 0.5 * tl.sum(x * x, 1)[:, None] - 0.5 * tl.log(RANK * 1.0)
    else:
        x = tl.load(
            row_ptrs[:, None] + rank_offs[None, :] * stride_dim,
            mask=row_valid[:, None] & rank_valid[None, :],
            other=1.0,
        ).to(tl.float32)
        if FEATURE == ELU:
            log_phi = tl.where(x < 0, x, tl.log(1.0 + tl.maximum(x, 0.0)))
        else:
            log_phi = tl.log(x)
    return tl.where(row_valid[:, None] & rank_valid[None, :], log_phi, float("-inf"))
