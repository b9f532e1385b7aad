"""The fidelity harness: its statistics, its regression check, and the quick run through vLLM."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.fidelity import quick_failures, wilson_interval
from benchmarks.tasks import make_task

REPO = Path(__file__).parents[2]


def test_wilson_interval_matches_newcombes_worked_example():
    # Newcombe (1998), Statistics in Medicine 17:857, method 3: 81 of 263 -> 0.2553 to 0.3662.
    low, high = wilson_interval(81, 263)
    assert round(low, 4) == 0.2553 and round(high, 4) == 0.3662


def test_quick_check_refuses_low_full_accuracy_and_budget_one_drift():
    task = make_task("recall")
    full = {
        "label": "full",
        "budget": 1.0,
        "accuracy": task.min_full_accuracy,
        "outputs": [[5], [6]],
    }
    same = {"label": "snapkv", "budget": 1.0, "accuracy": 1.0, "outputs": [[5], [6]]}
    assert quick_failures(task, [full, same]) == []
    drifted = {**same, "outputs": [[5], [7]]}
    assert quick_failures(task, [full, drifted]) == [
        "snapkv at budget 1.0 differs from full on 1 items"
    ]
    low = {**full, "accuracy": task.min_full_accuracy - 0.01}
    (failure,) = quick_failures(task, [low, same])
    assert failure.startswith("full-cache accuracy")


@pytest.mark.slow
@pytest.mark.parametrize("task", ["recall", "grid"])
def test_quick_fidelity_run_keeps_the_documented_accuracy(tmp_path, task):
    """Full cache at or above the documented accuracy on each shipped model, and every policy at
    budget 1.0 generating exactly what full generates (the harness exits 1 otherwise)."""
    out = tmp_path / "quick.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.fidelity", "--task", task, "--quick", "--out", str(out)],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = json.loads(out.read_text())
    assert result.returncode == 0, report["failures"] or result.stderr[-3000:]
    full = next(c for c in report["cells"] if c["label"] == "full")
    assert full["accuracy"] >= make_task(task).min_full_accuracy
