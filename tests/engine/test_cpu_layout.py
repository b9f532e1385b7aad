"""Attention over a request's live cache slots (decode: in place on the blocks; a chunk of new tokens:
torch's fused attention, prefix and causal part merged) against the plain-torch definition on the same
slots: `RequestSlots.read` (token-order copy through the measured layout) and `core.local_attention`."""

import pytest
import torch
from vllm import _custom_ops as ops

from retentivekv_vllm.core import local_attention
from retentivekv_vllm.engine.cpu_layout import RequestSlots, split_kv_cache

HEADS, HEAD_SIZE, BLOCK_SIZE, NUM_BLOCKS = 2, 64, 128, 12


def filled_cache(dtype, block_row: torch.Tensor, num_tokens: int, isa: str):
    """A cache whose request (block_row) holds num_tokens random tokens, written by vLLM's own op."""
    generator = torch.Generator().manual_seed(0)
    cache = torch.randn(NUM_BLOCKS, HEADS, BLOCK_SIZE, 2 * HEAD_SIZE, generator=generator).to(dtype)
    keys, values = (torch.randn(num_tokens, HEADS, HEAD_SIZE, generator=generator).to(dtype) for _ in range(2))
    slots = torch.arange(num_tokens)
    slot_mapping = block_row[slots // BLOCK_SIZE].long() * BLOCK_SIZE + slots % BLOCK_SIZE
    ops.cpu_attn_reshape_and_cache(keys, values, *split_kv_cache(cache), slot_mapping, isa)
    return cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("blocks", ["consecutive", "scattered"])
@pytest.mark.parametrize("num_queries,group", [(1, 1), (1, 4), (37, 1), (37, 2), (450, 2)])
def test_attend_matches_local_attention(dtype, blocks, num_queries, group):
    isa = "vec"
    block_row = torch.arange(2, 7) if blocks == "consecutive" else torch.tensor([9, 3, 11, 0, 5])
    start, end = 150, 600  # the first live slot is inside a block, the last block is partial
    cache = filled_cache(dtype, block_row, end, isa)
    slots = RequestSlots(cache, block_row.int(), start, end, isa)
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(HEADS, group * num_queries, HEAD_SIZE, generator=generator)
    q_positions = torch.arange(end - num_queries, end).repeat(group)
    scale = HEAD_SIZE**-0.5

    out, lse = slots.attend(q, num_queries, scale)

    keys, values = slots.read()
    want_out, want_lse = local_attention(q, keys, values, scale, q_positions, torch.arange(start, end))
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(lse, want_lse, **tolerance)
    torch.testing.assert_close(out, want_out, **tolerance)
