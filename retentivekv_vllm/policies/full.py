"""`full`: the plugin's machinery is active but nothing is ever compressed."""

import torch

from retentivekv_vllm.policies.base import KVPolicy, Observation, register_policy


@register_policy
class FullPolicy(KVPolicy):
    name = "full"
    compresses = False

    def score(self, obs: Observation) -> torch.Tensor:
        return torch.zeros_like(obs.candidates, dtype=torch.float32)
