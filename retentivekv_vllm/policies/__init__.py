"""KV policies behind a registry: one small file each."""

from retentivekv_vllm.policies.base import (
    POLICIES,
    KVPolicy,
    Observation,
    make_policy,
    register_policy,
)
from retentivekv_vllm.policies import full, h2o, lookm, retentive, snapkv, streaming  # noqa: F401  (registration)

__all__ = ["POLICIES", "KVPolicy", "Observation", "make_policy", "register_policy"]
