"""The CPU decode kernels side by side on one cache: vLLM's own (`cpu_attention_with_kv_cache`) over
a request's whole context, and the plugin's (`csrc/cpu_decode.cpp`, with its torch twin) over the
whole context and over the live slots a 0.2 budget leaves.

    python -m benchmarks.cpu_decode           # writes benchmarks/results/cpu_decode.json

One query token per request and query head, fp32, the speed benchmark's head shape (8 query and
8 KV heads of 64), 128-token blocks laid out the way vLLM's "vec" ISA writes them, consecutive
block ids; torch's default threads. Median and minimum of repeated calls, after warm-up. This is
the per-token cost that decides where compression starts to pay: a kernel that reads a token as
fast as vLLM's makes every budget below 1.0 faster, a slower one moves the break-even down.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "cpu_decode.json"
HEADS, HEAD_SIZE, BLOCK_SIZE, ISA = 8, 64, 128, "vec"
CASES = ((1, 8192), (1, 16384), (4, 4096), (12, 4096))  # (requests, context tokens)
BUDGET = 0.2


def timed(fn, repeats: int) -> dict:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return {
        "median_ms": round(1e3 * statistics.median(times), 3),
        "min_ms": round(1e3 * min(times), 3),
    }


def run_case(requests: int, context: int, repeats: int) -> dict:
    from vllm import _custom_ops as ops

    from retentivekv_vllm.engine.cpu_kernel import decode_extension
    from retentivekv_vllm.engine.cpu_layout import DecodeBatch, split_kv_cache

    blocks_per_request = -(-context // BLOCK_SIZE)
    generator = torch.Generator().manual_seed(0)
    cache = torch.randn(
        requests * blocks_per_request + 1, HEADS, BLOCK_SIZE, 2 * HEAD_SIZE, generator=generator
    )
    block_rows = (
        (1 + torch.arange(requests * blocks_per_request)).view(requests, blocks_per_request).int()
    )
    q = torch.randn(requests, HEADS, HEAD_SIZE, generator=generator)
    scale = HEAD_SIZE**-0.5

    seq_lens = torch.full((requests,), context, dtype=torch.int32)
    query_start_loc = torch.arange(requests + 1, dtype=torch.int32)
    metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=requests,
        num_heads=HEADS,
        num_kv_heads=HEADS,
        head_dim=HEAD_SIZE,
        seq_lens=seq_lens,
        dtype=torch.float32,
        query_start_loc=query_start_loc,
        causal=True,
        sliding_window_size=-1,
        isa=ISA,
        enable_kv_split=False,
    )
    out = torch.empty(requests, HEADS, HEAD_SIZE)
    key_cache, value_cache = split_kv_cache(cache)

    def vllm_kernel():
        ops.cpu_attention_with_kv_cache(
            query=q,
            key_cache=key_cache,
            value_cache=value_cache,
            output=out,
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            scale=scale,
            causal=True,
            alibi_slopes=None,
            sliding_window=-1,
            block_table=block_rows,
            softcap=0.0,
            scheduler_metadata=metadata,
            s_aux=None,
        )

    q_grouped = q.view(requests, HEADS, 1, HEAD_SIZE)
    live = int(BUDGET * context)
    whole = DecodeBatch(
        list(range(requests)), block_rows, [0] * requests, [context] * requests, BLOCK_SIZE
    )
    budget = DecodeBatch(
        list(range(requests)),
        block_rows,
        [context - live] * requests,
        [context] * requests,
        BLOCK_SIZE,
    )
    result = {
        "requests": requests,
        "context": context,
        "live_at_budget": live,
        "vllm_kernel_whole": timed(vllm_kernel, repeats),
    }
    if decode_extension().module is not None:
        result["plugin_kernel_whole"] = timed(
            lambda: whole.attend(cache, q_grouped, scale, ISA), repeats
        )
        result["plugin_kernel_budget"] = timed(
            lambda: budget.attend(cache, q_grouped, scale, ISA), repeats
        )
    result["torch_twin_whole"] = timed(
        lambda: whole.attend_torch(cache, q_grouped, scale, ISA), repeats
    )
    result["torch_twin_budget"] = timed(
        lambda: budget.attend_torch(cache, q_grouped, scale, ISA), repeats
    )
    # The same answer from both kernels, on the whole context.
    vllm_kernel()
    mine, _ = whole.attend(cache, q_grouped, scale, ISA)
    result["max_abs_difference"] = float((mine.view_as(out) - out).abs().max())
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    results = [run_case(requests, context, args.repeats) for requests, context in CASES]
    data = {
        "meta": {
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load": [round(x, 2) for x in os.getloadavg()],
            "torch": torch.__version__,
            "heads": HEADS,
            "head_size": HEAD_SIZE,
            "block_size": BLOCK_SIZE,
            "budget": BUDGET,
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    for r in results:
        cells = ", ".join(f"{k} {v['median_ms']} ms" for k, v in r.items() if isinstance(v, dict))
        print(
            f"{r['requests']} x {r['context']}: {cells}; max |diff| {r['max_abs_difference']:.2e}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
