"""The quick soak run (benchmarks/soak.py): 100 mixed requests against one server; no errors but
the aborted ones, every block and state back, resident memory growing no more than stock vLLM's
on the same requests.  The 1,000-request run is
`python -m benchmarks.soak`."""

from dataclasses import asdict

import pytest

from benchmarks.soak import run_soak
from retentivekv_vllm.fixtures import build_tiny_vlm


@pytest.mark.slow
def test_quick_soak(tmp_path):
    model_dir = build_tiny_vlm(tmp_path / "tiny-qwen2_vl", "qwen2_vl")
    report, stock = run_soak(
        100, model_dir, log_path=tmp_path / "vllm-serve.log", seed=1, deadline_s=600
    )
    assert report.failures == [], (asdict(report), asdict(stock))
    assert report.completed > 0 and report.aborted > 0
    assert set(report.by_kind) == {"text", "long text", "image", "two images"}
