"""Per-head gathering and compaction against plain torch indexing of the same paged cache.

The twin is the packing step of a compression (`executor.compress`): head h of request r moves
its kept slots
slots[r, h, :count], in slot order, to fold_to, fold_to + 1, ... with fold_to = seq_len − count,
so sources and destinations overlap. These kernels copy, so the results must be bit-exact.
"""

import pytest
import torch
from retentivekv_vllm.kernels import gather_slots, write_slots

from .paged_batch import DEVICE, DTYPES, make_paged_batch

NUM_KV_HEADS = 3
SEQ_LENS = [37, 9, 70]
LIVE_START = [5, 0, 20]
COUNTS = [12, 9, 30]  # request 1 keeps everything: every slot moves onto itself


def kept_slots(gen: torch.Generator) -> torch.Tensor:
    """[R, Hkv, max(COUNTS)] long: per head a sorted random subset of the live slots, padded with
    -1 (a kernel reading padding would index outside the request)."""
    slots = torch.full((len(SEQ_LENS), NUM_KV_HEADS, max(COUNTS)), -1, dtype=torch.long)
    for r, (n, s, count) in enumerate(zip(SEQ_LENS, LIVE_START, COUNTS)):
        for h in range(NUM_KV_HEADS):
            slots[r, h, :count] = (s + torch.randperm(n - s, generator=gen)[:count]).sort().values
    return slots


def cache_rows(
    cache: torch.Tensor, block_table: torch.Tensor, request: int, slots: torch.Tensor, head: int
):
    """cache[...] rows of the given slots of one request's head, by plain indexing."""
    block_size = cache.shape[1]
    blocks = block_table[request, (slots // block_size).to(block_table.device)].long()
    return cache[blocks, (slots % block_size).to(cache.device), head]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "block_size, slot_major", [(16, False), (8, True)], ids=["bs16-hnd", "bs8-nhd"]
)
def test_compaction_equals_torch_indexing(dtype, block_size, slot_major):
    gen = torch.Generator().manual_seed(4)
    batch = make_paged_batch(
        SEQ_LENS, NUM_KV_HEADS, 24, block_size, dtype, seed=5, slot_major=slot_major
    )
    slots = kept_slots(gen)
    counts = torch.tensor(COUNTS)
    fold_to = torch.tensor(SEQ_LENS) - counts
    before = batch.kv_cache.clone()
    key_before, value_before = batch.key_cache.clone(), batch.value_cache.clone()

    keys, values = gather_slots(
        batch.key_cache, batch.value_cache, batch.block_table, slots.to(DEVICE), counts.to(DEVICE)
    )
    for r, count in enumerate(COUNTS):
        for h in range(NUM_KV_HEADS):
            src = slots[r, h, :count]
            assert torch.equal(
                keys[r, h, :count], cache_rows(key_before, batch.block_table, r, src, h)
            )
            assert torch.equal(
                values[r, h, :count], cache_rows(value_before, batch.block_table, r, src, h)
            )

    # Every source is read (above) before any destination is written.
    write_slots(
        batch.key_cache,
        batch.value_cache,
        batch.block_table,
        keys,
        values,
        fold_to.to(DEVICE),
        counts.to(DEVICE),
    )

    expected_key, expected_value = key_before.clone(), value_before.clone()
    for r, count in enumerate(COUNTS):
        dst = torch.arange(int(fold_to[r]), SEQ_LENS[r])
        for h in range(NUM_KV_HEADS):
            src = slots[r, h, :count]
            blocks = batch.block_table[r, (dst // block_size).to(DEVICE)].long()
            expected_key[blocks, (dst % block_size).to(DEVICE), h] = cache_rows(
                key_before, batch.block_table, r, src, h
            )
            expected_value[blocks, (dst % block_size).to(DEVICE), h] = cache_rows(
                value_before, batch.block_table, r, src, h
            )
    # Unwritten slots hold NaN: everything outside the destinations must be left as it was.
    torch.testing.assert_close(batch.key_cache, expected_key, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(batch.value_cache, expected_value, rtol=0, atol=0, equal_nan=True)
    assert batch.kv_cache.shape == before.shape  # the views wrote into vLLM's one tensor
    assert not torch.equal(batch.kv_cache.nan_to_num(), before.nan_to_num())
