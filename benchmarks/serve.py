"""Stock vLLM against the plugin through vLLM's own serving benchmark: `vllm serve` measured by
`vllm bench serve`, back to back in one run.

    python -m benchmarks.serve            # stock, retentive 0.2 and 0.05
    python -m benchmarks.serve --quick    # stock and retentive 0.2, shorter prompts
    python -m benchmarks.serve --model smollm2   # the real SmolLM2-135M-Instruct: stock and 0.2
                                                 # with the prf and the learned state

The cross-check of `benchmarks.speed` (which drives the engine in-process and reads the
scheduler after every step) through the path a user runs: each configuration is a fresh
`vllm serve` of the same model (stock with the plugin not loaded, ``VLLM_PLUGINS=""``; the
plugin with ``--kv-policy retentive --kv-feature-map prf --kv-budget B``: the prf state, which the
recorded results carry; for SmolLM2 also with its shipped ``--kv-maps``, the demo's state), and
`vllm bench serve` with its random dataset measures two workloads against it:

* batch 1: a few requests of a long prompt one at a time (``--max-concurrency 1``): TTFT and
  TPOT as vLLM's benchmark reports them;
* burst: many requests of a shorter prompt sent at once (``--request-rate inf``) into a KV pool
  that holds a few whole stock requests: output tokens/s over the burst, and the most requests
  running at once, polled from the server's ``vllm:num_requests_running`` gauge.

Same model shapes (the synthetic one by default, ``--model smollm2`` for the real model at its
8,192 positions), block size, chunk size and pool as `benchmarks.speed`. Writes
``benchmarks/results/serve.json`` (``serve_quick.json`` for --quick, ``serve_smollm2.json`` for
--model smollm2) and a plot.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

from benchmarks import require_matplotlib
from benchmarks.speed import (
    BLOCK_SIZE,
    MAX_NUM_BATCHED_TOKENS,
    MODELS,
    SHIPPED_MAPS,
    STOCK_REQUESTS_IN_POOL,
    bar_panels,
    benchmark_model_dir,
    kv_bytes_per_token,
    load,
)
from benchmarks.speed import configs as speed_configs

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SEED = 0
SETTINGS = {
    "full": dict(
        budgets=(0.2, 0.05),
        batch1=dict(input_len=16384, output_len=64, num_prompts=3),
        burst=dict(input_len=4096, output_len=96, num_prompts=24),
    ),
    "quick": dict(
        budgets=(0.2,),
        batch1=dict(input_len=8192, output_len=32, num_prompts=2),
        burst=dict(input_len=2048, output_len=48, num_prompts=12),
    ),
    "smollm2": dict(
        budgets=(0.2,),
        batch1=dict(input_len=8192 - 32, output_len=32, num_prompts=2),
        burst=dict(input_len=2048, output_len=32, num_prompts=16),
    ),
}
# What vllm bench serve's result JSON reports, kept per workload.
REPORTED = (
    "completed",
    "duration",
    "output_throughput",
    "request_throughput",
    "mean_ttft_ms",
    "median_ttft_ms",
    "mean_tpot_ms",
    "median_tpot_ms",
    "median_itl_ms",
    "median_e2el_ms",
)


class RunningGauge(threading.Thread):
    """Polls the server's /metrics for the most requests running at once."""

    def __init__(self, base_url: str, interval: float = 0.25):
        super().__init__(daemon=True)
        self.url, self.interval = base_url + "/metrics", interval
        self.peak = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    for line in response.read().decode().splitlines():
                        if line.startswith("vllm:num_requests_running"):
                            self.peak = max(self.peak, float(line.rsplit(" ", 1)[1]))
            except OSError:
                pass
            self.done.wait(self.interval)

    def stop(self) -> int:
        self.done.set()
        self.join()
        return int(self.peak)


def bench_serve(
    base_url: str, model_dir: str, workload: dict, result: Path, max_concurrency: int | None
) -> dict:
    """One `vllm bench serve` run; its saved result, reduced to REPORTED."""
    from retentivekv_vllm.fixtures.server import vllm_command

    command = [
        *vllm_command(),
        "bench",
        "serve",
        "--backend",
        "vllm",
        "--base-url",
        base_url,
        "--model",
        model_dir,
        "--tokenizer",
        model_dir,
        "--dataset-name",
        "random",
        "--random-input-len",
        str(workload["input_len"]),
        "--random-output-len",
        str(workload["output_len"]),
        "--num-prompts",
        str(workload["num_prompts"]),
        "--ignore-eos",
        "--request-rate",
        "inf",
        "--seed",
        str(SEED),
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--disable-tqdm",
        "--save-result",
        "--result-dir",
        str(result.parent),
        "--result-filename",
        result.name,
    ]
    if max_concurrency is not None:
        command += ["--max-concurrency", str(max_concurrency)]
    subprocess.run(
        command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL
    )
    saved = json.loads(result.read_text())
    return {key: saved[key] for key in REPORTED if key in saved}


def plugin_flags(additional_config: dict | None) -> tuple[str, ...] | None:
    """The `vllm serve` flags of a configuration's settings (`cli.flag`); None for stock."""
    from retentivekv_vllm.cli import flag

    if additional_config is None:
        return None
    settings = additional_config.items()
    return tuple(part for key, value in settings for part in (flag(key), str(value)))


def run_config(
    name: str,
    plugin_args: tuple[str, ...] | None,
    model_dir: str,
    settings: dict,
    pool_blocks: int,
    work: Path,
    bytes_per_token: int,
) -> dict:
    from retentivekv_vllm.fixtures.server import Server

    max_model_len = max(
        w["input_len"] + w["output_len"] for w in (settings["batch1"], settings["burst"])
    )
    args = (
        "--max-model-len",
        str(max_model_len),
        "--kv-cache-memory-bytes",
        str(pool_blocks * BLOCK_SIZE * bytes_per_token),
        "--block-size",
        str(BLOCK_SIZE),
        "--max-num-batched-tokens",
        str(MAX_NUM_BATCHED_TOKENS),
        # The plugin reserves the states of max_num_seqs requests out of the pool: the burst's size.
        "--max-num-seqs",
        str(settings["burst"]["num_prompts"]),
        "--no-enable-prefix-caching",
        "--seed",
        str(SEED),
        *(plugin_args or ()),
    )
    env = {"VLLM_PLUGINS": ""} if plugin_args is None else {}
    slug = name.replace(" ", "-")
    server = Server(model_dir, args=args, env=env, log_path=work / f"{slug}.log")
    server.start(timeout=600)  # `with server:` would start it with the default wait
    try:
        batch1 = bench_serve(
            server.base_url, model_dir, settings["batch1"], work / f"{slug}-batch1.json", 1
        )
        gauge = RunningGauge(server.base_url)
        gauge.start()
        load_before = load()
        burst = bench_serve(
            server.base_url, model_dir, settings["burst"], work / f"{slug}-burst.json", None
        )
        burst.update(max_running=gauge.stop(), load_before=load_before, load_after=load())
    finally:
        server.stop()
    return {"name": name, "plugin_args": list(plugin_args or ()), "batch1": batch1, "burst": burst}


def add_ratios(results: list[dict]) -> None:
    stock = results[0]
    for r in results:
        r["vs_stock"] = {
            "tpot_batch1_speedup": _ratio(
                stock["batch1"]["median_tpot_ms"], r["batch1"]["median_tpot_ms"]
            ),
            "ttft_batch1": _ratio(r["batch1"]["median_ttft_ms"], stock["batch1"]["median_ttft_ms"]),
            "burst_output_tokens_per_s": _ratio(
                r["burst"]["output_throughput"], stock["burst"]["output_throughput"]
            ),
            "burst_max_running": _ratio(r["burst"]["max_running"], stock["burst"]["max_running"]),
        }


def _ratio(a, b):
    return round(a / b, 2) if a and b else None


def summary_table(data: dict) -> str:
    lines = [
        "| config | TTFT batch 1 | TPOT batch 1 | TPOT speed-up | burst output tok/s | vs stock | "
        "max running |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        b1, burst, vs = r["batch1"], r["burst"], r["vs_stock"]
        lines.append(
            f"| {r['name']} | {b1['median_ttft_ms'] / 1e3:.2f} s | {b1['median_tpot_ms']:.1f} ms | "
            f"{vs['tpot_batch1_speedup']}x | {burst['output_throughput']:.1f} | "
            f"{vs['burst_output_tokens_per_s']}x | {burst['max_running']} |"
        )
    s = data["meta"]["settings"]
    flags = {"full": "", "quick": " --quick", "smollm2": " --model smollm2"}[data["meta"]["mode"]]
    lines += [
        "",
        f"{data['meta']['mode']} run of `python -m benchmarks.serve{flags}`, "
        f"{data['meta']['date']}; batch 1: "
        f"{s['batch1']['num_prompts']} requests of {s['batch1']['input_len']} prompt tokens; "
        "burst: "
        f"{s['burst']['num_prompts']} requests of {s['burst']['input_len']} prompt and "
        f"{s['burst']['output_len']} "
        f"output tokens into a pool of {STOCK_REQUESTS_IN_POOL} stock requests; medians as `vllm "
        "bench serve` "
        "reports them; 1-minute load "
        f"{data['meta']['load_start'][0]}-{data['meta']['load_end'][0]}.",
    ]
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    results = data["results"]
    bar_panels(
        [r["name"].replace("retentive ", "") for r in results],
        [
            ("TTFT batch 1 (s)", [r["batch1"]["median_ttft_ms"] / 1e3 for r in results]),
            ("TPOT batch 1 (ms)", [r["batch1"]["median_tpot_ms"] for r in results]),
            ("burst output tokens/s", [r["burst"]["output_throughput"] for r in results]),
            ("burst max running", [r["burst"]["max_running"] for r in results]),
        ],
        f"vllm bench serve: stock vLLM vs retentive budgets ({data['meta']['mode']} run)",
        path,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="stock and 0.2 only, shorter prompts")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    parser.add_argument(
        "--model",
        choices=tuple(MODELS),
        default="synthetic",
        help="synthetic (the default) or smollm2 (the real SmolLM2-135M-Instruct: stock and 0.2, "
        "prf and learned state)",
    )
    args = parser.parse_args(argv)
    if args.model != "synthetic" and args.quick:
        parser.error(f"--model {args.model} has one setting of its own: drop --quick")
    mode = args.model if args.model != "synthetic" else "quick" if args.quick else "full"
    settings = SETTINGS[mode]
    require_matplotlib()

    import vllm

    burst = settings["burst"]
    pool_blocks = (
        STOCK_REQUESTS_IN_POOL * -(-(burst["input_len"] + burst["output_len"]) // BLOCK_SIZE) + 2
    )
    meta = {
        "benchmark": "serve",
        "mode": mode,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "vllm": vllm.__version__,
        "model": {"name": args.model, **MODELS[args.model]},
        "settings": {**settings, "pool_blocks": pool_blocks, "block_size": BLOCK_SIZE},
        "load_start": load(),
    }
    # The speed benchmark's configurations, spelled as `vllm serve` flags; no stock again.
    configs = [
        (name, plugin_flags(additional_config))
        for name, additional_config in speed_configs(
            settings["budgets"], SHIPPED_MAPS.get(args.model)
        )
        if name != "stock again"
    ]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = benchmark_model_dir(args.model, work / "serve-llama")
        bytes_per_token = kv_bytes_per_token(MODELS[args.model])
        for index, (name, plugin_args) in enumerate(configs):
            print(f"[{index + 1}/{len(configs)}] {name} ...", flush=True)
            r = run_config(
                name, plugin_args, model_dir, settings, pool_blocks, work, bytes_per_token
            )
            print(
                f"    batch 1: TTFT {r['batch1']['median_ttft_ms'] / 1e3:.2f} s, TPOT "
                f"{r['batch1']['median_tpot_ms']:.1f} ms;"
                f" burst: {r['burst']['output_throughput']:.1f} output tok/s, max running "
                f"{r['burst']['max_running']}",
                flush=True,
            )
            results.append(r)
    add_ratios(results)
    meta["load_end"] = load()
    data = {"meta": meta, "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / {"full": "serve.json"}.get(mode, f"serve_{mode}.json")
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    plot(data, json_path.with_suffix(".png"))
    print(summary_table(data))
    return 0 if all(r["burst"]["completed"] == burst["num_prompts"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
