"""Folded tokens really leave vLLM's KV cache: block accounting read from vLLM's own
scheduler and block pool (in-process engine), release on finish, abort and preemption."""

import gc
import math
import random

import pytest
import torch
from vllm import LLM, SamplingParams

from retentivekv_vllm.engine.worker import WORKER, worker_stats
from retentivekv_vllm.fixtures import build_tiny_model

from .test_engine import ENGINE, PRF


def random_prompt(n: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"prompt_token_ids": torch.randint(5, 2000, (n,), generator=generator).tolist()}


class Engine:
    """An in-process LLM and the vLLM objects that own its KV cache."""

    def __init__(self, model_dir, additional_config, **engine):
        self.llm = LLM(
            model=model_dir,
            additional_config=additional_config,
            enable_prefix_caching=False,
            **{**ENGINE, **engine},
        )
        self.engine = self.llm.llm_engine
        self.scheduler = self.engine.engine_core.engine_core.scheduler
        self.pool = self.scheduler.kv_cache_manager.block_pool
        self.manager = self.scheduler.kv_cache_manager.coordinator.single_type_managers[0]
        self.block_size = self.manager.block_size
        self.free_at_start = self.pool.get_num_free_blocks()

    def held_blocks(self) -> int:
        return self.free_at_start - self.pool.get_num_free_blocks()

    def drain(self) -> None:
        while self.engine.has_unfinished_requests():
            self.engine.step()
        # Finished requests are released in the worker at the next step.
        self.engine.step()

    def close(self) -> None:
        if hasattr(self, "llm"):
            del self.llm, self.engine, self.scheduler, self.pool, self.manager
            gc.collect()


@pytest.fixture
def make_engine():
    engines = []

    def make(*args, **kwargs):
        engines.append(Engine(*args, **kwargs))
        return engines[-1]

    yield make
    for engine in engines:
        engine.close()


@pytest.mark.parametrize("budget", [0.2, 0.05])
def test_request_holds_the_blocks_of_its_live_slots(model_dir, make_engine, budget):
    """A request whose live slots are [folded, n) holds ceil(n / bs) - floor(folded / bs)
    blocks (docs/method.md); everything returns to the pool when it finishes."""
    engine = make_engine(model_dir, {"kv_policy": "retentive", "kv_budget": budget})
    prompt_len = 1000
    engine.engine.add_request(
        "r", random_prompt(prompt_len, 0), SamplingParams(max_tokens=6, ignore_eos=True)
    )
    engine.engine.step()  # the whole prompt, then folded down to the budget
    assert engine.held_blocks() == math.ceil(prompt_len / engine.block_size)
    folded = prompt_len - math.ceil(budget * prompt_len)
    for decode_step in range(1, 4):
        engine.engine.step()  # frees the folded blocks before allocating the next slot
        slots = prompt_len + decode_step
        expected = math.ceil(slots / engine.block_size) - folded // engine.block_size
        assert engine.held_blocks() == expected
        assert expected < math.ceil(slots / engine.block_size)
    engine.drain()
    assert engine.held_blocks() == 0
    assert not WORKER.memories.live


def test_stock_run_holds_every_block(model_dir, make_engine):
    engine = make_engine(model_dir, {})
    engine.engine.add_request(
        "r", random_prompt(1000, 0), SamplingParams(max_tokens=4, ignore_eos=True)
    )
    engine.engine.step()
    engine.engine.step()
    assert engine.held_blocks() == math.ceil(1001 / engine.block_size)
    engine.drain()
    assert engine.held_blocks() == 0


def run_with_aborts(engine, num_requests: int, seed: int) -> int:
    """Random long prompts and lengths on a small pool, random aborts; returns preemptions."""
    rng = random.Random(seed)
    preemptions = 0
    preempt = engine.scheduler._preempt_request

    def counting_preempt(*args, **kwargs):
        nonlocal preemptions
        preemptions += 1
        return preempt(*args, **kwargs)

    engine.scheduler._preempt_request = counting_preempt
    pending = list(range(num_requests))
    live: set[str] = set()
    while pending or engine.engine.has_unfinished_requests():
        while pending and len(live) < 12:
            i = pending.pop()
            engine.engine.add_request(
                str(i),
                random_prompt(rng.randint(100, 1000), i),
                SamplingParams(max_tokens=rng.randint(1, 300), ignore_eos=True),
            )
            live.add(str(i))
        for output in engine.engine.step():
            if output.finished:
                live.discard(output.request_id)
        if live and rng.random() < 0.03:
            victim = rng.choice(sorted(live))
            engine.engine.abort_request([victim])
            live.discard(victim)
    engine.engine.step()
    return preemptions


@pytest.mark.parametrize(
    "num_requests", [pytest.param(40, id="40"), pytest.param(200, id="200", marks=pytest.mark.slow)]
)
def test_aborts_and_preemption_return_every_block_and_state(model_dir, make_engine, num_requests):
    engine = make_engine(
        # A long decode interval lets decoding outgrow the small pool, so requests are
        # preempted (and recomputed) as well as aborted and finished.
        model_dir,
        {"kv_policy": "retentive", "kv_budget": 0.5, "kv_decode_interval": 256, **PRF},
        kv_cache_memory_bytes=8 * 2**20,
        max_model_len=1536,
        max_num_batched_tokens=512,
        enable_chunked_prefill=True,
        max_num_seqs=6,
    )
    preemptions = run_with_aborts(engine, num_requests, seed=num_requests)
    assert preemptions > 0, "the pool was meant to be too small to avoid preemption"
    assert engine.held_blocks() == 0
    assert not engine.manager.progress
    assert not WORKER.memories.live


def max_running(engine, prompts: list[dict], max_tokens: int) -> int:
    """Submit every prompt at once; the most requests vLLM's scheduler ran at once."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.engine.add_request(str(i), prompt, params)
    most = 0
    while engine.engine.has_unfinished_requests():
        engine.engine.step()
        most = max(most, len(engine.scheduler.running))
    engine.engine.step()
    assert engine.held_blocks() == 0
    return most


def test_budget_0_2_runs_at_least_four_times_the_requests_of_stock(tmp_path_factory, make_engine):
    """Same KV pool, long prompts, vLLM's own admission (the whole request must fit): at budget
    0.2 the scheduler runs at least 4x as many requests at once as stock vLLM."""
    prompt_len, max_tokens, block_size = 8000, 160, 32
    model_dir = str(
        build_tiny_model(
            tmp_path_factory.mktemp("models") / "tiny-llama-8k",
            arch="llama",
            max_position_embeddings=8192,
        )
    )
    stock_blocks_per_request = math.ceil((prompt_len + max_tokens) / block_size)
    # 2 (K and V) x 4 layers x 2 KV heads x 64 dims x 4 bytes per token; one block more for vLLM's
    # null block.
    pool_bytes = (4 * stock_blocks_per_request + 1) * block_size * 2 * 4 * 2 * 64 * 4
    engine = dict(
        kv_cache_memory_bytes=pool_bytes,
        block_size=block_size,
        max_model_len=prompt_len + max_tokens,
        enable_chunked_prefill=True,
        max_num_batched_tokens=1024,
        max_num_seqs=4 * 4 + 1,
    )
    stock = make_engine(model_dir, {}, **engine)
    stock_running = max_running(stock, [random_prompt(prompt_len, i) for i in range(5)], max_tokens)
    assert stock_running == 4
    stock.close()
    retentive = make_engine(
        model_dir, {"kv_policy": "retentive", "kv_budget": 0.2, **PRF}, **engine
    )
    # One request more than needed: the test then fails only if fewer than 4x run at once.
    num_requests = 4 * stock_running + 1
    retentive_running = max_running(
        retentive, [random_prompt(prompt_len, i) for i in range(num_requests)], max_tokens
    )
    assert retentive_running >= 4 * stock_running


def test_states_of_max_num_seqs_requests_are_reserved_out_of_the_kv_memory(model_dir, make_engine):
    memory, max_num_seqs = 64 * 2**20, 32
    stock = make_engine(model_dir, {}, kv_cache_memory_bytes=memory, max_num_seqs=max_num_seqs)
    block_bytes = memory // (stock.free_at_start + 1)  # vLLM keeps one null block
    stock.close()
    retentive = make_engine(
        model_dir,
        {"kv_policy": "retentive", **PRF},
        kv_cache_memory_bytes=memory,
        max_num_seqs=max_num_seqs,
    )
    # 4 layers x 1 text state x 2 KV heads x rank 64 x (64 + 1) float32 numbers per request.
    state_bytes = 4 * 2 * 64 * 65 * 4
    assert retentive.free_at_start + 1 == (memory - max_num_seqs * state_bytes) // block_bytes
    retentive.engine.add_request(
        "r", random_prompt(600, 0), SamplingParams(max_tokens=2, ignore_eos=True)
    )
    retentive.drain()
    (stats,) = retentive.llm.collective_rpc(worker_stats)
    (finished,) = stats["finished"].values()
    assert finished["state_elements"] * 4 == finished["state_bytes"] == state_bytes
    retentive.close()
    # Without a maps file retentive keeps no state: nothing reserved, nothing held.
    no_maps = make_engine(
        model_dir, {"kv_policy": "retentive"}, kv_cache_memory_bytes=memory, max_num_seqs=32
    )
    assert no_maps.free_at_start == stock.free_at_start
    no_maps.engine.add_request(
        "r", random_prompt(600, 0), SamplingParams(max_tokens=2, ignore_eos=True)
    )
    no_maps.drain()
    (stats,) = no_maps.llm.collective_rpc(worker_stats)
    (finished,) = stats["finished"].values()
    assert finished["tokens_folded"] > 0
    assert finished["state_elements"] == finished["state_bytes"] == 0
