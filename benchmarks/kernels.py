"""The Triton kernels at torch level: achieved bandwidth and a decode step.

    python -m benchmarks.kernels            # on a CUDA GPU: the measurements below
    python -m benchmarks.kernels --smoke    # anywhere: toy shapes (on CPU through Triton's
                                            # interpreter), only to show the script runs

Measured in one process, on one device:

* peak bandwidth: a device-to-device copy (``Tensor.copy_``) of a large buffer, bytes read
  plus bytes written over the time;
* each kernel's achieved bandwidth: the bytes it must move at least (inputs read once,
  outputs written once, as counted per kernel below) over its time, also as a share of the
  copy peak;
* a decode step at LLaVA-1.5-7B shapes (32 layers, 32 KV heads, head dim 128, fp16, a
  4.5k-token context, one request): the attention of every layer over the kept cache merged
  with the states' readout (``decode_attention``), at budgets 1.0/0.5/0.2/0.05, with the KV
  memory (cache kept plus states) measured from the allocator. Only attention is timed, not
  the rest of the model, so the ms/token are not the paper's; their ratios to budget 1.0 are
  set beside the paper's ratios.

Times are medians over repeats, after warm-up, with CUDA events on a GPU. Writes
``benchmarks/results/kernels.json`` and ``kernels.png``, naming the device (``--out DIR`` to
write elsewhere).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks import require_matplotlib

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BUDGETS = (1.0, 0.5, 0.2, 0.05)
# The paper's decode table (latency per token, KV memory) for its full cache and budgets.
PAPER = {
    1.0: {"ms_per_token": 32.15, "kv_gib": 2.24},
    0.5: {"ms_per_token": 27.84, "kv_gib": 1.18},
    0.2: {"ms_per_token": 21.42, "kv_gib": 0.46},
    0.05: {"ms_per_token": 18.42, "kv_gib": 0.23},
}


@dataclass(frozen=True)
class Shapes:
    copy_bytes: int
    layers: int
    kv_heads: int
    group: int  # query heads per KV head
    head_dim: int
    context: int  # tokens of the decode step's request
    block_size: int
    state_rank: int
    observation_rows: int
    repeats: int


FULL = Shapes(
    copy_bytes=1 << 30,
    layers=32,
    kv_heads=32,
    group=1,
    head_dim=128,
    context=4500,
    block_size=16,
    state_rank=64,
    observation_rows=32,
    repeats=20,
)
SMOKE = Shapes(
    copy_bytes=1 << 20,
    layers=2,
    kv_heads=2,
    group=2,
    head_dim=32,
    context=96,
    block_size=16,
    state_rank=16,
    observation_rows=4,
    repeats=1,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="toy shapes; runs on CPU through Triton's interpreter"
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help="directory for kernels.json and kernels.png"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    require_matplotlib()
    if not torch.cuda.is_available():
        if not args.smoke:
            raise SystemExit(
                "error: the measurements need a CUDA GPU; pass --smoke to run toy shapes on CPU"
            )
        # Read by Triton when the kernels are defined, so before they are imported.
        os.environ["TRITON_INTERPRET"] = "1"
    results = run(SMOKE if args.smoke else FULL, smoke=args.smoke)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "kernels.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / "kernels.png")
    print(f"wrote {json_path} and {args.out / 'kernels.png'}")
    return 0


class Timer:
    """Median time of a callable in ms: CUDA events on a GPU, the wall clock on CPU."""

    def __init__(self, device, repeats: int):
        self.device, self.repeats = device, repeats

    def __call__(self, fn) -> float:
        fn()  # warm-up (and compilation)
        times = []
        for _ in range(self.repeats):
            if self.device.type == "cuda":
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                began = time.perf_counter()
                fn()
                times.append((time.perf_counter() - began) * 1e3)
        return statistics.median(times)


def bandwidth(name: str, nbytes: int, ms: float, peak_gbps: float) -> dict:
    gbps = nbytes / (ms * 1e-3) / 1e9
    return {
        "kernel": name,
        "bytes": nbytes,
        "ms": ms,
        "gb_per_s": gbps,
        "share_of_copy_peak": gbps / peak_gbps,
    }


def paged_cache(shapes: Shapes, tokens: int, dtype, device, gen):
    """One request's `tokens` slots in a vLLM-layout cache [blocks, Hkv, bs, 2d], random."""
    from retentivekv_vllm.kernels import split_kv_cache

    blocks = math.ceil(tokens / shapes.block_size)
    kv_cache = torch.randn(
        blocks,
        shapes.kv_heads,
        shapes.block_size,
        2 * shapes.head_dim,
        generator=gen,
        device=device,
    ).to(dtype)
    key_cache, value_cache = split_kv_cache(kv_cache, shapes.head_dim)
    block_table = torch.randperm(blocks, device=device, generator=gen).to(torch.int32)[None]
    return kv_cache, key_cache, value_cache, block_table


def state_pool(heads: int, rank: int, head_dim: int, cache_dtype, device, gen):
    """One request's state in a pool, stored as the engine stores it beside a `cache_dtype`
    cache (`core.storage_dtype`)."""
    from retentivekv_vllm.kernels import PagedStates

    from retentivekv_vllm.core import RecurrentState, storage_dtype

    state = RecurrentState(
        torch.rand(1, heads, rank, head_dim, generator=gen, device=device),
        torch.rand(1, heads, rank, generator=gen, device=device) + 1,
    ).stored_as(storage_dtype(cache_dtype))
    index = torch.zeros(1, 1, dtype=torch.int32, device=device)
    return PagedStates(S=state.S, z=state.z, index=index)


def run(shapes: Shapes, smoke: bool) -> dict:
    import triton
    from retentivekv_vllm.kernels import (
        cuda_extension,
        decode_attention,
        gather_slots,
        merge_with_state,
        observation_scores,
        write_slots,
    )

    from retentivekv_vllm.core import PositiveRandomFeatures

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.float16
    elt = torch.finfo(dtype).bits // 8
    timer = Timer(device, shapes.repeats)
    H, d, r = shapes.kv_heads, shapes.head_dim, shapes.state_rank
    num_q_heads = H * shapes.group
    scale = d**-0.5
    feature_map = PositiveRandomFeatures(d, r, scale)

    # Peak: a copy reads and writes every byte once.
    src = torch.empty(shapes.copy_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy_ms = timer(lambda: dst.copy_(src))
    peak = 2 * shapes.copy_bytes / (copy_ms * 1e-3) / 1e9
    src = dst = None  # free the copy buffers before the kernels run

    n = shapes.context
    _, key_cache, value_cache, block_table = paged_cache(shapes, n, dtype, device, gen)
    seq_lens = torch.tensor([n], device=device)
    live_start = torch.zeros(1, dtype=torch.int32, device=device)
    kernels = []

    # Observation scores: keys read by both launches, α and H written.
    m = shapes.observation_rows
    queries = torch.randn(m, num_q_heads, d, generator=gen, device=device).to(dtype)
    starts = torch.tensor([0, m], device=device)
    q_positions = torch.arange(n - m, n, device=device)
    ms = timer(
        lambda: observation_scores(
            queries, starts, q_positions, key_cache, block_table, live_start, seq_lens, scale
        )
    )
    kernels.append(bandwidth("observation_scores", 2 * H * n * d * elt + 2 * H * n * 4, ms, peak))

    # Decode over the whole cache with one state: K and V read once, the state read once.
    states = state_pool(H, r, d, dtype, device, gen)
    query = torch.randn(1, num_q_heads, d, generator=gen, device=device).to(dtype)
    ms = timer(
        lambda: decode_attention(
            query,
            key_cache,
            value_cache,
            block_table,
            live_start,
            seq_lens,
            scale,
            states,
            feature_map,
        )
    )
    kernels.append(
        bandwidth(
            "decode_attention",
            H * n * 2 * d * elt + H * r * (d + 1) * states.S.element_size(),
            ms,
            peak,
        )
    )

    # A compression's packing: half the slots read into a buffer, written onto the newest half.
    kept = n // 2
    slots = (torch.arange(kept, device=device) * 2).expand(H, -1)[None].contiguous()
    counts = torch.tensor([kept], device=device)
    fold_to = seq_lens - kept

    def pack():
        keys, values = gather_slots(key_cache, value_cache, block_table, slots, counts)
        write_slots(key_cache, value_cache, block_table, keys, values, fold_to, counts)

    ms = timer(pack)
    kernels.append(bandwidth("gather_slots + write_slots", 4 * H * kept * 2 * d * elt, ms, peak))

    # The merge (the CUDA extension where it builds, its torch twin otherwise).
    rows = num_q_heads * shapes.observation_rows
    out_local = torch.randn(rows, d, generator=gen, device=device).to(dtype)
    lse = torch.randn(rows, generator=gen, device=device)
    numerator = torch.randn(rows, d, generator=gen, device=device)
    denominator = torch.rand(rows, generator=gen, device=device) + 1
    ms = timer(lambda: merge_with_state(out_local, lse, numerator, denominator))
    merge = bandwidth("merge_with_state", rows * (2 * d * elt + d * 4 + 8), ms, peak)
    merge["implementation"] = (
        "cuda extension" if cuda_extension().module is not None else "torch fallback"
    )
    merge["why"] = cuda_extension().reason
    kernels.append(merge)
    key_cache = value_cache = None  # free the cache before the decode emulation

    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else "cpu (Triton interpreter)",
        "mode": "smoke" if smoke else "full",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": triton.__version__,
        },
        "shapes": asdict(shapes),
        "copy_peak_gb_per_s": peak,
        "kernels": kernels,
        "decode_step": decode_step(shapes, dtype, device, gen, timer, feature_map),
    }


def decode_step(shapes: Shapes, dtype, device, gen, timer, feature_map) -> list[dict]:
    """One decode token through every layer's attention at each budget: the kept cache (a
    budget's share of the context, in whole blocks) plus one state per layer below budget 1."""
    from retentivekv_vllm.kernels import decode_attention

    H, d, r = shapes.kv_heads, shapes.head_dim, shapes.state_rank
    scale = d**-0.5
    query = torch.randn(1, H * shapes.group, d, generator=gen, device=device).to(dtype)
    rows = []
    for budget in BUDGETS:
        kept = max(1, math.ceil(budget * shapes.context))
        allocated_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        layers = []
        for _ in range(shapes.layers):
            kv_cache, key_cache, value_cache, block_table = paged_cache(
                shapes, kept, dtype, device, gen
            )
            states = None
            if budget < 1.0:
                states = state_pool(H, r, d, dtype, device, gen)
            layers.append((kv_cache, key_cache, value_cache, block_table, states))
        # Measured from the allocator on a GPU; on CPU the same bytes, counted from the tensors.
        if device.type == "cuda":
            kv_bytes = torch.cuda.memory_allocated(device) - allocated_before
        else:
            kv_bytes = sum(
                c.numel() * c.element_size() + (0 if s is None else s.S.nbytes + s.z.nbytes)
                for c, _, _, _, s in layers
            )
        seq_lens = torch.tensor([kept], device=device)
        live_start = torch.zeros(1, dtype=torch.int32, device=device)

        def step(layers=layers, live_start=live_start, seq_lens=seq_lens):
            for _, key_cache, value_cache, block_table, states in layers:
                decode_attention(
                    query,
                    key_cache,
                    value_cache,
                    block_table,
                    live_start,
                    seq_lens,
                    scale,
                    states,
                    None if states is None else feature_map,
                )

        ms = timer(step)
        rows.append(
            {"budget": budget, "kept_tokens": kept, "ms_per_token": ms, "kv_gib": kv_bytes / 2**30}
        )
        layers = None  # free this budget's caches before the next
    full = rows[0]
    for row in rows:
        paper = PAPER[row["budget"]]
        row["ms_ratio_to_full"] = row["ms_per_token"] / full["ms_per_token"]
        row["kv_ratio_to_full"] = row["kv_gib"] / full["kv_gib"]
        row["paper_ms_ratio_to_full"] = paper["ms_per_token"] / PAPER[1.0]["ms_per_token"]
        row["paper_kv_ratio_to_full"] = paper["kv_gib"] / PAPER[1.0]["kv_gib"]
        row["paper"] = paper
    return rows


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bw, step) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [k["kernel"] for k in results["kernels"]]
    bw.barh(names, [k["gb_per_s"] for k in results["kernels"]])
    bw.axvline(results["copy_peak_gb_per_s"], color="k", linestyle="--", label="copy peak")
    bw.set_xlabel("GB/s")
    bw.set_title("achieved bandwidth")
    bw.legend()
    rows = results["decode_step"]
    budgets = [str(r["budget"]) for r in rows]
    x = range(len(rows))
    step.bar(
        [i - 0.2 for i in x],
        [r["ms_ratio_to_full"] for r in rows],
        width=0.4,
        label="attention, this run",
    )
    step.bar(
        [i + 0.2 for i in x],
        [r["paper_ms_ratio_to_full"] for r in rows],
        width=0.4,
        label="paper (whole model)",
    )
    step.plot(list(x), [r["kv_ratio_to_full"] for r in rows], "ko-", label="KV memory, this run")
    step.set_xticks(list(x), budgets)
    step.set_xlabel("budget")
    step.set_ylabel("ratio to budget 1.0")
    step.set_title("decode step")
    step.legend()
    fig.suptitle(f"{results['device']} ({results['mode']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
