"""Fidelity of every KV policy and retentive ablation, through vLLM with the plugin.

    python -m benchmarks.fidelity --task recall            # the full grid, >= 500 items a cell
    python -m benchmarks.fidelity --task recall --quick    # a few cells, fails on a regression

Each cell (a policy or ablation at one budget) builds its own in-process ``vllm.LLM`` with the
cell's ``additional_config``, generates greedily for the same seeded items, and scores them with
the task's answer check. Accuracy comes with a Wilson 95 % interval. Writes JSON
(``benchmarks/results/fidelity_<task>.json``), a plot (accuracy vs budget per policy and per
ablation) and the markdown table between the task's markers in ``docs/results.md``.

``--quick`` runs full, and snapkv and retentive at budgets 1.0 and 0.2 on fewer items, and exits
non-zero if full-cache accuracy is below the task's documented level or if any policy at budget
1.0 generates anything other than what full generates.

The ``retentive`` cell and its ablations fold into the prf state (``kv_feature_map: prf``), the
state the recorded results were measured with; ``retentive: no state`` is what ``retentive`` does
without a maps file. Learned maps: ``retentive: learned`` runs ``retentive`` with
``kv_feature_map: learned`` and the maps fitted for the task's model
(``retentivekv_vllm/maps/<model>.safetensors``, written by ``python -m benchmarks.fixture_maps
--task TASK``); it is in the grid when that file exists.

Equal memory (``--equal-memory-to``, by default every cell run among ``retentive`` and
``retentive: learned``): at each compressed budget, once a reference cell has run, every eviction
cell (a policy other than ``retentive``, or ``retentive: no state``) runs again with the
reference's state bytes, measured from the worker's stats and rounded up to whole tokens of the
cache, as extra cached tokens: each request's budget becomes the cell's share of its prompt plus
those tokens (``vllm_xargs.kv_budget``, a token count). Every cell reports its KV bytes (live
cache tokens once the prompt is in x bytes per token) plus its state bytes, and keeps each item's
output and right/wrong; each reference is compared, paired over items (bootstrap interval of the
accuracy difference, McNemar's exact test), with the best eviction cell at its own equal memory
and with its no-state ablation.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import require_matplotlib
from benchmarks.equal_memory import (
    equal_memory_budget,
    held_no_state,
    keeps_no_state,
    mcnemar_exact,
    paired_bootstrap,
    request_stats,
    state_tokens,
    token_bytes,
)

REPO = Path(__file__).resolve().parents[1]
BUDGETS = (1.0, 0.5, 0.2, 0.1, 0.05)
# Items are drawn with this seed, independent of every training seed.
ITEM_SEED = 20_260_601

# label -> additional_config of the policy (budget and task defaults are added per cell)
POLICY_CELLS: dict[str, dict[str, Any]] = {
    "full": {"kv_policy": "full"},
    "streaming": {"kv_policy": "streaming"},
    "h2o": {"kv_policy": "h2o"},
    "snapkv": {"kv_policy": "snapkv"},
    "knorm": {"kv_policy": "knorm"},
    "lookm": {"kv_policy": "lookm"},
    # The prf state, which the recorded results were measured with (it was the default; without
    # a maps file retentive now keeps no state, which is the "retentive: no state" cell).
    "retentive": {"kv_policy": "retentive", "kv_feature_map": "prf"},
}
ABLATION_CELLS: dict[str, dict[str, Any]] = {
    "retentive: no state": {"kv_policy": "retentive", "kv_states": "none"},
    "retentive: single state": {
        "kv_policy": "retentive",
        "kv_feature_map": "prf",
        "kv_states": "single",
    },
    "retentive: no entropy": {"kv_policy": "retentive", "kv_feature_map": "prf", "kv_lambda": 1.0},
    "retentive: fixed-query readout": {
        "kv_policy": "retentive",
        "kv_feature_map": "prf",
        "kv_state_query": "fixed",
    },
    "retentive: elu": {"kv_policy": "retentive", "kv_feature_map": "elu"},
    # kv_maps is the task's maps file, added per task (`task_maps`)
    "retentive: learned": {"kv_policy": "retentive", "kv_feature_map": "learned"},
}
LEARNED = "retentive: learned"
EQUAL_MEMORY_REFERENCES = ("retentive", LEARNED)
# Single and dual states differ only on requests with images.
IMAGE_ONLY_ABLATIONS = ("retentive: single state",)
QUICK_CELLS = ("full", "snapkv", "retentive")
QUICK_BUDGETS = (1.0, 0.2)


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95 % for z = 1.96)."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def task_maps(task) -> Path | None:
    """The learned maps shipped for the task's model, if any."""
    from retentivekv_vllm.learned_maps import SHIPPED_MAPS_DIR

    path = SHIPPED_MAPS_DIR / f"{Path(task.model_dir()).name}.safetensors"
    return path if path.is_file() else None


def shown_path(path: str | Path) -> str:
    """A path as the results show it: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name


@dataclass
class Cell:
    label: str
    budget: float
    config: dict[str, Any]
    # Equal memory: the reference cell whose state's bytes this eviction cell gets as tokens.
    equal_memory_to: str | None = None


def equal_memory_label(label: str, reference: str) -> str:
    return f"{label} (equal memory to {reference})"


def cell_config(task, label: str, budget: float) -> dict[str, Any]:
    base = {**POLICY_CELLS, **ABLATION_CELLS}[label]
    config = {**task.policy_defaults, **base, "kv_budget": budget}
    if label == LEARNED:
        maps = task_maps(task)
        if maps is None:
            raise SystemExit(
                f"{LEARNED}: no maps for {task.name}'s model; fit them with "
                f"python -m benchmarks.fixture_maps --task {task.name}"
            )
        config["kv_maps"] = str(maps)
    return config


def grid(
    task,
    labels: list[str],
    budgets: list[float],
    references: tuple[str, ...] = (),
    matched: list[str] | None = None,
) -> list[Cell]:
    """The cells of a run: full, then budget by budget every label, then every eviction cell of
    `matched` (default: of `labels`) again per reference, at equal memory."""
    cells = [Cell("full", 1.0, cell_config(task, "full", 1.0))]
    # Budget by budget, in the order given: a long run cut short has every label at the first ones.
    for budget in budgets:
        for label in labels:
            if label != "full":  # full never compresses: one cell, shown as a flat line
                cells.append(Cell(label, budget, cell_config(task, label, budget)))
        if budget == 1.0:
            continue  # nothing is folded: no state to match
        # After the references of this budget, whose state bytes they need.
        for reference in references:
            for label in labels if matched is None else matched:
                config = cell_config(task, label, budget)
                if keeps_no_state(config):
                    cells.append(
                        Cell(equal_memory_label(label, reference), budget, config, reference)
                    )
    return cells


def run_cell(
    task,
    cell: Cell,
    items,
    calibration: Path | None,
    per_token: int,
    extra_tokens: int = 0,
    prompt_tokens: list[int] | None = None,
) -> dict[str, Any]:
    """One cell on every item; with `extra_tokens`, each request's budget is the cell's share of
    its prompt (`prompt_tokens`, as an earlier cell measured them) plus those tokens."""
    from vllm import LLM, SamplingParams

    from retentivekv_vllm.engine.worker import worker_stats

    config = dict(cell.config)
    if calibration is not None and config["kv_policy"] == "retentive":
        # Calibrated knobs replace the defaults; an ablation's own knob stays.
        fitted = json.loads(calibration.read_text())["additional_config"]
        config = {**fitted, **config} if cell.label != "retentive" else {**config, **fitted}
    params = SamplingParams(temperature=0, max_tokens=task.max_tokens)
    if extra_tokens:
        params = [
            SamplingParams(
                temperature=0,
                max_tokens=task.max_tokens,
                extra_args={
                    "kv_policy": config["kv_policy"],
                    "kv_budget": equal_memory_budget(config["kv_budget"], n, extra_tokens),
                },
            )
            for n in prompt_tokens
        ]
    started = time.monotonic()
    llm = LLM(
        model=str(task.model_dir()),
        dtype="float32",
        enforce_eager=True,
        kv_cache_memory_bytes=128 * 2**20,
        enable_prefix_caching=False,
        max_num_seqs=64,
        seed=0,
        additional_config=config,
        **task.engine,
    )
    try:
        (before,) = llm.collective_rpc(worker_stats)
        outputs = llm.generate(
            [item.prompt for item in items],
            params,
            use_tqdm=lambda *a, **k: _tqdm(
                *a, **{**k, "desc": f"{cell.label} @ {cell.budget}", "leave": False}
            ),
        )
        (after,) = llm.collective_rpc(worker_stats)
    finally:
        del llm
        gc.collect()
    stats = request_stats(before, after, outputs)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    right = [task.is_correct(item, t) for item, t in zip(items, tokens)]
    correct = sum(right)
    groups: dict[str, list[bool]] = {}
    for item, ok in zip(items, right):
        if item.group:
            groups.setdefault(item.group, []).append(ok)
    low, high = wilson_interval(correct, len(items))
    # Live cache tokens once the prompt is in (sinks, kept and window; the answer's few tokens
    # are left out, the same for every cell), and the states' bytes.
    kv_tokens = sum(min(s["budget_tokens"], s["num_prompt_tokens"]) for s in stats) / len(stats)
    state_bytes = sum(s["state_bytes"] for s in stats) / len(stats)
    if "kv_maps" in config:
        config["kv_maps"] = shown_path(config["kv_maps"])
    return {
        "label": cell.label,
        "budget": cell.budget,
        "config": config,
        "equal_memory_to": cell.equal_memory_to,
        "extra_tokens": extra_tokens,
        "items": len(items),
        "correct": correct,
        "accuracy": correct / len(items),
        "ci95": [low, high],
        "accuracy_by_group": {group: sum(oks) / len(oks) for group, oks in sorted(groups.items())},
        "mean_tokens_folded": sum(s["tokens_folded"] for s in stats) / len(stats),
        "kv_tokens": kv_tokens,
        "kv_bytes": kv_tokens * per_token,
        "state_bytes": state_bytes,
        "max_state_bytes": max(s["state_bytes"] for s in stats),
        "total_bytes": kv_tokens * per_token + state_bytes,
        "seconds": round(time.monotonic() - started, 1),
        "prompt_tokens": [s["num_prompt_tokens"] for s in stats],
        "right": right,
        "outputs": tokens,
    }


def _tqdm(*args, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(*args, **kwargs)


def quick_failures(task, results: list[dict[str, Any]]) -> list[str]:
    """What the quick check refuses: full below the documented accuracy, budget 1.0 != full."""
    full = next(r for r in results if r["label"] == "full")
    failures = []
    if full["accuracy"] < task.min_full_accuracy:
        failures.append(
            f"full-cache accuracy {full['accuracy']:.3f} is below the documented "
            f"{task.min_full_accuracy:.3f}"
        )
    for r in results:
        if r["budget"] == 1.0 and r["label"] != "full" and r["outputs"] != full["outputs"]:
            differing = sum(a != b for a, b in zip(r["outputs"], full["outputs"]))
            failures.append(f"{r['label']} at budget 1.0 differs from full on {differing} items")
    return failures


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Cell a against cell b on the same items: the accuracy difference in points with its paired
    bootstrap 95 % interval, and McNemar's exact test of the right/wrong pairs."""
    diff, low, high = paired_bootstrap(a["right"], b["right"])
    return {
        "budget": a["budget"],
        "a": a["label"],
        "b": b["label"],
        "accuracy_diff_points": [100 * diff, 100 * low, 100 * high],
        "mcnemar": mcnemar_exact(a["right"], b["right"]),
    }


def comparisons(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per budget, each equal-memory reference against the most accurate eviction cell given its
    state's bytes (ties: the first run), against the most accurate eviction cell at the bare
    budget, and against its no-state ablation."""
    out = []
    for budget in dict.fromkeys(r["budget"] for r in results):
        mine = [r for r in results if r["budget"] == budget and "right" in r]
        by_label = {r["label"]: r for r in mine}
        bare = [r for r in mine if held_no_state(r) and not r["equal_memory_to"]]
        for reference in dict.fromkeys(r["equal_memory_to"] for r in mine if r["equal_memory_to"]):
            if reference not in by_label:
                continue
            ref = by_label[reference]
            matched = [r for r in mine if r["equal_memory_to"] == reference]
            for kind, pool in (("equal memory", matched), ("bare budget", bare)):
                if pool:
                    best = max(pool, key=lambda r: r["correct"])
                    out.append({"against": f"best eviction, {kind}", **compare(ref, best)})
            if "retentive: no state" in by_label:
                out.append({"against": "no state", **compare(ref, by_label["retentive: no state"])})
    return out


def compact_json(data: Any) -> str:
    """JSON indented by object, with lists of plain values on one line (per-item outputs)."""
    text = json.dumps(data, indent=2)

    def one_line(match: re.Match) -> str:
        return re.sub(r"\s+", " ", match.group(0)).replace("[ ", "[").replace(" ]", "]")

    return re.sub(r"\[[^\[\]{}\"]*\]", one_line, text)


def markdown_table(task, results: list[dict[str, Any]], budgets: list[float]) -> str:
    labels = list(dict.fromkeys(r["label"] for r in results))
    by = {(r["label"], r["budget"]): r for r in results}
    head = "| policy | " + " | ".join(f"{b:g}" for b in budgets) + " |"
    lines = [head, "|" + "---|" * (len(budgets) + 1)]
    for label in labels:
        row = []
        for b in budgets:
            r = by.get((label, b)) or (by.get((label, 1.0)) if label == "full" else None)
            row.append(
                f"{100 * r['accuracy']:.1f} [{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}]"
                if r
                else "—"
            )
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    n = sorted({r["items"] for r in results})
    lines.append("")
    lines.append(
        f"Accuracy in % with Wilson 95 % intervals; {', '.join(map(str, n))} items per cell; "
        "columns are budgets (share of the prompt kept in the cache, sinks and window included)."
    )
    return "\n".join(lines)


def write_docs(task, table: str, docs: Path) -> None:
    begin, end = f"<!-- fidelity:{task.name}:begin -->", f"<!-- fidelity:{task.name}:end -->"
    text = docs.read_text(encoding="utf-8") if docs.exists() else "# Results\n"
    block = f"{begin}\n{table}\n{end}"
    if begin in text and end in text:
        before, rest = text.split(begin, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n{block}\n"
    docs.write_text(text, encoding="utf-8")


def plot(task, results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("policies", POLICY_CELLS),
        ("retentive ablations", {"retentive": 0, **ABLATION_CELLS}),
    ]
    matched = [r["label"] for r in results if r.get("equal_memory_to")]
    if matched:
        references = dict.fromkeys(
            r["equal_memory_to"] for r in results if r.get("equal_memory_to")
        )
        panels.append(("equal memory", {**dict.fromkeys(references), **dict.fromkeys(matched)}))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), sharey=True)
    full = next((r for r in results if r["label"] == "full"), None)
    for ax, (title, labels) in zip(axes, panels):
        for label in labels:
            rows = sorted((r for r in results if r["label"] == label), key=lambda r: r["budget"])
            if not rows or label == "full":
                continue
            x = [r["budget"] for r in rows]
            y = [100 * r["accuracy"] for r in rows]
            # max(0, .): at 100 % the interval's top is 1 - 1e-16 after rounding.
            err = [
                [100 * max(0.0, r["accuracy"] - r["ci95"][0]) for r in rows],
                [100 * max(0.0, r["ci95"][1] - r["accuracy"]) for r in rows],
            ]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
        if full is not None:
            ax.axhline(100 * full["accuracy"], color="black", linestyle="--", label="full")
        ax.set_xscale("log")
        ax.set_xlabel("budget (share of the prompt kept)")
        ax.set_title(f"{task.name}: {title}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def merge_results(task, args) -> int:
    reports = [json.loads(path.read_text()) for path in args.table_from]
    # Every run includes full, and a reference cell may run again beside its equal-memory cells:
    # keep the first file's and check the others generated the same, item for item.
    cells, seen = [], {}
    for report in reports:
        for c in report["cells"]:
            key = (c["label"], c["budget"])
            if key in seen:
                first = seen[key]
                if c["correct"] != first["correct"] or c.get("outputs") != first.get("outputs"):
                    raise SystemExit(f"--table-from: {key} appears twice with different results")
                continue
            seen[key] = c
            cells.append(c)
    labels = list(dict.fromkeys(c["label"] for c in cells))
    budgets = sorted({c["budget"] for c in cells}, reverse=True)
    out = args.out or REPO / "benchmarks" / "results" / f"fidelity_{task.name}.json"
    merged = {
        **reports[0],
        "complete": all(report.get("complete", True) for report in reports),
        "cells": sorted(cells, key=lambda c: (labels.index(c["label"]), -c["budget"])),
        "merged_from": [p.name for p in args.table_from],
    }
    if "comparisons" in merged:  # files that keep each item's answers: compare across them too
        merged["comparisons"] = comparisons([c for c in merged["cells"] if "right" in c])
    out.write_text(compact_json(merged) + "\n")
    plot(task, merged["cells"], out.with_suffix(".png"))
    table = markdown_table(task, merged["cells"], budgets)
    print(table)
    if not args.no_docs:
        write_docs(task, table, args.docs)
    return 0


def main(argv: list[str] | None = None) -> int:
    from benchmarks.tasks import make_task

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", default="recall")
    parser.add_argument(
        "--quick", action="store_true", help="a few cells on fewer items; fail on regressions"
    )
    parser.add_argument(
        "--items", type=int, default=None, help="items per cell (default 500; 50 with --quick)"
    )
    parser.add_argument(
        "--cells",
        nargs="+",
        default=None,
        help=f"labels to run (default: all); known: {list(POLICY_CELLS) + list(ABLATION_CELLS)}",
    )
    parser.add_argument(
        "--equal-memory-to",
        nargs="*",
        default=None,
        help="cells whose state bytes every eviction cell runs again with as cached tokens "
        f"(default: those of {list(EQUAL_MEMORY_REFERENCES)} that run; none: no equal-memory "
        "cells)",
    )
    parser.add_argument(
        "--equal-memory-tokens",
        type=int,
        default=None,
        help="the extra tokens of the equal-memory cells when their reference runs in another "
        "process (merge the runs with --table-from)",
    )
    parser.add_argument(
        "--equal-memory-cells",
        nargs="+",
        default=None,
        help="eviction cells run at equal memory (default: those among --cells); they need not "
        "run at the bare budget too",
    )
    parser.add_argument("--budgets", type=float, nargs="+", default=None)
    parser.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help="a file written by benchmarks/calibrate.py; its knobs apply to every retentive cell",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default benchmarks/results/fidelity_<task>.json)",
    )
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "results.md")
    parser.add_argument("--no-docs", action="store_true", help="do not write the table into --docs")
    parser.add_argument(
        "--table-from",
        type=Path,
        nargs="+",
        default=None,
        help="run nothing: merge these result files (e.g. policies and ablations run "
        "in two processes) into one JSON (--out), plot and docs table",
    )
    args = parser.parse_args(argv)
    require_matplotlib()

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    task = make_task(args.task)
    known = list(POLICY_CELLS) + list(ABLATION_CELLS)
    labels = args.cells or (list(QUICK_CELLS) if args.quick else known)
    unknown = [label for label in labels if label not in known]
    if unknown:
        parser.error(f"--cells: unknown {unknown}; known: {known}")
    if not task.has_images:
        labels = [label for label in labels if label not in IMAGE_ONLY_ABLATIONS]
    if LEARNED in labels and task_maps(task) is None:
        if args.cells:
            parser.error(
                f"--cells: {LEARNED!r} needs maps for {task.name}'s model; fit them with "
                f"python -m benchmarks.fixture_maps --task {task.name}"
            )
        labels.remove(LEARNED)  # the whole grid: without a maps file, no learned cell
    if args.equal_memory_to is None:
        references = tuple(r for r in EQUAL_MEMORY_REFERENCES if r in labels)
    else:
        references = tuple(args.equal_memory_to)
        missing = [r for r in references if r not in labels]
        if missing and args.equal_memory_tokens is None:
            parser.error(f"--equal-memory-to: {missing} are not among the cells run {labels}")
    unknown = [label for label in args.equal_memory_cells or () if label not in known]
    if unknown:
        parser.error(f"--equal-memory-cells: unknown {unknown}; known: {known}")
    budgets = args.budgets or list(QUICK_BUDGETS if args.quick else BUDGETS)
    if any(not 0 < b <= 1 for b in budgets):
        parser.error(f"--budgets: ratios in (0, 1] expected, got {budgets}")
    if args.table_from:
        return merge_results(task, args)
    count = args.items or (50 if args.quick else 500)
    items = task.items(count, ITEM_SEED)

    from tqdm.auto import tqdm

    suffix = "_quick" if args.quick else ("_calibrated" if args.calibration else "")
    out = args.out or REPO / "benchmarks" / "results" / f"fidelity_{task.name}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    per_token = token_bytes(task.model_dir())

    def write_json(complete: bool) -> list[str]:
        failures = quick_failures(task, results)
        out.write_text(
            compact_json(
                {
                    "task": task.name,
                    "item_seed": ITEM_SEED,
                    "items_per_cell": count,
                    "calibration": shown_path(args.calibration) if args.calibration else None,
                    "token_bytes": per_token,
                    "complete": complete,
                    "failures": failures,
                    "comparisons": comparisons(results),
                    "cells": results,
                }
            )
            + "\n"
        )
        return failures

    results = []
    cells = grid(task, labels, budgets, references, args.equal_memory_cells)
    for cell in tqdm(cells, desc=f"fidelity {task.name}", unit="cell"):
        extra, prompt_tokens = 0, None
        if cell.equal_memory_to:
            reference = next(
                (
                    r
                    for r in results
                    if r["label"] == cell.equal_memory_to and r["budget"] == cell.budget
                ),
                None,
            )
            if reference is None:  # it ran in another process: its bytes as given, full's prompts
                extra, prompt_tokens = args.equal_memory_tokens, results[0]["prompt_tokens"]
            else:
                extra = state_tokens(reference["max_state_bytes"], per_token)
                prompt_tokens = reference["prompt_tokens"]
        results.append(
            run_cell(task, cell, items, args.calibration, per_token, extra, prompt_tokens)
        )
        r = results[-1]
        tqdm.write(
            f"{r['label']:>50} @ {r['budget']:<5g} {100 * r['accuracy']:5.1f} % "
            f"[{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}]  "
            f"KV {r['kv_bytes'] / 2**10:.0f} KiB + state {r['state_bytes'] / 2**10:.0f} KiB"
            f"{f' (+{extra} tokens)' if extra else ''}  ({r['seconds']} s)"
        )
        write_json(complete=False)  # a long run interrupted keeps what it measured
    failures = write_json(complete=True)
    plot(task, results, out.with_suffix(".png"))
    table = markdown_table(task, results, budgets)
    print(table)
    if not args.quick and not args.no_docs:
        write_docs(task, table, args.docs)
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
