"""Local softmax attention over the retained cache, and its merge with the readouts of folded-token
states.

o = (e^{lse}·o_L + Σ_X num_X) / (e^{lse} + Σ_X den_X), evaluated as a merge of two normalised
partial outputs in log space, like FlashAttention's merge_attn_states.
"""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .feature_maps import FeatureMap
from .scores import masked_logits, masked_softmax
from .state import RecurrentState, readout


def local_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    q_positions: Tensor,
    k_positions: Tensor,
    key_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Softmax attention over visible keys: out [H, m, dv], lse [H, m] = log Σ_j exp(scale·q·k_j).

    q [H, m, d], k [H, n, d], v [H, n, dv]; visibility as in `scores.masked_logits`. Rows with no
    visible key get out 0 and lse -inf.
    """
    probs, lse = masked_softmax(masked_logits(q, k, scale, q_positions, k_positions, key_mask))
    return probs @ v.float(), lse


def merge_with_states(
    out_local: Tensor,
    lse_local: Tensor,
    numerators: Sequence[Tensor],
    denominators: Sequence[Tensor],
) -> Tensor:
    """Merge local attention out_local [H, m, dv] (lse_local [H, m]) with state readouts ->
    [H, m, dv].

    numerators [H, m, dv] and denominators [H, m] come one per state from `state.readout`. Rows
    whose states hold no mass (empty list, zero denominators) return
    out_local unchanged, bit for bit, so a cache that folded nothing is exactly full attention.
    """
    out_local = out_local.float()
    if not numerators:
        return out_local
    num = sum(n.float() for n in numerators)
    den = sum(d.float() for d in denominators)
    has_state = den > 0
    # The state as a second normalised partial output: o_S = num/den with lse_S = log den.
    out_state = num / torch.where(has_state, den, 1.0)[..., None]
    lse_state = torch.where(has_state, den, 1.0).log().masked_fill(~has_state, float("-inf"))
    # Factor out the larger lse: both weights are then <= 1 and no exp overflows.
    lse_max = torch.maximum(lse_local.float(), lse_state)
    weight_local = torch.exp(lse_local.float() - lse_max)
    weight_state = torch.exp(lse_state - lse_max)
    merged = (weight_local[..., None] * out_local + weight_state[..., None] * out_state) / (
        weight_local + weight_state
    )[..., None]
    return torch.where(has_state[..., None], merged, out_local)


def merge_with_state_readouts(
    out_local: Tensor,
    lse_local: Tensor,
    q: Tensor,
    states: Sequence[RecurrentState],
    feature_map: FeatureMap | None,
    merge: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor] | None = None,
    q_positions: Tensor | None = None,
) -> Tensor:
    """Local attention out_local [..., H, m, dv] (lse_local [..., H, m]) of queries q [..., H, m, d]
    merged with what every state returns to those queries -> [..., H, m, dv] float32; out_local
    itself without states.

    The readout is exact in log space: φ(q) = e^c·φ'(q) with c = max_r log φ_r(q) per row, so
    φ'(q) has largest entry 1 and never underflows as a whole, and the merge
    (e^lse·o_L + e^c·Σ φ'ᵀS) / (e^lse + e^c·Σ φ'ᵀz) is evaluated as `merge_with_states` of
    lse − c with the readouts of φ', summed over states. (A sharp query's log φ(q) reaches −500
    with ``prf``, where φ(q) itself is 0 in float32 and the state would silently weigh nothing.)
    `merge` (out_local, lse, numerator, denominator) replaces that last step where a kernel does
    it (the CUDA extension's `kernels.merge_with_state`, its twin).
    """
    if not states:
        return out_local.float()
    # The queries' positions (broadcastable to q.shape[:-1]) for maps that read them.
    log_phi_q = feature_map.query_log_features(q, q_positions)
    shift = log_phi_q.amax(-1)
    shift = torch.where(torch.isfinite(shift), shift, 0.0)
    phi_q = (log_phi_q - shift[..., None]).exp()
    readouts = [readout(state, phi_q) for state in states]
    numerator = sum(num.float() for num, _ in readouts)
    denominator = sum(den.float() for _, den in readouts)
    if merge is None:
        return merge_with_states(out_local, lse_local.float() - shift, [numerator], [denominator])
    return merge(out_local, lse_local.float() - shift, numerator, denominator).float()
