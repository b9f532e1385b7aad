"""States are stored in `core.storage_dtype` of the cache beside them: bfloat16 beside a bfloat16
cache, in the engine (real vLLM, in process), in the memory reserved for them at start-up and in
the bytes a request reports; float32 beside a float32 cache."""

import pytest
from vllm import SamplingParams

from retentivekv_vllm.engine.worker import WORKER, worker_stats

from .test_memory import Engine, random_prompt

MEMORY, MAX_NUM_SEQS = 64 * 2**20, 32
PRF = {"kv_policy": "retentive", "kv_budget": 0.2, "kv_feature_map": "prf"}
# The tiny llama: 4 layers x 1 text state x 2 KV heads x rank 64 x (64 + 1) numbers per request.
STATE_NUMBERS = 4 * 2 * 64 * 65


def live_state_dtypes(worker=None) -> list[str]:
    """The dtypes of every state the worker holds for its live requests."""
    return sorted(
        {
            str(tensor.dtype)
            for memory in WORKER.memories.live.values()
            for layer in memory.layers.values()
            for state in layer.states
            for tensor in (state.S, state.z)
        }
    )


@pytest.mark.parametrize(
    "dtype, state_dtype, element_bytes",
    [("bfloat16", "torch.bfloat16", 2), ("float32", "torch.float32", 4)],
)
def test_states_are_stored_in_the_storage_dtype_of_the_cache(
    model_dir, dtype, state_dtype, element_bytes
):
    engine_args = dict(
        kv_cache_memory_bytes=MEMORY,
        max_num_seqs=MAX_NUM_SEQS,
        max_num_batched_tokens=256,
        dtype=dtype,
    )
    stock = Engine(model_dir, {}, **engine_args)
    block_bytes = MEMORY // (stock.free_at_start + 1)  # vLLM keeps one null block
    stock.close()
    retentive = Engine(model_dir, PRF, **engine_args)
    state_bytes = STATE_NUMBERS * element_bytes
    assert retentive.free_at_start + 1 == (MEMORY - MAX_NUM_SEQS * state_bytes) // block_bytes

    # Prompts arrive in chunks (max_num_batched_tokens): both compress during their prefill, their
    # later chunks read the states, and then they decode through the batched decode path.
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    retentive.engine.add_request("a", random_prompt(600, 0), params)
    retentive.engine.add_request("b", random_prompt(900, 1), params)
    seen, outputs = set(), {}
    while retentive.engine.has_unfinished_requests():
        for output in retentive.engine.step():
            if output.finished:
                outputs[output.request_id] = output.outputs[0].token_ids
        (dtypes,) = retentive.llm.collective_rpc(live_state_dtypes)
        seen.update(dtypes)
    retentive.engine.step()
    assert seen == {state_dtype}
    assert all(len(tokens) == 40 for tokens in outputs.values()) and len(outputs) == 2
    (stats,) = retentive.llm.collective_rpc(worker_stats)
    for finished in stats["finished"].values():
        assert finished["tokens_folded"] > 0
        assert finished["state_bytes"] == finished["state_elements"] * element_bytes == state_bytes
    retentive.close()
