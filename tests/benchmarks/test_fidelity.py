"""The fidelity harness: its statistics, its regression check, and the quick run through vLLM."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.equal_memory import equal_memory_budget, state_tokens, token_bytes
from benchmarks.fidelity import (
    LEARNED,
    compact_json,
    comparisons,
    grid,
    quick_failures,
    task_maps,
    wilson_interval,
)
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


def test_equal_memory_cells_follow_their_references_at_compressed_budgets_only():
    """Every eviction cell (a policy other than retentive, or retentive without a state) runs
    again per reference, after the references of its budget; none at 1.0, where nothing folds."""
    task = make_task("recall")
    labels = ["snapkv", "retentive", "retentive: no state", LEARNED]
    cells = grid(task, labels, [1.0, 0.2], ("retentive", LEARNED))
    assert [(c.label, c.budget) for c in cells] == [
        ("full", 1.0),
        *((label, 1.0) for label in labels),
        *((label, 0.2) for label in labels),
        ("snapkv (equal memory to retentive)", 0.2),
        ("retentive: no state (equal memory to retentive)", 0.2),
        (f"snapkv (equal memory to {LEARNED})", 0.2),
        (f"retentive: no state (equal memory to {LEARNED})", 0.2),
    ]
    matched = [c for c in cells if c.equal_memory_to]
    assert [c.equal_memory_to for c in matched] == ["retentive"] * 2 + [LEARNED] * 2
    bare = next(c for c in cells if (c.label, c.budget) == ("snapkv", 0.2))
    assert matched[0].config == bare.config
    learned = next(c for c in cells if c.label == LEARNED)
    assert learned.config["kv_feature_map"] == "learned"
    assert learned.config["kv_maps"] == str(task_maps(task))
    # "retentive" is the prf state the recorded results were measured with.
    assert next(c for c in cells if c.label == "retentive").config["kv_feature_map"] == "prf"
    # --equal-memory-cells: eviction cells at equal memory only (retentive keeps a state: none).
    only = grid(task, [LEARNED], [0.1], (LEARNED,), ["h2o", "retentive"])
    assert [c.label for c in only] == ["full", LEARNED, f"h2o (equal memory to {LEARNED})"]


def test_equal_memory_budget_and_tokens():
    assert equal_memory_budget(0.2, 257, 0) == 0.2  # no extra: the cell's own ratio
    assert equal_memory_budget(0.2, 257, 9) == 52 + 9  # ceil(0.2 * 257) + 9 tokens
    assert equal_memory_budget(0.9, 257, 40) == 257  # never more than the prompt
    assert state_tokens(16640, 2048) == 9 and state_tokens(2048, 2048) == 1  # rounded up
    # A float32 cache token over every layer and KV head; a VLM's language model (text_config).
    assert token_bytes(make_task("recall").model_dir()) == 2 * 2 * 2 * 64 * 4
    assert token_bytes(make_task("grid").model_dir()) == 3 * 2 * 2 * 64 * 4
    assert token_bytes(make_task("recall").model_dir(), "bfloat16") == 2 * 2 * 2 * 64 * 2


def _cell(label, right, reference=None, policy="snapkv", states=None, state_bytes=0):
    config = {"kv_policy": policy, **({"kv_states": states} if states else {})}
    return {
        "label": label,
        "budget": 0.2,
        "config": config,
        "equal_memory_to": reference,
        "correct": sum(right),
        "right": right,
        "state_bytes": state_bytes,
    }


def test_comparisons_pair_each_reference_with_the_best_eviction_cell_at_its_memory():
    """Eviction cells are told by the state bytes they held: "retentive" recorded as plain
    {"kv_policy": "retentive"} ran with the prf state (the default then), and is no eviction
    cell even though that config keeps no state now."""
    results = [
        _cell("retentive", [1, 0, 0, 0], policy="retentive", state_bytes=16640),
        _cell("retentive: no state", [1, 0, 0, 0], policy="retentive", states="none"),
        _cell("snapkv", [0, 1, 0, 0]),
        _cell("h2o (equal memory to retentive)", [1, 1, 0, 0], "retentive", policy="h2o"),
        _cell("snapkv (equal memory to retentive)", [1, 1, 1, 0], "retentive"),
    ]
    found = {c["against"]: c for c in comparisons(results)}
    best = found["best eviction, equal memory"]
    assert best["b"] == "snapkv (equal memory to retentive)"
    assert best["accuracy_diff_points"][0] == pytest.approx(-50.0)
    assert best["mcnemar"] == {"a_only": 0, "b_only": 2, "p": 0.5}
    assert found["best eviction, bare budget"]["b"] == "retentive: no state"  # first of equals
    assert found["no state"]["accuracy_diff_points"] == [0.0, 0.0, 0.0]


def test_compact_json_puts_lists_of_values_on_one_line():
    data = {"outputs": [[5, 6], [7]], "ci95": [0.1, 0.2], "names": ["a", "b"], "x": {"y": 1}}
    text = compact_json(data)
    assert json.loads(text) == data
    assert '"ci95": [0.1, 0.2]' in text and "[5, 6]" in text


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
    # snapkv at 0.2 runs again with retentive's state bytes as tokens: more cache, no state.
    cells = {(c["label"], c["budget"]): c for c in report["cells"]}
    retentive, bare = cells["retentive", 0.2], cells["snapkv", 0.2]
    matched = cells["snapkv (equal memory to retentive)", 0.2]
    assert retentive["state_bytes"] > 0 == bare["state_bytes"] == matched["state_bytes"]
    extra = matched["extra_tokens"]
    assert extra == -(-retentive["max_state_bytes"] // report["token_bytes"])
    assert bare["kv_tokens"] < matched["kv_tokens"] <= bare["kv_tokens"] + extra
    assert matched["total_bytes"] >= retentive["total_bytes"]
    assert len(matched["right"]) == len(matched["outputs"]) == matched["items"]
    assert any(c["b"] == matched["label"] for c in report["comparisons"])


def test_table_from_merges_runs_of_different_budgets_and_compares_them(tmp_path):
    """A grid run in two processes (one budget each) merges into one file whose paired
    comparisons cover both budgets."""
    from benchmarks.fidelity import main

    def report(budget):
        cells = []
        for cell in (
            _cell("full", [1, 1, 1, 1], policy="full"),
            _cell("retentive", [1, 0, 0, 0], policy="retentive", state_bytes=16640),
            _cell("snapkv (equal memory to retentive)", [1, 1, 0, 0], "retentive"),
        ):
            budget_of = 1.0 if cell["label"] == "full" else budget
            n = len(cell["right"])
            cell.update(budget=budget_of, items=n, accuracy=cell["correct"] / n)
            cells.append({**cell, "ci95": list(wilson_interval(cell["correct"], n))})
        return {"task": "recall", "complete": True, "comparisons": [], "cells": cells}

    paths = []
    for budget in (0.2, 0.1):
        paths.append(tmp_path / f"{budget}.json")
        paths[-1].write_text(json.dumps(report(budget)))
    out = tmp_path / "merged.json"
    argv = ["--task", "recall", "--no-docs", "--out", str(out), "--table-from", *map(str, paths)]
    assert main(argv) == 0
    merged = json.loads(out.read_text())
    assert merged["complete"] and len(merged["cells"]) == 5
    assert sorted(c["budget"] for c in merged["comparisons"]) == [0.1, 0.2]
