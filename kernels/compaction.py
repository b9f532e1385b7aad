"""Moving kept tokens within a request's blocks, per KV head.

Naive twin: the packing step of `retentivekv_vllm.engine.executor.compress` (each head's kept
keys and values gathered in slot order, then written to slots fold_to, fold_to + 1, ...); in
torch, on a dense [Hkv, n, d] view of one request, `k[h, fold_to + i] = k_old[h, slots[h, i]]`.

`gather_slots` reads slots into dense tensors (the GPU backend reads a request's live slots with
it); `write_slots` writes tokens into a contiguous range of slots (the packed tokens). The kept
slots and their destinations usually overlap (kept tokens are packed below the newest one): a
compaction gathers every source first and writes in a second launch, whose boundary orders every
read before every write, whatever the order of the source slots.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from .paged import as_index, load_paged_tile, pow2, store_paged_tile

BLOCK_T = 32


@triton.jit
def _gather_slots_kernel(
    k_cache_ptr,
    v_cache_ptr,
    block_table_ptr,
    slots_ptr,
    counts_ptr,
    k_out_ptr,
    v_out_ptr,
    max_count,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_bt,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    DV_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    i = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    valid = i < tl.load(counts_ptr + req)
    row = (req * NUM_KV_HEADS + kv_head).to(tl.int64) * max_count + i
    slots = tl.load(slots_ptr + row, mask=valid, other=0)
    block_table_row_ptr = block_table_ptr + req.to(tl.int64) * stride_bt
    k = load_paged_tile(
        k_cache_ptr,
        block_table_row_ptr,
        slots,
        valid,
        kv_head,
        stride_kb,
        stride_ks,
        stride_kh,
        stride_kd,
        BLOCK_SIZE,
        HEAD_DIM,
        D_PAD,
    )
    v = load_paged_tile(
        v_cache_ptr,
        block_table_row_ptr,
        slots,
        valid,
        kv_head,
        stride_vb,
        stride_vs,
        stride_vh,
        stride_vd,
        BLOCK_SIZE,
        HEAD_DIM_V,
        DV_PAD,
    )
    dims = tl.arange(0, D_PAD)
    dims_v = tl.arange(0, DV_PAD)
    tl.store(
        k_out_ptr + row[:, None] * HEAD_DIM + dims[None, :],
        k,
        mask=valid[:, None] & (dims[None, :] < HEAD_DIM),
    )
    tl.store(
        v_out_ptr + row[:, None] * HEAD_DIM_V + dims_v[None, :],
        v,
        mask=valid[:, None] & (dims_v[None, :] < HEAD_DIM_V),
    )


@triton.jit
def _scatter_range_kernel(
    k_cache_ptr,
    v_cache_ptr,
    block_table_ptr,
    first_slot_ptr,
    counts_ptr,
    k_in_ptr,
    v_in_ptr,
    max_count,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_bt,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    DV_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    i = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    valid = i < tl.load(counts_ptr + req)
    row = (req * NUM_KV_HEADS + kv_head).to(tl.int64) * max_count + i
    slots = tl.load(first_slot_ptr + req) + i
    dims = tl.arange(0, D_PAD)
    dims_v = tl.arange(0, DV_PAD)
    k = tl.load(
        k_in_ptr + row[:, None] * HEAD_DIM + dims[None, :],
        mask=valid[:, None] & (dims[None, :] < HEAD_DIM),
    )
    v = tl.load(
        v_in_ptr + row[:, None] * HEAD_DIM_V + dims_v[None, :],
        mask=valid[:, None] & (dims_v[None, :] < HEAD_DIM_V),
    )
    block_table_row_ptr = block_table_ptr + req.to(tl.int64) * stride_bt
    store_paged_tile(
        k_cache_ptr,
        block_table_row_ptr,
        slots,
        valid,
        kv_head,
        k,
        stride_kb,
        stride_ks,
        stride_kh,
        stride_kd,
        BLOCK_SIZE,
        HEAD_DIM,
        D_PAD,
    )
    store_paged_tile(
        v_cache_ptr,
        block_table_row_ptr,
        slots,
        valid,
        kv_head,
        v,
        stride_vb,
        stride_vs,
        stride_vh,
        stride_vd,
        BLOCK_SIZE,
        HEAD_DIM_V,
        DV_PAD,
    )


def _args(key_cache: Tensor, value_cache: Tensor, block_table: Tensor, rows: Tensor):
    """Launch grid, strides and shapes for rows [R, Hkv, max_count, ...] of slots or tokens."""
    num_requests, num_kv_heads, max_count = rows.shape[:3]
    grid = (num_requests, num_kv_heads, triton.cdiv(max(max_count, 1), BLOCK_T))
    strides = (*key_cache.stride(), *value_cache.stride(), block_table.stride(0))
    shapes = dict(
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=key_cache.shape[3],
        D_PAD=pow2(key_cache.shape[3]),
        HEAD_DIM_V=value_cache.shape[3],
        DV_PAD=pow2(value_cache.shape[3]),
        BLOCK_SIZE=key_cache.shape[1],
        BLOCK_T=BLOCK_T,
    )
    return grid, strides, shapes


def gather_slots(
    key_cache: Tensor, value_cache: Tensor, block_table: Tensor, slots: Tensor, counts: Tensor
) -> tuple[Tensor, Tensor]:
    """Keys and values of the given slots, per KV head, as dense tensors.

    key_cache, value_cache [num_blocks, block_size, Hkv, d / dv] (any strides); block_table
    [R, max_blocks]; slots [R, Hkv, max_count]: request r's head h reads its slots
    slots[r, h, :counts[r]] (counts [R], the same for every head). Returns keys
    [R, Hkv, max_count, d] and values [R, Hkv, max_count, dv] in the cache dtype; rows past
    counts[r] are left uninitialised.
    """
    num_requests, num_kv_heads, max_count = slots.shape
    block_table, slots, counts = as_index(block_table), as_index(slots), as_index(counts)
    keys = torch.empty(
        num_requests,
        num_kv_heads,
        max_count,
        key_cache.shape[3],
        dtype=key_cache.dtype,
        device=key_cache.device,
    )
    values = torch.empty(
        num_requests,
        num_kv_heads,
        max_count,
        value_cache.shape[3],
        dtype=value_cache.dtype,
        device=value_cache.device,
    )
    grid, strides, shapes = _args(key_cache, value_cache, block_table, slots)
    _gather_slots_kernel[grid](
        key_cache,
        value_cache,
        block_table,
        slots,
        counts,
        keys,
        values,
        max_count,
        *strides,
        **shapes,
    )
    return keys, values


def write_slots(
    key_cache: Tensor,
    value_cache: Tensor,
    block_table: Tensor,
    keys: Tensor,
    values: Tensor,
    first_slot: Tensor,
    counts: Tensor,
) -> None:
    """Write keys [R, Hkv, max_count, d] and values [.., dv] into each request's slots
    first_slot[r] : first_slot[r] + counts[r], in place (rows past counts[r] are not read);
    caches and block_table as in `gather_slots`."""
    block_table, counts = as_index(block_table), as_index(counts)
    keys, values = keys.to(key_cache.dtype).contiguous(), values.to(value_cache.dtype).contiguous()
    grid, strides, shapes = _args(key_cache, value_cache, block_table, keys)
    _scatter_range_kernel[grid](
        key_cache,
        value_cache,
        block_table,
        as_index(first_slot),
        counts,
        keys,
        values,
        keys.shape[2],
        *strides,
        **shapes,
    )
