"""Per-request compression state, owned by the worker process, outside vLLM's KV cache.

A RequestMemory is created the first step a request is scheduled and dropped when the
scheduler reports it finished or aborted (or preempted: a resumed request recomputes
its prompt from scratch, so its memory starts again too).  It holds, per attention
layer, which cached tokens are still live (not folded), the recurrent states, the
recent queries that score the cache, and the accumulated attention statistic.
"""

from __future__ import annotations

import logging
import weakref
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import torch

from retentivekv_vllm.budget import live_tokens_after_step
from retentivekv_vllm.core import PatchLayout, RecurrentState, storage_dtype

# A child of vLLM's logger, so lines appear in vLLM's log format and stream.
logger = logging.getLogger("vllm.retentivekv_vllm")

# Stats of finished requests are kept for inspection (tests, debugging), bounded.
FINISHED_STATS_KEPT = 1024
# The counters of `MemoryRegistry.metrics` (released requests plus live ones).
COUNTERS = (
    "requests_released_total",
    "compressions_total",
    "tokens_cached_total",
    "tokens_folded_total",
    "blocks_freed_total",
)


@dataclass
class LayerMemory:
    """One request in one layer.  Slot i of the request's cache holds the token at
    position ``positions[h, i]`` for head h: folding packs each head's kept tokens
    (in position order) into the slots right below the newest token, so the live
    slots are always ``[num_folded, seq_len)`` and slots at or above the last
    compression hold their own position."""

    positions: torch.Tensor  # [Hkv, capacity] long
    accumulated: torch.Tensor  # [Hkv, capacity] float32, H2O statistic per slot
    states: list[RecurrentState] = field(default_factory=list)
    # The queries of the last steps, newest last, trimmed to cover the observation window:
    # ([T, Hq, d] queries the caller will not overwrite, position of the first).  A deque, so that
    # remembering a decode step's query costs no tensor op.
    recent: deque[tuple[torch.Tensor, int]] = field(default_factory=deque)
    # Rows of `recent`, so trimming it is O(1) a step (not a sum over the window).
    recent_rows: int = 0

    @classmethod
    def empty(cls, num_kv_heads: int, capacity: int, device=None) -> LayerMemory:
        return cls(
            positions=torch.arange(capacity, device=device).expand(num_kv_heads, -1).clone(),
            accumulated=torch.zeros(num_kv_heads, capacity, device=device),
        )

    def ensure_capacity(self, n: int) -> None:
        """Grow the per-slot tensors geometrically; new slots hold their own position."""
        capacity = self.positions.shape[1]
        if n <= capacity:
            return
        grown = max(n, 2 * capacity)
        heads, device = self.positions.shape[0], self.positions.device
        positions = torch.arange(grown, device=device).expand(heads, -1).clone()
        positions[:, :capacity] = self.positions
        accumulated = torch.zeros(heads, grown, device=device)
        accumulated[:, :capacity] = self.accumulated
        self.positions, self.accumulated = positions, accumulated

    def remember_queries(self, queries: torch.Tensor, first_position: int, m: int) -> None:
        """Note a step's last queries [T, Hq, d] (T <= m; a tensor nobody overwrites: a copy, not
        the model's buffer) at positions first_position..; the last m queries are the observation
        window of the next compression."""
        self.recent.append((queries, first_position))
        self.recent_rows += queries.shape[0]
        while len(self.recent) > 1 and self.recent_rows - self.recent[0][0].shape[0] >= m:
            self.recent_rows -= self.recent.popleft()[0].shape[0]

    def observation_queries(self, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The last m queries remembered, [m', Hq, d] (m' <= m), and their positions [m']."""
        queries = torch.cat([q for q, _ in self.recent])[-m:]
        positions = torch.cat(
            [torch.arange(p, p + q.shape[0], device=q.device) for q, p in self.recent]
        )[-m:]
        return queries, positions

    @property
    def state_elements(self) -> int:
        return sum(s.num_elements for s in self.states)


@dataclass
class RequestMemory:
    req_id: str
    num_prompt_tokens: int
    budget: int
    layers: dict[str, LayerMemory] = field(default_factory=dict)
    # Tokens folded per KV head, equal in every layer and head; set when a step that
    # compressed has run in every layer (worker.WorkerState.commit).
    num_folded: int = 0
    num_cached: int = 0  # tokens written to the cache so far (folded ones included)
    num_compressions: int = 0
    kept_after_compression: int = 0  # the largest live count right after a compression
    # Where the prompt's image tokens sit (multimodal.TokenLayout); None for text only.
    token_layout: Any = None
    visual_slots_folded: int = 0  # image tokens folded, summed over layers and KV heads

    def patch_layout(self, positions: torch.Tensor) -> PatchLayout | None:
        """The layout of the cached tokens at positions [Hkv, n]; generated tokens are text."""
        layout = self.token_layout
        if layout is None:
            return None
        n = layout.image.shape[0]
        inside = positions < n
        at = positions.clamp(max=n - 1)
        pick = lambda x: torch.where(inside, x.to(positions.device)[at], -1)  # noqa: E731
        return PatchLayout(
            pick(layout.image), pick(layout.row), pick(layout.col), tuple(layout.grids)
        )

    def layer(self, name: str, num_kv_heads: int, n: int, device=None) -> LayerMemory:
        """The request's memory in layer `name`, created on `device` (the cache's) on first use."""
        memory = self.layers.get(name)
        if memory is None:
            memory = self.layers[name] = LayerMemory.empty(num_kv_heads, max(n, 64), device)
        memory.ensure_capacity(n)
        return memory

    @property
    def state_bytes(self) -> int:
        return sum(s.S.nbytes + s.z.nbytes for layer in self.layers.values() for s in layer.states)

    def stats(self) -> dict:
        state_elements = sum(m.state_elements for m in self.layers.values())
        return {
            "req_id": self.req_id,
            "num_prompt_tokens": self.num_prompt_tokens,
            "budget_tokens": self.budget,
            "tokens_cached": self.num_cached,
            "tokens_folded": self.num_folded,
            "tokens_kept": self.num_cached - self.num_folded,
            "kept_after_compression": self.kept_after_compression,
            "compressions": self.num_compressions,
            "state_elements": state_elements,
            "state_bytes": self.state_bytes,
            "images": 0 if self.token_layout is None else len(self.token_layout.grids),
            "visual_slots_folded": self.visual_slots_folded,
        }


class MemoryRegistry:
    """The live RequestMemory objects of one worker, plus stats of finished ones."""

    def __init__(self) -> None:
        self.live: dict[str, RequestMemory] = {}
        self.finished: OrderedDict[str, dict] = OrderedDict()
        # What the released requests (finished, aborted or preempted) added up to.
        self.released: Counter[str] = Counter()
        self.compress_seconds = 0.0  # wall time of every compression, all layers
        self.block_size = 0
        self._runner = lambda: None

    def bind(self, runner) -> None:
        """Start afresh when a new model runner (a new engine in this process) steps."""
        if self._runner() is not runner:
            self.live.clear()
            self.finished.clear()
            self.released.clear()
            self.compress_seconds = 0.0
            self.block_size = runner.cache_config.block_size
            self._runner = weakref.ref(runner)

    def blocks_freed(self, memory: RequestMemory) -> int:
        """Blocks the scheduler's KV manager has returned for the request: its folded tokens are
        its oldest slots, so every whole block of them (kv_manager.py applies the same rule)."""
        return memory.num_folded // self.block_size if self.block_size else 0

    def release(self, req_ids) -> None:
        for req_id in req_ids:
            memory = self.live.pop(req_id, None)
            if memory is not None:
                self.released.update(self.totals(memory), requests_released_total=1)
                stats = self.finished[req_id] = memory.stats()
                logger.info(
                    "retentivekv: request %(req_id)s kept %(tokens_kept)d of %(tokens_cached)d "
                    "cached tokens (budget %(budget_tokens)d), folded %(tokens_folded)d (prompt "
                    "%(num_prompt_tokens)d, %(images)d images, %(visual_slots_folded)d image-token "
                    "slots folded over layers and heads) in %(compressions)d compressions",
                    stats,
                )
                while len(self.finished) > FINISHED_STATS_KEPT:
                    self.finished.popitem(last=False)

    def totals(self, memory: RequestMemory) -> dict[str, int]:
        """A request's share of the `COUNTERS` (but the request count)."""
        return {
            "compressions_total": memory.num_compressions,
            "tokens_cached_total": memory.num_cached,
            "tokens_folded_total": memory.num_folded,
            "blocks_freed_total": self.blocks_freed(memory),
        }

    def metrics(self) -> dict:
        """Totals since the engine started (released and live requests) and live gauges."""
        live, totals = list(self.live.values()), Counter(self.released)
        for memory in live:
            totals.update(self.totals(memory))
        return {
            "requests_live": len(live),
            **{key: totals[key] for key in COUNTERS},
            "compress_seconds_total": self.compress_seconds,
            "tokens_kept": sum(m.num_cached - m.num_folded for m in live),
            "state_bytes": sum(m.state_bytes for m in live),
        }

    def snapshot(self) -> dict:
        return {
            "live": {rid: m.stats() for rid, m in self.live.items()},
            "finished": dict(self.finished),
            "metrics": self.metrics(),
        }


def state_bytes_per_request(policy, vllm_config) -> int:
    """Most bytes the recurrent states of one request take in this worker (its share of the KV
    heads), stored in `core.storage_dtype` of the cache (the model's dtype); an image request's
    for a multimodal model, 0 for eviction policies."""
    if not policy.keeps_state:
        return 0
    model, parallel = vllm_config.model_config, vllm_config.parallel_config
    head_size = model.get_head_size()
    rank = policy.state_rank(head_size)
    num_states = policy.num_states(has_images=model.is_multimodal_model)
    num_kv_heads = model.get_num_kv_heads(parallel)
    element_bytes = torch.finfo(storage_dtype(model.dtype)).bits // 8
    numbers = model.get_num_layers(parallel) * num_states * num_kv_heads * rank * (head_size + 1)
    return numbers * element_bytes


def check_state_reservation(kv_memory_bytes: int, vllm_config) -> int:
    """Bytes set aside for the states of max_num_seqs requests (0 without a stateful policy),
    refusing a KV memory they would use up (an error naming the options)."""
    from retentivekv_vllm.engine.settings import policy_from_vllm_config

    policy = policy_from_vllm_config(vllm_config)
    max_num_seqs = vllm_config.scheduler_config.max_num_seqs
    reserved = 0 if policy is None else max_num_seqs * state_bytes_per_request(policy, vllm_config)
    if reserved and reserved >= kv_memory_bytes:
        from retentivekv_vllm.config import ConfigError

        raise ConfigError(
            f"--kv-policy {policy.name}: the recurrent states of --max-num-seqs {max_num_seqs} "
            f"requests need {reserved / 2**20:.1f} MiB, not less than the "
            f"{kv_memory_bytes / 2**20:.1f} MiB of KV-cache memory; lower --max-num-seqs or "
            "raise --kv-cache-memory-bytes"
        )
    return reserved


def reserve_state_memory(kv_memory_bytes: int, vllm_config) -> int:
    """KV-cache bytes left once the states of max_num_seqs requests are set aside.

    vLLM never runs more than max_num_seqs requests at once, so states allocated as requests
    need them never take more than this reservation: the KV memory the user set bounds
    cache and states together.
    """
    reserved = check_state_reservation(kv_memory_bytes, vllm_config)
    if reserved:
        logger.info(
            "retentivekv: %.1f MiB of the %.1f MiB KV-cache memory reserved for the states of "
            "%d requests (--max-num-seqs)",
            reserved / 2**20,
            kv_memory_bytes / 2**20,
            vllm_config.scheduler_config.max_num_seqs,
        )
    return kv_memory_bytes - reserved


def log_memory_plan(policy, kv_cache_spec, num_layers: int, vllm_config) -> None:
    """One start-up line: what a request costs with this policy, against stock vLLM."""
    c = policy.config
    max_len = vllm_config.model_config.max_model_len
    kv_per_token = kv_cache_spec.page_size_bytes // kv_cache_spec.block_size * num_layers
    state = state_bytes_per_request(policy, vllm_config)
    kept = live_tokens_after_step(c, max_len, kv_cache_spec.block_size)
    ours, stock = kept * kv_per_token + state, max_len * kv_per_token
    memory = vllm_config.cache_config.kv_cache_memory_bytes
    max_num_seqs = vllm_config.scheduler_config.max_num_seqs
    capacity = (
        f"; {memory / 2**20:.0f} MiB of KV memory hold "
        f"{min(max_num_seqs, (memory - max_num_seqs * state) / (kept * kv_per_token)):.1f} such "
        f"requests (states reserved for {max_num_seqs}) against {memory / stock:.1f} for stock vLLM"
        if memory
        else ""
    )
    logger.info(
        "retentivekv: policy %s, budget %s: KV %d B/token, state %d B/request; a %d-token "
        "request keeps at most %d tokens: %.2f MiB against %.2f MiB (%.1fx)%s",
        c.policy,
        c.budget,
        kv_per_token,
        state,
        max_len,
        kept,
        ours / 2**20,
        stock / 2**20,
        stock / ours,
        capacity,
    )
