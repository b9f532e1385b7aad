"""A request's own policy and budget (SamplingParams.extra_args, the OpenAI request's vllm_xargs):
the scheduler's KV manager and the worker fold it by the same rule, it generates what a server
started with that policy and budget generates, and bad values are refused naming the field."""

import gc
import math

import pytest
import torch
from vllm import LLM, SamplingParams
from vllm.exceptions import VLLMValidationError

from retentivekv_vllm.engine.worker import WORKER, worker_stats

from .test_engine import ENGINE, MAX_TOKENS

SERVER = {"kv_policy": "retentive", "kv_budget": 0.2, "kv_feature_map": "prf"}  # with a state


def random_prompt(n: int, seed: int) -> list[int]:
    return torch.randint(5, 2000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def make_llm(model_dir, additional_config) -> LLM:
    return LLM(
        model=model_dir, additional_config=additional_config, enable_prefix_caching=False, **ENGINE
    )


@pytest.fixture(scope="module")
def llm(model_dir):
    llm = make_llm(model_dir, SERVER)
    yield llm
    del llm
    gc.collect()


def greedy(max_tokens=12, **extra_args) -> SamplingParams:
    return SamplingParams(
        temperature=0, max_tokens=max_tokens, ignore_eos=True, extra_args=extra_args or None
    )


def generate(llm, prompts, params):
    """Tokens and the worker's stats of each request, in prompt order."""
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    llm.llm_engine.step()  # finished requests are released in the worker at the next step
    (stats,) = llm.collective_rpc(worker_stats)
    by_id = {rid.split("-")[0]: s for rid, s in stats["finished"].items()}
    return [list(o.outputs[0].token_ids) for o in outputs], [by_id[o.request_id] for o in outputs]


def test_scheduler_and_worker_fold_each_request_by_its_own_budget(llm):
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    null_block = scheduler.kv_cache_manager.block_pool.null_block
    n = 1000
    budgets = {"server": math.ceil(0.2 * n), "ratio": math.ceil(0.5 * n), "count": 300}
    engine.add_request("server", {"prompt_token_ids": random_prompt(n, 0)}, greedy())
    engine.add_request("ratio", {"prompt_token_ids": random_prompt(n, 1)}, greedy(kv_budget=0.5))
    engine.add_request("count", {"prompt_token_ids": random_prompt(n, 2)}, greedy(kv_budget=300))
    for _ in range(4):  # the prompts (folded at their end), then decode steps below the interval
        engine.step()
    scheduled = {rid.split("-")[0]: rid for rid in manager.progress}
    worker = {rid.split("-")[0]: m for rid, m in WORKER.memories.live.items()}
    assert set(budgets) <= set(scheduled) and set(budgets) <= set(worker)
    for name, budget in budgets.items():
        rid, memory = scheduled[name], worker[name]
        assert memory.budget == budget
        assert manager.num_folded(rid) == memory.num_folded == n - budget
        # The blocks the manager still holds are the worker's live slots [folded, cached + 1).
        held = [b for b in manager.req_to_blocks[rid] if b is not null_block]
        slots = memory.num_cached + 1
        assert (
            len(held)
            == math.ceil(slots / manager.block_size) - memory.num_folded // manager.block_size
        )
    while engine.has_unfinished_requests():
        engine.step()


def test_a_request_choosing_a_policy_generates_what_that_server_generates(llm, model_dir):
    prompts = [random_prompt(300, 3), random_prompt(240, 4)]
    own = {"kv_policy": "h2o", "kv_budget": 0.5}
    tokens, stats = generate(llm, prompts, [greedy(), greedy(**own)])
    assert stats[0]["budget_tokens"] == math.ceil(0.2 * 300) and stats[0]["state_elements"] > 0
    assert stats[1]["budget_tokens"] == math.ceil(0.5 * 240) and stats[1]["state_elements"] == 0
    assert stats[1]["tokens_folded"] == 240 - math.ceil(0.5 * 240)

    other = make_llm(model_dir, own)
    try:
        expected, _ = generate(other, prompts[1:], [greedy()])
    finally:
        del other
        gc.collect()
    assert tokens[1] == expected[0]


@pytest.fixture(scope="module")
def merging_servers(model_dir, prompts):
    """Tokens of servers started with retentive, lookm and snapkv (budget 0.2), each also running
    requests that choose another policy. lookm merges the tokens it folds into the kept ones;
    retentive and snapkv do not merge. (One engine at a time: vLLM's in-process engine cannot
    step once another one in the process has shut down.)"""
    runs = {"retentive": ["lookm"], "lookm": [None, "snapkv"], "snapkv": [None]}
    tokens = {}
    for server, requested in runs.items():
        other = make_llm(model_dir, {"kv_policy": server, "kv_budget": 0.2})
        try:
            for policy in requested:
                own = {} if policy is None else {"kv_policy": policy}
                tokens[policy or server, server], stats = generate(
                    other, prompts, greedy(MAX_TOKENS, **own)
                )
                folded = [len(p) - math.ceil(0.2 * len(p)) for p in prompts]
                assert [s["tokens_folded"] for s in stats] == folded
        finally:
            del other
            gc.collect()
    # On these prompts merging changes what is generated, so a step that merged by the server's
    # policy instead of the request's would generate other tokens.
    assert tokens["lookm", "lookm"] != tokens["snapkv", "snapkv"]
    return tokens


def test_a_lookm_request_on_a_retentive_server_generates_what_a_lookm_server_does(merging_servers):
    assert merging_servers["lookm", "retentive"] == merging_servers["lookm", "lookm"]


def test_a_snapkv_request_on_a_lookm_server_generates_what_a_snapkv_server_does(merging_servers):
    assert merging_servers["snapkv", "lookm"] == merging_servers["snapkv", "snapkv"]


@pytest.mark.parametrize(
    "extra_args, field",
    [
        ({"kv_budget": 1.5}, "vllm_xargs.kv_budget"),
        ({"kv_budget": "lots"}, "vllm_xargs.kv_budget"),
        ({"kv_budget": 0}, "vllm_xargs.kv_budget"),
        # The budget rule on the LLM API path: finite, a count up to the maximum length.
        ({"kv_budget": 1e20}, "vllm_xargs.kv_budget"),
        ({"kv_budget": float("inf")}, "vllm_xargs.kv_budget"),
        ({"kv_budget": float("nan")}, "vllm_xargs.kv_budget"),
        ({"kv_budget": "1e309"}, "vllm_xargs.kv_budget"),
        ({"kv_budget": True}, "vllm_xargs.kv_budget"),
        ({"kv_budget": 10**6}, "vllm_xargs.kv_budget"),
        ({"kv_policy": "nope"}, "vllm_xargs.kv_policy"),
        ({"kv_policy": 3}, "vllm_xargs.kv_policy"),
        ({"kv_sinks": 2}, "vllm_xargs.kv_sinks"),
    ],
)
def test_bad_request_settings_are_refused_naming_the_field(llm, extra_args, field):
    with pytest.raises(VLLMValidationError) as refused:
        llm.generate(
            [{"prompt_token_ids": random_prompt(50, 5)}], greedy(**extra_args), use_tqdm=False
        )
    assert refused.value.parameter == field
    assert str(refused.value).startswith(field), str(refused.value)
