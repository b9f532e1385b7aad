"""`expected_attention` (kvpress's ExpectedAttentionPress): keep the tokens that the next queries
are expected to attend to most.

kvpress (0.5.x) models the queries of the next `FUTURE_POSITIONS` tokens as Gaussian: the mean µ
and covariance Σ of the prompt's queries before RoPE, rotated by RoPE's rotation averaged over
those positions (R). A query q ~ N(Rµ, RΣRᵀ) gives E[exp(s q·k)] = exp(s (Rµ)·k + s² kᵀRΣRᵀk / 2),
so per query head, over the cached keys k_j (as cached, after RoPE),

    score_j = softmax_j( s (Rµ)·k_j + s² k_jᵀ (RΣRᵀ) k_j / 2 ) · ‖v_j‖

averaged over the query heads that read the KV head (GQA), s the attention scale (kvpress's
1/√d). Here, against kvpress:

* µ and Σ come from the observation window's queries (the last ``--kv-observation-window``, 32 by
  default), the only queries the engine keeps (``LayerMemory.observation_queries``), not from
  every prompt query after the first 4. Σ of 32 queries has rank at most 31: a noisier,
  recency-weighted estimate than kvpress's over the whole prompt. The window's queries are held
  after RoPE; they are de-rotated at their positions (``core.derotate``) to the pre-RoPE queries
  kvpress computes from the hidden states.
* The future positions start at the current length (the newest query's position + 1): the
  prompt's length at the compression after prefill, as kvpress's; a later compression (a long
  prompt's next chunk, decoding) averages over the positions after it.
* The softmax runs over the live tokens but the first ``--kv-sinks`` positions (kvpress drops its
  first n_sink = 4 tokens); the engine keeps sinks and the recent window itself, so kvpress's
  padding of the sinks with the maximum score is not needed.
* s is the layer's attention scale, which is 1/√d for Llama-family models.

RoPE must be the plain rotate-half kind (Llama-family and vLLM's neox style) whose frequencies
the model's config gives; ``core.feature_maps.rotary_frequencies_from_config`` refuses any
other.
"""

from __future__ import annotations

import torch

from retentivekv_vllm.core.feature_maps import derotate
from retentivekv_vllm.policies.base import KVPolicy, Observation, register_policy

FUTURE_POSITIONS = 512  # kvpress's n_future_positions


def averaged_rotation(inv_freq: torch.Tensor, start: int, count: int, dim: int) -> torch.Tensor:
    """[dim, dim] RoPE's rotation (rotate-half) averaged over positions start .. start + count - 1:
    kvpress's mean of cos·I + sin·P; the dims past the rotated ones are left as they are."""
    half = inv_freq.shape[0]
    angles = torch.arange(start, start + count, dtype=torch.float64)[:, None] * inv_freq.double()
    cos, sin = angles.cos().mean(0), angles.sin().mean(0)
    first, second = torch.arange(half), torch.arange(half, 2 * half)
    rotation = torch.eye(dim, dtype=torch.float64)
    rotation[first, first] = cos
    rotation[second, second] = cos
    rotation[first, second] = -sin
    rotation[second, first] = sin
    return rotation.float()


@register_policy
class ExpectedAttentionPolicy(KVPolicy):
    name = "expected_attention"
    needs_rotary = True

    def score(self, obs: Observation) -> torch.Tensor:
        flag = "--kv-policy expected_attention"
        if obs.queries is None or obs.query_positions is None or obs.values is None:
            raise ValueError(
                f"{flag} scores the cached keys and values by the observation window's queries; "
                "this Observation lacks some of them"
            )
        if obs.keys is None:
            raise ValueError(f"{flag} scores the cached keys; this Observation has none")
        if self.rotary is None:
            raise ValueError(f"{flag} needs the model's rotary frequencies; this policy has none")
        keys = obs.keys.float()
        heads, n, dim = keys.shape
        queries = obs.queries.float()  # [m, Hq, d] after RoPE
        group = queries.shape[1] // heads
        inv_freq = torch.tensor(self.rotary, dtype=torch.float32)
        pre_rope = derotate(queries, obs.query_positions[:, None], inv_freq)
        mean = pre_rope.mean(0)  # [Hq, d]
        centred = pre_rope - mean
        cov = torch.einsum("mhd,mhe->hde", centred, centred) / pre_rope.shape[0]
        start = int(obs.query_positions[-1]) + 1  # the current length
        rotation = averaged_rotation(inv_freq, start, FUTURE_POSITIONS, dim).to(keys.device)
        mean = mean @ rotation.T
        cov = rotation @ cov @ rotation.T
        scale = obs.scale if obs.scale is not None else dim**-0.5
        # Query head h reads KV head h // group (as `executor.group_queries`).
        mean = mean.view(heads, group, dim)
        cov = cov.view(heads, group, dim, dim)
        logits = scale * torch.einsum("knd,kgd->kgn", keys, mean)
        for g in range(group):  # one [Hkv, n, d] product at a time, not [Hq, n, d]
            quadratic = ((keys @ cov[:, g]) * keys).sum(-1)
            logits[:, g] += scale**2 * quadratic / 2
        sinks = (obs.positions < self.config.sinks)[:, None]
        probs = logits.masked_fill(sinks, float("-inf")).softmax(-1).mean(1)
        return probs * obs.values.float().norm(dim=-1)
