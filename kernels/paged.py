"""vLLM's paged KV cache as the kernels see it, and the device helpers every kernel shares.

vLLM (0.32 and later) hands an attention layer one tensor per layer, logically
[num_blocks, num_kv_heads, block_size, 2 * head_size] (K then V along the last dim) with
layout-dependent physical strides; the Triton and FlashAttention backends view it as
key_cache, value_cache = kv_cache.transpose(1, 2).split(head_size, -1), each
[num_blocks, block_size, num_kv_heads, head_size] and not contiguous. The kernels take such
views and all four strides, so any physical layout works (the older
[2, num_blocks, block_size, num_kv_heads, head_size] layout gives them as kv_cache.unbind(0)).

A request's token slot s lives at block block_table[request, s // block_size], offset
s % block_size. Slots are looked up per token, so a tile may start anywhere, e.g. at a
request's first live slot after its oldest blocks were folded and freed.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor


def split_kv_cache(kv_cache: Tensor, head_size: int) -> tuple[Tensor, Tensor]:
    """vLLM's per-layer cache [num_blocks, Hkv, block_size, 2·head_size] -> key and value views
    [num_blocks, block_size, Hkv, head_size], exactly as vLLM's Triton attention backend splits
    it."""
    key_cache, value_cache = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    return key_cache, value_cache


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot precision for operands upcast from `dtype` to float32.

    TF32 has fp16's 10 mantissa bits and fp32's exponent range, so fp16 and bf16 values pass
    through it exactly and tensor cores can be used; float32 inputs need the exact ("ieee") path.
    """
    return "ieee" if dtype == torch.float32 else "tf32"


def pow2(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum): tile sizes (tl.dot needs dims >= 16)."""
    return max(triton.next_power_of_2(n), minimum)


def as_index(x: Tensor) -> Tensor:
    """Per-request integers (block tables, lengths) as contiguous int32 on x's device."""
    return x.to(torch.int32).contiguous()


@triton.jit
def load_paged_tile(
    cache_ptr,
    block_table_row_ptr,
    slots,
    slot_valid,
    kv_head,
    stride_block,
    stride_slot,
    stride_head,
    stride_dim,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
):
    """Rows `slots` [N] of one KV head of a paged cache -> [N, D_PAD] in the cache dtype, 0 where
    masked. block_table_row_ptr points at the request's row of the block table."""
    blocks = tl.load(block_table_row_ptr + slots // BLOCK_SIZE, mask=slot_valid, other=0).to(
        tl.int64
    )
    dims = tl.arange(0, D_PAD)
    ptrs = (
        cache_ptr
        + blocks[:, None] * stride_block
        + (slots % BLOCK_SIZE).to(tl.int64)[:, None] * stride_slot
        + kv_head * stride_head
        + dims[None, :] * stride_dim
    )
    return tl.load(ptrs, mask=slot_valid[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def store_paged_tile(
    cache_ptr,
    block_table_row_ptr,
    slots,
    slot_valid,
    kv_head,
    tile,
    stride_block,
    stride_slot,
    stride_head,
    stride_dim,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
):
    """Write tile [N, D_PAD] into rows `slots` of one KV head of a paged cache."""
    blocks = tl.load(block_table_row_ptr + slots // BLOCK_SIZE, mask=slot_valid, other=0).to(
        tl.int64
    )
    dims = tl.arange(0, D_PAD)
    ptrs = (
        cache_ptr
        + blocks[:, None] * stride_block
        + (slots % BLOCK_SIZE).to(tl.int64)[:, None] * stride_slot
        + kv_head * stride_head
        + dims[None, :] * stride_dim
    )
    tl.store(
        ptrs,
        tile.to(cache_ptr.dtype.element_ty),
        mask=slot_valid[:, None] & (dims[None, :] < HEAD_DIM),
    )


@triton.jit
def online_logsumexp(running_max, running_sum, logits):
    """One tile of a streaming log-sum-exp over the last dim of logits [M, N] (-inf = masked).

    Returns the updated (max, sum of exp(logit - max)) and the factor the old sum was rescaled by.
    A row that has seen only -inf keeps max -inf and sum 0; the shift then uses 0 instead of -inf,
    which avoids inf - inf.
    """
    new_max = tl.maximum(running_max, tl.max(logits, 1))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    rescale = tl.exp(running_max - shift)
    new_sum = running_sum * rescale + tl.sum(tl.exp(logits - shift[:, None]), 1)
    return new_max, new_sum, rescale


@triton.jit
def finish_logsumexp(running_max, running_sum):
    """log Σ exp from `online_logsumexp`'s state; -inf for rows that saw no finite logit."""
    return tl.where(running_sum > 0, running_max + tl.log(running_sum), float("-inf"))


@triton.jit
def logaddexp(a, b):
    """log(exp(a) + exp(b)) elementwise, -inf when both are -inf."""
    top = tl.maximum(a, b)
    shift = tl.where(top == float("-inf"), 0.0, top)
    total = tl.log(tl.exp(a - shift) + tl.exp(b - shift))
    return tl.where(top == float("-inf"), float("-inf"), shift + total)
