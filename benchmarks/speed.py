"""Speed and memory of stock vLLM against the plugin, measured back to back in one run.

    python -m benchmarks.speed            # stock and budgets 1.0/0.5/0.2/0.1/0.05, 16k-token
    latency
    python -m benchmarks.speed --quick    # stock and 0.2 only, 8k-token latency (a regression
    check)
    python -m benchmarks.speed --readme   # rewrite the README's headline table from the JSON
    python -m benchmarks.speed --model smollm2   # the real SmolLM2-135M-Instruct: stock and 0.2
                                                 # with the prf and the learned state

Every configuration runs in its own process, one after another, on the same model and
prompts: stock vLLM with the plugin disabled (``VLLM_PLUGINS=""``), then
``kv_policy=retentive`` with the prf state (``kv_feature_map=prf``, the state the recorded
results carry) at each budget, and for a model with shipped learned maps (SmolLM2) with those
too (``kv_maps``, the state the demo serves). Each process runs two workloads on an in-process
engine (``llm.llm_engine.step()`` driven by hand, timed around each step):

* latency, batch 1: one request of a long random-token prompt; time to first token
  (TTFT) and the median time per output token over the decode steps (TPOT). The prefill
  overhead of compression is the plugin's TTFT over stock's, minus one.
* throughput: many requests of a shorter prompt submitted at once into a fixed KV pool
  (`benchmarks.memory.run_config`, which also reads KV bytes per request, states
  included, and the largest number of running requests from vLLM's scheduler); output
  tokens per second over the whole run, and TPOT at the largest batch (median step time
  over the steps where the largest batch was decoding).

The whole sequence of processes runs `passes` times over (three in either synthetic mode), one
pass after another: between processes of one configuration decode steps differ by up to 20% here, so
every reported number is the median over the passes, each ratio is taken between those
medians, and the ratio of every pass to its own stock is kept beside it (`vs_stock_by_pass`).

The load average of the machine is recorded with every measurement: on a shared
machine a number taken under load is slower and noisier, and says so in the JSON.

The default model is synthetic (random weights, shaped so that the KV cache dominates a decode
step); ``--model smollm2`` runs the real SmolLM2-135M-Instruct (``fixtures.smollm2``), whose
weights dominate instead, at its longest context (8,192 positions) with one pass: a cost of about
half an hour on two cores.

Writes ``benchmarks/results/speed.json`` (``speed_quick.json`` for --quick,
``speed_smollm2.json`` for --model smollm2) and a plot.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import require_matplotlib
from benchmarks.memory import DTYPE_BYTES, MEASURING_ENV, run_config

RESULTS_DIR = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parents[1] / "README.md"
TABLE_START, TABLE_END = "<!-- speed-table:start -->", "<!-- speed-table:end -->"
BLOCK_SIZE = 128  # the CPU backend's block size
SEED = 0

# Decode on this CPU is memory-bound: per decode step a request reads its whole KV cache
# and the batch shares one read of the weights. Two narrow layers with eight KV heads of
# 64 hold 8 KiB of fp32 KV per token (128 MiB at 16k tokens) against 28 MB of weights, so
# the KV cache is most of what a long-context decode step reads.
MODEL = dict(
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=40960,
)
# SmolLM2-135M-Instruct (fixtures.smollm2): 30 layers with 3 KV heads of 64 (GQA, 9 query
# heads) hold 45 KiB of fp32 KV per token (360 MiB at its 8,192 positions) against 538 MB of
# weights: at batch 1 the weights are most of what a decode step reads.
SMOLLM2 = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
)
MODELS = {"synthetic": MODEL, "smollm2": SMOLLM2}
# The learned maps shipped for a model (the state the demo serves), from the repository root:
# the measuring processes run there, and the JSON records no machine path.
SHIPPED_MAPS = {"smollm2": "retentivekv_vllm/maps/smollm2-135m-instruct.safetensors"}
SETTINGS = {
    "full": dict(
        budgets=(1.0, 0.5, 0.2, 0.1, 0.05),
        latency_prompt=16384,
        latency_tokens=64,
        throughput=dict(prompt_tokens=4096, num_requests=24, max_tokens=96),
        passes=3,
    ),
    "quick": dict(
        budgets=(0.2,),
        latency_prompt=8192,
        latency_tokens=32,
        throughput=dict(prompt_tokens=2048, num_requests=12, max_tokens=48),
        passes=3,
    ),
    # One pass and TTFT the median of two requests: an 8k prefill of 30 layers takes tens of
    # seconds here, so the run takes about half an hour; stock again is its noise check.
    "smollm2": dict(
        budgets=(0.2,),
        latency_prompt=8192 - 32,
        latency_tokens=32,
        latency_repeats=2,
        throughput=dict(prompt_tokens=2048, num_requests=16, max_tokens=32),
        passes=1,
    ),
}
# The throughput pool holds this many whole stock requests (prompt + output), plus one block.
STOCK_REQUESTS_IN_POOL = 4
MAX_NUM_BATCHED_TOKENS = 2048
# Batch-1 requests per configuration unless the settings say otherwise: TTFT is their median
# (one prefill is too noisy here).
LATENCY_REPEATS = 3


def configs(budgets, maps: str | None = None) -> list[tuple[str, dict | None]]:
    """Stock first (the reference of every ratio) and once more last: the last row's ratios to the
    first are the run's own noise and drift (ideally 1.0x everywhere). With `maps` (a model's
    learned maps), each budget runs with the learned state too."""
    retentive = []
    for b in budgets:
        prf = {"kv_policy": "retentive", "kv_feature_map": "prf", "kv_budget": b}
        retentive.append((f"retentive {b:g}", prf))
        if maps:
            learned = {"kv_policy": "retentive", "kv_budget": b, "kv_maps": maps}
            retentive.append((f"retentive {b:g} learned", learned))
    return [("stock", None), *retentive, ("stock again", None)]


def model_shape(model: dict = MODEL) -> dict:
    return {
        "arch": "LlamaForCausalLM",
        "num_layers": model["num_hidden_layers"],
        "num_attention_heads": model["num_attention_heads"],
        "num_kv_heads": model["num_key_value_heads"],
        "head_dim": model["head_dim"],
        "hidden_size": model["hidden_size"],
        "dtype": "float32",
    }


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def measure_latency(
    model_dir: str,
    additional_config,
    prompt: list[int],
    max_tokens: int,
    model: dict = MODEL,
    repeats: int = LATENCY_REPEATS,
) -> dict:
    """Batch 1: TTFT and the decode step times of `repeats` requests of the prompt, one after
    another (prefix caching off: each one prefills in full); TTFT is their median."""
    from vllm import LLM, SamplingParams

    kwargs = {} if additional_config is None else {"additional_config": additional_config}
    total = len(prompt) + max_tokens
    llm = LLM(
        model=model_dir,
        dtype="float32",
        enforce_eager=True,
        seed=SEED,
        kv_cache_memory_bytes=(-(-total // BLOCK_SIZE) + 2)
        * BLOCK_SIZE
        * kv_bytes_per_token(model),
        max_model_len=total,
        max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
        max_num_seqs=1,
        enable_prefix_caching=False,
        **kwargs,
    )
    load_before = load()
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    ttfts, decode_steps = [], []
    for repeat in range(repeats):
        started = time.perf_counter()
        engine.add_request(f"latency-{repeat}", {"prompt_token_ids": prompt}, params)
        generated = 0
        while engine.has_unfinished_requests():
            step_start = time.perf_counter()
            outputs = engine.step()
            step_end = time.perf_counter()
            for output in outputs:
                n = len(output.outputs[0].token_ids)
                if n > generated:
                    if generated == 0:
                        ttfts.append(step_end - started)
                    else:
                        decode_steps.append(step_end - step_start)
                    generated = n
    del llm
    return {
        "prompt_tokens": len(prompt),
        "output_tokens": generated,
        "ttft_s": round(statistics.median(ttfts), 4),
        "ttft_each_s": [round(t, 4) for t in ttfts],
        "tpot_s": round(statistics.median(decode_steps), 5),
        "tpot_min_s": round(min(decode_steps), 5),
        "decode_step_s": [round(t, 5) for t in decode_steps],
        "load_before": load_before,
        "load_after": load(),
    }


def kv_bytes_per_token(model: dict = MODEL) -> int:
    return (
        2
        * model["num_hidden_layers"]
        * model["num_key_value_heads"]
        * model["head_dim"]
        * DTYPE_BYTES
    )


def tpot_at_largest_batch(series: dict) -> tuple[int, float | None]:
    """Median step time over the steps that only decoded the largest batch: every request running
    when the step began already had output tokens (counts are taken after each step, so a request
    whose prefill ends in a step counts as decoding only after it), and nobody was admitted."""
    largest = max(series["decoding"])
    times = [0.0] + series["time_s"]
    steps = [
        times[i + 1] - times[i]
        for i in range(1, len(series["running"]))
        if series["running"][i - 1] == series["decoding"][i - 1] == largest
        and series["waiting"][i] == series["waiting"][i - 1]
    ]
    return largest, (round(statistics.median(steps), 5) if steps else None)


def run_one(spec: dict) -> dict:
    """One configuration (in its own process): latency, then throughput."""
    import torch

    generator = torch.Generator().manual_seed(SEED)
    prompt = torch.randint(5, 2000, (spec["latency_prompt"],), generator=generator).tolist()
    model = spec["model"]
    latency = measure_latency(
        spec["model_dir"],
        spec["additional_config"],
        prompt,
        spec["latency_tokens"],
        model,
        spec["latency_repeats"],
    )
    stats = {}
    if spec["additional_config"] is not None:
        from retentivekv_vllm.engine.worker import WORKER

        stats["compress_seconds_latency_run"] = round(WORKER.memories.compress_seconds, 4)

    settings = spec["throughput"]
    prompts = [
        torch.randint(5, 2000, (settings["prompt_tokens"],), generator=generator).tolist()
        for _ in range(settings["num_requests"])
    ]
    pool_bytes = spec["pool_blocks"] * BLOCK_SIZE * kv_bytes_per_token(model)
    load_before = load()
    throughput = run_config(
        spec["name"],
        spec["additional_config"],
        spec["model_dir"],
        model_shape(model),
        prompts,
        settings,
        pool_bytes,
        max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
    )
    largest, tpot = tpot_at_largest_batch(throughput["series"])
    output_tokens = settings["num_requests"] * settings["max_tokens"]
    throughput.update(
        output_tokens_per_s=round(output_tokens / throughput["elapsed_s"], 2),
        largest_decode_batch=largest,
        tpot_at_largest_batch_s=tpot,
        decode_tokens_per_s_at_largest_batch=round(largest / tpot, 2) if tpot else None,
        load_before=load_before,
        load_after=load(),
    )
    return {
        "name": spec["name"],
        "additional_config": spec["additional_config"],
        "latency": latency,
        "throughput": throughput,
        **stats,
    }


def run_in_subprocess(spec: dict, work: Path) -> dict:
    spec_path, out_path = work / f"spec-{spec['index']}.json", work / f"out-{spec['index']}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, **MEASURING_ENV}
    if spec["additional_config"] is None:
        env["VLLM_PLUGINS"] = ""  # stock vLLM: the plugin is not even loaded
    subprocess.run(
        [sys.executable, "-m", "benchmarks.speed", "--run-spec", str(spec_path), str(out_path)],
        check=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    return json.loads(out_path.read_text())


# The numbers of one process that a configuration reports as their median over the passes.
MEDIAN_FIELDS = {
    "latency": ("ttft_s", "tpot_s"),
    "throughput": (
        "kv_bytes_per_request",
        "blocks_per_request",
        "max_running",
        "largest_decode_batch",
        "tpot_at_largest_batch_s",
        "decode_tokens_per_s_at_largest_batch",
        "output_tokens_per_s",
    ),
}


def merge_passes(runs: list[dict]) -> dict:
    """One configuration's processes (one a pass) as one result: the median of each reported
    number, the highest load seen before any of them, every error, and each process's own result."""
    merged = {"name": runs[0]["name"], "additional_config": runs[0]["additional_config"]}
    for part, fields in MEDIAN_FIELDS.items():
        merged[part] = {}
        for field in fields:
            values = [run[part][field] for run in runs if run[part][field] is not None]
            merged[part][field] = statistics.median(values) if values else None
        merged[part]["load_before"] = max(
            (run[part]["load_before"] for run in runs), key=lambda x: x[0]
        )
    merged["throughput"]["errors"] = [e for run in runs for e in run["throughput"]["errors"]]
    merged["passes"] = runs
    return merged


def ratios(r: dict, stock: dict) -> dict:
    lat, thr, s_lat, s_thr = r["latency"], r["throughput"], stock["latency"], stock["throughput"]
    return {
        "kv_memory": _ratio(s_thr["kv_bytes_per_request"], thr["kv_bytes_per_request"]),
        "tpot_batch1_speedup": _ratio(s_lat["tpot_s"], lat["tpot_s"]),
        "output_tokens_per_s": _ratio(thr["output_tokens_per_s"], s_thr["output_tokens_per_s"]),
        "decode_tokens_per_s_at_largest_batch": _ratio(
            thr["decode_tokens_per_s_at_largest_batch"],
            s_thr["decode_tokens_per_s_at_largest_batch"],
        ),
        "max_concurrency": _ratio(thr["max_running"], s_thr["max_running"]),
        "prefill_overhead": round(lat["ttft_s"] / s_lat["ttft_s"] - 1, 3),
    }


def add_ratios(results: list[dict]) -> None:
    """Each configuration's ratios to stock (the first), between medians over the passes, and
    those of every pass to the same pass's stock."""
    stock = results[0]
    for r in results:
        r["vs_stock"] = ratios(r, stock)
        r["vs_stock_by_pass"] = [
            ratios(mine, theirs) for mine, theirs in zip(r["passes"], stock["passes"])
        ]


def _ratio(a, b):
    return round(a / b, 2) if a and b else None


TABLE_COLUMNS = (
    ("config", lambda r: r["name"]),
    ("KV bytes/request", lambda r: f"{r['throughput']['kv_bytes_per_request'] / 2**20:.1f} MiB"),
    ("KV memory vs stock", lambda r: f"{r['vs_stock']['kv_memory']}x"),
    ("max concurrent", lambda r: str(r["throughput"]["max_running"])),
    ("TTFT", lambda r: f"{r['latency']['ttft_s']:.2f} s"),
    ("prefill overhead", lambda r: f"{100 * r['vs_stock']['prefill_overhead']:+.0f}%"),
    ("TPOT batch 1", lambda r: f"{1e3 * r['latency']['tpot_s']:.1f} ms"),
    ("TPOT speed-up", lambda r: f"{r['vs_stock']['tpot_batch1_speedup']}x"),
    (
        "TPOT largest batch",
        lambda r: (
            _ms(r["throughput"]["tpot_at_largest_batch_s"])
            + f" ({r['throughput']['largest_decode_batch']})"
        ),
    ),
    (
        "decode tok/s largest batch vs stock",
        lambda r: f"{r['vs_stock']['decode_tokens_per_s_at_largest_batch']}x",
    ),
    ("output tok/s", lambda r: f"{r['throughput']['output_tokens_per_s']:.1f}"),
    ("tok/s vs stock", lambda r: f"{r['vs_stock']['output_tokens_per_s']}x"),
)


def _ms(seconds):
    return "n/a" if seconds is None else f"{1e3 * seconds:.1f} ms"


COMMAND_FLAGS = {"full": "", "quick": " --quick", "smollm2": " --model smollm2"}


def summary_table(data: dict) -> str:
    meta = data["meta"]
    lines = [
        "| " + " | ".join(name for name, _ in TABLE_COLUMNS) + " |",
        "|" + "---|" * len(TABLE_COLUMNS),
    ] + ["| " + " | ".join(cell(r) for _, cell in TABLE_COLUMNS) + " |" for r in data["results"]]
    loads = [
        x
        for r in data["results"]
        for x in (r["latency"]["load_before"][0], r["throughput"]["load_before"][0])
    ]
    lines.append("")
    lines.append(
        f"{meta['mode']} run of `python -m benchmarks.speed{COMMAND_FLAGS[meta['mode']]}`, "
        f"{meta['date']}, {meta['cpu_count']} CPU cores; every number the median over "
        f"{meta['settings']['passes']} passes, a process each; batch-1 latency at "
        f"{meta['settings']['latency_prompt']} "
        f"prompt tokens (TTFT the median of {meta['settings']['latency_repeats']} requests); "
        f"throughput: {meta['settings']['throughput']['num_requests']} requests of "
        f"{meta['settings']['throughput']['prompt_tokens']} prompt and "
        f"{meta['settings']['throughput']['max_tokens']} "
        f"output tokens into a pool of {STOCK_REQUESTS_IN_POOL} stock requests; 1-minute load "
        "average "
        f"{min(loads):.1f}-{max(loads):.1f} during the measurements"
        + (
            " (taken under load from other work on the machine: slower and noisier than idle)."
            if max(loads) > 1.0
            else "."
        )
    )
    return "\n".join(lines)


def write_readme_table(data: dict, readme: Path = README) -> None:
    text = readme.read_text()
    if TABLE_START not in text or TABLE_END not in text:
        raise SystemExit(f"{readme} has no {TABLE_START} ... {TABLE_END} markers")
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    readme.write_text(f"{head}{TABLE_START}\n{summary_table(data)}\n{TABLE_END}{tail}")


def plot(data: dict, path: Path) -> None:
    results = data["results"]
    bar_panels(
        [r["name"].replace("retentive ", "") for r in results],
        [
            (
                "KV MiB per request",
                [r["throughput"]["kv_bytes_per_request"] / 2**20 for r in results],
            ),
            ("TPOT batch 1 (ms)", [1e3 * r["latency"]["tpot_s"] for r in results]),
            ("TTFT batch 1 (s)", [r["latency"]["ttft_s"] for r in results]),
            (
                "output tokens/s (throughput run)",
                [r["throughput"]["output_tokens_per_s"] for r in results],
            ),
            ("max concurrent requests", [r["throughput"]["max_running"] for r in results]),
        ],
        f"stock vLLM vs retentive budgets ({data['meta']['mode']} run, load "
        f"{data['meta']['load_start'][0]}-{data['meta']['load_end'][0]})",
        path,
    )


def bar_panels(
    names: list[str], panels: list[tuple[str, list[float]]], title: str, path: Path
) -> None:
    """One bar chart per (title, values) panel over the configurations, stock in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for ax, (panel_title, values) in zip(axes, panels):
        ax.bar(
            names,
            values,
            color=["tab:gray" if name.startswith("stock") else "tab:blue" for name in names],
        )
        ax.set_title(panel_title, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def benchmark_model_dir(name: str, synthetic_dir: Path) -> str:
    """The synthetic model built into `synthetic_dir`, or the real SmolLM2 (converted once, cached
    under models/)."""
    if name == "smollm2":
        from retentivekv_vllm.fixtures.smollm2 import smollm2_model_dir

        return str(smollm2_model_dir())
    from retentivekv_vllm.fixtures import build_tiny_model

    return str(build_tiny_model(synthetic_dir, arch="llama", **MODEL))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="stock and 0.2 only, shorter prompts")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    parser.add_argument(
        "--readme", action="store_true", help="only rewrite README.md's table from the JSON"
    )
    parser.add_argument(
        "--model",
        choices=tuple(MODELS),
        default="synthetic",
        help="synthetic (the default; random weights, KV-dominated) or smollm2 (the real "
        "SmolLM2-135M-Instruct: stock and 0.2 at 8k, one pass)",
    )
    parser.add_argument(
        "--run-spec", nargs=2, type=Path, help=argparse.SUPPRESS
    )  # one configuration
    args = parser.parse_args(argv)
    if args.model != "synthetic" and (args.quick or args.readme):
        parser.error(f"--model {args.model} has one setting of its own: drop --quick and --readme")
    mode = args.model if args.model != "synthetic" else "quick" if args.quick else "full"
    json_path = args.out / {"full": "speed.json"}.get(mode, f"speed_{mode}.json")
    if args.run_spec:
        spec_path, out_path = args.run_spec
        out_path.write_text(json.dumps(run_one(json.loads(spec_path.read_text()))))
        return 0
    if args.readme:
        write_readme_table(json.loads(json_path.read_text()))
        return 0
    require_matplotlib()

    import torch
    import vllm

    settings = SETTINGS[mode]
    model = MODELS[args.model]
    repeats = settings.get("latency_repeats", LATENCY_REPEATS)
    throughput = settings["throughput"]
    blocks_per_stock_request = -(
        -(throughput["prompt_tokens"] + throughput["max_tokens"]) // BLOCK_SIZE
    )
    pool_blocks = (
        STOCK_REQUESTS_IN_POOL * blocks_per_stock_request + 2
    )  # +1 slack, +1 vLLM's null block
    meta = {
        "benchmark": "speed",
        "mode": mode,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "model": {"name": args.model, **model_shape(model)},
        "settings": {
            **settings,
            "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS,
            "pool_blocks": pool_blocks,
            "kv_bytes_per_token": kv_bytes_per_token(model),
            "stock_requests_in_pool": STOCK_REQUESTS_IN_POOL,
            "latency_repeats": repeats,
        },
        "load_start": load(),
    }
    started = time.perf_counter()
    runs = configs(settings["budgets"], SHIPPED_MAPS.get(args.model))
    by_config = [[] for _ in runs]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = benchmark_model_dir(args.model, Path(tmp) / "speed-llama")
        for pass_index in range(settings["passes"]):
            for index, (name, additional_config) in enumerate(runs):
                print(
                    f"[pass {pass_index + 1}/{settings['passes']}, {index + 1}/{len(runs)}] {name} "
                    "...",
                    flush=True,
                )
                spec = {
                    "index": index,
                    "name": name,
                    "additional_config": additional_config,
                    "model_dir": model_dir,
                    "latency_prompt": settings["latency_prompt"],
                    "latency_tokens": settings["latency_tokens"],
                    "throughput": throughput,
                    "pool_blocks": pool_blocks,
                    "model": model,
                    "latency_repeats": repeats,
                }
                r = run_in_subprocess(spec, Path(tmp))
                r["throughput"].pop("series")
                lat, thr = r["latency"], r["throughput"]
                print(
                    f"    TTFT {lat['ttft_s']:.2f} s, TPOT {1e3 * lat['tpot_s']:.1f} ms (load "
                    f"{lat['load_before'][0]}); "
                    f"{thr['output_tokens_per_s']:.1f} output tok/s, max running "
                    f"{thr['max_running']}, "
                    f"KV {thr['kv_bytes_per_request'] / 2**20:.1f} MiB/request (load "
                    f"{thr['load_before'][0]})"
                    + (f"  ERRORS {thr['errors']}" if thr["errors"] else ""),
                    flush=True,
                )
                by_config[index].append(r)
    results = [merge_passes(config_runs) for config_runs in by_config]
    add_ratios(results)
    meta.update(load_end=load(), elapsed_s=round(time.perf_counter() - started, 1))
    data = {"meta": meta, "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    plot(data, json_path.with_suffix(".png"))
    print(summary_table(data))
    return 1 if any(r["throughput"]["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
