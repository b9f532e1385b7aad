"""The CPU backend's decode kernels: `csrc/cpu_decode.cpp`, compiled on first use.

`paged_decode_attention` attends one query token per request over its live slots, straight from
vLLM's CPU cache blocks, and returns the log-sum-exp the merge with the states needs; its torch
twin is `cpu_layout.DecodeBatch.attend`. `merge_state_readouts` merges those rows with their
requests' states in place, reading each state where it lives; its twin is
`core.merge_with_state_readouts`. `observation_statistics` scores a compression's cache (the
attention each key receives from the observation window and its entropy potential) from the
window's logits without forming their probabilities; its twin is
`core.scores.observation_statistics`.
The decode kernel reads the cache layout of vLLM's "vec" ISA
(keys dimension-major, values token-major per block and head); the backend checks the measured
layout and falls back to the twin for any other, and where the extension cannot be built.

The build is started with the backend (`RetentiveCPUAttentionImpl`), so that its first compile
(about a minute on two cores, cached afterwards) is part of start-up, not of a request.
"""

from __future__ import annotations

import functools
import hashlib
import platform
from pathlib import Path

import torch

from retentivekv_vllm.core import PatchLayout, RecurrentState
from retentivekv_vllm.csrc import CPU_DECODE_SOURCE, Extension, build

# -ffast-math: the kernel never forms an infinity (its running maximum starts at -FLT_MAX and only
# live slots are visited). -fopenmp: ATen's parallel_for is OpenMP here, and the loader resolves
# libgomp to the copy torch has already loaded.
FLAGS = dict(
    extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"], extra_ldflags=["-fopenmp"]
)


def cpu_tag() -> str:
    """The build targets this machine's instruction set (-march=native), so its cache is keyed by
    the CPU's feature flags: a build made on another CPU model (a Docker image's) is not loaded."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        features = next(line for line in cpuinfo if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        features = f"{platform.machine()} {platform.processor()}"
    return hashlib.sha256(features.encode()).hexdigest()[:12]


@functools.cache
def decode_extension() -> Extension:
    return build(f"retentivekv_cpu_decode_{cpu_tag()}", [CPU_DECODE_SOURCE], **FLAGS)


def paged_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_rows: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [R, Hkv, g, d] float32; kv_cache [blocks, Hkv, 2·bs, d] in the vec layout; block_rows
    [R, max_blocks] int32 (block-table rows); starts, ends [R] int64: request r's live slots are
    [starts[r], ends[r]). -> out [R, Hkv, g, d] float32, lse [R, Hkv, g]."""
    return tuple(
        decode_extension().module.paged_decode_attention(
            q, kv_cache, block_rows, starts, ends, scale
        )
    )


def merge_state_readouts(
    out: torch.Tensor,
    lse: torch.Tensor,
    log_phi: torch.Tensor,
    rows: torch.Tensor,
    states: list[list[RecurrentState]],
) -> None:
    """In place: out [R, Hkv, g, dv] float32 rows[m] (lse [R, Hkv, g]) merged with the readouts of
    states[m] (the same number of states for every member m) for the queries' log features
    log_phi [M, Hkv, g, r]; unit gains."""
    flat = [state for member in states for state in member]
    decode_extension().module.merge_state_readouts(
        out,
        lse,
        log_phi.contiguous(),
        rows,
        [s.S.contiguous() for s in flat],
        [s.z.contiguous() for s in flat],
    )


def observation_statistics(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    layout: PatchLayout | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(α, H) [H, n] of the observation rows q [H, m, d] over the keys k [H, n, d] (key positions
    [n] or per head [H, n]); arguments as in `core.scores.observation_statistics`."""
    logits = (scale * q.float()) @ k.float().transpose(-1, -2)
    heads, n = k.shape[0], k.shape[1]
    visual = layout.visual if layout is not None else torch.empty(0, dtype=torch.bool)
    return tuple(
        decode_extension().module.observation_statistics(
            logits, q_positions, k_positions.expand(heads, n), visual
        )
    )
