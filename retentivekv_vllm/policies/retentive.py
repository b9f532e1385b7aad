"""`retentive` (RetentiveKV): keep by attention + entropy, fold the rest into a state.

Text-only scoring for now: the entropy potential runs over all keys and every
folded token goes into the text state, in position order (oldest first).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from retentivekv_vllm.core import (
    FeatureMap,
    RecurrentState,
    absorption_from_attention,
    accumulated_attention,
    entropy_potential,
    fold,
    make_feature_map,
    normalize_by_max,
    retention_from_entropy,
    retention_score,
)
from retentivekv_vllm.policies.base import KVPolicy, Observation, register_policy


@register_policy
@dataclass
class RetentivePolicy(KVPolicy):
    name = "retentive"
    keeps_state = True
    _feature_maps: dict[tuple[int, float], FeatureMap] = field(
        default_factory=dict, init=False, repr=False
    )

    def feature_map(self, head_dim: int, scale: float) -> FeatureMap:
        key = (head_dim, scale)
        if key not in self._feature_maps:
            c = self.config
            self._feature_maps[key] = make_feature_map(
                c.feature_map, head_dim, c.state_rank, scale, c.seed
            )
        return self._feature_maps[key]

    def score(self, obs: Observation) -> torch.Tensor:
        c = self.config
        return retention_score(
            accumulated_attention(obs.probs),
            entropy_potential(obs.probs),
            c.lambda_,
            obs.candidates,
            c.pool_kernel,
        )

    def absorb(self, states, obs, folded, keys, values, scale):
        c = self.config
        num_heads, _, head_dim = keys.shape
        per_head = int(folded[0].sum())
        if per_head == 0:
            return states
        # The same number of tokens is folded in every head; gathering them in index
        # order folds oldest first, so recency decays like a causal scan.
        index = folded.nonzero()[:, 1].view(num_heads, per_head)
        take = lambda x: x.gather(1, index)  # noqa: E731
        alpha = accumulated_attention(obs.probs)
        entropy_hat = normalize_by_max(entropy_potential(obs.probs), obs.candidates)
        gamma = retention_from_entropy(take(entropy_hat), c.gamma0)
        absorption = absorption_from_attention(take(alpha), c.absorption_min, c.absorption_max)
        phi = self.feature_map(head_dim, scale)
        expand = index.unsqueeze(-1).expand(-1, -1, head_dim)
        k_folded = keys.float().gather(1, expand)
        v_folded = values.float().gather(1, expand)
        state = states[0] if states else RecurrentState.zeros(
            num_heads, phi.rank, values.shape[-1], device=keys.device
        )
        return [fold(state, phi.features(k_folded), v_folded, gamma, absorption)]
