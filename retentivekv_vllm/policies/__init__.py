"""KV policies behind a registry: one small file each."""

from retentivekv_vllm.policies import (  # noqa: F401  (registration)
    expected_attention,
    full,
    h2o,
    knorm,
    lookm,
    retentive,
    snapkv,
    streaming,
)
from retentivekv_vllm.policies.base import (
    POLICIES,
    KVPolicy,
    Observation,
    make_policy,
    register_policy,
)

__all__ = ["POLICIES", "KVPolicy", "Observation", "make_policy", "register_policy"]
