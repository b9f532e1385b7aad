"""`streaming` (StreamingLLM): attention sinks plus the most recent tokens."""

import torch

from retentivekv_vllm.policies.base import KVPolicy, Observation, register_policy


@register_policy
class StreamingPolicy(KVPolicy):
    name = "streaming"

    def score(self, obs: Observation) -> torch.Tensor:
        # Recency is the whole score, so the budget beyond sinks and window goes
        # to the tokens just before the window.
        return obs.positions.to(torch.float32).expand(obs.candidates.shape)
