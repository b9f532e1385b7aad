"""How many tokens a request has folded: the one rule the scheduler and the worker share.

The worker decides *which* tokens to fold; *how many* follows from the step sizes
alone, so the KV-cache manager in the scheduler process computes the same count
without hearing back from the worker, and frees exactly the blocks the worker has
emptied.  Folded tokens always form the oldest `num_folded` cache slots of a request
(the worker packs the kept ones right after them).
"""

from __future__ import annotations

from retentivekv_vllm.config import KVPolicyConfig
from retentivekv_vllm.policies import POLICIES


def folded_after_step(
    config: KVPolicyConfig,
    num_prompt_tokens: int,
    num_folded: int,
    computed_before: int,
    seq_len: int,
    block_size: int,
) -> int:
    """Tokens folded once a step that grew the request from computed_before to seq_len ends.

    A step that adds more than one token (a prompt chunk, or a span recomputed after
    preemption) and ends over budget folds back to it, so only a step that decodes one token
    ever starts with more than the budget live.  During decoding the live tokens may exceed
    the budget by the decode interval; then the request folds whole blocks, back to the
    highest block boundary that leaves at least the budget live.  Only whole blocks are ever
    freed, so a decode compression that stops short of a boundary would free nothing until the
    next one: this way every decode compression frees a block, and the live span starts on a
    block boundary (no part-used block in front).
    """
    if not POLICIES[config.policy].compresses:
        return 0
    budget = config.budget_tokens(num_prompt_tokens)
    live = seq_len - num_folded
    if computed_before < num_prompt_tokens or seq_len - computed_before > 1:
        return seq_len - budget if live > budget else num_folded
    if live <= budget + config.decode_interval:
        return num_folded
    return max(num_folded, (seq_len - budget) // block_size * block_size)


def live_tokens_after_step(config: KVPolicyConfig, num_tokens: int, block_size: int) -> int:
    """Most live cache slots a request of num_tokens holds when a step has ended.

    The budget plus the decode interval, or plus one block less a token when a decode fold
    back to a block boundary leaves more (`folded_after_step`).  The budget of a ratio grows
    with the tokens it is taken of, so num_tokens (prompt and any output a resumed request
    recomputes) bounds it from above.
    """
    if not POLICIES[config.policy].compresses:
        return num_tokens
    slack = max(config.decode_interval, block_size - 1)
    return min(num_tokens, config.budget_tokens(num_tokens) + slack)


def peak_live_tokens(
    config: KVPolicyConfig, num_tokens: int, max_step_tokens: int, block_size: int
) -> int:
    """Most cache slots a request of num_tokens ever holds at once under `folded_after_step`,
    while a step runs: a step of up to max_step_tokens (one prefill chunk, or a recomputed span
    after preemption) starts from at most the budget, a decode step of one token from at most
    what a step leaves live."""
    if not POLICIES[config.policy].compresses:
        return num_tokens
    budget = config.budget_tokens(num_tokens)
    after_decode = live_tokens_after_step(config, num_tokens, block_size) - budget + 1
    return min(num_tokens, budget + max(max_step_tokens, after_decode))
