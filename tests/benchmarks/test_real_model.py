"""The real-model benchmark: its paired statistics against plain definitions, the two protocols'
prompt layouts, equal-memory budgets, and (slow tier) a small run through vLLM on a tiny fixture."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.real_model import (
    CELLS,
    Prompts,
    engine_key,
    gap_closed,
    keeps_no_state,
    mcnemar_exact,
    merged_cells,
    paired_bootstrap,
    parse_extra_cell,
    request_params,
)
from benchmarks.tasks.ruler import TASK_NAMES, make_items
from retentivekv_vllm.learned_maps import SHIPPED_MAPS_DIR

REPO = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from retentivekv_vllm.fixtures import TOKENIZER_DIR

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def test_paired_bootstrap_centres_on_the_mean_difference_and_covers_it():
    rng = np.random.default_rng(1)
    a, b = rng.normal(1.0, 1.0, 200), rng.normal(0.0, 1.0, 200)
    mean, low, high = paired_bootstrap(a, b)
    assert mean == pytest.approx(float(np.mean(a - b)))
    # The interval of a mean of 200 paired differences of sd sqrt(2): about +-1.96 * 0.1.
    assert low < mean < high and 0.3 < high - low < 0.5
    assert paired_bootstrap([1, 1, 0], [1, 1, 0]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="no items"):
        paired_bootstrap([], [])


def test_mcnemar_exact_counts_discordant_pairs_and_matches_the_binomial():
    a = [1, 1, 1, 1, 1, 1, 0, 0, 1]
    b = [0, 0, 0, 0, 0, 0, 0, 1, 1]
    result = mcnemar_exact(a, b)
    assert (result["a_only"], result["b_only"]) == (6, 1)
    # Two-sided exact: 2 * P(X <= 1), X ~ Binomial(7, 1/2) = 2 * 8 / 128.
    assert result["p"] == pytest.approx(16 / 128)
    assert mcnemar_exact([1, 0], [1, 0])["p"] == 1.0
    assert mcnemar_exact([1] * 12, [0] * 12)["p"] == pytest.approx(2 / 2**12)


@pytest.mark.parametrize("protocol", ["agnostic", "aware"])
def test_the_first_chunk_ends_where_the_protocol_puts_it(tokenizer, protocol):
    layout = Prompts(tokenizer, chunk=300)
    for item in make_items(TASK_NAMES, 1, 0, tokenizer, layout.context_tokens(protocol)):
        ids = layout.prompt(item, protocol)
        first = tokenizer.decode(ids[:300])
        question_in_first = item.question in first
        assert question_in_first == (protocol == "aware")
        # Everything after the first chunk: the question (if not in it) and the assistant turn.
        assert tokenizer.decode(ids[300:]).endswith(item.answer_prefix)


def test_equal_memory_budgets_add_the_state_tokens_to_each_prompts_share():
    params = request_params({"kv_policy": "snapkv", "kv_budget": 0.2}, 533, 65, max_tokens=4)
    assert params.extra_args == {"kv_policy": "snapkv", "kv_budget": math.ceil(0.2 * 533) + 65}
    plain = request_params({"kv_policy": "snapkv", "kv_budget": 0.2}, 533, 0, max_tokens=4)
    assert plain.extra_args == {"kv_policy": "snapkv", "kv_budget": 0.2}
    # Never more than the whole prompt.
    assert (
        request_params({"kv_policy": "h2o", "kv_budget": 0.9}, 100, 65).extra_args["kv_budget"]
        == 100
    )


def test_cells_share_an_engine_only_when_policy_and_budget_alone_differ():
    assert engine_key(CELLS["snapkv"]) == engine_key({**CELLS["retentive"], "kv_budget": 0.3})
    assert engine_key(CELLS["retentive: no state"]) != engine_key(CELLS["retentive"])
    assert [label for label in CELLS if keeps_no_state(CELLS[label])] == [
        "retentive: no state",
        "snapkv",
        "knorm",
        "h2o",
        "streaming",
    ]
    # "retentive" is the prf state the recorded results were measured with; by the plugin's rule
    # retentive without a maps file or feature map keeps none, and with a maps file keeps one.
    assert CELLS["retentive"]["kv_feature_map"] == "prf"
    assert keeps_no_state({"kv_policy": "retentive"})
    maps = str(SHIPPED_MAPS_DIR / "smollm2-135m-instruct.safetensors")
    assert not keeps_no_state({"kv_policy": "retentive", "kv_maps": maps})


def test_extra_cells_are_checked():
    label, config = parse_extra_cell(
        'learned={"kv_policy": "retentive", "kv_feature_map": "learned"}'
    )
    assert label == "learned" and config["kv_feature_map"] == "learned"
    import argparse

    for bad in ("learned", 'learned={"kv_budget": 0.2}', "learned={nope"):
        with pytest.raises(argparse.ArgumentTypeError, match="--extra-cell"):
            parse_extra_cell(bad)


def test_gap_closed_is_the_share_of_the_best_equal_memory_gap():
    def cell(label, nll):
        return {"label": label, "protocol": "agnostic", "loglik": {"mean_nll": nll}}

    cells = [
        cell("full", 2.0),
        cell("retentive", 2.3),
        cell("snapkv (equal memory)", 2.5),
        cell("knorm (equal memory)", 2.4),
        cell("snapkv", 2.1),
    ]
    closed = gap_closed(cells, "retentive")
    assert closed["best_equal_memory_eviction"] == "knorm (equal memory)"
    assert closed["share_closed"] == pytest.approx(1 - 0.3 / 0.4)


def test_merge_takes_an_earlier_runs_own_cells_of_the_same_items_only(tmp_path):
    settings = {"model": "m", "item_seed": 1, "chunk": 512, "tasks": ["niah_noise"]}
    cells = [{"protocol": "aware", "label": "full"}, {"protocol": "aware", "label": "snapkv"}]
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps({**settings, "cells": cells, "merged_cells": [["aware", "full"]]}))
    assert merged_cells(path, settings) == cells[1:]
    with pytest.raises(SystemExit, match="'chunk': \\(512, 256\\)"):
        merged_cells(path, {**settings, "chunk": 256})


@pytest.mark.slow
def test_small_run_on_a_tiny_fixture_writes_paired_per_item_results(tmp_path):
    from retentivekv_vllm.fixtures import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny-llama", arch="llama")
    out = tmp_path / "real_model.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.real_model",
            "--model",
            str(model),
            "--tasks",
            "niah_noise",
            "multikey",
            "--items",
            "2",
            "--ll-items",
            "2",
            "--ll-tokens",
            "64",
            "--chunk",
            "256",
            "--cells",
            "full",
            "retentive",
            "snapkv",
            "--max-tokens",
            "8",
            "--equal-memory-protocols",
            "agnostic",
            "--out",
            str(out),
        ],
        check=False,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["complete"] and out.with_suffix(".png").exists()
    cells = {(c["protocol"], c["label"]): c for c in report["cells"]}
    assert set(cells) == {
        ("agnostic", "retentive"),
        ("agnostic", "full"),
        ("agnostic", "snapkv"),
        ("agnostic", "snapkv (equal memory)"),
        ("aware", "retentive"),
        ("aware", "full"),
        ("aware", "snapkv"),
    }
    retentive, snapkv = cells["agnostic", "retentive"], cells["agnostic", "snapkv"]
    matched = cells["agnostic", "snapkv (equal memory)"]
    assert retentive["state_bytes"] > 0 and snapkv["state_bytes"] == 0
    assert retentive["kv_tokens"] == snapkv["kv_tokens"] < cells["agnostic", "full"]["kv_tokens"]
    # The state's bytes as whole extra tokens, rounded up, on every request.
    extra = math.ceil(retentive["state_bytes"] / report["token_bytes"])
    assert matched["extra_tokens"] == extra
    assert all(
        m["budget_tokens"] == s["budget_tokens"] + extra
        for m, s in zip(matched["items"], snapkv["items"])
    )
    assert matched["total_bytes"] >= retentive["total_bytes"]
    # Budget 1.0 folds nothing; 0.2 folds on every item; every item's output is kept.
    assert all(r["tokens_folded"] == 0 for r in cells["agnostic", "full"]["items"])
    assert all(r["tokens_folded"] > 0 for r in retentive["items"])
    assert len(retentive["items"]) == 4 and len(retentive["loglik"]["nll_per_item"]) == 2
    pairs = {(c["a"], c["b"], c["protocol"]) for c in report["comparisons"]}
    assert ("snapkv (equal memory)", "retentive", "agnostic") in pairs


def test_kept_answer_measures_on_constructed_masks():
    import torch

    from benchmarks.real_model_kept import answer_kept, copies, kept_mask
    from retentivekv_vllm.config import KVPolicyConfig
    from retentivekv_vllm.policies import make_policy

    prompt = [5, 1, 2, 3, 9, 1, 2, 3, 7]
    assert copies(prompt, [1, 2, 3]) == [range(1, 4), range(5, 8)]
    places = [copies(prompt, [1, 2, 3]), copies(prompt, [7])]
    mask = torch.zeros(3, len(prompt), dtype=torch.bool)
    mask[0, [1, 2, 3, 8]] = True  # one whole copy and the second answer
    mask[1, [1, 2, 6, 7, 8]] = True  # no whole copy of the first answer
    share, whole = answer_kept(mask, places)
    assert share == pytest.approx((4 + 5) / 21) and whole == pytest.approx(1 / 3)
    # The policy keeps exactly the budget of the whole prompt, sinks and window included.
    policy = make_policy(KVPolicyConfig(policy="snapkv", budget=0.2))
    q, k = torch.randn(6, 300, 16), torch.randn(2, 300, 16)
    kept = kept_mask(policy, q, k, 0.25, cut=300, num_prompt_tokens=320)
    assert kept.sum(1).tolist() == [64, 64] and kept[:, :4].all() and kept[:, -32:].all()
