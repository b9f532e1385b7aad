"""The recurrent state that absorbs folded tokens, and the two per-token gates of a fold.

S ← γ_i·S + a_i·φ(k_i) v_iᵀ,  z ← γ_i·z + a_i·φ(k_i)  — one state per KV head, size independent of
the number of tokens folded. A state is computed in float32 and stored in `storage_dtype` of the
cache beside it; every reader widens it to float32 again.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from .feature_maps import FeatureMap

_TINY = torch.finfo(torch.float32).tiny


@dataclass
class RecurrentState:
    """S [H, r, dv] and normaliser z [H, r], one (S, z) per KV head; float32 as computed, or the
    dtype it is stored in (`stored_as`)."""

    S: Tensor
    z: Tensor

    @classmethod
    def zeros(cls, num_heads: int, rank: int, head_dim_v: int, device=None) -> "RecurrentState":
        return cls(
            S=torch.zeros(num_heads, rank, head_dim_v, device=device),
            z=torch.zeros(num_heads, rank, device=device),
        )

    @classmethod
    def stack(cls, states: "list[RecurrentState]") -> "RecurrentState":
        """One state with a leading batch dim over `states` (requests decoded together)."""
        return cls(S=torch.stack([s.S for s in states]), z=torch.stack([s.z for s in states]))

    @property
    def num_elements(self) -> int:
        return self.S.numel() + self.z.numel()

    def stored_as(self, dtype: torch.dtype) -> "RecurrentState":
        return RecurrentState(self.S.to(dtype), self.z.to(dtype))


def storage_dtype(cache_dtype: torch.dtype) -> torch.dtype:
    """The dtype states are stored in beside a KV cache of `cache_dtype`: float32 beside a float32
    cache, bfloat16 beside a 16-bit one. Not float16 beside a float16 cache: S and z are sums of
    unnormalised key features (a learned map carries a key's softmax mass, up to e^30 for sharp
    keys), beyond float16's largest number, 65504; bfloat16 has float32's range in the same two
    bytes."""
    return torch.float32 if cache_dtype == torch.float32 else torch.bfloat16


def fold_sequential(
    state: RecurrentState, phi_k: Tensor, v: Tensor, gamma: Tensor, absorption: Tensor
) -> RecurrentState:
    """The definition, one token at a time (the oracle for `fold`).

    phi_k [H, n, r] features (not logs), v [H, n, dv], gamma [H, n] in (0, 1], absorption [H, n] >=
    0.
    """
    S, z = state.S.float(), state.z.float()
    phi_k, v, gamma, absorption = phi_k.float(), v.float(), gamma.float(), absorption.float()
    for i in range(phi_k.shape[1]):
        weighted_phi = absorption[:, i, None] * phi_k[:, i]
        S = gamma[:, i, None, None] * S + weighted_phi[:, :, None] * v[:, i, None, :]
        z = gamma[:, i, None] * z + weighted_phi
    return RecurrentState(S, z)


def fold(
    state: RecurrentState, phi_k: Tensor, v: Tensor, gamma: Tensor, absorption: Tensor
) -> RecurrentState:
    """`fold_sequential` in one batch; returns a new state.

    Unrolling the recurrence, token i is scaled by a_i·∏_{j>i} γ_j and the old state by ∏_j γ_j. The
    products are taken as sums of log γ so that long folds do not underflow step by step.
    Shapes as in `fold_sequential`.
    """
    phi_k, v, absorption = phi_k.float(), v.float(), absorption.float()
    log_gamma = gamma.float().log()
    suffix = log_gamma.flip(-1).cumsum(-1).flip(-1)  # Σ_{j>=i} log γ_j
    # Shift by one instead of subtracting log γ_i: Σ_{j>i} log γ_j without cancellation error.
    decay_after = torch.cat([suffix[:, 1:], torch.zeros_like(suffix[:, :1])], dim=1)
    weight = absorption * decay_after.exp()  # [H, n]
    decay_total = log_gamma.sum(-1).exp()  # [H]
    weighted_phi = weight[:, :, None] * phi_k
    return RecurrentState(
        S=decay_total[:, None, None] * state.S.float() + weighted_phi.transpose(1, 2) @ v,
        z=decay_total[:, None] * state.z.float() + weighted_phi.sum(1),
    )


def readout(state: RecurrentState, phi_q: Tensor) -> tuple[Tensor, Tensor]:
    """phi_q [..., H, m, r] (a KV head's query rows) -> numerator φ(q)ᵀS [..., H, m, dv],
    denominator
    φ(q)ᵀz [..., H, m]; leading dims (a batch of requests) are shared by the state's S [..., H, r,
    dv]."""
    phi_q = phi_q.float()
    return phi_q @ state.S.float(), (phi_q @ state.z.float().unsqueeze(-1)).squeeze(-1)


def retention_from_entropy(entropy_hat: Tensor, gamma0: float) -> Tensor:
    """γ = γ0^(1 − Ĥ): a token in diffuse attention (Ĥ → 1) barely decays what the state already
    holds.

    entropy_hat [...] in [0, 1] (clamped) -> γ [...] in [γ0, 1].
    """
    return torch.pow(gamma0, 1.0 - entropy_hat.float().clamp(0.0, 1.0))


def absorption_from_attention(alpha: Tensor, a_min: float, a_max: float) -> Tensor:
    """a = clamp(α / mean(α), a_min, a_max) over the last dim; rows whose mean is 0 carry no signal
    -> 1.

    alpha [..., n] >= 0 -> a [..., n]. The caller picks the tokens the mean runs over.
    """
    alpha = alpha.float()
    mean = alpha.mean(-1, keepdim=True)
    ratio = alpha / mean.clamp(min=torch.finfo(torch.float32).tiny)
    return torch.where(mean > 0, ratio.clamp(a_min, a_max), torch.ones_like(alpha))


def self_recall_error(
    feature_map: FeatureMap,
    keys: Tensor,
    values: Tensor,
    members: Tensor,
    positions: Tensor | None = None,
) -> Tensor:
    """How badly a state of the `members` gives each token's own value back [H, n] float32
    (LoLA's self-recall error, McDermott et al. 2025).

    keys [H, n, d], values [H, n, dv], members [H, n] (or [n]) bool; positions [H, n] of the
    keys, for maps that read them (`feature_maps.LearnedFeatureMap`). The state is the plain
    (ungated) sum over the members of one head, S = Σ_j φ_k(k_j) v_jᵀ and z = Σ_j φ_k(k_j);
    token i (member or not) reads it with the query features of its own key, φ_q(k_i), and

        recalled_i = φ_q(k_i)ᵀS / max(φ_q(k_i)ᵀz, tiny),    error_i = ‖v_i − recalled_i‖₂.

    A token the state would reconstruct badly is one worth keeping exactly. Computed in log
    space as `merge.merge_with_state_readouts` reads a state: log φ_q(k_i) is shifted by its row
    max before `readout`, and log φ_k by its largest entry over the head's members (a constant
    per head), so neither side underflows as a whole; both shifts cancel in the ratio. A head
    without members recalls 0 (error ‖v_i‖).
    """
    members = members.expand(keys.shape[:2])
    log_phi_k = feature_map.log_features(keys, positions)  # [H, n, r]
    masked = log_phi_k.masked_fill(~members[..., None], float("-inf"))
    key_shift = masked.flatten(1).amax(-1)  # [H]
    key_shift = torch.where(torch.isfinite(key_shift), key_shift, 0.0)
    phi_k = (masked - key_shift[:, None, None]).exp()  # 0 off members
    v = values.float()
    state = RecurrentState(S=phi_k.transpose(1, 2) @ v, z=phi_k.sum(1))
    log_phi_q = feature_map.query_log_features(keys, positions)
    query_shift = log_phi_q.amax(-1)
    query_shift = torch.where(torch.isfinite(query_shift), query_shift, 0.0)
    numerator, denominator = readout(state, (log_phi_q - query_shift[..., None]).exp())
    recalled = numerator / denominator.clamp(min=_TINY)[..., None]
    return torch.linalg.vector_norm(v - recalled, dim=-1)
