"""Retention scores: which cached tokens stay as exact K/V and which are folded into the state.

Everything is per KV head. The query heads of one KV head are stacked as rows: the caller reshapes
q [T, Hq, d] to [Hkv, g·T, d], so summing over rows aggregates a GQA group.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

_TINY = torch.finfo(torch.float32).tiny


def masked_logits(
    q: Tensor,
    k: Tensor,
    scale: float,
    q_positions: Tensor,
    k_positions: Tensor,
    key_mask: Tensor | None = None,
) -> Tensor:
    """scale·q·kᵀ [H, m, n] float32, -inf where key j is hidden from row i.

    q [H, m, d], k [H, n, d], q_positions [m] and k_positions [n] or per head [H, n] long: key j is
    visible to row i iff k_positions[j] <= q_positions[i] and key_mask[h, j] (key_mask [H, n] bool,
    None = all keys).  Per-head positions serve a compacted cache, where each head keeps other
    tokens.
    """
    per_head = k_positions if k_positions.dim() == 2 else k_positions[None]
    hidden = per_head[:, None, :] > q_positions[None, :, None]  # [H or 1, m, n]
    if key_mask is not None:
        hidden = hidden | ~key_mask[:, None, :]
    # The scale on q (m·d products, not m·n), the mask in place: every pass over [H, m, n] counts.
    logits = (scale * q.float()) @ k.float().transpose(-1, -2)
    return logits.masked_fill_(hidden, float("-inf"))


def masked_softmax(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over the last dim and its log-normaliser; rows that are all -inf give probs 0, lse
    -inf.

    logits [..., n] -> (probs [..., n], lse [...]).
    """
    lse = torch.logsumexp(logits, dim=-1)
    # Subtracting lse = -inf would give NaN; every logit of such a row is -inf, so any finite shift
    # yields 0.
    shift = lse.masked_fill(lse.isneginf(), 0.0)
    return torch.exp(logits - shift[..., None]), lse


def attention_probs(
    q: Tensor,
    k: Tensor,
    scale: float,
    q_positions: Tensor,
    k_positions: Tensor,
    key_mask: Tensor | None = None,
) -> Tensor:
    """Causal softmax attention probabilities [H, m, n] float32; arguments as in `masked_logits`.
    One fused torch.softmax (`masked_softmax`'s log-normaliser would cost several more passes);
    it gives NaN on a row that is all -inf (a query that sees no key), and only there: zeroed."""
    logits = masked_logits(q, k, scale, q_positions, k_positions, key_mask)
    return torch.softmax(logits, dim=-1).nan_to_num_(0.0)


def accumulated_attention(probs: Tensor) -> Tensor:
    """α [H, n]: attention each key receives, summed over the observation rows of probs [H, m,
    n]."""
    return probs.float().sum(-2)


def entropy_potential(probs: Tensor, subset: Tensor | None = None) -> Tensor:
    """Each key's share of the row entropies of attention restricted to `subset` [H, n] float32.

    probs [H, m, n], softmax rows (each sums to one, or is all zero for a query that saw no key);
    subset bool [n] or [H, n], None = all keys. Each row is restricted to the subset and
    renormalised to p_q(j); H_j = −Σ_q p_q(j) log p_q(j), divided by log(max(|subset|, 2)) so heads
    with
    different subset sizes are comparable. Zero outside the subset and for rows with no mass on it.
    """
    probs = probs.float()
    if (
        subset is None
    ):  # restricted to every key, a softmax row is already p: no pass to renormalise
        p, log_size = probs, math.log(max(probs.shape[-1], 2))
    else:
        subset = subset.expand(probs.shape[0], probs.shape[-1])
        restricted = probs * subset[:, None, :]
        p = restricted / restricted.sum(-1, keepdim=True).clamp(min=_TINY)
        log_size = subset.sum(-1, keepdim=True).clamp(min=2).float().log()
    entropy = torch.special.entr(p).sum(-2)  # -p·log p, and 0 at p = 0
    return entropy / log_size


def normalize_by_max(x: Tensor, candidates: Tensor) -> Tensor:
    """x [H, n] / its max over candidates [H, n] or [n] bool, per head; 0 off candidates or if the
    max is <= 0."""
    x = torch.where(candidates, x.float(), 0.0)
    peak = x.amax(-1, keepdim=True)
    return torch.where(peak > 0, x / peak.clamp(min=_TINY), 0.0)


def pool1d(x: Tensor, kernel: int) -> Tensor:
    """Average pooling over the last dim of x [..., n], same length; edges average only real
    neighbours.

    Smoothing keeps a token's neighbours with it, so kept spans stay contiguous (SnapKV's
    clustering).
    """
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"pool kernel must be a positive odd integer, got {kernel}")
    x = x.float()
    pooled = F.avg_pool1d(
        x.reshape(-1, 1, x.shape[-1]),
        kernel,
        stride=1,
        padding=kernel // 2,
        count_include_pad=False,
    )
    return pooled.reshape(x.shape)


@dataclass(frozen=True)
class PatchLayout:
    """Where each cached token sits: image index, row and column on that image's patch grid
    (after any spatial merge), all [H, n] long and -1 for text tokens; grids[i] = (rows, cols)."""

    image: Tensor
    row: Tensor
    col: Tensor
    grids: tuple[tuple[int, int], ...]

    @property
    def visual(self) -> Tensor:
        return self.image >= 0


def modality_entropy(probs: Tensor, layout: PatchLayout | None) -> Tensor:
    """Entropy potential [H, n]: visual keys over the attention restricted to visual keys, text
    keys over the attention restricted to text keys; over all keys when there is no image."""
    if layout is None:
        return entropy_potential(probs)
    visual = layout.visual
    return torch.where(visual, entropy_potential(probs, visual), entropy_potential(probs, ~visual))


def observation_statistics(
    q: Tensor,
    k: Tensor,
    scale: float,
    q_positions: Tensor,
    k_positions: Tensor,
    layout: PatchLayout | None,
) -> tuple[Tensor, Tensor]:
    """(α, H) [H, n]: the attention each key receives from the observation rows q [H, m, d]
    (`accumulated_attention`) and its entropy potential (`modality_entropy`), causal as in
    `attention_probs`. The definition; the CPU backend's kernel computes both without the
    probabilities
    (`engine.cpu_kernel.observation_statistics`)."""
    probs = attention_probs(q, k, scale, q_positions, k_positions)
    return accumulated_attention(probs), modality_entropy(probs, layout)


def _masked_pool1d(x: Tensor, mask: Tensor, kernel: int) -> Tensor:
    """Average of x over the masked tokens among each token's `kernel` slot neighbours."""
    weight = mask.float()
    return pool1d(x * weight, kernel) / pool1d(weight, kernel).clamp(min=1e-30)


def pool_scores(
    x: Tensor, layout: PatchLayout | None, kernel_1d: int, kernel_2d: int = 3
) -> Tensor:
    """Smooth per-token scores x [H, n]: 1-D over text tokens, 2-D over each image's patch grid.

    2-D pooling averages a patch with the present neighbours of its kernel_2d x kernel_2d grid
    window, so kept patches come in spatial clusters instead of scattered dots.
    """
    if layout is None:
        return pool1d(x, kernel_1d)
    x = x.float()
    visual = layout.visual
    pooled = torch.where(visual, 0.0, _masked_pool1d(x, ~visual, kernel_1d))
    heads = x.shape[0]
    for image, (rows, cols) in enumerate(layout.grids):
        mine = layout.image == image  # [H, n]
        if not mine.any():
            continue
        head, slot = mine.nonzero(as_tuple=True)
        cell = layout.row[head, slot] * cols + layout.col[head, slot]
        values = x.new_zeros(heads, rows * cols)
        present = x.new_zeros(heads, rows * cols)
        values[head, cell] = x[head, slot]
        present[head, cell] = 1.0
        window = dict(
            kernel_size=kernel_2d, stride=1, padding=kernel_2d // 2, count_include_pad=True
        )
        total = F.avg_pool2d(values.view(heads, 1, rows, cols), **window).view(heads, -1)
        count = F.avg_pool2d(present.view(heads, 1, rows, cols), **window).view(heads, -1)
        pooled[head, slot] = (total / count.clamp(min=1e-30))[head, cell]
    return pooled


def retention_score(
    alpha: Tensor,
    entropy: Tensor,
    lam: float,
    candidates: Tensor,
    pool_kernel: int,
    layout: PatchLayout | None = None,
) -> Tensor:
    """R = λ·α̂ + (1−λ)·Ĥ [H, n]; α̂, Ĥ are pooled (`pool_scores`) then divided by their max over
    candidates. -inf off candidates.

    alpha, entropy [H, n]; candidates bool [H, n] or [n] (tokens that may be folded: not sinks, not
    window).
    """
    alpha_hat = normalize_by_max(pool_scores(alpha, layout, pool_kernel), candidates)
    entropy_hat = normalize_by_max(pool_scores(entropy, layout, pool_kernel), candidates)
    score = lam * alpha_hat + (1.0 - lam) * entropy_hat
    return score.masked_fill(~candidates.expand_as(score), float("-inf"))


def select_topk(scores: Tensor, k: int) -> Tensor:
    """Keep mask [H, n] bool: the k highest finite scores of each head.

    Every head keeps the same count (a cache slot holds all heads, so equal counts let heads keep
    different
    tokens in the same slots); k is clamped to the smallest number of finite scores over heads.
    """
    k = max(0, min(k, int(torch.isfinite(scores).sum(-1).min())))
    keep = torch.zeros_like(scores, dtype=torch.bool)
    return keep.scatter_(-1, scores.topk(k, dim=-1).indices, True)


def gather_tokens(x: Tensor, index: Tensor, *, token_major: bool = False) -> Tensor:
    """x [H, n, d] -> [H, k, d]: head h's tokens index[h] (index [H, k] long), in that order.

    `x.gather(1, index[..., None].expand(-1, -1, d))` by definition; as one row lookup into x
    flattened to [H·n, d], which copies whole rows (6x faster on the CPU than gather, whose index
    is per element).  token_major=True gives the same values as a view of a contiguous [k, H, d]
    tensor, the order vLLM's cache write takes (no second copy to transpose).
    """
    heads, n, d = x.shape
    if x.stride(2) == 1 and x.stride(1) == d and x.stride(0) % d == 0:
        # A slice of whole rows (the cache read hands over its live span as one): its rows as
        # they lie in memory; reshape would first copy all of x.
        per_head = x.stride(0) // d
        flat = x.as_strided(((heads - 1) * per_head + n, d), (d, 1))
    else:
        per_head, flat = n, x.reshape(heads * n, d)
    rows = index + torch.arange(heads, device=index.device)[:, None] * per_head
    if token_major:
        return flat.index_select(0, rows.t().reshape(-1)).view(-1, heads, d).transpose(0, 1)
    return flat.index_select(0, rows.view(-1)).view(heads, -1, d)
