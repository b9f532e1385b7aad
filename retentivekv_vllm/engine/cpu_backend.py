"""The CPU attention backend with a KV policy: vLLM's CPU_ATTN trio, extended.

Registered in place of CPU_ATTN (the CPU platform ignores --attention-backend), so it is a
pass-through whenever no policy is configured. With a policy:

* the builder plans, once per step and request, which cache slots are live and how many tokens
  the request has folded after the step (``budget.folded_after_step``, the rule the scheduler's
  KV manager applies too);
* the impl runs vLLM's C++ kernel for the requests with nothing folded (exact for them; the
  others are left out of its call) and computes the rows of requests with folded tokens itself:
  all decoding requests of the step in one batch, attended over their live blocks as stored and
  merged with their states by the C++ kernels of `cpu_kernel`; a prefill chunk per request, in
  torch's fused CPU attention;
* then it compresses the requests over budget (``executor.compress``): each head's kept tokens
  are packed, in position order, into the slots right below the newest token, so the folded
  ones are always a request's oldest slots and the KV manager frees their blocks.
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

from retentivekv_vllm.core import RecurrentState, merge_with_state_readouts
from retentivekv_vllm.engine.cpu_kernel import decode_extension, merge_state_readouts
from retentivekv_vllm.engine.cpu_layout import DecodeBatch, RequestSlots
from retentivekv_vllm.engine.executor import RequestPlan, attend_live, layer_index
from retentivekv_vllm.engine.worker import WORKER


@dataclass
class RetentiveCPUMetadata(CPUAttentionMetadata):
    plans: list[RequestPlan] = dataclasses.field(default_factory=list)
    # Every request's block-table row (`block_table` holds only those vLLM's kernel attends).
    request_block_table: torch.Tensor | None = None
    # The query rows vLLM's C++ kernel computes (the requests with nothing folded), when some
    # requests' rows are recomputed; None when it computes every row of the step.
    kernel_rows: torch.Tensor | None = None
    # The recomputed requests that decode one token (their plans, in order), batched.
    decode_plans: list[RequestPlan] = dataclasses.field(default_factory=list)
    decode_batch: DecodeBatch | None = None


class RetentiveCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.policy = WORKER.load_builder(kv_cache_spec, len(layer_names), vllm_config)

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        if self.policy is None:
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        plans = WORKER.plan(self.policy, common_attn_metadata, self.kv_cache_spec.block_size)
        block_table = common_attn_metadata.block_table_tensor  # every request's row, for the plans
        recomputed = {plan.row for plan in plans if plan.recomputed}
        kept = [row for row in range(common_attn_metadata.num_reqs) if row not in recomputed]
        kernel_rows, kernel_metadata = None, common_attn_metadata
        if recomputed:
            kernel_rows = torch.zeros(0, dtype=torch.long)
            if kept:
                kernel_metadata, kernel_rows = self._subset(common_attn_metadata, kept)
        metadata = super().build(common_prefix_len, kernel_metadata, fast_build)
        fields = {f.name: getattr(metadata, f.name) for f in dataclasses.fields(metadata)}
        decode_plans = [plan for plan in plans if plan.recomputed and plan.decodes]
        decode_batch = None
        if decode_plans:
            decode_batch = DecodeBatch(
                [plan.query_start for plan in decode_plans],
                block_table[[plan.row for plan in decode_plans]],
                [plan.live_start for plan in decode_plans],
                [plan.seq_len for plan in decode_plans],
                self.kv_cache_spec.block_size,
            )
        return RetentiveCPUMetadata(
            **fields,
            plans=plans,
            request_block_table=block_table,
            kernel_rows=kernel_rows,
            decode_plans=decode_plans,
            decode_batch=decode_batch,
        )

    @staticmethod
    def _subset(cm, rows: list[int]):
        """The common metadata of the requests `rows` only, as vLLM's kernel is to see them, and the
        step's query rows they own: the recomputed requests are left out of vLLM's kernel call
        instead of having it attend their chunk causally for rows the torch path replaces (about
        as much work as the chunk's own attention). Only the fields CPU_ATTN's builder reads are
        narrowed; the cache write uses the forward context's slot mapping, not this metadata."""
        starts = cm.query_start_loc_cpu.tolist()
        lengths = [starts[r + 1] - starts[r] for r in rows]
        token_rows = torch.cat([torch.arange(starts[r], starts[r + 1]) for r in rows])
        query_start_loc = torch.zeros(len(rows) + 1, dtype=cm.query_start_loc_cpu.dtype)
        query_start_loc[1:] = torch.tensor(lengths).cumsum(0)
        index = torch.tensor(rows)
        seq_lens = cm.seq_lens[index]
        narrowed = dataclasses.replace(
            cm,
            query_start_loc=query_start_loc.to(cm.query_start_loc.device),
            query_start_loc_cpu=query_start_loc,
            seq_lens=seq_lens,
            num_reqs=len(rows),
            num_actual_tokens=len(token_rows),
            max_query_len=max(lengths),
            max_seq_len=int(seq_lens.max()),
            block_table_tensor=cm.block_table_tensor[index],
            slot_mapping=cm.slot_mapping[token_rows],
        )
        return narrowed, token_rows


class RetentiveCPUAttentionImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.policy = WORKER.load_layer(self, sliding_window=self.sliding_window != -1)
        if self.policy is not None and self.policy.compresses:
            decode_extension()  # built (or loaded from its cache) at start-up, not in a request

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        kernel_rows = getattr(attn_metadata, "kernel_rows", None)
        if kernel_rows is None:
            output = super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs
            )
        elif len(kernel_rows):
            # vLLM's kernel over the requests with nothing folded, on their rows gathered in order.
            flat = output.view(output.shape[0], -1)
            computed = super().forward(
                layer,
                query[kernel_rows],
                key,
                value,
                kv_cache,
                attn_metadata,
                flat.new_empty(len(kernel_rows), flat.shape[1]),
                *args,
                **kwargs,
            )
            flat[kernel_rows] = computed.view(len(kernel_rows), -1)
        plans = getattr(attn_metadata, "plans", None)
        if not plans or self.attn_type != AttentionType.DECODER:
            return output
        rows = output.view(output.shape[0], self.num_heads, self.head_size)
        if attn_metadata.decode_batch is not None:
            self._decode(
                layer, attn_metadata.decode_plans, attn_metadata.decode_batch, query, kv_cache, rows
            )
        for plan in plans:
            self._run_plan(layer, plan, query, kv_cache, attn_metadata.request_block_table, rows)
        return output

    def _decode(
        self, layer, plans: list[RequestPlan], batch: DecodeBatch, query, kv_cache, rows
    ) -> None:
        """The rows of every recomputed request that decodes: attention over the live blocks in one
        batch, merged with each request's states (one batch per policy and number of states)."""
        # A fresh tensor (advanced indexing copies): each request remembers its row as a view.
        rows_q = query[batch.query_rows].float()
        q = rows_q.view(len(plans), self.num_kv_heads, self.num_queries_per_kv, -1)
        out, lse = batch.attend(kv_cache, q, self.scale, layer.isa)
        groups: dict[tuple[int, int], list[int]] = {}
        memories = [
            plan.memory.layer(layer.layer_name, self.num_kv_heads, plan.seq_len) for plan in plans
        ]
        for i, (plan, memory) in enumerate(zip(plans, memories)):
            memory.remember_queries(
                rows_q[i : i + 1], plan.seq_len - 1, plan.policy.config.observation_window
            )
            if memory.states:
                groups.setdefault((id(plan.policy), len(memory.states)), []).append(i)
        in_kernel = decode_extension().module is not None
        for members in groups.values():
            states = [memories[i].states for i in members]
            feature_map = plans[members[0]].policy.feature_map(
                self.head_size, self.scale, layer_index(layer.layer_name)
            )
            rows_of = torch.tensor(members)
            # Each member's query sits at its newest position (for maps that read positions).
            positions = torch.tensor([plans[i].seq_len - 1 for i in members])[:, None, None]
            if in_kernel:  # reads each state where it is; no stacked copy
                log_phi = feature_map.query_log_features(q[rows_of], positions)
                merge_state_readouts(out, lse, log_phi, rows_of, states)
                continue
            pick = slice(None) if len(members) == len(plans) else rows_of
            stacked = [RecurrentState.stack([s[k] for s in states]) for k in range(len(states[0]))]
            out[pick] = merge_with_state_readouts(
                out[pick], lse[pick], q[pick], stacked, feature_map, q_positions=positions
            )
        # [R, Hkv, g, dv] -> [R, Hq, dv]
        rows[batch.query_rows] = out.view(len(plans), self.num_heads, -1).to(rows.dtype)

    def _run_plan(self, layer, plan: RequestPlan, query, kv_cache, block_table, rows) -> None:
        n = plan.seq_len
        memory = plan.memory.layer(layer.layer_name, self.num_kv_heads, n)
        if not (plan.recomputed and plan.decodes):  # else attended, query remembered: `_decode`
            q = query[plan.query_start : plan.query_end].float()
            window = plan.policy.config.observation_window
            memory.remember_queries(q[-window:].clone(), n - min(window, q.shape[0]), window)
        chunk = plan.recomputed and not plan.decodes
        if not (chunk or plan.compress):
            return
        slots = RequestSlots(kv_cache, block_table[plan.row], plan.live_start, n, layer.isa)
        index = layer_index(layer.layer_name)
        if chunk:
            out = attend_live(plan, memory, q, slots, self.scale, index)
            rows[plan.query_start : plan.query_end] = out.to(rows.dtype)
        if plan.compress:
            WORKER.compress(plan, memory, slots, self.scale, index)


class RetentiveCPUAttentionBackend(CPUAttentionBackend):
    """CPU_ATTN with KV policies; same name, so vLLM's enum lookups are unchanged."""

    @classmethod
    def customize_spec(cls, spec):
        return WORKER.kv_cache_spec(super().customize_spec(spec))

    @staticmethod
    def get_impl_cls():
        return RetentiveCPUAttentionImpl

    @staticmethod
    def get_builder_cls():
        return RetentiveCPUMetadataBuilder
