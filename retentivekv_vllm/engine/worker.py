"""What one worker process holds for compression, in one object: ``WORKER``.

* ``loaded``: the policy of the model this worker serves. vLLM asks the backend class for the
  KV-cache spec (``customize_spec``) without a config; the attention impls, built under vLLM's
  config context while the model loads, record it before that happens;
* ``memories``: the request memories (``memory.MemoryRegistry``), outside vLLM's KV cache;
* ``batch``: the requests of the step being built, as the model runner sees them. vLLM's
  attention metadata carries no request ids, prompt lengths or multimodal placeholders, so the
  runner hook in ``patches.py`` records them just before the runner builds the step's metadata;
* the step's plans: the metadata builder plans each request's step (``plan``) without changing
  its memory; what the plans fold is committed once the step has run (``commit``, called by the
  runner hook before the next step is prepared), so a metadata build that is not run changes
  nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from vllm.v1.kv_cache_interface import FullAttentionSpec

from retentivekv_vllm.engine.executor import RequestPlan, compress
from retentivekv_vllm.engine.memory import MemoryRegistry, RequestMemory, log_memory_plan, logger
from retentivekv_vllm.engine.patches import install_runner_hooks, install_worker_hooks
from retentivekv_vllm.engine.settings import (
    policy_from_vllm_config,
    refuse_unsupported_layer,
    request_policy,
)
from retentivekv_vllm.policies import KVPolicy


@dataclass(frozen=True)
class LoadedPolicy:
    policy: KVPolicy
    # Upper bound on the tokens a request adds to its cache in one step (vLLM's
    # max_in_flight_tokens): what a request may hold beyond its budget before it folds.
    max_step_tokens: int


@dataclass(frozen=True)
class BatchView:
    req_ids: list[str | None]  # row i of the step's batch -> request id
    num_prompt_tokens: list[int]
    # The runner's request states (CachedRequestState by id: multimodal features) and
    # the model's Hugging Face config (vision settings).
    requests: dict[str, Any] = field(default_factory=dict)
    hf_config: Any = None


def request_token_layout(view: BatchView, req_id: str, num_prompt_tokens: int):
    """Where the request's image tokens sit, from the runner's multimodal features; None for a
    text-only request, and for inputs the policy cannot place (scored as text, with a warning)."""
    features = getattr(view.requests.get(req_id), "mm_features", None)
    if not features:
        return None
    from retentivekv_vllm.multimodal import UnsupportedMultimodalInput, layout_from_mm_features

    try:
        return layout_from_mm_features(features, view.hf_config, num_prompt_tokens)
    except UnsupportedMultimodalInput as error:
        logger.warning("retentivekv: request %s is scored as text only: %s", req_id, error)
        return None


class WorkerState:
    def __init__(self) -> None:
        self.loaded: LoadedPolicy | None = None
        self.memories = MemoryRegistry()
        self.batch = BatchView([], [])
        self.planned: list[RequestPlan] = []

    def load_layer(self, impl, sliding_window: bool) -> KVPolicy | None:
        """The policy of the model whose attention layer `impl` (a backend's impl, just built
        under the model's config) computes: recorded for the KV-cache spec, with the worker's hooks
        installed; a layer the policy cannot serve is refused. Every backend's impl calls it."""
        from vllm.config import get_current_vllm_config

        vllm_config = get_current_vllm_config()
        policy = policy_from_vllm_config(vllm_config)
        max_step_tokens = vllm_config.max_in_flight_tokens
        self.loaded = None if policy is None else LoadedPolicy(policy, max_step_tokens)
        if policy is not None:
            install_worker_hooks()
        refuse_unsupported_layer(policy, impl, sliding_window)
        return policy

    def load_builder(self, kv_cache_spec, num_layers: int, vllm_config) -> KVPolicy | None:
        """The policy a backend's metadata builder plans with; with one, the runner's hooks are
        installed and the start-up line on memory is logged. Every backend's builder calls it."""
        policy = policy_from_vllm_config(vllm_config)
        if policy is not None:
            install_runner_hooks()
            log_memory_plan(policy, kv_cache_spec, num_layers, vllm_config)
        return policy

    def compress(self, plan: RequestPlan, memory, slots, scale: float, layer: int) -> None:
        """`executor.compress`, its wall time added to the worker's metrics."""
        started = time.perf_counter()
        compress(plan, memory, slots, scale, layer)
        self.memories.compress_seconds += time.perf_counter() - started

    def kv_cache_spec(self, spec):
        """A backend's KV-cache spec for the loaded model: full attention under a compressing
        policy gets the spec whose KV manager frees the blocks of folded tokens."""
        loaded = self.loaded
        if loaded is None or not loaded.policy.compresses or type(spec) is not FullAttentionSpec:
            return spec
        from retentivekv_vllm.engine.kv_manager import RetentiveAttentionSpec

        return RetentiveAttentionSpec.from_full(spec, loaded.policy.config, loaded.max_step_tokens)

    def record_batch(self, runner, num_reqs: int) -> None:
        """The runner is about to build the metadata of a step of its first num_reqs requests."""
        self.memories.bind(runner)
        input_batch = runner.input_batch
        self.batch = BatchView(
            list(input_batch.req_ids[:num_reqs]),
            [int(n) for n in input_batch.num_prompt_tokens[:num_reqs]],
            runner.requests,
            runner.model_config.hf_config,
        )

    def plan(self, server: KVPolicy, cm, block_size: int) -> list[RequestPlan]:
        """Each request's plan for the step of vLLM's common metadata `cm`, under its own policy."""
        view, registry = self.batch, self.memories
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
                registry.live.pop(req_id, None)
            num_prompt = view.num_prompt_tokens[row]
            policy = request_policy(server, view.requests.get(req_id))
            memory = registry.live.get(req_id)
            if memory is None:
                budget = policy.config.budget_tokens(num_prompt)
                layout = request_token_layout(view, req_id, num_prompt)
                memory = registry.live[req_id] = RequestMemory(
                    req_id, num_prompt, budget, token_layout=layout
                )
            plans.append(RequestPlan.make(policy, memory, row, start, end, seq_len, block_size))
        self.planned = plans
        return plans

    def commit(self) -> None:
        """The last planned step has run: its folds and cache lengths are now the requests'."""
        for plan in self.planned:
            memory = plan.memory
            memory.num_cached = plan.seq_len
            if plan.compress:
                memory.num_folded = plan.fold_to
                memory.num_compressions += 1
                memory.kept_after_compression = max(memory.kept_after_compression, plan.budget)
        self.planned = []


WORKER = WorkerState()


def worker_stats(worker=None) -> dict:
    """Stats of this worker's requests; usable as ``llm.collective_rpc(worker_stats)``."""
    return WORKER.memories.snapshot()


def worker_metrics(worker=None) -> dict:
    """This worker's totals and gauges; a worker method (``collective_rpc("retentivekv_metrics")``,
    serving.py)."""
    return WORKER.memories.metrics()
