import pytest
import torch
from retentivekv_vllm.kernels import observation_scores

from retentivekv_vllm.core import accumulated_attention, attention_probs, entropy_potential

from .paged_batch import DEVICE, DTYPES, grouped_rows, make_paged_batch

NUM_KV_HEADS = 2
SEQ_LENS = [37, 9, 150]  # 150: three key tiles of 64 (two after live_start 33)
OBS_ROWS = [6, 3, 8]


def compacted_positions(gen, live_start, seq_len, num_heads):
    """Per head, sorted distinct positions < seq_len for the live slots, always including the
    newest tokens, like a cache whose heads kept different older tokens."""
    n = seq_len - live_start
    recent = torch.arange(seq_len - 4, seq_len)
    rows = [
        torch.cat([torch.randperm(seq_len - 4, generator=gen)[: n - 4].sort().values, recent])
        for _ in range(num_heads)
    ]
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "head_dim, group, block_size, compacted, max_splits",
    [(32, 1, 16, False, 16), (64, 2, 32, True, 1)],
    # One split: a program streams all tiles of a request (the online log-sum-exp across tiles);
    # many splits: one tile each, combined afterwards.
    ids=["d32-g1-bs16-plain-splits", "d64-g2-bs32-compacted-onesplit"],
)
def test_scores_equal_naive_twin(dtype, head_dim, group, block_size, compacted, max_splits):
    gen = torch.Generator().manual_seed(0)
    batch = make_paged_batch(
        SEQ_LENS, NUM_KV_HEADS, head_dim, block_size, dtype, seed=1, slot_major=compacted
    )
    num_q_heads = NUM_KV_HEADS * group
    live_start = [5, 0, 33] if compacted else [0, 0, 0]
    max_keys = max(n - s for n, s in zip(SEQ_LENS, live_start))
    queries = torch.randn(sum(OBS_ROWS), num_q_heads, head_dim, generator=gen).to(dtype)
    starts = torch.tensor([0, *OBS_ROWS]).cumsum(0)
    q_positions = torch.cat([torch.arange(n - m, n) for n, m in zip(SEQ_LENS, OBS_ROWS)])
    key_positions = subset = None
    if compacted:
        key_positions = torch.zeros(len(SEQ_LENS), NUM_KV_HEADS, max_keys, dtype=torch.long)
        subset = torch.rand(len(SEQ_LENS), NUM_KV_HEADS, max_keys, generator=gen) < 0.6
        for r, (n, s) in enumerate(zip(SEQ_LENS, live_start)):
            key_positions[r, :, : n - s] = compacted_positions(gen, s, n, NUM_KV_HEADS)

    scale = head_dim**-0.5
    alpha, entropy = observation_scores(
        queries.to(DEVICE),
        starts.to(DEVICE),
        q_positions.to(DEVICE),
        batch.key_cache,
        batch.block_table,
        torch.tensor(live_start, device=DEVICE),
        batch.seq_lens,
        scale,
        None if key_positions is None else key_positions.to(DEVICE),
        None if subset is None else subset.to(DEVICE),
        max_splits=max_splits,
    )

    assert alpha.shape == entropy.shape == (len(SEQ_LENS), NUM_KV_HEADS, max_keys)
    for r, (n, s) in enumerate(zip(SEQ_LENS, live_start)):
        q = grouped_rows(queries[starts[r] : starts[r + 1]].float(), NUM_KV_HEADS)
        k_pos = torch.arange(s, n) if key_positions is None else key_positions[r, :, : n - s]
        probs = attention_probs(
            q,
            batch.keys[r][:, s:n],
            scale,
            q_positions[starts[r] : starts[r + 1]].repeat(group),
            k_pos,
        )
        expected_alpha = accumulated_attention(probs)
        expected_entropy = entropy_potential(
            probs, None if subset is None else subset[r, :, : n - s]
        )
        torch.testing.assert_close(alpha[r, :, : n - s].cpu(), expected_alpha, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            entropy[r, :, : n - s].cpu(), expected_entropy, rtol=1e-4, atol=1e-5
        )
        assert not alpha[r, :, n - s :].any() and not entropy[r, :, n - s :].any()
