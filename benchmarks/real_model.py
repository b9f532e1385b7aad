"""Policies on the real SmolLM2-135M-Instruct through vLLM: RULER-style tasks, a log-likelihood
gap, two protocols, equal memory, paired comparisons.

    python -m benchmarks.real_model                          # every cell, default sizes
    python -m benchmarks.real_model --items 4 --ll-items 4   # a small run
    python -m benchmarks.real_model --extra-cell 'retentive: learned={"kv_policy": "retentive",
        "kv_feature_map": "learned", ...}'                   # one more additional_config cell

Every prompt is laid out so that vLLM prefills it in exactly two chunks
(``long_prefill_token_threshold`` = ``--chunk``, and ``max_num_batched_tokens`` large enough that
no request ever gets a shorter chunk), and a policy compresses once the first chunk is in:

* *question-agnostic*: chunk 1 = instruction + haystack; chunk 2 = question + assistant header.
  The haystack is compressed before the question arrives (kvpress's protocol);
* *query-aware*: chunk 1 = instruction + haystack + question; chunk 2 = assistant header. The
  question is in the observation window (and the recent window) when the cache is compressed.

Either way the answer is generated from the compressed cache (plus the states). The haystack
fills what instruction and question leave of the chunk, so both protocols see the same items up
to a few filler tokens. An answer is right when it contains every expected string.

Log-likelihood: seeded spans of ``pydoc_data.topics`` of ``--chunk`` + ``--ll-tokens`` tokens;
the first chunk is compressed, then the prompt log-probabilities of the last ``--ll-tokens`` are
read from the compressed cache. Reported as mean nats per token and as the paired gap to full.

Equal memory: every eviction cell runs again with the state's bytes (measured in the
``--equal-memory-to`` cell of the same protocol, rounded up to whole tokens) as extra cached
tokens: each request's budget becomes the cell's share of its prompt plus those tokens. Every
cell reports its KV bytes (cached tokens once the prompt is in x bytes per token) plus state
bytes. Cells whose settings differ in policy and budget only share one engine, each request
choosing its own (``vllm_xargs.kv_policy``, ``vllm_xargs.kv_budget``).

Scores: an answer is correct when it holds every expected string, and scores the share it holds
(RULER's string_match_all). Comparisons are paired over items: a paired bootstrap interval of
the difference (score, accuracy, log-likelihood) and McNemar's exact test of right/wrong. Writes
JSON with every item's output (``benchmarks/results/real_model.json``) and a figure next to it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import require_matplotlib
from benchmarks.equal_memory import (
    equal_memory_budget,
    keeps_no_state,
    mcnemar_exact,
    paired_bootstrap,
    request_stats,
    state_tokens,
    token_bytes,
)
from benchmarks.fidelity import wilson_interval

REPO = Path(__file__).resolve().parents[1]
ITEM_SEED = 20_261_206
MAX_NUM_SEQS = 8
REQUEST_KEYS = ("kv_policy", "kv_budget")  # what a request may choose (config.REQUEST_KNOBS)
PROTOCOLS = ("agnostic", "aware")
# retentive's state in these cells: the prf state the recorded results were measured with (without
# a maps file retentive keeps none, which is the "retentive: no state" cell). Every cell carries it:
# cells whose settings differ in policy and budget only share one engine, started with the
# retentive cell's settings.
PRF_STATE = {"kv_feature_map": "prf"}
# label -> additional_config of the policy; the budget is added per cell.
CELLS: dict[str, dict[str, Any]] = {
    label: {**config, **PRF_STATE}
    for label, config in {
        "full": {"kv_policy": "full"},
        "retentive": {"kv_policy": "retentive"},
        "retentive: no state": {"kv_policy": "retentive", "kv_states": "none"},
        "snapkv": {"kv_policy": "snapkv"},
        "knorm": {"kv_policy": "knorm"},
        "h2o": {"kv_policy": "h2o"},
        "streaming": {"kv_policy": "streaming"},
    }.items()
}


# ---------------------------------------------------------------- paired statistics


def compare(a: dict, b: dict) -> dict[str, Any]:
    """Cell a against cell b (same protocol, same items): the graded score and accuracy in points
    (paired bootstrap), right/wrong pairs (McNemar), log-likelihood in nats per token."""
    out: dict[str, Any] = {"a": a["label"], "b": b["label"], "protocol": a["protocol"]}
    if a["items"]:
        for key in ("score", "correct"):
            diff, low, high = paired_bootstrap(
                [r[key] for r in a["items"]], [r[key] for r in b["items"]]
            )
            out[f"{key}_diff_points"] = [100 * diff, 100 * low, 100 * high]
        out["mcnemar"] = mcnemar_exact(
            [r["correct"] for r in a["items"]], [r["correct"] for r in b["items"]]
        )
    if a.get("loglik") and b.get("loglik"):
        diff, low, high = paired_bootstrap(a["loglik"]["nll_per_item"], b["loglik"]["nll_per_item"])
        out["nll_diff_nats_per_token"] = [diff, low, high]
    return out


# ---------------------------------------------------------------- prompts


class Prompts:
    """Token layouts of the two protocols on one tokenizer (ChatML, as SmolLM2 speaks it)."""

    def __init__(self, tokenizer, chunk: int):
        self.tokenizer, self.chunk = tokenizer, chunk

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def head(self, instruction: str) -> list[int]:
        return self.ids(f"<|im_start|>user\n{instruction}\n\n")

    def question(self, question: str) -> list[int]:
        return self.ids(f"\n\n{question}<|im_end|>\n")

    def tail(self, prefix: str) -> list[int]:
        return self.ids(f"<|im_start|>assistant\n{prefix}")

    def context_tokens(self, protocol: str):
        def length(instruction: str, question: str) -> int:
            used = len(self.head(instruction)) + (
                len(self.question(question)) if protocol == "aware" else 0
            )
            return self.chunk - used

        return length

    def prompt(self, item, protocol: str) -> list[int]:
        ids = self.head(item.instruction) + list(item.context_ids) + self.question(item.question)
        ids += self.tail(item.answer_prefix)
        first = len(self.head(item.instruction)) + len(item.context_ids)
        first += len(self.question(item.question)) if protocol == "aware" else 0
        assert first == self.chunk, (first, self.chunk)  # compression falls where the protocol says
        return ids


def loglik_spans(tokenizer, count: int, chunk: int, scored: int, seed: int) -> list[list[int]]:
    """`count` seeded spans of Python's documentation, each chunk + scored tokens long."""
    from benchmarks.tasks.ruler import english_text

    text, rng, spans = english_text(), random.Random(f"{seed}:loglik"), []
    while len(spans) < count:
        start = rng.randrange(len(text) - 16 * (chunk + scored))
        start = text.rfind(". ", 0, start) + 2
        ids = tokenizer(text[start : start + 16 * (chunk + scored)], add_special_tokens=False)[
            "input_ids"
        ]
        if len(ids) >= chunk + scored:
            spans.append(ids[: chunk + scored])
    return spans


# ---------------------------------------------------------------- cells


def engine_key(config: dict[str, Any]) -> str:
    """Cells whose configs differ in policy and budget only share one engine: a request chooses
    its own (vllm_xargs.kv_policy, vllm_xargs.kv_budget)."""
    return json.dumps({k: v for k, v in config.items() if k not in REQUEST_KEYS}, sort_keys=True)


class Engine:
    """One vLLM engine for the cells of one engine_key. The server runs a policy with states when
    any cell of the group keeps them (a request may only choose states the server reserved)."""

    def __init__(
        self,
        model_dir: Path,
        chunk: int,
        longest: int,
        max_tokens: int,
        configs: list[dict[str, Any]],
        dtype: str = "float32",
    ):
        from vllm import LLM

        server = next((c for c in configs if c["kv_policy"] == "retentive"), configs[0])
        self.llm = LLM(
            model=str(model_dir),
            dtype=dtype,
            enforce_eager=True,
            seed=0,
            kv_cache_memory_bytes=MAX_NUM_SEQS
            * (longest + max_tokens)
            * token_bytes(model_dir, dtype)
            * 2,
            enable_prefix_caching=False,
            max_num_seqs=MAX_NUM_SEQS,
            max_model_len=longest + max_tokens + 8,
            enable_chunked_prefill=True,
            long_prefill_token_threshold=chunk,
            # Room for every running request's full chunk in one step: no request is ever cut
            # short by another's, so the first chunk always ends where the protocol puts it.
            max_num_batched_tokens=MAX_NUM_SEQS * chunk,
            additional_config=server,
        )

    def generate(self, prompts: list[list[int]], params: list) -> tuple[list, list[dict]]:
        """Outputs in prompt order and the plugin's stats of each request, in the same order."""
        (before,) = self.llm.collective_rpc("retentivekv_stats")  # the plugin's worker method
        outputs = self.llm.generate(
            [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False
        )
        (after,) = self.llm.collective_rpc("retentivekv_stats")
        return outputs, request_stats(before, after, outputs)

    def close(self) -> None:
        del self.llm
        gc.collect()


def request_params(config: dict[str, Any], prompt_len: int, extra_tokens: int, **sampling):
    """Sampling parameters carrying the cell's policy and this prompt's budget: the cell's ratio
    of the prompt, plus extra_tokens (the state's bytes as tokens) as a token count."""
    from vllm import SamplingParams

    budget = equal_memory_budget(config["kv_budget"], prompt_len, extra_tokens)
    extra = {"kv_policy": config["kv_policy"], "kv_budget": budget}
    return SamplingParams(temperature=0, extra_args=extra, **sampling)


def run_cell(
    engine: Engine,
    label: str,
    protocol: str,
    config: dict[str, Any],
    per_token: int,
    prompts: list[list[int]],
    items,
    spans: list[list[int]],
    scored: int,
    max_tokens: int,
    extra_tokens: int = 0,
) -> dict[str, Any]:
    started = time.monotonic()
    outputs, stats = engine.generate(
        prompts,
        [request_params(config, len(p), extra_tokens, max_tokens=max_tokens) for p in prompts],
    )
    logliks, _ = (
        engine.generate(
            spans,
            [
                request_params(config, len(s), extra_tokens, max_tokens=1, prompt_logprobs=0)
                for s in spans
            ],
        )
        if spans
        else ([], [])
    )
    # Live cache tokens once the prompt is in (sinks, kept and window; the answer's own tokens
    # are left out: they are the same few for every cell).
    kv_tokens = float(np.mean([min(s["budget_tokens"], s["num_prompt_tokens"]) for s in stats]))
    state_bytes = float(np.mean([s["state_bytes"] for s in stats]))
    records = []
    for item, out, stat in zip(items, outputs, stats):
        text = out.outputs[0].text
        records.append(
            {
                "task": item.task,
                "answers": list(item.answers),
                "output": text,
                "correct": item.is_correct(text),
                "score": item.score(text),
                "budget_tokens": stat["budget_tokens"],
                "tokens_folded": stat["tokens_folded"],
            }
        )
    result: dict[str, Any] = {
        "label": label,
        "protocol": protocol,
        "config": config,
        "extra_tokens": extra_tokens,
        "kv_tokens": kv_tokens,
        "kv_bytes": kv_tokens * per_token,
        "state_bytes": state_bytes,
        "total_bytes": kv_tokens * per_token + state_bytes,
        "seconds": round(time.monotonic() - started, 1),
        "tasks": {},
        "items": records,
    }
    for task in dict.fromkeys(r["task"] for r in records):
        mine = [r for r in records if r["task"] == task]
        right = sum(r["correct"] for r in mine)
        result["tasks"][task] = {
            "correct": right,
            "items": len(mine),
            "accuracy": right / len(mine),
            "ci95": list(wilson_interval(right, len(mine))),
            "score": float(np.mean([r["score"] for r in mine])),
        }
    if records:
        right = sum(r["correct"] for r in records)
        result["accuracy"] = right / len(records)
        result["ci95"] = list(wilson_interval(right, len(records)))
        result["score"] = float(np.mean([r["score"] for r in records]))
    if logliks:
        nll = [
            -float(
                np.mean([next(iter(lp.values())).logprob for lp in out.prompt_logprobs[-scored:]])
            )
            for out in logliks
        ]
        result["loglik"] = {
            "scored_tokens": scored,
            "nll_per_item": nll,
            "mean_nll": float(np.mean(nll)),
        }
    return result


def summary_line(r: dict) -> str:
    acc = (
        f"{100 * r['accuracy']:5.1f} % [{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}]"
        if "accuracy" in r
        else ""
    )
    ll = f"  nll {r['loglik']['mean_nll']:.4f}" if "loglik" in r else ""
    return (
        f"{r['protocol']:>8} {r['label']:>34}  {acc}{ll}  "
        f"KV {r['kv_bytes'] / 2**20:.2f} MiB + state {r['state_bytes'] / 2**20:.2f} MiB  "
        f"({r['seconds']} s)"
    )


def comparisons(cells: list[dict], reference: str) -> list[dict]:
    """Every cell against the reference cell and against full, per protocol."""
    out = []
    for protocol in PROTOCOLS:
        mine = {c["label"]: c for c in cells if c["protocol"] == protocol}
        for base in (reference, "full"):
            if base not in mine:
                continue
            for label, cell in mine.items():
                if label != base:
                    out.append(compare(cell, mine[base]))
    return out


def gap_closed(cells: list[dict], reference: str) -> dict[str, Any] | None:
    """The share of the best equal-memory eviction cell's log-likelihood gap to full that the
    reference cell closes (question-agnostic cells, which alone read log-likelihood)."""
    mine = {c["label"]: c for c in cells if c["protocol"] == "agnostic" and "loglik" in c}
    if "full" not in mine or reference not in mine:
        return None
    full = mine["full"]["loglik"]["mean_nll"]
    matched = {k: v for k, v in mine.items() if k.endswith("(equal memory)")}
    if not matched:
        return None
    best = min(matched, key=lambda k: matched[k]["loglik"]["mean_nll"])
    best_gap = matched[best]["loglik"]["mean_nll"] - full
    ref_gap = mine[reference]["loglik"]["mean_nll"] - full
    return {
        "reference": reference,
        "best_equal_memory_eviction": best,
        "best_gap": best_gap,
        "reference_gap": ref_gap,
        "share_closed": 1 - ref_gap / best_gap if best_gap > 0 else None,
    }


def plot(cells: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 6))
    for ax, protocol in zip(axes[:2], PROTOCOLS):
        rows = [c for c in cells if c["protocol"] == protocol and "accuracy" in c]
        y = range(len(rows))
        acc = [100 * c["accuracy"] for c in rows]
        err = [
            [100 * (c["accuracy"] - c["ci95"][0]) for c in rows],
            [100 * (c["ci95"][1] - c["accuracy"]) for c in rows],
        ]
        ax.barh(list(y), acc, xerr=err, capsize=3)
        ax.set_yticks(
            list(y),
            [f"{c['label']} ({c['total_bytes'] / 2**20:.1f} MiB)" for c in rows],
            fontsize=8,
        )
        ax.invert_yaxis()
        ax.set_xlabel("needle tasks, all items (%)")
        ax.set_title(f"question-{protocol}")
    rows = [c for c in cells if "loglik" in c]
    full = next((c["loglik"]["mean_nll"] for c in rows if c["label"] == "full"), 0.0)
    axes[2].barh(range(len(rows)), [c["loglik"]["mean_nll"] - full for c in rows])
    axes[2].set_yticks(range(len(rows)), [c["label"] for c in rows], fontsize=8)
    axes[2].invert_yaxis()
    axes[2].set_xlabel("log-likelihood gap to full (nats/token)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merged_cells(path: Path, settings: dict[str, Any]) -> list[dict]:
    """The cells of an earlier run, refused unless it ran the same items the same way."""
    earlier = json.loads(path.read_text())
    differ = {k: (earlier.get(k), v) for k, v in settings.items() if earlier.get(k) != v}
    if differ:
        raise SystemExit(
            f"error: --merge {path}: not the same items and settings as this run "
            f"(earlier, now): {differ}"
        )
    # Only cells the earlier run measured itself: a merged run's own merges are not repeated.
    own = {tuple(cell) for cell in earlier.get("merged_cells", [])}
    return [c for c in earlier["cells"] if (c["protocol"], c["label"]) not in own]


def parse_extra_cell(text: str) -> tuple[str, dict[str, Any]]:
    label, sep, config = text.partition("=")
    try:
        parsed = json.loads(config) if sep else None
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(
            f"--extra-cell: {config!r} is not JSON ({error})"
        ) from None
    if not label or not isinstance(parsed, dict) or "kv_policy" not in parsed:
        raise argparse.ArgumentTypeError(
            f'--extra-cell: expected LABEL={{"kv_policy": ..., ...}}, got {text!r}'
        )
    return label, parsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="model directory (default: the SmolLM2-135M-Instruct fixture)",
    )
    from benchmarks.tasks.ruler import TASK_NAMES

    parser.add_argument("--tasks", nargs="+", default=list(TASK_NAMES))
    parser.add_argument("--items", type=int, default=30, help="items per task")
    parser.add_argument("--ll-items", type=int, default=30, help="log-likelihood spans")
    parser.add_argument("--ll-tokens", type=int, default=256, help="scored tokens of each span")
    parser.add_argument(
        "--chunk",
        type=int,
        default=512,
        help="first-chunk length: instruction + haystack (+ question if query-aware)",
    )
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=PROTOCOLS)
    parser.add_argument(
        "--cells",
        nargs="*",
        default=list(CELLS),
        help=f"known: {list(CELLS)}; none with --merge: only combine earlier runs",
    )
    parser.add_argument(
        "--extra-cell",
        type=parse_extra_cell,
        action="append",
        default=[],
        metavar="LABEL=JSON",
        help="one more cell: a label and its additional_config",
    )
    parser.add_argument(
        "--equal-memory-to",
        default="retentive",
        help="cell whose state bytes eviction cells get as extra tokens ('' for none)",
    )
    parser.add_argument(
        "--equal-memory-tokens",
        type=int,
        default=None,
        help="extra cached tokens of the equal-memory cells, when the reference "
        "cell ran in another run (--merge it)",
    )
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=[],
        help="earlier runs' JSON of the same items: their cells join this run's "
        "comparisons and figure",
    )
    parser.add_argument(
        "--equal-memory-only",
        action="store_true",
        help="run eviction cells at equal memory only, not also at the bare budget",
    )
    parser.add_argument(
        "--equal-memory-protocols",
        nargs="+",
        default=list(PROTOCOLS),
        choices=PROTOCOLS,
        help="protocols whose eviction cells run at equal memory",
    )
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="the model's and so the cache's dtype (states beside a bfloat16 cache are bfloat16)",
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "real_model.json"
    )
    args = parser.parse_args(argv)
    unknown = [c for c in args.cells if c not in CELLS]
    if unknown:
        parser.error(f"--cells: unknown {unknown}; known: {list(CELLS)}")
    if not 0 < args.budget <= 1:
        parser.error(f"--budget: a ratio in (0, 1] expected, got {args.budget}")
    if args.ll_tokens > args.chunk:
        parser.error(
            f"--ll-tokens ({args.ll_tokens}) must not exceed --chunk ({args.chunk}): "
            "the scored tokens are one chunk"
        )
    labels = list(args.cells) + [label for label, _ in args.extra_cell]
    configs = {**CELLS, **dict(args.extra_cell)}
    if not labels and not args.merge:
        parser.error("--cells: no cells to run and no --merge to combine")
    if (
        labels
        and args.equal_memory_to
        and args.equal_memory_to not in labels
        and args.equal_memory_tokens is None
    ):
        parser.error(
            f"--equal-memory-to: {args.equal_memory_to!r} is not among the cells run {labels}"
        )
    require_matplotlib()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from transformers import AutoTokenizer

    from benchmarks.tasks.ruler import make_items

    if args.model is None:
        from retentivekv_vllm.fixtures.smollm2 import smollm2_model_dir

        args.model = smollm2_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    layout = Prompts(tokenizer, args.chunk)
    spans = (
        loglik_spans(tokenizer, args.ll_items, args.chunk, args.ll_tokens, ITEM_SEED)
        if args.ll_items
        else []
    )
    per_token = token_bytes(args.model, args.dtype)
    cells: list[dict] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {
        "model": args.model.name,
        "item_seed": ITEM_SEED,
        "budget": args.budget,
        "chunk": args.chunk,
        "tasks": args.tasks,
        "items_per_task": args.items,
        "loglik_spans": args.ll_items,
        "loglik_scored_tokens": args.ll_tokens,
        "token_bytes": per_token,
        # Recorded only when not the default, so runs from before the option still merge.
        **({"dtype": args.dtype} if args.dtype != "float32" else {}),
    }
    merged = [cell for path in args.merge for cell in merged_cells(path, settings)]

    def write(complete: bool) -> None:
        every = merged + cells
        args.out.write_text(
            json.dumps(
                {
                    **settings,
                    "equal_memory_to": args.equal_memory_to,
                    "complete": complete,
                    "merged": [path.name for path in args.merge],
                    "merged_cells": [[c["protocol"], c["label"]] for c in merged],
                    "comparisons": comparisons(every, args.equal_memory_to or "retentive"),
                    "loglik_gap_closed": gap_closed(every, args.equal_memory_to or "retentive"),
                    "cells": every,
                },
                indent=1,
            )
            + "\n"
        )

    layouts = {}
    for protocol in args.protocols:
        items = make_items(
            args.tasks, args.items, ITEM_SEED, tokenizer, layout.context_tokens(protocol)
        )
        layouts[protocol] = items, [layout.prompt(item, protocol) for item in items]
    longest = max(len(p) for _, prompts in layouts.values() for p in prompts + spans)
    budgets = {
        label: {
            **configs[label],
            "kv_budget": 1.0 if configs[label]["kv_policy"] == "full" else args.budget,
        }
        for label in labels
    }
    # The reference first, so that its state's bytes are known before any equal-memory cell.
    ordered = sorted(labels, key=lambda label: label != args.equal_memory_to)
    groups: dict[str, list[str]] = {}
    for label in ordered:
        groups.setdefault(engine_key(budgets[label]), []).append(label)
    extra_tokens = dict.fromkeys(args.protocols, args.equal_memory_tokens)
    for group in groups.values():
        engine = Engine(
            args.model,
            args.chunk,
            longest,
            args.max_tokens,
            [budgets[g] for g in group],
            args.dtype,
        )
        try:
            for protocol in args.protocols:
                items, prompts = layouts[protocol]
                # Log-likelihood has no question: it runs with the question-agnostic cells only.
                ll = spans if protocol == "agnostic" else []
                equal_memory = protocol in args.equal_memory_protocols and args.equal_memory_to
                for label in group:
                    if equal_memory and args.equal_memory_only and keeps_no_state(budgets[label]):
                        continue
                    cells.append(
                        run_cell(
                            engine,
                            label,
                            protocol,
                            budgets[label],
                            per_token,
                            prompts,
                            items,
                            ll,
                            args.ll_tokens,
                            args.max_tokens,
                        )
                    )
                    print(summary_line(cells[-1]), flush=True)
                    write(complete=False)
                    if label == args.equal_memory_to:
                        # Rounded up: an eviction cell never holds less memory than the reference.
                        extra_tokens[protocol] = state_tokens(cells[-1]["state_bytes"], per_token)
                if not equal_memory:
                    continue
                for label in (g for g in group if keeps_no_state(budgets[g])):
                    cells.append(
                        run_cell(
                            engine,
                            f"{label} (equal memory)",
                            protocol,
                            budgets[label],
                            per_token,
                            prompts,
                            items,
                            ll,
                            args.ll_tokens,
                            args.max_tokens,
                            extra_tokens[protocol],
                        )
                    )
                    print(summary_line(cells[-1]), flush=True)
                    write(complete=False)
        finally:
            engine.close()
    write(complete=True)
    plot(merged + cells, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
