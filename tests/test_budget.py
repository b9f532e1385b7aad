"""The folding schedule (budget.py) the scheduler and the worker share, step by step."""

import math

import pytest

from retentivekv_vllm.budget import folded_after_step, live_tokens_after_step, peak_live_tokens
from retentivekv_vllm.config import KVPolicyConfig


def config(budget, interval=64, policy="retentive"):
    return KVPolicyConfig.from_additional_config(
        {"kv_policy": policy, "kv_budget": budget, "kv_decode_interval": interval}
    )


def run(c, prompt, output, chunk, block):
    """(num_folded, live) after every step: prefill in chunks, then one token a step."""
    folded, computed, after = 0, 0, []
    steps = [min(chunk, prompt - start) for start in range(0, prompt, chunk)] + [1] * output
    for size in steps:
        seq = computed + size
        folded = folded_after_step(c, prompt, folded, computed, seq, block)
        computed = seq
        after.append((folded, seq - folded))
    return after


def held_blocks(after, block):
    """Blocks a request holds after each step: ⌈n / block⌉ − ⌊f / block⌋."""
    return [math.ceil((f + live) / block) - f // block for f, live in after]


@pytest.mark.parametrize("budget, interval", [(0.2, 64), (0.05, 64), (300, 1), (0.1, 200)])
@pytest.mark.parametrize("block", [16, 128])
def test_decode_folds_free_whole_blocks_and_keep_the_budget(budget, interval, block):
    c, prompt, output = config(budget, interval), 4096, 700
    b = c.budget_tokens(prompt)
    after = run(c, prompt, output, chunk=512, block=block)
    decoding = after[-output:]
    assert after[-output - 1] == (prompt - b, b)  # the prompt ends folded to the budget
    bound = live_tokens_after_step(c, prompt + output, block)
    folds = 0
    for (f_before, _), (f, live) in zip(after[-output - 1 :], decoding):
        assert b <= live <= bound
        if f != f_before:
            folds += 1
            assert f % block == 0 and f // block > f_before // block  # a fold frees a block
    # Folds are spaced by at least the interval and by a block: far fewer than one a token.
    assert 0 < folds <= output // max(interval + 1, block) + 1


def test_decode_folds_hold_no_more_than_folding_to_the_budget_itself():
    """Against folding back to exactly the budget (the live span's front block part-used), at the
    CPU's 128-token blocks: fewer compressions, no more blocks held on average."""
    c, prompt, output, block = config(0.2), 4096, 1024, 128
    b = c.budget_tokens(prompt)
    exact, folded = [], prompt - b
    for seq in range(prompt + 1, prompt + output + 1):
        if seq - folded > b + c.decode_interval:
            folded = seq - b
        exact.append((folded, seq - folded))
    aligned = run(c, prompt, output, chunk=2048, block=block)[-output:]
    folds = lambda after: len({f for f, _ in after}) - 1  # noqa: E731
    assert folds(aligned) * 1.8 < folds(exact)  # one a block (128 tokens) against one every 65
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(held_blocks(aligned, block)) < mean(held_blocks(exact, block))


def test_prompt_chunks_fold_back_to_the_budget_exactly():
    c, block = config(0.2), 128
    after = run(c, 4096, 0, chunk=1000, block=block)
    b = c.budget_tokens(4096)
    # Over budget from the first chunk on: every chunk folds back to the budget, block or not.
    assert [live for _, live in after] == [b] * len(after)


def test_a_recomputed_span_folds_back_to_the_budget_and_no_step_passes_the_peak():
    """A preempted request is recomputed, prompt and output, in chunks; the chunks past the prompt
    fold back to the budget like prompt chunks, so the peak is the budget plus one chunk."""
    c, prompt, chunk, block = config(0.2), 4096, 512, 128
    b = c.budget_tokens(prompt)
    peak = 0

    def steps(sizes, folded=0, computed=0):
        nonlocal peak
        for size in sizes:
            seq = computed + size
            peak = max(peak, seq - folded)  # live while the step runs, before it folds
            new = folded_after_step(c, prompt, folded, computed, seq, block)
            if size > 1 and seq - folded > b:
                assert seq - new == b
            folded, computed = new, seq
        return folded, computed

    folded, computed = steps([chunk] * 8 + [1] * 200)  # the prompt in chunks, then 200 tokens
    recompute = [chunk] * (computed // chunk) + [computed % chunk]  # preempted: from nothing
    steps(recompute + [1] * 100)
    # The bound (the manager takes a ratio's budget of every token the request may reach, a bound
    # from above; here of the prompt) is reached: one chunk on top of the budget.
    assert peak == peak_live_tokens(c, prompt, chunk, block) == b + chunk


def test_peak_adds_one_step_to_what_a_step_leaves_live():
    c = config(0.2)
    assert live_tokens_after_step(c, 4096, 128) == 820 + 127
    assert live_tokens_after_step(c, 4096, 16) == 820 + 64
    assert peak_live_tokens(c, 4096, 2048, 128) == 820 + 2048  # a chunk on top of the budget
    assert peak_live_tokens(c, 4096, 16, 128) == 820 + 128  # a token on top of the decode slack
    assert peak_live_tokens(c, 1000, 2048, 128) == 1000  # never more than the request itself
    full = config(0.2, policy="full")
    assert folded_after_step(full, 4096, 0, 4096, 4200, 128) == 0
    assert peak_live_tokens(full, 4096, 2048, 128) == 4096
