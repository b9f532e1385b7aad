"""How many tokens a request has folded: the one rule the scheduler and the worker share.

The worker decides *which* tokens to fold; *how many* follows from the step sizes
alone, so the KV-cache manager in the scheduler process computes the same count
without hearing back from the worker, and frees exactly the blocks the worker has
emptied.  Folded tokens always form the oldest `num_folded` cache slots of a request
(the worker packs the kept ones right after them).
"""

from __future__ import annotations

from retentivekv_vllm.config import KVPolicyConfig


def folded_after_step(
    config: KVPolicyConfig,
    num_prompt_tokens: int,
    num_folded: int,
    computed_before: int,
    seq_len: int,
) -> int:
    """Tokens folded once a step that grew the request from computed_before to seq_len ends.

    While the prompt is being processed every step that ends over budget folds back
    to it; during decoding the live tokens may exceed the budget by the decode
    interval before the next fold.
    """
    from retentivekv_vllm.policies import POLICIES

    if not POLICIES[config.policy].compresses:
        return 0
    budget = config.budget_tokens(num_prompt_tokens)
    prefilling = computed_before < num_prompt_tokens
    allowance = budget if prefilling else budget + config.decode_interval
    if seq_len - num_folded > allowance:
        return seq_len - budget
    return num_folded


def peak_live_tokens(config: KVPolicyConfig, num_tokens: int, max_step_tokens: int) -> int:
    """Most cache slots a request of num_tokens ever holds at once under `folded_after_step`.

    After every step at most budget + decode_interval tokens are live; the next step adds at
    most max_step_tokens (one prefill chunk, or a recomputed span after preemption) before
    compression runs again.  The budget of a ratio grows with the tokens it is taken of, so
    num_tokens (prompt and any output a resumed request recomputes) bounds it from above.
    """
    from retentivekv_vllm.policies import POLICIES

    if not POLICIES[config.policy].compresses:
        return num_tokens
    peak = config.budget_tokens(num_tokens) + config.decode_interval + max_step_tokens
    return min(num_tokens, peak)
