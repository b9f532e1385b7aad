"""What the API server shows of the plugin: Prometheus metrics on vLLM's own /metrics and a
read-only stats route, through vLLM's endpoint-plugin mechanism.

The numbers live in the workers (``engine.memory.MemoryRegistry``: compression runs there, and the
worker counts the blocks the scheduler frees by the rule the KV manager applies).  vLLM's
stat-logger plugins only see SchedulerStats and IterationStats, which have no room for them, so
the endpoint plugin asks the workers through the engine client's ``collective_rpc`` (the path the
endpoint-plugin contract names) once per REFRESH_SECONDS and a collector on vLLM's Prometheus
registry serves the latest answer.  The stats route asks afresh on each call.

Endpoint plugins load only when named in VLLM_PLUGINS; the entry point has the general plugin's
name, so ``VLLM_PLUGINS=retentivekv`` enables both.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import Request
from fastapi.responses import JSONResponse

from retentivekv_vllm.config import KVPolicyConfig

logger = logging.getLogger("vllm.retentivekv_vllm")

# Under /v1, so vLLM's API-key middleware guards it whenever --api-key is set.
STATS_ROUTE = "/v1/retentivekv/stats"
REFRESH_SECONDS = 1.0
METRIC_PREFIX = "retentivekv:"

# name -> (kind, help); names are the keys of MemoryRegistry.metrics().
METRICS = {
    "tokens_folded_total": (
        "counter",
        "Cached tokens folded out of the KV cache (into a state or evicted).",
    ),
    "tokens_cached_total": ("counter", "Tokens written to the KV cache, folded ones included."),
    "blocks_freed_total": (
        "counter",
        "KV-cache blocks returned to vLLM's pool because their tokens were folded.",
    ),
    "compressions_total": (
        "counter",
        "Compressions (one per request and step that went over its budget).",
    ),
    "compress_seconds_total": ("counter", "Wall time spent compressing, all layers (rank 0)."),
    "requests_released_total": (
        "counter",
        "Requests whose memory was released (finished, aborted or preempted).",
    ),
    "requests_live": ("gauge", "Requests holding per-request memory (live slots and states)."),
    "tokens_kept": ("gauge", "Live cache tokens of the requests running now."),
    "state_bytes": (
        "gauge",
        "Bytes of recurrent state held by the requests running now (all workers).",
    ),
    "compression_ratio": (
        "gauge",
        "Tokens cached over tokens kept, over every request so far (1 = none folded).",
    ),
}


def combine(per_worker: list[dict]) -> dict:
    """One view of all workers: tensor-parallel workers fold the same tokens, so counts are
    rank 0's; the states are sharded with the KV heads, so their bytes add up."""
    totals = dict(per_worker[0])
    totals["state_bytes"] = sum(w["state_bytes"] for w in per_worker)
    kept = totals["tokens_cached_total"] - totals["tokens_folded_total"]
    totals["compression_ratio"] = totals["tokens_cached_total"] / kept if kept else 1.0
    return totals


class MetricsCollector:
    """A prometheus_client collector over the latest combined worker metrics."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.latest: dict | None = None

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        if self.latest is None:
            return
        for name, (kind, help_text) in METRICS.items():
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            # CounterMetricFamily appends _total itself.
            metric_name = METRIC_PREFIX + (
                name.removesuffix("_total") if kind == "counter" else name
            )
            metric = family(metric_name, help_text, labels=["model_name"])
            metric.add_metric([self.model_name], self.latest[name])
            yield metric


async def ask_workers(engine_client) -> dict:
    return combine(await engine_client.collective_rpc("retentivekv_metrics"))


class RetentiveKVEndpoints:
    """The ``vllm.endpoint_plugins`` entry point (see vLLM's plugins/endpoint_plugins)."""

    name = "retentivekv"
    required_tasks = ("generate",)

    def attach_router(self, app) -> None:
        @app.get(STATS_ROUTE)
        async def retentivekv_stats(request: Request) -> JSONResponse:
            engine_client = request.app.state.retentivekv_engine_client
            config: KVPolicyConfig | None = request.app.state.retentivekv_config
            if config is None:
                return JSONResponse({"kv_policy": None})
            per_worker = await engine_client.collective_rpc("retentivekv_stats")
            return JSONResponse(
                {
                    "kv_policy": config.to_additional_config(),
                    "totals": combine([w["metrics"] for w in per_worker]),
                    "workers": [w["metrics"] for w in per_worker],
                    # Per request, from rank 0 (live ones and the last finished ones).
                    "live": per_worker[0]["live"],
                    "finished": per_worker[0]["finished"],
                }
            )

    async def init_state(self, engine_client, state, args) -> None:
        from retentivekv_vllm.engine.settings import kv_config_from_vllm_config

        state.retentivekv_engine_client = engine_client
        state.retentivekv_config = None
        if engine_client is None:
            return
        config = kv_config_from_vllm_config(engine_client.vllm_config)
        state.retentivekv_config = config
        if config is None:
            return
        from prometheus_client import REGISTRY

        collector = MetricsCollector(engine_client.vllm_config.model_config.served_model_name)
        REGISTRY.register(collector)
        state.retentivekv_refresh = asyncio.get_running_loop().create_task(
            _refresh(engine_client, collector)
        )


async def _refresh(engine_client, collector: MetricsCollector) -> None:
    while not engine_client.errored:
        try:
            collector.latest = await ask_workers(engine_client)
        except Exception as error:  # noqa: BLE001 - a failed round keeps the last answer
            logger.warning("retentivekv: could not read the workers' metrics: %s", error)
        await asyncio.sleep(REFRESH_SECONDS)
