"""`lookm` (LOOK-M): text-prior attention scores; each evicted token is merged into its most
similar kept token instead of being dropped.

Scoring: attention accumulated over the request (as H2O), with text tokens ranked above every
image token (LOOK-M's text prior), so images are compressed first. Merging (LOOK-M's averaged
merge): per KV head, each evicted key picks the kept key of highest cosine similarity, and
every kept token that received evicted tokens is replaced by the plain mean of itself and
them, keys and values alike. Keys are compared post-RoPE, as they sit in the cache.
"""

from __future__ import annotations

import torch

from retentivekv_vllm.policies.base import KVPolicy, Observation, register_policy


def merge_into_most_similar(
    keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [H, n, d], values [H, n, dv], kept [H, n] bool -> merged keys and values [H, n, ...].

    Evicted tokens (``~kept``) are averaged into the kept token whose key is the most
    cosine-similar; evicted rows of the result are left as they were (the caller drops them).
    """
    k, v = keys.float(), values.float()
    unit = torch.nn.functional.normalize(k, dim=-1)
    similarity = (unit @ unit.transpose(1, 2)).masked_fill(~kept[:, None, :], float("-inf"))
    target = similarity.argmax(-1)  # [H, n]: for every token, its most similar kept token
    # A kept token is its own target; evicted tokens point at a kept one.
    target = torch.where(kept, torch.arange(k.shape[1], device=k.device).expand_as(target), target)
    count = torch.zeros(kept.shape, device=k.device).scatter_add_(
        1, target, torch.ones_like(target, dtype=torch.float32)
    )

    def merge(x: torch.Tensor) -> torch.Tensor:
        summed = torch.zeros_like(x).scatter_add_(1, target[..., None].expand_as(x), x)
        return summed / count.clamp(min=1)[..., None]

    merged_k, merged_v = merge(k), merge(v)
    keep_rows = kept[..., None]
    return (
        torch.where(keep_rows, merged_k, k).to(keys.dtype),
        torch.where(keep_rows, merged_v, v).to(values.dtype),
    )


@register_policy
class LookMPolicy(KVPolicy):
    name = "lookm"

    def score(self, obs: Observation) -> torch.Tensor:
        scores = obs.accumulated.float()
        if obs.layout is None:
            return scores
        # Text prior: lift every text token above the best image token.
        lift = scores.masked_fill(~obs.candidates, 0.0).amax(-1, keepdim=True) + 1.0
        return torch.where(obs.layout.visual, scores, scores + lift)

    def merge(self, obs: Observation, kept: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
        return merge_into_most_similar(keys, values, kept)
