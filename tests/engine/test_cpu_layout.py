"""Attention over requests' live cache slots against the plain-torch definition on the same slots
(`RequestSlots.read`, a token-order copy through the measured layout, and `core.local_attention`):
decode, every request of a step in one batch on the blocks as stored; a chunk of new tokens, torch's
fused attention with the prefix and the causal part merged."""

import pytest
import torch
from vllm import _custom_ops as ops

from retentivekv_vllm.core import local_attention
from retentivekv_vllm.engine import cpu_layout
from retentivekv_vllm.engine.cpu_layout import (
    DecodeBatch,
    RequestSlots,
    split_kv_cache,
    uses_decode_kernel,
)

HEADS, HEAD_SIZE, BLOCK_SIZE, NUM_BLOCKS = 2, 64, 128, 24
ISA = "vec"
SCALE = HEAD_SIZE**-0.5
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-3, rtol=1e-3)}


def random_cache(dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(NUM_BLOCKS, HEADS, BLOCK_SIZE, 2 * HEAD_SIZE, generator=generator).to(dtype)


# (block row, first live slot, end): the first live slot inside a block, the last block partial.
CONSECUTIVE = (torch.arange(2, 7), 150, 600)
SCATTERED = (torch.tensor([9, 3, 11, 0, 5]), 150, 600)
ALIGNED = (torch.tensor([14, 15, 16, 20]), 256, 512)  # whole blocks only
ONE_BLOCK = (torch.tensor([21, 22]), 130, 140)  # the live span in one block


def fill(
    cache: torch.Tensor, block_row: torch.Tensor, num_tokens: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write num_tokens random tokens into the request's blocks (block_row) with vLLM's own op;
    returns the keys and values written, [num_tokens, Hkv, d]."""
    generator = torch.Generator().manual_seed(seed)
    keys, values = (
        torch.randn(num_tokens, HEADS, HEAD_SIZE, generator=generator).to(cache.dtype)
        for _ in range(2)
    )
    slots = torch.arange(num_tokens)
    slot_mapping = block_row[slots // BLOCK_SIZE].long() * BLOCK_SIZE + slots % BLOCK_SIZE
    ops.cpu_attn_reshape_and_cache(keys, values, *split_kv_cache(cache), slot_mapping, ISA)
    return keys, values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "span",
    [CONSECUTIVE, SCATTERED, ALIGNED, ONE_BLOCK],
    ids=["consecutive", "scattered", "aligned", "one-block"],
)
@pytest.mark.parametrize("order", ["matrices", "offsets"])
def test_read_returns_the_tokens_vllm_wrote(dtype, span, order, monkeypatch):
    """Both read paths: the views of plain matrices, and the measured offsets that serve any
    other layout (forced here on the vec layout, whose offsets are measured like any other)."""
    if order == "offsets":
        monkeypatch.setattr(cpu_layout, "block_orders", lambda *args: (None, None))
    block_row, start, end = span
    cache = random_cache(dtype)
    keys, values = fill(cache, block_row, end, 0)
    got_keys, got_values = RequestSlots(cache, block_row.int(), start, end, ISA).read()
    assert got_keys.dtype == got_values.dtype == torch.float32
    torch.testing.assert_close(got_keys, keys[start:end].transpose(0, 1).float(), atol=0, rtol=0)
    torch.testing.assert_close(
        got_values, values[start:end].transpose(0, 1).float(), atol=0, rtol=0
    )


def reference(cache, block_row, start, end, q):
    keys, values = RequestSlots(cache, block_row.int(), start, end, ISA).read()
    q_positions = torch.full((q.shape[1],), end - 1)
    return local_attention(q, keys, values, SCALE, q_positions, torch.arange(start, end))


@pytest.mark.parametrize(
    "attend", [DecodeBatch.attend, DecodeBatch.attend_torch], ids=["kernel", "torch"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize(
    "requests",
    [[CONSECUTIVE], [SCATTERED], [ALIGNED], [CONSECUTIVE, SCATTERED, ALIGNED, ONE_BLOCK]],
    ids=["one-consecutive", "one-scattered", "one-aligned", "batch"],
)
def test_decode_batch_matches_local_attention(attend, dtype, group, requests):
    cache = random_cache(dtype)
    for seed, (block_row, _, end) in enumerate(requests):
        fill(cache, block_row, end, seed)
    max_blocks = max(len(r[0]) for r in requests) + 1
    block_rows = torch.stack(
        [torch.cat([r[0], torch.zeros(max_blocks - len(r[0]), dtype=torch.long)]) for r in requests]
    )
    batch = DecodeBatch(
        list(range(len(requests))),
        block_rows.int(),
        [r[1] for r in requests],
        [r[2] for r in requests],
        BLOCK_SIZE,
    )
    q = torch.randn(
        len(requests), HEADS, group, HEAD_SIZE, generator=torch.Generator().manual_seed(7)
    )

    out, lse = attend(batch, cache, q, SCALE, ISA)

    for i, (block_row, start, end) in enumerate(requests):
        want_out, want_lse = reference(cache, block_row, start, end, q[i])
        torch.testing.assert_close(lse[i], want_lse, **TOLERANCE[dtype])
        torch.testing.assert_close(out[i], want_out, **TOLERANCE[dtype])


def test_one_request_with_consecutive_blocks_is_read_in_place():
    block_row, start, end = CONSECUTIVE
    batch = DecodeBatch([0], block_row[None].int(), [start], [end], BLOCK_SIZE)
    blocks, _ = batch._torch_plan
    assert blocks == [slice(3, 7)]  # slots 128-639 of blocks 2-6: the first live one is 150


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_runs_in_the_kernel_on_the_vec_layout(dtype):
    """The engine's decode path is the C++ kernel here (g++ and ninja come with the environment),
    not the twin: a build failure would otherwise pass unnoticed as a slower server."""
    from retentivekv_vllm.engine.cpu_kernel import decode_extension

    assert uses_decode_kernel(ISA, BLOCK_SIZE, HEAD_SIZE, dtype), decode_extension().reason


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("blocks", ["consecutive", "scattered"])
@pytest.mark.parametrize("num_queries,group", [(1, 2), (37, 1), (37, 2), (450, 2)])
def test_chunk_matches_local_attention(dtype, blocks, num_queries, group):
    block_row, start, end = CONSECUTIVE if blocks == "consecutive" else SCATTERED
    cache = random_cache(dtype)
    fill(cache, block_row, end, 0)
    slots = RequestSlots(cache, block_row.int(), start, end, ISA)
    q = torch.randn(
        HEADS, group * num_queries, HEAD_SIZE, generator=torch.Generator().manual_seed(1)
    )
    q_positions = torch.arange(end - num_queries, end).repeat(group)

    positions = torch.arange(start, end).expand(HEADS, -1)

    out, lse = slots.attend(q, num_queries, SCALE, q_positions, positions)

    keys, values = slots.read()
    want_out, want_lse = local_attention(q, keys, values, SCALE, q_positions, positions)
    torch.testing.assert_close(lse, want_lse, **TOLERANCE[dtype])
    torch.testing.assert_close(out, want_out, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("blocks", ["consecutive", "scattered"])
def test_write_replaces_exactly_the_given_slots(dtype, blocks):
    """Compaction's write: slots [begin, begin + m) take the new tokens; every other slot of the
    request, and every other block of the cache, is as it was."""
    block_row, start, end = CONSECUTIVE if blocks == "consecutive" else SCATTERED
    cache = random_cache(dtype)
    fill(cache, block_row, end, 0)
    before_keys, before_values = RequestSlots(cache, block_row.int(), start, end, ISA).read()
    before_cache = cache.clone()
    generator = torch.Generator().manual_seed(3)
    new_keys, new_values = (
        torch.randn(HEADS, 300, HEAD_SIZE, generator=generator) for _ in range(2)
    )

    slots = RequestSlots(cache, block_row.int(), start, end, ISA)
    slots.read()  # a read before the write must not be returned after it
    slots.write(start + 100, new_keys, new_values)

    keys, values = slots.read()
    for got, before, new in ((keys, before_keys, new_keys), (values, before_values, new_values)):
        want = before.clone()
        want[:, 100:400] = new.to(dtype).float()
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    other_blocks = [b for b in range(NUM_BLOCKS) if b not in block_row.tolist()]
    assert torch.equal(cache[other_blocks], before_cache[other_blocks])
