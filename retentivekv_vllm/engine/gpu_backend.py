"""The GPU attention backend with a KV policy: vLLM's Triton attention trio, extended.

Registered for ``--attention-backend CUSTOM`` (``patches.py``), which ``--kv-policy`` selects on
a CUDA platform when no backend is named. Like the CPU backend (``cpu_backend.py``), its builder
plans each step through the worker (``worker.WorkerState.plan``), its layers keep their memory
in the request memories (on the GPU) and compression is the executor's (``executor.compress``).
What is its own is the access to the paged cache, through the project's Triton kernels:

* vLLM's unified Triton attention runs over the whole batch first (exact for requests with
  nothing folded);
* decode rows of requests with folded tokens are recomputed in one ``decode_attention`` launch
  over their live slots, with their states read out and merged in the kernel;
* other rows of such requests (a prompt chunk after a fold, or states whose feature map has no
  kernel) read their live slots with ``gather_slots`` and attend in torch
  (``executor.attend_live``), merged with the states by the CUDA extension's
  ``merge_with_state`` where it is built;
* a compression reads the live slots with ``gather_slots``, scores them with
  ``observation_scores`` and writes the packed tokens back with ``write_slots`` (``PagedSlots``).

Not yet run on a GPU: its kernels are tested under Triton's interpreter only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadata,
    TritonAttentionMetadataBuilder,
)

from retentivekv_vllm.engine.executor import RequestPlan, attend_live, layer_index
from retentivekv_vllm.engine.slots import Slots
from retentivekv_vllm.engine.worker import WORKER
from retentivekv_vllm.kernels import (
    PagedStates,
    decode_attention,
    gather_slots,
    merge_with_state,
    observation_scores,
    split_kv_cache,
    supports_feature_map,
    write_slots,
)


@dataclass
class RetentiveTritonMetadata(TritonAttentionMetadata):
    plans: list[RequestPlan] = dataclasses.field(default_factory=list)


class RetentiveTritonMetadataBuilder(TritonAttentionMetadataBuilder):
    # Plans are made on the host every step and the impl loops over requests, which a full
    # CUDA graph cannot capture; piecewise graphs run attention eagerly and still work.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.policy = WORKER.load_builder(kv_cache_spec, len(layer_names), vllm_config)

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        if self.policy is None:
            return metadata
        fields = {f.name: getattr(metadata, f.name) for f in dataclasses.fields(metadata)}
        plans = WORKER.plan(self.policy, common_attn_metadata, self.kv_cache_spec.block_size)
        return RetentiveTritonMetadata(**fields, plans=plans)


class PagedSlots(Slots):
    """One request's slots [start, end) in this layer's paged GPU cache, read, scored and written
    by the project's Triton kernels."""

    def __init__(self, key_cache, value_cache, block_row, start: int, end: int):
        self.key_cache, self.value_cache = key_cache, value_cache
        self.dtype = key_cache.dtype
        self.block_table = block_row[None]
        self.start, self.end = start, end
        self._tokens: tuple[torch.Tensor, torch.Tensor] | None = None

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the slots, [Hkv, end - start, d] float32 (read once a step)."""
        if self._tokens is None:
            heads, device = self.key_cache.shape[2], self.key_cache.device
            slots = torch.arange(self.start, self.end, device=device).expand(heads, -1)[None]
            count = torch.tensor([self.end - self.start], device=device)
            caches = self.key_cache, self.value_cache
            keys, values = gather_slots(*caches, self.block_table, slots, count)
            self._tokens = keys[0].float(), values[0].float()
        return self._tokens

    def observe(self, queries, keys, scale, q_positions, positions, layout):
        """α and H from `observation_scores` over the paged keys; an image request's entropy is
        per modality, which the kernel does not split, so it is scored in torch."""
        if layout is not None:
            return super().observe(queries, keys, scale, q_positions, positions, layout)
        # The grouped rows [Hkv, g·T, d] passed as g·T tokens of Hkv query heads: each KV head
        # reads the same rows either way, and α and H are sums over rows.
        rows, device = queries.shape[1], keys.device
        alpha, entropy = observation_scores(
            queries.transpose(0, 1),
            torch.tensor([0, rows], device=device),
            q_positions,
            self.key_cache,
            self.block_table,
            torch.tensor([self.start], device=device),
            torch.tensor([self.end], device=device),
            scale,
            key_positions=positions[None],
        )
        return None, (alpha[0], entropy[0])

    def write(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite slots [start, start + m) with [Hkv, m, d] keys and values."""
        device = self.key_cache.device
        write_slots(
            self.key_cache,
            self.value_cache,
            self.block_table,
            keys[None],
            values[None],
            torch.tensor([start], device=device),
            torch.tensor([keys.shape[1]], device=device),
        )
        self._tokens = None


class RetentiveTritonAttentionImpl(TritonAttentionImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.policy = WORKER.load_layer(self, sliding_window=self.sliding_window != (-1, -1))

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        output = super().forward(
            layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs
        )
        plans = getattr(attn_metadata, "plans", None)
        if not plans or self.attn_type != AttentionType.DECODER:
            return output
        caches = split_kv_cache(kv_cache, self.head_size)
        rows = output.view(output.shape[0], self.num_heads, self.head_size)
        block_table = attn_metadata.block_table
        index = layer_index(layer.layer_name)
        decoded = self._decode(layer, index, plans, query, caches, block_table, rows)
        for plan in plans:
            attended = plan.row in decoded
            self._run_plan(layer, index, plan, query, caches, block_table, rows, attended)
        return output

    def _decode(self, layer, index: int, plans, query, caches, block_table, rows) -> set[int]:
        """Recompute the decode rows of requests with folded tokens with `decode_attention`, one
        launch per feature map their states are read with (one, unless requests chose their own
        policies); returns the batch rows served. Requests whose feature map has no kernel are
        left to `_run_plan`."""
        groups: dict[int, tuple] = {}
        for plan in plans:
            if not (plan.recomputed and plan.decodes):
                continue
            memory = plan.memory.layer(
                layer.layer_name, self.num_kv_heads, plan.seq_len, query.device
            )
            feature_map = None
            if memory.states:
                feature_map = plan.policy.feature_map(self.head_size, self.scale, index)
            if feature_map is None or supports_feature_map(feature_map):
                groups.setdefault(id(feature_map), (feature_map, []))[1].append((plan, memory))
        for feature_map, members in groups.values():
            self._decode_group(feature_map, members, query, caches, block_table, rows)
        return {plan.row for _, members in groups.values() for plan, _ in members}

    def _decode_group(self, feature_map, members, query, caches, block_table, rows) -> None:
        device = query.device
        plans = [plan for plan, _ in members]
        states = None
        if feature_map is not None:
            states = PagedStates.of([memory.states for _, memory in members])
        tokens = torch.tensor([p.query_start for p in plans], device=device)
        out, _ = decode_attention(
            query[tokens],
            *caches,
            block_table[torch.tensor([p.row for p in plans], device=device)],
            torch.tensor([p.live_start for p in plans], device=device),
            torch.tensor([p.seq_len for p in plans], device=device),
            self.scale,
            states,
            feature_map,
        )
        rows[tokens] = out.to(rows.dtype)

    def _run_plan(
        self, layer, index: int, plan: RequestPlan, query, caches, block_table, rows, attended: bool
    ) -> None:
        """One request's rows that `_decode` did not recompute, and its compression."""
        n = plan.seq_len
        q = query[plan.query_start : plan.query_end].float()
        memory = plan.memory.layer(layer.layer_name, self.num_kv_heads, n, q.device)
        attend = plan.recomputed and not attended
        slots = PagedSlots(*caches, block_table[plan.row], plan.live_start, n)
        if attend:
            out = attend_live(plan, memory, q, slots, self.scale, index, merge_with_state)
            rows[plan.query_start : plan.query_end] = out.to(rows.dtype)
        window = plan.policy.config.observation_window
        memory.remember_queries(q[-window:].clone(), n - min(window, q.shape[0]), window)
        if plan.compress:
            WORKER.compress(plan, memory, slots, self.scale, index)


class RetentiveTritonAttentionBackend(TritonAttentionBackend):
    """TRITON_ATTN with KV policies, registered as CUSTOM."""

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @classmethod
    def customize_spec(cls, spec):
        return WORKER.kv_cache_spec(super().customize_spec(spec))

    @staticmethod
    def get_impl_cls():
        return RetentiveTritonAttentionImpl

    @staticmethod
    def get_builder_cls():
        return RetentiveTritonMetadataBuilder
