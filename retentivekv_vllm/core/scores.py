"""Retention scores: which cached tokens stay as exact K/V and which are folded into the state.

Everything is per KV head. The query heads of one KV head are stacked as rows: the caller reshapes
q [T, Hq, d] to [Hkv, g·T, d], so summing over rows aggregates a GQA group.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

_TINY = torch.finfo(torch.float32).tiny


def masked_logits(
    q: Tensor, k: Tensor, scale: float, q_positions: Tensor, k_positions: Tensor, key_mask: Tensor | None = None
) -> Tensor:
    """scale·q·kᵀ [H, m, n] float32, -inf where key j is hidden from row i.

    q [H, m, d], k [H, n, d], q_positions [m] and k_positions [n] or per head [H, n] long: key j is
    visible to row i iff k_positions[j] <= q_positions[i] and key_mask[h, j] (key_mask [H, n] bool,
    None = all keys).  Per-head positions serve a compacted cache, where each head keeps other tokens.
    """
    per_head = k_positions if k_positions.dim() == 2 else k_positions[None]
    visible = per_head[:, None, :] <= q_positions[None, :, None]  # [H or 1, m, n]
    if key_mask is not None:
        visible = visible & key_mask[:, None, :]
    logits = scale * (q.float() @ k.float().transpose(-1, -2))
    return logits.masked_fill(~visible, float("-inf"))


def masked_softmax(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over the last dim and its log-normaliser; rows that are all -inf give probs 0, lse -inf.

    logits [..., n] -> (probs [..., n], lse [...]).
    """
    lse = torch.logsumexp(logits, dim=-1)
    # Subtracting lse = -inf would give NaN; every logit of such a row is -inf, so any finite shift yields 0.
    shift = lse.masked_fill(lse.isneginf(), 0.0)
    return torch.exp(logits - shift[..., None]), lse


def attention_probs(
    q: Tensor, k: Tensor, scale: float, q_positions: Tensor, k_positions: Tensor, key_mask: Tensor | None = None
) -> Tensor:
    """Causal softmax attention probabilities [H, m, n] float32; arguments as in `masked_logits`."""
    return masked_softmax(masked_logits(q, k, scale, q_positions, k_positions, key_mask))[0]


def accumulated_attention(probs: Tensor) -> Tensor:
    """α [H, n]: attention each key receives, summed over the observation rows of probs [H, m, n]."""
    return probs.float().sum(-2)


def entropy_potential(probs: Tensor, subset: Tensor | None = None) -> Tensor:
    """Each key's share of the row entropies of attention restricted to `subset` [H, n] float32.

    probs [H, m, n]; subset bool [n] or [H, n], None = all keys. Each row is restricted to the subset and
    renormalised to p_q(j); H_j = −Σ_q p_q(j) log p_q(j), divided by log(max(|subset|, 2)) so heads with
    different subset sizes are comparable. Zero outside the subset and for rows with no mass on it.
    """
    probs = probs.float()
    if subset is None:
        subset = torch.ones(probs.shape[-1], dtype=torch.bool, device=probs.device)
    subset = subset.expand(probs.shape[0], probs.shape[-1])
    restricted = probs * subset[:, None, :]
    p = restricted / restricted.sum(-1, keepdim=True).clamp(min=_TINY)
    entropy = -torch.xlogy(p, p).sum(-2)  # xlogy: 0·log 0 = 0
    subset_size = subset.sum(-1, keepdim=True).clamp(min=2).float()
    return entropy / subset_size.log()


def normalize_by_max(x: Tensor, candidates: Tensor) -> Tensor:
    """x [H, n] / its max over candidates [H, n] or [n] bool, per head; 0 off candidates or if the max is <= 0."""
    x = torch.where(candidates, x.float(), 0.0)
    peak = x.amax(-1, keepdim=True)
    return torch.where(peak > 0, x / peak.clamp(min=_TINY), 0.0)


def pool1d(x: Tensor, kernel: int) -> Tensor:
    """Average pooling over the last dim of x [..., n], same length; edges average only real neighbours.

    Smoothing keeps a token's neighbours with it, so kept spans stay contiguous (SnapKV's clustering).
    """
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"pool kernel must be a positive odd integer, got {kernel}")
    x = x.float()
    pooled = F.avg_pool1d(
        x.reshape(-1, 1, x.shape[-1]), kernel, stride=1, padding=kernel // 2, count_include_pad=False
    )
    return pooled.reshape(x.shape)


def retention_score(alpha: Tensor, entropy: Tensor, lam: float, candidates: Tensor, pool_kernel: int) -> Tensor:
    """R = λ·α̂ + (1−λ)·Ĥ [H, n]; α̂, Ĥ are pooled then divided by their max over candidates. -inf off candidates.

    alpha, entropy [H, n]; candidates bool [H, n] or [n] (tokens that may be folded: not sinks, not window).
    """
    alpha_hat = normalize_by_max(pool1d(alpha, pool_kernel), candidates)
    entropy_hat = normalize_by_max(pool1d(entropy, pool_kernel), candidates)
    score = lam * alpha_hat + (1.0 - lam) * entropy_hat
    return score.masked_fill(~candidates.expand_as(score), float("-inf"))


def select_topk(scores: Tensor, k: int) -> Tensor:
    """Keep mask [H, n] bool: the k highest finite scores of each head.

    Every head keeps the same count (a cache slot holds all heads, so equal counts let heads keep different
    tokens in the same slots); k is clamped to the smallest number of finite scores over heads.
    """
    k = max(0, min(k, int(torch.isfinite(scores).sum(-1).min())))
    keep = torch.zeros_like(scores, dtype=torch.bool)
    return keep.scatter_(-1, scores.topk(k, dim=-1).indices, True)
