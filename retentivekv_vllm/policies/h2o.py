"""`h2o` (Heavy-Hitter Oracle): attention received so far, plus the recent window."""

import torch

from retentivekv_vllm.policies.base import KVPolicy, Observation, register_policy


@register_policy
class H2OPolicy(KVPolicy):
    name = "h2o"

    def score(self, obs: Observation) -> torch.Tensor:
        return obs.accumulated
