"""The scheduler side: a KV-cache spec and manager that free the blocks of folded tokens.

Folded tokens are always a request's oldest cache slots (the worker packs the kept
ones right after them), so freeing them is vLLM's own sliding-window mechanism:
the manager replaces the request's leading blocks with the null block and returns
them to the pool, and admission, allocation and preemption all see the compressed
size.  How many tokens are folded follows from the step sizes alone
(``budget.folded_after_step``), so this manager and the worker agree without a
message between them.

Importing this module registers the spec with vLLM's spec registry; the spec
travels from the worker to the engine core by pickling, which imports it there too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from retentivekv_vllm.budget import folded_after_step, peak_live_tokens
from retentivekv_vllm.config import KVPolicyConfig, request_config
from retentivekv_vllm.engine.patches import install_scheduler_hooks


@dataclass(frozen=True, kw_only=True)
class RetentiveAttentionSpec(FullAttentionSpec):
    """Full attention whose requests fold tokens under `kv_policy`."""

    kv_policy: KVPolicyConfig
    # Most tokens one step adds to a request's cache (vLLM's max_in_flight_tokens).
    max_step_tokens: int

    @classmethod
    def from_full(
        cls, spec: FullAttentionSpec, kv_policy: KVPolicyConfig, max_step_tokens: int
    ) -> RetentiveAttentionSpec:
        fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(FullAttentionSpec)}
        return cls(**fields, kv_policy=kv_policy, max_step_tokens=max_step_tokens)

    def peak_blocks(self, num_tokens: int, kv_policy: KVPolicyConfig | None = None) -> int:
        """Most blocks a request of num_tokens holds at once under kv_policy (the server's by
        default): its peak live slots span at most one block more than their count (the first
        may be part-folded)."""
        peak = peak_live_tokens(
            kv_policy or self.kv_policy, num_tokens, self.max_step_tokens, self.block_size
        )
        return min(cdiv(num_tokens, self.block_size), cdiv(peak, self.block_size) + 1)

    def max_memory_usage_bytes(self, vllm_config) -> int:
        # vLLM's start-up check that one max_model_len request fits the pool.
        return self.peak_blocks(vllm_config.model_config.max_model_len) * self.page_size_bytes

    @classmethod
    def merge(cls, specs: list[RetentiveAttentionSpec]) -> RetentiveAttentionSpec:
        settings = {(spec.kv_policy, spec.max_step_tokens) for spec in specs}
        assert len(settings) == 1, f"one KV policy per cache group, got {settings}"
        return cls.from_full(FullAttentionSpec.merge(specs), *settings.pop())


class RetentiveAttentionManager(FullAttentionManager):
    def __init__(self, kv_cache_spec: RetentiveAttentionSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.kv_policy = kv_cache_spec.kv_policy
        # request id -> (computed tokens at its last step boundary, tokens folded)
        self.progress: dict[str, tuple[int, int]] = {}
        # request id -> the settings it runs under (its own policy and budget, if it chose them)
        self.request_policies: dict[str, KVPolicyConfig] = {}
        install_scheduler_hooks()

    def note_request(self, request) -> None:
        """Called before each allocation for the request (scheduler hook in patches.py)."""
        if request.request_id not in self.request_policies:
            extra_args = request.sampling_params.extra_args if request.sampling_params else None
            self.request_policies[request.request_id] = request_config(self.kv_policy, extra_args)

    def policy_of(self, request_id: str) -> KVPolicyConfig:
        return self.request_policies.get(request_id, self.kv_policy)

    def num_folded(self, request_id: str) -> int:
        return self.progress.get(request_id, (0, 0))[1]

    def get_num_blocks_to_allocate(
        self, request_id: str, num_tokens: int, *args, apply_admission_cap: bool = False, **kwargs
    ) -> int:
        # Admission (vLLM's full-sequence check, scheduler_reserve_full_isl) asks whether the
        # whole request fits; a compressing request never holds more than its peak.
        if apply_admission_cap and request_id not in self.req_to_blocks:
            peak_blocks = self.kv_cache_spec.peak_blocks(num_tokens, self.policy_of(request_id))
            num_tokens = min(num_tokens, peak_blocks * self.block_size)
        return super().get_num_blocks_to_allocate(
            request_id, num_tokens, *args, apply_admission_cap=apply_admission_cap, **kwargs
        )

    def remove_skipped_blocks(
        self, request_id: str, processed_computed_tokens: int, num_prompt_tokens: int | None = None
    ) -> None:
        # Called before every allocation of a request; the computed count moves once
        # per finished step, which is exactly when the worker may have folded.
        computed, folded = self.progress.get(request_id, (0, 0))
        if processed_computed_tokens != computed and num_prompt_tokens is not None:
            folded = folded_after_step(
                self.policy_of(request_id),
                num_prompt_tokens,
                folded,
                computed,
                processed_computed_tokens,
                self.block_size,
            )
            self.progress[request_id] = (processed_computed_tokens, folded)
        blocks = self.req_to_blocks.get(request_id)
        if blocks:
            self._remove_blocks_in_range(request_id, 0, min(folded // self.block_size, len(blocks)))

    def free(self, request_id: str) -> None:
        # Also on preemption: a resumed request is noted again at its next allocation.
        self.progress.pop(request_id, None)
        self.request_policies.pop(request_id, None)
        super().free(request_id)


KVCacheSpecRegistry._ensure_registered()
KVCacheSpecRegistry.register(
    RetentiveAttentionSpec, RetentiveAttentionManager, uniform_type_base_spec=FullAttentionSpec
)
