"""The CPU attention backend with a KV policy: vLLM's CPU_ATTN trio, extended.

Registered in place of CPU_ATTN (the CPU platform ignores --attention-backend), so it
is a pass-through whenever no policy is configured.  With a policy:

* the builder plans, once per step and request, whether attention must read the
  request's memory (something was folded before) and whether to compress after it;
* the impl runs vLLM's C++ kernel for the whole batch (exact for requests with
  nothing folded), recomputes the rows of requests with folded tokens in torch
  (attention over live tokens with its log-sum-exp, state readout, merge), then
  compresses the requests that the plan says are over budget.

Folding here is logical: folded tokens stay in their blocks but are hidden from
attention.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from retentivekv_vllm.core import accumulated_attention, attention_probs, compressed_attention
from retentivekv_vllm.engine import batch
from retentivekv_vllm.engine.cpu_layout import gather_request_kv
from retentivekv_vllm.engine.memory import REGISTRY, LayerMemory, RequestMemory
from retentivekv_vllm.engine.patches import install_runner_hooks
from retentivekv_vllm.engine.settings import policy_from_vllm_config
from retentivekv_vllm.policies import KVPolicy, Observation


@dataclass
class RequestPlan:
    """What one layer does for one request in this step (identical in every layer)."""

    memory: RequestMemory
    row: int
    query_start: int
    query_end: int
    seq_len: int
    attend_with_memory: bool  # tokens were folded before this step
    compress: bool  # fold down to the budget after attention
    sinks: int
    window: int
    keep_top: int  # candidates kept per head when compressing


@dataclass
class RetentiveCPUMetadata(CPUAttentionMetadata):
    plans: list[RequestPlan] = dataclasses.field(default_factory=list)


def plan_request(
    policy: KVPolicy, memory: RequestMemory, row: int, start: int, end: int, seq_len: int
) -> RequestPlan:
    c = policy.config
    budget = memory.budget
    sinks = min(c.sinks, budget)
    window = min(c.window, budget - sinks)
    prefilling = seq_len - (end - start) < memory.num_prompt_tokens
    live = seq_len - memory.num_folded
    allowance = budget if prefilling else budget + c.decode_interval
    plan = RequestPlan(
        memory=memory,
        row=row,
        query_start=start,
        query_end=end,
        seq_len=seq_len,
        attend_with_memory=memory.num_folded > 0,
        compress=policy.compresses and live > allowance,
        sinks=sinks,
        window=window,
        keep_top=budget - sinks - window,
    )
    memory.num_cached = seq_len
    if plan.compress:
        memory.num_folded = seq_len - budget
        memory.num_compressions += 1
        memory.kept_after_compression = max(memory.kept_after_compression, budget)
    return plan


class RetentiveCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.policy = policy_from_vllm_config(vllm_config)
        if self.policy is not None:
            install_runner_hooks()

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        if self.policy is None:
            return metadata
        fields = {f.name: getattr(metadata, f.name) for f in dataclasses.fields(metadata)}
        return RetentiveCPUMetadata(**fields, plans=self._plan(common_attn_metadata))

    def _plan(self, cm) -> list[RequestPlan]:
        view = batch.current()
        starts = cm.query_start_loc_cpu.tolist()
        seq_lens = cm.seq_lens.tolist()
        plans = []
        for row in range(min(cm.num_reqs, len(view.req_ids))):
            req_id = view.req_ids[row]
            start, end = starts[row], starts[row + 1]
            if req_id is None or end == start:
                continue
            seq_len = seq_lens[row]
            if seq_len == end - start:
                # A request's first step, or a preempted one recomputing its prompt.
                REGISTRY.restart(req_id)
            num_prompt = view.num_prompt_tokens[row]
            memory = REGISTRY.get_or_create(
                req_id, num_prompt, self.policy.config.budget_tokens(num_prompt)
            )
            plans.append(plan_request(self.policy, memory, row, start, end, seq_len))
        return plans


class RetentiveCPUAttentionImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from vllm.config import get_current_vllm_config

        self.policy = policy_from_vllm_config(get_current_vllm_config())
        if self.policy is not None and self.attn_type == AttentionType.DECODER:
            unsupported = {
                "sliding window": self.sliding_window != -1,
                "ALiBi": self.alibi_slopes is not None,
                "logits soft-capping": bool(self.logits_soft_cap),
                "attention sinks": self.sinks is not None,
            }
            found = [name for name, present in unsupported.items() if present]
            if found:
                raise ValueError(
                    f"--kv-policy {self.policy.name}: models with {', '.join(found)} "
                    "are not supported"
                )

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        output = super().forward(
            layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs
        )
        plans = getattr(attn_metadata, "plans", None)
        if not plans or self.attn_type != AttentionType.DECODER:
            return output
        rows = output.view(output.shape[0], self.num_heads, self.head_size)
        for plan in plans:
            self._run_plan(layer, plan, query, kv_cache, attn_metadata.block_table, rows)
        return output

    def _run_plan(self, layer, plan, query, kv_cache, block_table, rows) -> None:
        n = plan.seq_len
        q = query[plan.query_start : plan.query_end].float()
        positions = torch.arange(n - q.shape[0], n)
        memory = plan.memory.layer(layer.layer_name, self.num_kv_heads, n)
        keys = values = None
        if plan.attend_with_memory or plan.compress:
            keys, values = gather_request_kv(kv_cache, block_table[plan.row], n, layer.isa)
        if plan.attend_with_memory:
            out = self._attend(q, positions, keys, values, memory, n)
            rows[plan.query_start : plan.query_end] = out.to(rows.dtype)
        memory.remember_queries(q, positions, self.policy.config.observation_window)
        if plan.compress:
            self._compress(plan, memory, keys, values)

    def _group(self, q: torch.Tensor) -> torch.Tensor:
        """[T, Hq, d] -> [Hkv, g*T, d]: query head h reads KV head h // g."""
        t, hq, d = q.shape
        return q.permute(1, 0, 2).reshape(self.num_kv_heads, (hq // self.num_kv_heads) * t, d)

    def _attend(self, q, positions, keys, values, memory: LayerMemory, n: int) -> torch.Tensor:
        grouped = self._group(q)
        feature_map = (
            self.policy.feature_map(self.head_size, self.scale) if memory.states else None
        )
        out = compressed_attention(
            grouped,
            keys,
            values,
            self.scale,
            positions.repeat(self.num_queries_per_kv),
            torch.arange(n),
            memory.live[:, :n],
            memory.states,
            feature_map,
        )
        # [Hkv, g*T, dv] -> [T, Hq, dv]
        return out.view(self.num_heads, q.shape[0], -1).permute(1, 0, 2)

    def _compress(self, plan: RequestPlan, memory: LayerMemory, keys, values) -> None:
        n = plan.seq_len
        positions = torch.arange(n)
        live = memory.live[:, :n]
        candidates = live & (positions >= plan.sinks) & (positions < n - plan.window)
        queries = self._group(memory.recent_queries)
        q_positions = memory.recent_positions.repeat(self.num_queries_per_kv)
        probs = attention_probs(queries, keys, self.scale, q_positions, positions, live)
        memory.accumulated[:, :n] += accumulated_attention(probs)
        obs = Observation(probs, positions, candidates, memory.accumulated[:, :n])
        folded = candidates & ~self.policy.select(obs, plan.keep_top)
        if self.policy.keeps_state:
            memory.states = self.policy.absorb(memory.states, obs, folded, keys, values, self.scale)
        live &= ~folded
        memory.accumulated[:, :n].masked_fill_(folded, 0.0)


class RetentiveCPUAttentionBackend(CPUAttentionBackend):
    """CPU_ATTN with KV policies; same name, so vLLM's enum lookups are unchanged."""

    @staticmethod
    def get_impl_cls():
        return RetentiveCPUAttentionImpl

    @staticmethod
    def get_builder_cls():
        return RetentiveCPUMetadataBuilder
