"""Reading tokens out of vLLM's CPU KV cache, whatever order the kernel stores them in.

The CPU attention kernel packs each (block, KV head) region in an ISA-specific order
(for the AVX2 "vec" ISA keys are stored dimension-major, values token-major), and
that order is not part of any interface.  Instead of hard-coding it, the layout is
measured once per (ISA, block size, head size, dtype): vLLM's own
``cpu_attn_reshape_and_cache`` writes a probe block whose entries encode their
(token, dim) coordinates, and the result gives, for every element, where it lives.
Coordinates are written as base-16 digits (< 16) so the probe is exact in any dtype.
"""

from __future__ import annotations

import functools

import torch
from vllm import _custom_ops as ops

DIGIT = 16


def split_kv_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same K/V split as CPUAttentionBackendImpl.forward: two [blocks, Hkv, bs, d] views."""
    num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
    return kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, -1).chunk(2, dim=2)


@functools.cache
def block_layout(
    isa: str, block_size: int, head_size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """For keys and values: [bs * d] storage offsets of the elements in (token, dim) order."""
    tokens = torch.arange(block_size).view(block_size, 1, 1).expand(block_size, 1, head_size)
    dims = torch.arange(head_size).view(1, 1, head_size).expand(block_size, 1, head_size)
    digits = [tokens // DIGIT, tokens % DIGIT, dims // DIGIT, dims % DIGIT]
    stored_k, stored_v = [], []
    for digit in digits:
        cache = torch.zeros(1, 1, block_size, 2 * head_size, dtype=dtype)
        key_cache, value_cache = split_kv_cache(cache)
        ops.cpu_attn_reshape_and_cache(
            digit.to(dtype), digit.to(dtype), key_cache, value_cache,
            torch.arange(block_size), isa,
        )
        stored_k.append(key_cache.reshape(-1).long())
        stored_v.append(value_cache.reshape(-1).long())

    def offsets(stored: list[torch.Tensor]) -> torch.Tensor:
        t_hi, t_lo, d_hi, d_lo = stored
        element = (t_hi * DIGIT + t_lo) * head_size + d_hi * DIGIT + d_lo
        where = torch.empty_like(element)
        where[element] = torch.arange(element.numel())
        return where

    return offsets(stored_k), offsets(stored_v)


def gather_request_kv(
    kv_cache: torch.Tensor, block_row: torch.Tensor, n: int, isa: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """A request's first n cached tokens as [Hkv, n, d] keys and values (float32)."""
    key_cache, value_cache = split_kv_cache(kv_cache)
    _, heads, block_size, head_size = key_cache.shape
    key_offsets, value_offsets = block_layout(isa, block_size, head_size, kv_cache.dtype)
    blocks = block_row[: (n + block_size - 1) // block_size].long()

    def gather(cache: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        regions = cache[blocks].reshape(len(blocks), heads, block_size * head_size)
        ordered = regions[:, :, offsets].view(len(blocks), heads, block_size, head_size)
        return ordered.permute(1, 0, 2, 3).reshape(heads, -1, head_size)[:, :n].float()

    return gather(key_cache, key_offsets), gather(value_cache, value_offsets)
