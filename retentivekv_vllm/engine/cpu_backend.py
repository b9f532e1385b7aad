"""The CPU attention backend with a KV policy: vLLM's CPU_ATTN trio, extended.

Registered in place of CPU_ATTN (the CPU platform ignores --attention-backend), so it
is a pass-through whenever no policy is configured.  With a policy:

* the builder plans, once per step and request, which cache slots are live and how
  many tokens the request has folded after the step (``budget.folded_after_step``,
  the rule the scheduler's KV manager applies too);
* the impl runs vLLM's C++ kernel for the requests with nothing folded (exact for
  them; the others are left out of its call), computes the rows of requests with
  folded tokens itself (attention over the live blocks with
  its log-sum-exp, state readout, merge: all decoding requests of the step in one
  batch, read from the blocks as stored and merged with the states where they are, by
  the C++ kernels of `cpu_kernel`; a prefill
  chunk per request, in torch's fused CPU attention), then
  compresses the requests over budget: each head's kept tokens are packed, in
  position order, into the slots right below the newest token, so the folded ones
  are always a request's oldest slots and the KV manager frees their blocks.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
from vllm.v1.attention.backend import AttentionType
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from retentivekv_vllm.core import (
    RecurrentState,
    accumulated_attention,
    attention_probs,
    compressed_attention,
    gather_tokens,
    merge_with_state_readouts,
)
from retentivekv_vllm.engine import batch
from retentivekv_vllm.budget import folded_after_step
from retentivekv_vllm.engine.cpu_kernel import decode_extension, merge_state_readouts, observation_statistics
from retentivekv_vllm.engine.cpu_layout import DecodeBatch, RequestSlots
from retentivekv_vllm.engine.memory import REGISTRY, LayerMemory, RequestMemory, log_memory_plan, logger
from retentivekv_vllm.engine.patches import install_runner_hooks, install_worker_hooks
from retentivekv_vllm.engine.settings import (
    loaded_policy,
    policy_from_vllm_config,
    record_loaded_policy,
    refuse_unsupported_layer,
    request_policy,
)
from retentivekv_vllm.policies import KVPolicy, Observation


@dataclass
class RequestPlan:
    """What every layer does for one request in this step."""

    memory: RequestMemory
    policy: KVPolicy  # the request's own (vllm_xargs.kv_policy / kv_budget) or the server's
    row: int
    query_start: int
    query_end: int
    seq_len: int
    live_start: int  # tokens folded before this step: live slots are [live_start, seq_len)
    fold_to: int  # tokens folded after this step
    sinks: int
    window: int

    @property
    def compress(self) -> bool:
        return self.fold_to != self.live_start

    @property
    def recomputed(self) -> bool:
        """Its rows are computed in torch: it has folded tokens."""
        return self.live_start > 0

    @property
    def decodes(self) -> bool:
        return self.query_end - self.query_start == 1

    @property
    def budget(self) -> int:
        return self.seq_len - self.fold_to


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


def plan_request(
    policy: KVPolicy, memory: RequestMemory, row: int, start: int, end: int, seq_len: int, block_size: int
) -> RequestPlan:
    c = policy.config
    sinks = min(c.sinks, memory.budget)
    plan = RequestPlan(
        memory=memory,
        policy=policy,
        row=row,
        query_start=start,
        query_end=end,
        seq_len=seq_len,
        live_start=memory.num_folded,
        fold_to=folded_after_step(
            c, memory.num_prompt_tokens, memory.num_folded, seq_len - (end - start), seq_len, block_size
        ),
        sinks=sinks,
        window=min(c.window, memory.budget - sinks),
    )
    memory.num_cached = seq_len
    if plan.compress:
        memory.num_folded = plan.fold_to
        memory.num_compressions += 1
        memory.kept_after_compression = max(memory.kept_after_compression, plan.budget)
    return plan


def request_token_layout(view: batch.BatchView, req_id: str, num_prompt_tokens: int):
    """Where the request's image tokens sit, from the runner's multimodal features; None for a
    text-only request, and for inputs the policy cannot place (scored as text, with a warning)."""
    state = view.requests.get(req_id)
    features = getattr(state, "mm_features", None)
    if not features:
        return None
    from retentivekv_vllm.multimodal import UnsupportedMultimodalInput, layout_from_mm_features

    try:
        return layout_from_mm_features(features, view.hf_config, num_prompt_tokens)
    except UnsupportedMultimodalInput as error:
        logger.warning("retentivekv: request %s is scored as text only: %s", req_id, error)
        return None


class RetentiveCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.policy = policy_from_vllm_config(vllm_config)
        if self.policy is not None:
            install_runner_hooks()
            log_memory_plan(self.policy, kv_cache_spec, len(layer_names), vllm_config)

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        if self.policy is None:
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        plans = self._plan(common_attn_metadata)
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
            decode_batch = DecodeBatch.plan(
                [plan.query_start for plan in decode_plans],
                block_table[[plan.row for plan in decode_plans]],
                [plan.live_start for plan in decode_plans],
                [plan.seq_len for plan in decode_plans],
                self.kv_cache_spec.block_size,
            )
        return RetentiveCPUMetadata(
            **fields, plans=plans, request_block_table=block_table, kernel_rows=kernel_rows,
            decode_plans=decode_plans, decode_batch=decode_batch,
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
            policy = request_policy(self.policy, view.requests.get(req_id))
            memory = REGISTRY.live.get(req_id) or REGISTRY.get_or_create(
                req_id, num_prompt, policy.config.budget_tokens(num_prompt),
                request_token_layout(view, req_id, num_prompt),
            )
            plans.append(plan_request(policy, memory, row, start, end, seq_len, self.kv_cache_spec.block_size))
        return plans


def layer_policy(impl, sliding_window: bool) -> KVPolicy | None:
    """The policy of the model whose attention layer `impl` (vLLM's impl, just built under the
    model's config) computes: recorded for the KV-cache spec, with the worker's hooks installed;
    a layer the policy cannot serve is refused."""
    from vllm.config import get_current_vllm_config

    vllm_config = get_current_vllm_config()
    policy = policy_from_vllm_config(vllm_config)
    record_loaded_policy(policy, vllm_config)
    if policy is not None:
        install_worker_hooks()
    refuse_unsupported_layer(
        policy,
        impl.attn_type,
        sliding_window=sliding_window,
        alibi=impl.alibi_slopes is not None,
        soft_cap=bool(impl.logits_soft_cap),
        sinks=impl.sinks is not None,
    )
    return policy


class RetentiveCPUAttentionImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.policy = layer_policy(self, sliding_window=self.sliding_window != -1)
        if self.policy is not None and self.policy.compresses:
            decode_extension()  # built (or loaded from its cache) at start-up, not in a request

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        kernel_rows = getattr(attn_metadata, "kernel_rows", None)
        if kernel_rows is None:
            output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        elif len(kernel_rows):
            # vLLM's kernel over the requests with nothing folded, on their rows gathered in order.
            flat = output.view(output.shape[0], -1)
            computed = super().forward(
                layer, query[kernel_rows], key, value, kv_cache, attn_metadata,
                flat.new_empty(len(kernel_rows), flat.shape[1]), *args, **kwargs,
            )
            flat[kernel_rows] = computed.view(len(kernel_rows), -1)
        plans = getattr(attn_metadata, "plans", None)
        if not plans or self.attn_type != AttentionType.DECODER:
            return output
        rows = output.view(output.shape[0], self.num_heads, self.head_size)
        if attn_metadata.decode_batch is not None:
            self._decode(layer, attn_metadata.decode_plans, attn_metadata.decode_batch, query, kv_cache, rows)
        for plan in plans:
            self._run_plan(layer, plan, query, kv_cache, attn_metadata.request_block_table, rows)
        return output

    def _decode(self, layer, plans: list[RequestPlan], batch: DecodeBatch, query, kv_cache, rows) -> None:
        """The rows of every recomputed request that decodes: attention over the live blocks in one
        batch, merged with each request's states (one batch per policy and number of states)."""
        # A fresh tensor (advanced indexing copies): each request remembers its row as a view.
        rows_q = query[batch.query_rows].float()
        q = rows_q.view(len(plans), self.num_kv_heads, self.num_queries_per_kv, -1)
        out, lse = batch.attend(kv_cache, q, self.scale, layer.isa)
        groups: dict[tuple[int, int], list[int]] = {}
        memories = [plan.memory.layer(layer.layer_name, self.num_kv_heads, plan.seq_len) for plan in plans]
        for i, (plan, memory) in enumerate(zip(plans, memories)):
            memory.remember_queries(rows_q[i : i + 1], plan.seq_len - 1, plan.policy.config.observation_window)
            if memory.states:
                groups.setdefault((id(plan.policy), len(memory.states)), []).append(i)
        in_kernel = decode_extension().module is not None
        for members in groups.values():
            states = [memories[i].states for i in members]
            feature_map = plans[members[0]].policy.feature_map(self.head_size, self.scale)
            rows_of = torch.tensor(members)
            if in_kernel:  # reads each state where it is; no stacked copy
                merge_state_readouts(out, lse, feature_map.query_log_features(q[rows_of]), rows_of, states)
                continue
            pick = slice(None) if len(members) == len(plans) else rows_of
            stacked = [RecurrentState.stack([s[k] for s in states]) for k in range(len(states[0]))]
            out[pick] = merge_with_state_readouts(out[pick], lse[pick], q[pick], stacked, feature_map)
        # [R, Hkv, g, dv] -> [R, Hq, dv]
        rows[batch.query_rows] = out.view(len(plans), self.num_heads, -1).to(rows.dtype)

    def _run_plan(self, layer, plan: RequestPlan, query, kv_cache, block_table, rows) -> None:
        n = plan.seq_len
        memory = plan.memory.layer(layer.layer_name, self.num_kv_heads, n)
        batched = plan.recomputed and plan.decodes  # attended, and its query remembered, by `_decode`
        chunk = plan.recomputed and not plan.decodes
        if not batched:
            q = query[plan.query_start : plan.query_end].float()
            window = plan.policy.config.observation_window
            memory.remember_queries(q[-window:].clone(), n - min(window, q.shape[0]), window)
        if chunk or plan.compress:
            slots = RequestSlots(kv_cache, block_table[plan.row], plan.live_start, n, layer.isa)
        if chunk:
            out = self._attend_chunk(q, slots, memory, plan.policy)
            rows[plan.query_start : plan.query_end] = out.to(rows.dtype)
        if plan.compress:
            started = time.perf_counter()
            keys, values = slots.read()
            key_positions = memory.positions[:, plan.live_start : n]
            self._compress(plan, memory, slots, keys, values, key_positions)
            REGISTRY.compress_seconds += time.perf_counter() - started

    def _group(self, q: torch.Tensor) -> torch.Tensor:
        """[T, Hq, d] -> [Hkv, g*T, d]: query head h reads KV head h // g."""
        t, hq, d = q.shape
        return q.permute(1, 0, 2).reshape(self.num_kv_heads, (hq // self.num_kv_heads) * t, d)

    def _attend_chunk(self, q, slots: RequestSlots, memory: LayerMemory, policy):
        """Attention of a chunk's queries q [T, Hq, d] over the live slots, merged with the states."""
        grouped = self._group(q)
        out, lse = slots.attend_chunk(grouped, q.shape[0], self.scale)
        feature_map = policy.feature_map(self.head_size, self.scale) if memory.states else None
        out = merge_with_state_readouts(out, lse, grouped, memory.states, feature_map)
        # [Hkv, g*T, dv] -> [T, Hq, dv]
        return out.view(self.num_heads, q.shape[0], -1).permute(1, 0, 2)

    def _attend(self, q, q_positions, keys, values, key_positions, memory: LayerMemory, policy):
        """Attention over keys and values already read (the GPU backend's prefill rows)."""
        grouped = self._group(q)
        feature_map = policy.feature_map(self.head_size, self.scale) if memory.states else None
        out = compressed_attention(
            grouped, keys, values, self.scale, q_positions.repeat(self.num_queries_per_kv),
            key_positions, None, memory.states, feature_map,
        )
        # [Hkv, g*T, dv] -> [T, Hq, dv]
        return out.view(self.num_heads, q.shape[0], -1).permute(1, 0, 2)

    def _compress(self, plan: RequestPlan, memory: LayerMemory, slots, keys, values, positions):
        """Fold down to the budget and pack each head's kept tokens below the newest slot."""
        n, live = plan.seq_len, slice(plan.live_start, plan.seq_len)
        candidates = (positions >= plan.sinks) & (positions < n - plan.window)
        recent, recent_positions = memory.observation_queries(plan.policy.config.observation_window)
        queries = self._group(recent)
        q_positions = recent_positions.repeat(self.num_queries_per_kv)
        layout = plan.memory.patch_layout(positions)
        if keys.device.type == "cpu" and decode_extension().module is not None:
            probs = None
            statistics = observation_statistics(queries, keys, self.scale, q_positions, positions, layout)
            alpha = statistics[0]
        else:
            probs, statistics = attention_probs(queries, keys, self.scale, q_positions, positions), None
            alpha = accumulated_attention(probs)
        accumulated = memory.accumulated[:, live] + alpha
        obs = Observation(probs, positions, candidates, accumulated, layout, statistics, keys)
        keep_top = plan.budget - plan.sinks - plan.window
        kept = ~candidates | plan.policy.select(obs, keep_top)
        if obs.layout is not None:
            plan.memory.visual_slots_folded += int((obs.layout.visual & ~kept).sum())
        if plan.policy.keeps_state:
            memory.states = plan.policy.absorb(
                memory.states, obs, ~kept, keys, values, self.scale
            )
        # Merging policies (lookm) return the kept tokens' new keys and values; the rest as read.
        keys, values = self.policy.merge(obs, kept, keys, values)
        # Each head keeps the same number of tokens; nonzero() lists them in slot
        # order, which is position order.
        index = kept.nonzero()[:, 1].view(self.num_kv_heads, plan.budget)
        packed = slice(plan.fold_to, n)
        memory.positions[:, packed] = positions.gather(1, index)
        memory.accumulated[:, packed] = accumulated.gather(1, index)
        memory.accumulated[:, live.start : plan.fold_to] = 0.0
        slots.write(plan.fold_to, *(gather_tokens(x, index, token_major=True) for x in (keys, values)))


class RetentiveCPUAttentionBackend(CPUAttentionBackend):
    """CPU_ATTN with KV policies; same name, so vLLM's enum lookups are unchanged."""

    @classmethod
    def customize_spec(cls, spec):
        """Full attention under a compressing policy gets the spec whose KV manager
        frees the blocks of folded tokens."""
        spec = super().customize_spec(spec)
        loaded = loaded_policy()
        if loaded is None or not loaded.policy.compresses or type(spec) is not FullAttentionSpec:
            return spec
        from retentivekv_vllm.engine.kv_manager import RetentiveAttentionSpec

        return RetentiveAttentionSpec.from_full(spec, loaded.policy.config, loaded.max_step_tokens)

    @staticmethod
    def get_impl_cls():
        return RetentiveCPUAttentionImpl

    @staticmethod
    def get_builder_cls():
        return RetentiveCPUMetadataBuilder
