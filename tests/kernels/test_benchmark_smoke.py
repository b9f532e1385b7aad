"""benchmarks/kernels.py at toy shapes (on CPU through Triton's interpreter): the script runs end to
end and its JSON holds what the GPU run will report. The numbers themselves mean nothing here."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_smoke_run_writes_results(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "benchmarks.kernels", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=900,
    )
    results = json.loads((tmp_path / "kernels.json").read_text())
    assert (tmp_path / "kernels.png").stat().st_size > 0
    assert results["device"] and results["mode"] == "smoke" and results["copy_peak_gb_per_s"] > 0
    names = [k["kernel"] for k in results["kernels"]]
    assert names == [
        "observation_scores",
        "decode_attention",
        "gather_slots + write_slots",
        "merge_with_state",
    ]
    assert all(k["ms"] > 0 and k["gb_per_s"] > 0 for k in results["kernels"])

    shapes = results["shapes"]
    rows = results["decode_step"]
    assert [r["budget"] for r in rows] == [1.0, 0.5, 0.2, 0.05]
    # Budget 1.0 holds the whole context in whole blocks of fp16 keys and values, no state.
    blocks = math.ceil(shapes["context"] / shapes["block_size"])
    full_bytes = (
        shapes["layers"]
        * blocks
        * shapes["block_size"]
        * shapes["kv_heads"]
        * 2
        * shapes["head_dim"]
        * 2
    )
    assert rows[0]["kv_gib"] * 2**30 == full_bytes
    assert [r["kept_tokens"] for r in rows] == [
        math.ceil(b * shapes["context"]) for b in (1.0, 0.5, 0.2, 0.05)
    ]
    kv = [r["kv_gib"] for r in rows]
    assert kv == sorted(kv, reverse=True)
