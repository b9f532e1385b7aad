"""The worker's per-step bookkeeping (`worker.WorkerState`): the metadata builder plans a step
without changing any request's memory; what the plans fold becomes the requests' own only when
the step has run (`commit`, called by the runner hook after `execute_model`)."""

from types import SimpleNamespace

import torch

from retentivekv_vllm.config import KVPolicyConfig
from retentivekv_vllm.engine.worker import BatchView, WorkerState
from retentivekv_vllm.policies import make_policy

PROMPT, BLOCK_SIZE = 300, 16


def step_metadata(starts: list[int], seq_lens: list[int]):
    """The fields of vLLM's CommonAttentionMetadata that planning reads."""
    return SimpleNamespace(
        num_reqs=len(seq_lens),
        query_start_loc_cpu=torch.tensor(starts),
        seq_lens=torch.tensor(seq_lens),
    )


def memory_counts(worker: WorkerState) -> tuple[int, int, int]:
    memory = worker.memories.live["request"]
    return memory.num_folded, memory.num_cached, memory.num_compressions


def test_a_planned_step_changes_nothing_until_it_has_run():
    worker = WorkerState()
    worker.batch = BatchView(["request"], [PROMPT])
    policy = make_policy(KVPolicyConfig(policy="snapkv", budget=0.2))
    prompt = step_metadata([0, PROMPT], [PROMPT])
    budget = policy.config.budget_tokens(PROMPT)

    (plan,) = worker.plan(policy, prompt, BLOCK_SIZE)
    assert plan.compress and (plan.live_start, plan.fold_to) == (0, PROMPT - budget)
    assert memory_counts(worker) == (0, 0, 0)
    # Built again and not run (no commit in between): planned from the same state again.
    (again,) = worker.plan(policy, prompt, BLOCK_SIZE)
    assert (again.live_start, again.fold_to) == (plan.live_start, plan.fold_to)
    assert memory_counts(worker) == (0, 0, 0)

    worker.commit()
    assert memory_counts(worker) == (PROMPT - budget, PROMPT, 1)
    worker.commit()  # nothing planned since: nothing changes
    assert memory_counts(worker) == (PROMPT - budget, PROMPT, 1)

    (decode,) = worker.plan(policy, step_metadata([0, 1], [PROMPT + 1]), BLOCK_SIZE)
    assert decode.live_start == PROMPT - budget and not decode.compress
    assert memory_counts(worker) == (PROMPT - budget, PROMPT, 1)
