"""Cross-check the project's eviction scores (snapkv, streaming, h2o, knorm, expected_attention)
against NVIDIA kvpress.

    python -m benchmarks.kvpress.crosscheck [--kvpress-python .cache/kvpress-venv/bin/python]

kvpress runs in its own environment (``benchmarks/kvpress/dump.py``) on the tiny Llama fixture
(GQA: 4 query heads over 2 KV heads) and a seeded random prompt; its scores and kept sets, and
the post-RoPE queries and keys it saw, come back in one file. The project's policies then score
the very same tensors here. Reported per press and layer: the largest relative difference of
the scores (after the constant or per-position factor that separates the two definitions, see
below) and the share of kvpress's kept tokens the project keeps too.

Definitions compared (kvpress 0.5.5):

* SnapKV: kvpress averages the window rows' attention (the project sums it: a factor of
  g·window) and pools with zero padding counted (``count_include_pad``) over the keys before the
  window only; the project pools over real neighbours only, across the window boundary. So the
  scores agree up to the factor everywhere except the first and the last ``kernel // 2`` tokens
  before the window.
* StreamingLLM: both keep the sinks and the most recent tokens: kept sets compared.
* H2O: kvpress's ObservedAttentionPress divides each key's summed attention by the number of
  queries that see it (T - j); the project's h2o keeps the raw sum (H2O's accumulated statistic),
  and at the end of prefill it sums only the observation window's rows. Compared twice: with the
  observation window set to the whole prompt (scores agree after dividing by T - j) and with the
  project's default window (kept-set overlap only).
* Knorm: both score a key by its negated L2 norm; the cache holds post-RoPE keys and kvpress
  scores the same post-RoPE keys (RoPE keeps norms anyway). Compared with sinks and window 0, so
  the kept sets are the top-k of the scores alone.
* ExpectedAttention: kvpress takes the query mean and covariance over every prompt query but the
  first 4 (n_sink) and leaves the first 4 keys out of the softmax; the project takes them over its
  observation window and leaves ``--kv-sinks`` keys out. Compared with the observation window set
  to every query but the first 4 and 4 sinks (window 0), where the definitions coincide: the
  sinks' scores differ by construction (kvpress pads them with its maximum; the engine keeps
  sinks without scoring them), so only the other tokens' scores are compared.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.fidelity import REPO
from retentivekv_vllm.config import KVPolicyConfig
from retentivekv_vllm.policies import make_policy

PROMPT_LENGTH = 300
COMPRESSION_RATIO = 0.8  # kvpress's ratio removed; budget 0.2 here
SNAP_WINDOW, SNAP_KERNEL, SINKS = 64, 5, 4
PRESSES = {
    "snapkv": {"window_size": SNAP_WINDOW, "kernel_size": SNAP_KERNEL},
    "streaming": {"n_sink": SINKS},
    "observed": {},
    "knorm": {},
    "expected_attention": {},
}
EXPECTED_SINKS = 4  # kvpress's n_sink


def project_policy_scores(
    name: str,
    queries,
    keys,
    scale,
    observation_window: int,
    sinks: int,
    window: int,
    values=None,
    rotary=None,
):
    """The project's scores and kept mask for one layer (sinks and window kept), from the engine's
    own compression (`executor.compress`) of the layer's queries [Hq, n, d], keys [Hkv, n, d] and,
    for policies that read them, values and the model's rotary frequencies."""
    # Imported here: the engine imports vLLM, which sets environment variables (test_imports).
    from retentivekv_vllm.engine.executor import compress_tensors

    num_kv, n, _ = keys.shape
    config = KVPolicyConfig(
        policy=name,
        sinks=sinks,
        window=window,
        observation_window=observation_window,
        pool_kernel=SNAP_KERNEL,
    )
    policy = make_policy(config, rotary)
    # kvpress's share of the prompt, or the sinks and window alone where they are more (snapkv's
    # 64-token window over a budget of 60: the window is kept, nothing else).
    budget = max(int(n * (1 - COMPRESSION_RATIO)), sinks + window)
    # Compression packs the kept tokens into the slots it was given, so it gets copies and the
    # scores are read from the originals.
    values = keys if values is None else values
    rows = queries.transpose(0, 1)
    _, _, obs, kept = compress_tensors(policy, rows, keys.clone(), values.clone(), scale, budget, 0)
    scores = policy.score(dataclasses.replace(obs, keys=keys, values=values))
    return scores, kept, queries.shape[0] // num_kv


def overlap(kept_mask: torch.Tensor, kvpress_kept: torch.Tensor) -> float:
    """Share of kvpress's kept tokens (indices [Hkv, k]) that the project's mask keeps too."""
    return float(kept_mask.gather(1, kvpress_kept).float().mean())


def max_relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()).abs() / b.double().abs().clamp(min=1e-12)).max())


def compare(dump: dict, rotary: tuple[float, ...]) -> list[dict]:
    """One row per press and layer; `rotary`: the model's rotary frequencies."""
    scale = dump["scale"]
    rows = []
    for layer, data in sorted(dump["layers"].items()):
        q, k = data["queries"].float(), data["keys"].float()
        n = k.shape[1]
        positions = torch.arange(n)
        # SnapKV: sinks 0 (kvpress has none), window = observation window = kvpress's window.
        ours, kept, g = project_policy_scores("snapkv", q, k, scale, SNAP_WINDOW, 0, SNAP_WINDOW)
        theirs = data["snapkv"]["scores"][:, : n - SNAP_WINDOW]
        interior = slice(SNAP_KERNEL // 2, n - SNAP_WINDOW - SNAP_KERNEL // 2)
        rows.append(
            {
                "layer": layer,
                "press": "snapkv",
                "max_rel_diff_interior": max_relative_difference(
                    ours[:, interior] / (g * SNAP_WINDOW), theirs[:, interior]
                ),
                "max_rel_diff_all": max_relative_difference(
                    ours[:, : n - SNAP_WINDOW] / (g * SNAP_WINDOW), theirs
                ),
                "kept_overlap": overlap(kept, data["snapkv"]["kept"]),
            }
        )
        # StreamingLLM: sinks + most recent; the project's window is its default 32.
        _, kept, _ = project_policy_scores("streaming", q, k, scale, 32, SINKS, 32)
        rows.append(
            {
                "layer": layer,
                "press": "streaming",
                "kept_overlap": overlap(kept, data["streaming"]["kept"]),
            }
        )
        # H2O over every prompt query: equal after kvpress's division by the number of queries.
        ours, kept, g = project_policy_scores("h2o", q, k, scale, n, SINKS, 32)
        theirs = data["observed"]["scores"]
        seen_by = (n - positions).double()
        rows.append(
            {
                "layer": layer,
                "press": "h2o (all prompt queries)",
                "max_rel_diff_all": max_relative_difference(ours / seen_by / g, theirs),
                "kept_overlap": overlap(kept, data["observed"]["kept"]),
            }
        )
        _, kept, _ = project_policy_scores("h2o", q, k, scale, 32, SINKS, 32)
        rows.append(
            {
                "layer": layer,
                "press": "h2o (default observation window 32)",
                "kept_overlap": overlap(kept, data["observed"]["kept"]),
            }
        )
        ours, kept, _ = project_policy_scores("knorm", q, k, scale, 32, 0, 0)
        rows.append(
            {
                "layer": layer,
                "press": "knorm",
                "max_rel_diff_all": max_relative_difference(ours, data["knorm"]["scores"]),
                "kept_overlap": overlap(kept, data["knorm"]["kept"]),
            }
        )
        # ExpectedAttention where the definitions coincide (see the module docstring).
        sinks = EXPECTED_SINKS
        ours, kept, _ = project_policy_scores(
            "expected_attention", q, k, scale, n - sinks, sinks, 0, data["values"].float(), rotary
        )
        theirs = data["expected_attention"]["scores"]
        rows.append(
            {
                "layer": layer,
                "press": "expected_attention",
                "max_rel_diff_all": max_relative_difference(ours[:, sinks:], theirs[:, sinks:]),
                "kept_overlap": overlap(kept, data["expected_attention"]["kept"]),
            }
        )
    return rows


def crosscheck(python: Path, model_dir: Path, work: Path) -> list[dict]:
    """kvpress (`python`, its environment) and the project on the model in `model_dir`: the rows of
    `compare`."""
    from transformers import AutoConfig

    from retentivekv_vllm.core.feature_maps import rotary_frequencies_from_config

    rotary = rotary_frequencies_from_config(AutoConfig.from_pretrained(model_dir))
    return compare(run_kvpress(python, model_dir, work), rotary)


def run_kvpress(python: Path, model_dir: Path, work: Path) -> dict:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 2000, (PROMPT_LENGTH,), generator=generator).tolist()
    spec = {"token_ids": ids, "compression_ratio": COMPRESSION_RATIO, "presses": PRESSES}
    (work / "prompt.json").write_text(json.dumps(spec))
    subprocess.run(
        [
            str(python),
            str(REPO / "benchmarks" / "kvpress" / "dump.py"),
            str(model_dir),
            str(work / "prompt.json"),
            str(work / "dump.pt"),
        ],
        check=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        timeout=600,
    )
    return torch.load(work / "dump.pt")


def main(argv: list[str] | None = None) -> int:
    from retentivekv_vllm.fixtures import build_tiny_model

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--kvpress-python", type=Path, default=REPO / ".cache" / "kvpress-venv" / "bin" / "python"
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "kvpress_crosscheck.json"
    )
    args = parser.parse_args(argv)
    if not args.kvpress_python.exists():
        parser.error(
            f"--kvpress-python: {args.kvpress_python} does not exist (see docs/results.md for the "
            "environment)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = build_tiny_model(work / "tiny-llama", arch="llama")
        rows = crosscheck(args.kvpress_python, model_dir, work)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"prompt_length": PROMPT_LENGTH, "compression_ratio": COMPRESSION_RATIO, "rows": rows},
            indent=2,
        )
        + "\n"
    )
    for r in rows:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
