"""Decode attention against its naive twins: `core.merge.local_attention` for the paged part (output
and log-sum-exp), `core.state.readout` and `merge_with_states` for the states, together
`core.reference.compressed_attention` for one query token per request."""

import pytest
import torch
from retentivekv_vllm.kernels import PagedStates, decode_attention

from retentivekv_vllm.core import (
    EluPlusOne,
    PositiveRandomFeatures,
    RecurrentState,
    compressed_attention,
    fold,
    local_attention,
    retention_from_entropy,
    storage_dtype,
)

from .paged_batch import (
    DEVICE,
    DTYPES,
    assert_close_scaled,
    grouped_rows,
    make_paged_batch,
    tolerance,
)

NUM_KV_HEADS = 2
SEQ_LENS = [37, 9, 150, 3]
# Folded before this step; the last request has no live slot left (only its states answer).
LIVE_START = [5, 0, 40, 3]
PRF_RANK = 24
# Request r reads pool slots STATE_INDEX[r] (-1: none); pool slot 2 holds an empty state.
STATE_INDEX = [[0, 1], [-1, 2], [1, -1], [0, 1]]
POOL_SLOTS = 3

FEATURE_MAPS = {
    "none": lambda d: None,
    "elu": lambda d: EluPlusOne(d),
    "prf": lambda d: PositiveRandomFeatures(d, PRF_RANK, scale=d**-0.5, seed=5),
}


def state_pool(feature_map, head_dim: int, gen: torch.Generator) -> list[RecurrentState]:
    """States as folding builds them (random keys and values, gated), so their readouts have the
    scale of the attention they stand for; the last pool slot is empty."""
    states = []
    for slot in range(POOL_SLOTS):
        empty = RecurrentState.zeros(NUM_KV_HEADS, feature_map.rank, head_dim)
        if slot == POOL_SLOTS - 1:
            states.append(empty)
            continue
        n = 20
        keys = torch.randn(NUM_KV_HEADS, n, head_dim, generator=gen)
        values = torch.randn(NUM_KV_HEADS, n, head_dim, generator=gen)
        gamma = retention_from_entropy(torch.rand(NUM_KV_HEADS, n, generator=gen), 0.5)
        states.append(
            fold(empty, feature_map.features(keys), values, gamma, torch.ones(NUM_KV_HEADS, n))
        )
    return states


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feature", sorted(FEATURE_MAPS))
@pytest.mark.parametrize(
    "head_dim, group, block_size, slot_major, max_splits",
    [(32, 1, 16, False, 32), (64, 4, 32, True, 1)],
    # One split: a program streams all tiles of a request (the online softmax across tiles);
    # many splits: one tile each, combined by the second launch.
    ids=["d32-g1-bs16-hnd-splits", "d64-g4-bs32-nhd-onesplit"],
)
def test_decode_equals_naive_twin(
    dtype, feature, head_dim, group, block_size, slot_major, max_splits
):
    gen = torch.Generator().manual_seed(11)
    batch = make_paged_batch(
        SEQ_LENS, NUM_KV_HEADS, head_dim, block_size, dtype, seed=2, slot_major=slot_major
    )
    num_q_heads = NUM_KV_HEADS * group
    query = torch.randn(len(SEQ_LENS), num_q_heads, head_dim, generator=gen).to(dtype)
    scale = head_dim**-0.5
    feature_map = FEATURE_MAPS[feature](head_dim)
    pool = paged = None
    if feature_map is not None:
        # Stored as the engine stores them beside this cache (bfloat16 beside a 16-bit one).
        pool = [s.stored_as(storage_dtype(dtype)) for s in state_pool(feature_map, head_dim, gen)]
        paged = PagedStates(
            S=torch.stack([s.S for s in pool]).to(DEVICE),
            z=torch.stack([s.z for s in pool]).to(DEVICE),
            index=torch.tensor(STATE_INDEX, device=DEVICE),
        )

    out, lse = decode_attention(
        query.to(DEVICE),
        batch.key_cache,
        batch.value_cache,
        batch.block_table,
        torch.tensor(LIVE_START, device=DEVICE),
        batch.seq_lens,
        scale,
        paged,
        feature_map,
        max_splits=max_splits,
    )

    assert out.dtype == dtype and out.shape == (len(SEQ_LENS), num_q_heads, head_dim)
    for r, (n, s) in enumerate(zip(SEQ_LENS, LIVE_START)):
        q = grouped_rows(query[r : r + 1].float(), NUM_KV_HEADS)
        q_positions = torch.full((group,), n - 1)
        keys, values, k_positions = (
            batch.keys[r][:, s:n],
            batch.values[r][:, s:n],
            torch.arange(s, n),
        )
        present = [
            k for k, slot in enumerate(STATE_INDEX[r]) if feature_map is not None and slot >= 0
        ]
        expected = compressed_attention(
            q,
            keys,
            values,
            scale,
            q_positions,
            k_positions,
            None,
            [pool[STATE_INDEX[r][k]] for k in present],
            feature_map,
        ).reshape(num_q_heads, head_dim)
        expected_lse = local_attention(q, keys, values, scale, q_positions, k_positions)[1].reshape(
            num_q_heads
        )
        reduction = n - s + head_dim + (0 if feature_map is None else feature_map.rank)
        assert_close_scaled(out[r], expected, tolerance(dtype, reduction))
        if n > s:
            assert_close_scaled(lse[r], expected_lse, tolerance(torch.float32, n - s + head_dim))
        else:
            assert lse[r].isneginf().all()


def test_states_need_their_feature_map():
    batch = make_paged_batch([5], NUM_KV_HEADS, 32, 16, torch.float32, seed=0)
    states = PagedStates(
        S=torch.zeros(1, NUM_KV_HEADS, 32, 32, device=DEVICE),
        z=torch.zeros(1, NUM_KV_HEADS, 32, device=DEVICE),
        index=torch.zeros(1, 1, dtype=torch.int32, device=DEVICE),
    )
    with pytest.raises(ValueError, match="feature map"):
        decode_attention(
            torch.zeros(1, NUM_KV_HEADS, 32, device=DEVICE),
            batch.key_cache,
            batch.value_cache,
            batch.block_table,
            torch.zeros(1, device=DEVICE),
            batch.seq_lens,
            1.0,
            states,
            None,
        )


def test_decode_reads_states_of_sharp_queries_in_log_space():
    """A large-norm query: every prf feature φ_r(q) is below float32's range, so a readout with
    φ(q) itself would give the state no weight. The kernel subtracts each row's largest log-feature
    first (as `merge_with_state_readouts` does); the live keys are set so that the kept part's
    log-sum-exp is near the state's log-mass and both shares matter."""
    head_dim, rank, n, live_start, n_folded = 32, PRF_RANK, 6, 2, 9
    scale = head_dim**-0.5
    gen = torch.Generator().manual_seed(7)
    batch = make_paged_batch([n], NUM_KV_HEADS, head_dim, 4, torch.float32, seed=3)
    direction = torch.nn.functional.normalize(
        torch.randn(NUM_KV_HEADS, head_dim, generator=gen), dim=-1
    )
    query = (25.0 / scale**0.5) * direction[None]  # [1, Hkv, d], group 1
    feature_map = PositiveRandomFeatures(head_dim, rank, scale, seed=5)
    assert (feature_map.query_features(query) == 0).all()
    noise = 0.3 * torch.randn(NUM_KV_HEADS, n_folded, head_dim, generator=gen)
    k_folded = (2.0 / scale**0.5) * direction[:, None] + noise
    v_folded = torch.randn(NUM_KV_HEADS, n_folded, head_dim, generator=gen)
    ones = torch.ones(NUM_KV_HEADS, n_folded)
    empty = RecurrentState.zeros(NUM_KV_HEADS, rank, head_dim)
    state = fold(empty, feature_map.features(k_folded), v_folded, ones, ones)
    # Live keys along -direction, with the logit that puts their mass next to the state's.
    log_den = torch.logsumexp(
        torch.logsumexp(
            feature_map.log_features(query[0])[:, None, :] + feature_map.log_features(k_folded), -1
        ),
        -1,
    )  # [Hkv], around −250
    assert (log_den < -100).all()
    logit = log_den - torch.log(torch.tensor(float(n - live_start)))
    live_keys = (logit / (scale * query[0].norm(dim=-1)))[:, None, None] * direction[:, None, :]
    live_keys = live_keys + 0.01 * torch.randn(
        NUM_KV_HEADS, n - live_start, head_dim, generator=gen
    )
    slots = torch.arange(live_start, n)
    blocks = batch.block_table[0, slots // 4].long()
    batch.key_cache[blocks.to(DEVICE), (slots % 4).to(DEVICE)] = live_keys.transpose(0, 1).to(
        DEVICE
    )
    batch.keys[0][:, live_start:n] = live_keys
    paged = PagedStates(
        S=state.S[None].to(DEVICE),
        z=state.z[None].to(DEVICE),
        index=torch.tensor([[0]], device=DEVICE),
    )

    out, _ = decode_attention(
        query.to(DEVICE),
        batch.key_cache,
        batch.value_cache,
        batch.block_table,
        torch.tensor([live_start], device=DEVICE),
        batch.seq_lens,
        scale,
        paged,
        feature_map,
    )
    q = grouped_rows(query.float(), NUM_KV_HEADS)
    keys, values = batch.keys[0][:, live_start:n], batch.values[0][:, live_start:n]
    expected = compressed_attention(
        q,
        keys,
        values,
        scale,
        torch.full((1,), n - 1),
        slots,
        None,
        [state],
        feature_map,
    ).reshape(NUM_KV_HEADS, head_dim)
    local, _ = local_attention(q, keys, values, scale, torch.full((1,), n - 1), slots)
    # The state carries a real share: the merged output is far from the kept part's alone.
    assert (
        (expected - local.reshape(NUM_KV_HEADS, head_dim)).norm(dim=-1) > 0.1 * local.norm()
    ).all()
    torch.testing.assert_close(out[0].cpu(), expected, rtol=1e-3, atol=1e-3)


def test_pool_of_requests_states():
    """`PagedStates.of` pools the requests' states in order: request r's k-th state is read from
    the pool slot index[r, k], and a request with fewer states reads -1 past them."""
    gen = torch.Generator().manual_seed(5)

    def state():
        S = torch.randn(NUM_KV_HEADS, 4, 8, generator=gen)
        return RecurrentState(S, torch.rand(NUM_KV_HEADS, 4, generator=gen))

    states = [[state(), state()], [state()], [state(), state()]]

    paged = PagedStates.of(states)

    assert paged.index.tolist() == [[0, 1], [2, -1], [3, 4]]
    for r, member in enumerate(states):
        for k, s in enumerate(member):
            assert torch.equal(paged.S[paged.index[r, k]], s.S)
            assert torch.equal(paged.z[paged.index[r, k]], s.z)
