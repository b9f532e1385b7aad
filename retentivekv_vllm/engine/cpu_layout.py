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


class RequestSlots:
    """The cache blocks of one request covering slots [start, end), in token order."""

    def __init__(self, kv_cache: torch.Tensor, block_row: torch.Tensor, start: int, end: int, isa: str):
        self.caches = split_kv_cache(kv_cache)
        _, self.heads, self.block_size, self.head_size = self.caches[0].shape
        self.offsets = block_layout(isa, self.block_size, self.head_size, kv_cache.dtype)
        first = start // self.block_size
        self.blocks = block_row[first : (end + self.block_size - 1) // self.block_size].long()
        self.first_slot = first * self.block_size
        self.span = slice(start - self.first_slot, end - self.first_slot)

    def _read(self, which: int) -> torch.Tensor:
        """[Hkv, blocks * bs, d] in token order, cache dtype."""
        n, h, bs, d = len(self.blocks), self.heads, self.block_size, self.head_size
        regions = self.caches[which][self.blocks].reshape(n, h, bs * d)
        ordered = regions[:, :, self.offsets[which]].view(n, h, bs, d)
        return ordered.permute(1, 0, 2, 3).reshape(h, n * bs, d)

    def _write(self, which: int, tokens: torch.Tensor) -> None:
        n, h, bs, d = len(self.blocks), self.heads, self.block_size, self.head_size
        ordered = tokens.view(h, n, bs, d).permute(1, 0, 2, 3).reshape(n, h, bs * d)
        regions = torch.empty_like(ordered)
        regions[:, :, self.offsets[which]] = ordered
        self.caches[which][self.blocks] = regions.view(n, h, bs, d)

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the slots, [Hkv, end - start, d] float32."""
        return tuple(self._read(i)[:, self.span].float() for i in (0, 1))

    def write(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite slots [start, start + m) (inside the span) with [Hkv, m, d] keys and values."""
        begin = start - self.first_slot
        for which, new in enumerate((keys, values)):
            tokens = self._read(which)
            tokens[:, begin : begin + new.shape[1]] = new.to(tokens.dtype)
            self._write(which, tokens)
