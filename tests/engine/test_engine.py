"""The plugin inside a real vLLM engine (in-process, tiny Llama, fp32, greedy)."""

import gc
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
from vllm import LLM, SamplingParams

from retentivekv_vllm.config import KVPolicyConfig
from retentivekv_vllm.engine.worker import worker_stats
from retentivekv_vllm.fixtures import build_tiny_model

from .hf_reference import reference_greedy

ENGINE = dict(
    dtype="float32",
    enforce_eager=True,
    kv_cache_memory_bytes=64 * 2**20,
    max_model_len=2048,
    seed=0,
)
REPO = pathlib.Path(__file__).parents[2]
MAX_TOKENS = 24  # below the decode interval: only the prefill compression runs
# retentive with a state: without a maps file it keeps none unless a feature map is asked for.
PRF = {"kv_feature_map": "prf"}


def generate_in_subprocess(
    model_dir, prompts, engine, env, work, max_tokens=MAX_TOKENS
) -> list[list[int]]:
    spec = {"model": model_dir, "prompts": prompts, "max_tokens": max_tokens, "engine": engine}
    (work / "spec.json").write_text(json.dumps(spec))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.engine.generate_in_subprocess",
            work / "spec.json",
            work / "out.json",
        ],
        check=True,
        env={**os.environ, **env},
        timeout=600,
        cwd=REPO,
    )
    return json.loads((work / "out.json").read_text())


@pytest.fixture(scope="module")
def stock_tokens(model_dir, prompts, tmp_path_factory):
    """Stock vLLM in its own process with this plugin disabled."""
    env = {"VLLM_PLUGINS": "", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    return generate_in_subprocess(model_dir, prompts, ENGINE, env, tmp_path_factory.mktemp("stock"))


def generate(model_dir, prompts, additional_config, max_tokens=MAX_TOKENS, **engine):
    """Greedy tokens and the worker's per-request stats, in prompt order."""
    llm = LLM(
        model=model_dir,
        additional_config=additional_config,
        enable_prefix_caching=False,
        **{**ENGINE, **engine},
    )
    try:
        outputs = llm.generate(
            [{"prompt_token_ids": ids} for ids in prompts],
            SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
            use_tqdm=False,
        )
        (stats,) = llm.collective_rpc(worker_stats)
    finally:
        del llm
        gc.collect()
    by_id = {**stats["finished"], **stats["live"]}
    per_request = [
        next(s for rid, s in by_id.items() if rid.split("-")[0] == o.request_id) for o in outputs
    ]
    return [list(o.outputs[0].token_ids) for o in outputs], per_request


@pytest.mark.parametrize("policy, budget", [("full", 0.2), ("retentive", 1.0)])
def test_no_compression_gives_stock_tokens(model_dir, prompts, stock_tokens, policy, budget):
    tokens, stats = generate(model_dir, prompts, {"kv_policy": policy, "kv_budget": budget})
    assert tokens == stock_tokens
    assert [s["tokens_folded"] for s in stats] == [0] * len(prompts)


@pytest.mark.parametrize(
    "policy, knobs",
    [
        ("streaming", {}),
        ("h2o", {}),
        ("snapkv", {}),
        ("lookm", {}),
        ("retentive", PRF),
        ("retentive", {}),  # no maps file: no state, folded tokens dropped
    ],
    ids=["streaming", "h2o", "snapkv", "lookm", "retentive-prf", "retentive-no-maps"],
)
def test_compressed_generation_matches_reference(model_dir, prompts, policy, knobs):
    """At budget 0.2 the engine folds each prompt to its budget and generates exactly
    what a plain transformers run of the same policy generates; only retentive with a feature
    map keeps a state."""
    config = {"kv_policy": policy, "kv_budget": 0.2, **knobs}
    tokens, stats = generate(model_dir, prompts, config)
    kv = KVPolicyConfig.from_additional_config(config)
    for ids, got, s in zip(prompts, tokens, stats):
        budget = math.ceil(0.2 * len(ids))
        assert s["budget_tokens"] == budget
        assert s["tokens_folded"] == len(ids) - budget > 0
        assert s["kept_after_compression"] == budget
        assert s["tokens_kept"] == s["tokens_cached"] - s["tokens_folded"]
        assert (s["state_elements"] > 0) == (s["state_bytes"] > 0) == (knobs == PRF)
        assert got == reference_greedy(model_dir, ids, kv, MAX_TOKENS)


def test_decode_compression_folds_whole_blocks(model_dir, prompts):
    budget, interval, max_tokens = 64, 32, 180
    block = 128  # the CPU backend's block size
    config = {"kv_policy": "retentive", "kv_budget": budget, "kv_decode_interval": interval}
    tokens, stats = generate(model_dir, prompts[1:2], config, max_tokens=max_tokens)
    (s,) = stats
    assert len(tokens[0]) == max_tokens
    # Cached tokens when the last step ran: prompt + generated - 1 (the last sample is not cached).
    prompt = len(prompts[1])
    cached = prompt + max_tokens - 1
    assert s["tokens_cached"] == cached
    # The prompt folds to the budget; then, once decoding has added more than the interval over
    # it, the request folds back to the highest block boundary that leaves the budget live.
    folded, compressions = prompt - budget, 1
    for seq in range(prompt + 1, cached + 1):
        boundary = (seq - budget) // block * block
        if seq - folded > budget + interval and boundary > folded:
            folded, compressions = boundary, compressions + 1
    assert compressions >= 3  # two decode folds at least: the schedule is exercised
    assert s["compressions"] == compressions
    assert s["tokens_folded"] == folded and folded % block == 0
    assert budget <= s["tokens_kept"] < budget + block
    assert s["kept_after_compression"] < budget + block


@pytest.mark.parametrize(
    "additional_config, engine, message",
    [
        ({"kv_policy": "nope"}, {}, "--kv-policy"),
        ({"kv_policy": "retentive", "kv_budget": 1.5}, {}, "--kv-budget"),
        ({"kv_policy": "retentive", "kv_budget": 0}, {}, "--kv-budget"),
        ({"kv_policy": "retentive", "kv_window": -1}, {}, "--kv-window"),
        ({"kv_policy": "retentive", "kv_feature_map": "cosine"}, {}, "--kv-feature-map"),
        ({"kv_policy": "retentive", "kv_pool_kernel": 4}, {}, "--kv-pool-kernel"),
        ({"kv_policy": "retentive", "kv_bogus": 1}, {}, "kv_bogus"),
        ({"kv_budget": 0.5}, {}, "--kv-policy"),
        ({"kv_policy": "retentive"}, {"enable_prefix_caching": True}, "--no-enable-prefix-caching"),
        ({"kv_policy": "retentive", **PRF}, {"kv_cache_memory_bytes": 8 * 2**20}, "--max-num-seqs"),
    ],
)
def test_bad_settings_are_refused_at_start_up(model_dir, additional_config, engine, message):
    with pytest.raises(ValueError, match=message):
        LLM(model=model_dir, additional_config=additional_config, **{**ENGINE, **engine})


def test_unsupported_head_size_is_refused(tmp_path):
    model_dir = build_tiny_model(tmp_path / "head48", arch="llama", head_dim=48)
    with pytest.raises(ValueError, match="head size 48"):
        LLM(model=str(model_dir), additional_config={"kv_policy": "retentive"}, **ENGINE)


def test_prefill_chunks_are_compressed_once_over_budget(model_dir, prompts):
    chunk = 64
    ids = prompts[0]
    budget = math.ceil(0.2 * len(ids))
    tokens, (s,) = generate(
        model_dir,
        [ids],
        {"kv_policy": "retentive", "kv_budget": 0.2},
        max_num_batched_tokens=chunk,
        enable_chunked_prefill=True,
    )
    chunk_ends = list(range(chunk, len(ids), chunk)) + [len(ids)]
    assert s["compressions"] == sum(end > budget for end in chunk_ends)
    assert s["tokens_folded"] == len(ids) - budget
    assert len(tokens[0]) == MAX_TOKENS


def test_tensor_parallel_two_gives_the_same_tokens(model_dir, prompts, tmp_path):
    """TP=2 (two CPU workers, one KV head each: the state is sharded with the heads)."""
    config = {"kv_policy": "retentive", "kv_budget": 0.2, **PRF}
    expected, _ = generate(model_dir, prompts, config)
    engine = {
        **ENGINE,
        "additional_config": config,
        "enable_prefix_caching": False,
        "tensor_parallel_size": 2,
    }
    # One core per worker: vLLM's CPU workers each bind to their own cores.
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    assert generate_in_subprocess(model_dir, prompts, engine, env, tmp_path) == expected


def test_chunked_prefill_equals_one_shot_when_only_the_last_chunk_ends_over_budget(
    model_dir, prompts
):
    """Chunking itself changes nothing: with compression at the prompt's end only, a prompt
    processed in 48-token chunks generates what one-shot prefill generates (the last chunk is
    shorter than the observation window, so the scoring queries span two chunks).  (A budget that
    chunks overrun earlier compresses mid-prompt by design, scored by the queries seen so far:
    docs/method.md, section 7.)"""
    ids = prompts[0]
    config = {"kv_policy": "retentive", "kv_budget": len(ids) - 10, **PRF}
    one_shot, (s1,) = generate(model_dir, [ids], config)
    chunked, (s2,) = generate(
        model_dir, [ids], config, max_num_batched_tokens=48, enable_chunked_prefill=True
    )
    assert s1["tokens_folded"] > 0 and s2["compressions"] == s1["compressions"]
    assert chunked == one_shot
