"""KV memory of stock vLLM against the plugin, in one process, read from vLLM's own objects.

    python -m benchmarks.memory            # the full run (about 10 minutes on two cores)
    python -m benchmarks.memory --quick    # shorter prompts, fewer requests (a few minutes)

Each configuration runs in its own in-process engine (one after another, same tiny
random-weight Llama, same fixed KV pool, same prompts): stock vLLM (no
``additional_config``), then ``kv_policy=retentive`` with the prf state (``kv_feature_map=prf``,
the state the recorded results carry) at each budget. All requests are
submitted at once and ``llm.llm_engine.step()`` is driven until they finish; after
every step the benchmark reads vLLM's scheduler (its ``running`` list, the block
pool's free count, each request's block table) -- never the plugin's own counters,
except the recurrent-state sizes, which live only in the worker (``worker_stats``).

Measured per configuration:

* max concurrent requests: the largest ``len(scheduler.running)`` over the run;
* KV bytes per request in steady decode: ``(usable - free) / running`` blocks over the
  steps where every running request is decoding (median), times the bytes of one
  block (2 x layers x KV heads x block size x head dim x 4 bytes, checked against
  vLLM's own allocation), plus the state bytes per request (``state_elements`` x 4);
* the free-block series over steps, and preemptions (``Request.num_preemptions``).

Correctness is checked while measuring: the blocks held in the requests' block tables
must account for every used block of the pool at every step, every request must
produce exactly ``max_tokens`` tokens, and once all requests finished (and one more
step ran) the pool must be entirely free again.  A violation is recorded in the JSON,
printed, and makes the command exit non-zero (after the results are written).

Writes ``benchmarks/results/memory.json`` and ``benchmarks/results/memory.png``
(``--out DIR`` to write elsewhere).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

from benchmarks import require_matplotlib

# The environment the measuring process needs, set by the entry points before vLLM is imported (not
# at import: a process that only imports this module, a test run, must not pass them on to the
# servers it starts): an in-process engine core (the scheduler is then an attribute of the LLM
# object), no hub, and no INFO lines of vLLM's (and the plugin's per request) among the progress.
MEASURING_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "HF_HUB_OFFLINE": "1",
    "VLLM_LOGGING_LEVEL": "ERROR",
}

RESULTS_DIR = Path(__file__).resolve().parent / "results"

BUDGETS = (1.0, 0.5, 0.2, 0.1, 0.05)
CONFIGS: list[tuple[str, dict | None]] = [("stock", None)] + [
    (f"retentive {b:g}", {"kv_policy": "retentive", "kv_feature_map": "prf", "kv_budget": b})
    for b in BUDGETS
]

# The pool holds STOCK_REQUESTS_IN_POOL whole stock requests (prompt + all generated
# tokens), plus POOL_SLACK_BLOCKS.  Decoding has to outlast the admission of every
# request (each prompt takes prompt_tokens / max_num_batched_tokens steps to prefill),
# otherwise concurrency is limited by time, not memory: max_tokens is chosen for that.
STOCK_REQUESTS_IN_POOL = 4
POOL_SLACK_BLOCKS = 1
SETTINGS = {
    "full": dict(prompt_tokens=2048, num_requests=32, max_tokens=160),
    "quick": dict(prompt_tokens=1024, num_requests=12, max_tokens=48),
}
MAX_NUM_BATCHED_TOKENS = 512
SEED = 0
DTYPE_BYTES = 4  # float32 cache and float32 states


def build_model(directory: Path) -> tuple[Path, dict]:
    from retentivekv_vllm.fixtures import build_tiny_model

    model_dir = Path(build_tiny_model(directory / "tiny-llama", arch="llama"))
    config = json.loads((model_dir / "config.json").read_text())
    shape = {
        "arch": config["architectures"][0],
        "num_layers": config["num_hidden_layers"],
        "num_attention_heads": config["num_attention_heads"],
        "num_kv_heads": config["num_key_value_heads"],
        "head_dim": config["head_dim"],
        "hidden_size": config["hidden_size"],
        "dtype": "float32",
    }
    return model_dir, shape


def make_prompts(n: int, length: int) -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(SEED)
    return [torch.randint(5, 2000, (length,), generator=generator).tolist() for _ in range(n)]


def non_null_blocks(blocks) -> int:
    return sum(1 for block in blocks if not block.is_null)


def run_config(
    name,
    additional_config,
    model_dir,
    shape,
    prompts,
    settings,
    pool_bytes,
    reserve_full_isl=True,
    max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
) -> dict:
    from vllm import LLM, SamplingParams

    from retentivekv_vllm.engine.worker import worker_stats

    prompt_tokens, max_tokens = settings["prompt_tokens"], settings["max_tokens"]
    kwargs = {} if additional_config is None else {"additional_config": additional_config}
    llm = LLM(
        model=str(model_dir),
        dtype="float32",
        enforce_eager=True,
        seed=SEED,
        kv_cache_memory_bytes=pool_bytes,
        max_model_len=prompt_tokens + max_tokens,
        max_num_batched_tokens=max_num_batched_tokens,
        enable_chunked_prefill=True,
        enable_prefix_caching=False,
        scheduler_reserve_full_isl=reserve_full_isl,
        # The plugin reserves the states of max_num_seqs requests out of the pool: size it
        # to the requests this run submits (vLLM's default, 256, would reserve far more).
        max_num_seqs=settings["num_requests"],
        **kwargs,
    )
    try:
        engine = llm.llm_engine
        scheduler = engine.engine_core.engine_core.scheduler
        manager = scheduler.kv_cache_manager
        pool = manager.block_pool
        (group_manager,) = manager.coordinator.single_type_managers
        block_size = group_manager.block_size
        usable = pool.num_gpu_blocks - 1  # vLLM keeps one null block out of the pool
        block_bytes = (
            2
            * shape["num_layers"]
            * shape["num_kv_heads"]
            * block_size
            * shape["head_dim"]
            * DTYPE_BYTES
        )
        kv_config = scheduler.kv_cache_config
        vllm_block_bytes = sum(t.size for t in kv_config.kv_cache_tensors) // kv_config.num_blocks
        errors: list[str] = []
        if vllm_block_bytes != block_bytes:
            errors.append(
                f"bytes per block from the model shape {block_bytes} != vLLM's {vllm_block_bytes}"
            )
        free_at_start = pool.get_num_free_blocks()
        if free_at_start != usable:
            errors.append(
                f"free blocks before any request {free_at_start} != usable blocks {usable}"
            )

        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        for i, ids in enumerate(prompts):
            engine.add_request(f"req-{i}", {"prompt_token_ids": ids}, params)

        series = {
            k: []
            for k in ("time_s", "running", "decoding", "waiting", "free_blocks", "held_blocks")
        }
        preemptions: dict[str, int] = {}
        generated: dict[str, int] = {}
        accounting_errors = 0
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    generated[output.request_id] = len(output.outputs[0].token_ids)
            running = list(scheduler.running)
            free = pool.get_num_free_blocks()
            held = sum(
                non_null_blocks(group_manager.req_to_blocks.get(r.request_id, ())) for r in running
            )
            for request in scheduler.requests.values():
                if request.num_preemptions:
                    preemptions[request.request_id] = max(
                        preemptions.get(request.request_id, 0), request.num_preemptions
                    )
            if held != usable - free:
                accounting_errors += 1
                if accounting_errors <= 5:
                    errors.append(
                        f"step {len(series['running']) + 1}: running requests hold {held} blocks "
                        f"but the pool has {usable - free} in use"
                    )
            series["time_s"].append(round(time.perf_counter() - start, 4))
            series["running"].append(len(running))
            series["decoding"].append(sum(1 for r in running if r.num_output_tokens > 0))
            series["waiting"].append(len(scheduler.waiting))
            series["free_blocks"].append(free)
            series["held_blocks"].append(held)
        elapsed = time.perf_counter() - start
        if accounting_errors > 5:
            errors.append(f"... block accounting differed at {accounting_errors} steps in all")

        engine.step()  # one more step: anything deferred is released by now
        free_at_end = pool.get_num_free_blocks()
        if free_at_end != usable:
            errors.append(
                f"after all requests finished {free_at_end} of {usable} blocks are free "
                f"({usable - free_at_end} not returned)"
            )
        leftover = {rid: non_null_blocks(b) for rid, b in group_manager.req_to_blocks.items() if b}
        if leftover:
            errors.append(f"block tables left after all requests finished: {leftover}")
        short = {rid: n for rid, n in generated.items() if n != max_tokens}
        if len(generated) != len(prompts) or short:
            errors.append(
                f"{len(generated)} of {len(prompts)} requests finished; wrong token counts: {short}"
            )

        (stats,) = llm.collective_rpc(worker_stats)
        finished = list(stats["finished"].values())
        state_elements = [s["state_elements"] for s in finished]
        if stats["live"]:
            errors.append(f"worker still holds memory of {sorted(stats['live'])}")
    finally:
        del llm
        gc.collect()

    steady = [
        (usable - f) / r
        for r, d, f in zip(series["running"], series["decoding"], series["free_blocks"])
        if r > 0 and d == r
    ]
    blocks_per_request = statistics.median(steady) if steady else None
    state_bytes = statistics.mean(state_elements) * DTYPE_BYTES if state_elements else 0.0
    cache_bytes = blocks_per_request * block_bytes if steady else None
    return {
        "name": name,
        "additional_config": additional_config,
        "kv_manager": type(group_manager).__name__,
        "block_size": block_size,
        "block_bytes": block_bytes,
        "pool_blocks": usable,
        "max_running": max(series["running"]),
        "max_decoding": max(series["decoding"]),
        "steady_decode_steps": len(steady),
        "blocks_per_request": blocks_per_request,
        "cache_bytes_per_request": cache_bytes,
        "state_bytes_per_request": state_bytes,
        "kv_bytes_per_request": None if cache_bytes is None else cache_bytes + state_bytes,
        "min_free_blocks": min(series["free_blocks"]),
        "free_blocks_at_start": free_at_start,
        "free_blocks_at_end": free_at_end,
        "preempted_requests": len(preemptions),
        "preemptions": sum(preemptions.values()),
        "steps": len(series["running"]),
        "elapsed_s": round(elapsed, 2),
        "worker": {
            "requests": len(finished),
            "tokens_folded_mean": statistics.mean(s["tokens_folded"] for s in finished)
            if finished
            else 0,
            "compressions_mean": statistics.mean(s["compressions"] for s in finished)
            if finished
            else 0,
            "budget_tokens": finished[0]["budget_tokens"] if finished else None,
        },
        "errors": errors,
        "series": series,
    }


def add_ratios(results: list[dict]) -> None:
    stock = results[0]
    for r in results:
        r["max_running_vs_stock"] = r["max_running"] / stock["max_running"]
        r["kv_bytes_vs_stock"] = (
            r["kv_bytes_per_request"] / stock["kv_bytes_per_request"]
            if r["kv_bytes_per_request"] and stock["kv_bytes_per_request"]
            else None
        )


def summary_table(results: list[dict]) -> str:
    mib = 2**20
    header = (
        f"{'config':<16} {'max run':>7} {'x stock':>7} {'blocks/req':>10} {'cache MiB':>9} "
        f"{'state MiB':>9} {'KV MiB/req':>10} {'x stock':>7} {'preempt':>7} {'end free':>9} "
        f"{'time s':>7}"
    )
    lines = [header, "-" * len(header)]
    nan = float("nan")
    for r in results:
        kv = r["kv_bytes_per_request"]
        blocks = r["blocks_per_request"] if r["blocks_per_request"] is not None else nan
        vs_stock = r["kv_bytes_vs_stock"] if r["kv_bytes_vs_stock"] is not None else nan
        lines.append(
            f"{r['name']:<16} {r['max_running']:>7} {r['max_running_vs_stock']:>7.2f} "
            f"{blocks:>10.2f} "
            f"{(r['cache_bytes_per_request'] or float('nan')) / mib:>9.3f} "
            f"{r['state_bytes_per_request'] / mib:>9.3f} "
            f"{(kv or float('nan')) / mib:>10.3f} "
            f"{vs_stock:>7.3f} "
            f"{r['preemptions']:>7} "
            f"{str(r['free_blocks_at_end']) + '/' + str(r['pool_blocks']):>9} "
            f"{r['elapsed_s']:>7.1f}"
        )
    return "\n".join(lines)


def plot(results: list[dict], meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"].replace("retentive ", "ret ") for r in results]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))

    ax = axes[0]
    bars = ax.bar(names, [r["max_running"] for r in results], color=colors[: len(results)])
    ax.bar_label(bars)
    ax.axhline(meta["settings"]["num_requests"], color="grey", linestyle=":", linewidth=1)
    ax.set_title("max concurrent requests (scheduler.running)")
    ax.set_ylabel("requests")

    ax = axes[1]
    mib = 2**20
    cache = [(r["cache_bytes_per_request"] or 0) / mib for r in results]
    state = [r["state_bytes_per_request"] / mib for r in results]
    ax.bar(names, cache, color=colors[: len(results)], label="cache blocks")
    bars = ax.bar(names, state, bottom=cache, color="black", label="recurrent state")
    ax.bar_label(bars, labels=[f"{c + s:.2f}" for c, s in zip(cache, state)])
    ax.set_title("KV MiB per request, steady decode")
    ax.set_ylabel("MiB")
    ax.legend()

    ax = axes[2]
    # Stock last, dashed: budget 1.0 lies on top of it.
    for r, label, color in reversed(list(zip(results, names, colors))):
        style = (
            dict(color="black", linestyle="--", linewidth=1.0)
            if r is results[0]
            else dict(color=color)
        )
        ax.plot(
            range(1, r["steps"] + 1),
            r["series"]["free_blocks"],
            label=label,
            **{"linewidth": 1.2, **style},
        )
    reserved = results[0]["pool_blocks"] - results[-1]["pool_blocks"]
    ax.set_title(
        f"free blocks ({results[0]['pool_blocks']} usable; retentive reserves {reserved} for "
        "states)"
    )
    ax.set_xlabel("engine step")
    ax.set_ylabel("free blocks")
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], fontsize=8)

    for ax in axes[:2]:
        ax.tick_params(axis="x", labelrotation=30)
    s = meta["settings"]
    fig.suptitle(
        f"stock vLLM vs retentivekv: {s['num_requests']} requests x {s['prompt_tokens']}-token "
        "prompts, "
        f"{s['max_tokens']} generated, pool {results[0]['pool_blocks']} blocks of "
        f"{results[0]['block_size']} "
        f"tokens, max_num_batched_tokens {MAX_NUM_BATCHED_TOKENS} (vLLM {meta['vllm']}, "
        f"{meta['cpu_count']} cores)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter prompts and fewer requests")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    parser.add_argument(
        "--no-reserve-full-isl",
        action="store_true",
        help="admit a request once its first chunk fits (vLLM's scheduler_reserve_full_isl=False) "
        "instead of only once its whole prompt fits (vLLM's default)",
    )
    args = parser.parse_args(argv)
    require_matplotlib()
    os.environ.update(MEASURING_ENV)
    warnings.filterwarnings("ignore", category=FutureWarning)

    import torch
    import vllm

    settings = SETTINGS["quick" if args.quick else "full"]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, shape = build_model(Path(tmp))
        prompts = make_prompts(settings["num_requests"], settings["prompt_tokens"])
        # The CPU backend's block size is 128 tokens; the pool is sized in whole blocks.
        block_size = 128
        block_bytes = (
            2
            * shape["num_layers"]
            * shape["num_kv_heads"]
            * block_size
            * shape["head_dim"]
            * DTYPE_BYTES
        )
        blocks_per_stock_request = -(
            -(settings["prompt_tokens"] + settings["max_tokens"]) // block_size
        )
        # +1: vLLM takes one block of the pool as its null block.
        pool_blocks = STOCK_REQUESTS_IN_POOL * blocks_per_stock_request + POOL_SLACK_BLOCKS + 1
        results = []
        for i, (name, additional_config) in enumerate(CONFIGS):
            print(f"[{i + 1}/{len(CONFIGS)}] {name} ...", end=" ", flush=True)
            r = run_config(
                name,
                additional_config,
                model_dir,
                shape,
                prompts,
                settings,
                pool_blocks * block_bytes,
                not args.no_reserve_full_isl,
            )
            if r["block_size"] != block_size:
                r["errors"].append(
                    f"block size {r['block_size']} != the {block_size} the pool was sized for"
                )
            print(
                f"max running {r['max_running']}, blocks/request {r['blocks_per_request']}, "
                f"preemptions {r['preemptions']}, free at end "
                f"{r['free_blocks_at_end']}/{r['pool_blocks']}, "
                f"{r['steps']} steps in {r['elapsed_s']:.1f} s"
                + ("  ERRORS" if r["errors"] else ""),
                flush=True,
            )
            for error in r["errors"]:
                print(f"    ERROR: {error}", flush=True)
            results.append(r)

    add_ratios(results)
    meta = {
        "benchmark": "memory",
        "mode": "quick" if args.quick else "full",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "model": shape,
        "settings": {
            **settings,
            "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS,
            "chunked_prefill": True,
            "prefix_caching": False,
            "scheduler_reserve_full_isl": not args.no_reserve_full_isl,
            "sampling": "greedy, ignore_eos",
            "prompts": f"uniform random token ids in [5, 2000), torch seed {SEED}",
            "pool_blocks": pool_blocks - 1,
            "prompt_blocks": -(-settings["prompt_tokens"] // block_size),
            "pool_bytes": pool_blocks * block_bytes,
            "pool_sized_for_stock_requests": STOCK_REQUESTS_IN_POOL,
        },
        "notes": (
            "stock = the same engine with no additional_config (the plugin is installed but "
            "inactive). "
            "blocks_per_request = median over steps where every running request is decoding of "
            "(pool_blocks - free_blocks) / running. kv_bytes_per_request = blocks_per_request * "
            "block_bytes "
            "+ mean state_elements * 4 of the worker's finished requests."
        ),
        "total_elapsed_s": round(time.perf_counter() - started, 1),
    }
    table = summary_table(results)
    errors = {r["name"]: r["errors"] for r in results if r["errors"]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.json").write_text(
        json.dumps(
            {**meta, "ok": not errors, "summary": table.splitlines(), "configs": results}, indent=1
        )
        + "\n"
    )
    plot(results, meta, args.out / "memory.png")

    print()
    print(table)
    print(
        f"\ntotal {meta['total_elapsed_s']:.0f} s; wrote {args.out / 'memory.json'} and "
        f"{args.out / 'memory.png'}"
    )
    if errors:
        print("\nFAILED correctness checks:", file=sys.stderr)
        for name, errs in errors.items():
            for e in errs:
                print(f"  {name}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
