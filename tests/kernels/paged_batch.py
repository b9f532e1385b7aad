"""Random requests in a vLLM-layout paged KV cache, with the dense copies the naive twins read."""

import math
from dataclasses import dataclass

import torch
from retentivekv_vllm.kernels import split_kv_cache
from torch import Tensor

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class PagedBatch:
    kv_cache: Tensor  # vLLM's per-layer tensor [num_blocks, Hkv, block_size, 2·d]
    key_cache: Tensor  # views [num_blocks, block_size, Hkv, d]
    value_cache: Tensor
    block_table: Tensor  # [R, max_blocks] int32, blocks shuffled over the pool
    seq_lens: Tensor  # [R] int32
    keys: list[Tensor]  # per request [Hkv, seq_len, d] float32, slot order (values as stored)
    values: list[Tensor]


def make_paged_batch(
    seq_lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int,
    slot_major: bool = False,
) -> PagedBatch:
    """Requests of the given lengths in a pool with a few unused blocks, all unwritten slots NaN
    (a kernel that reads one poisons its output). slot_major: the physical layout puts the
    block_size dim before the heads (vLLM's NHD), so the key/value views have other strides."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_request = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_request) + 3
    if slot_major:
        storage = torch.full(
            (num_blocks, block_size, num_kv_heads, 2 * head_dim), float("nan"), dtype=dtype
        )
        kv_cache = storage.permute(0, 2, 1, 3)
    else:
        kv_cache = torch.full(
            (num_blocks, num_kv_heads, block_size, 2 * head_dim), float("nan"), dtype=dtype
        )
    kv_cache = kv_cache.to(DEVICE)
    key_cache, value_cache = split_kv_cache(kv_cache, head_dim)
    order = torch.randperm(num_blocks, generator=gen)
    block_table = torch.zeros(len(seq_lens), max(blocks_per_request), dtype=torch.int32)
    keys, values, used = [], [], 0
    for r, (n, count) in enumerate(zip(seq_lens, blocks_per_request)):
        block_table[r, :count] = order[used : used + count].int()
        used += count
        k = torch.randn(num_kv_heads, n, head_dim, generator=gen).to(dtype)
        v = torch.randn(num_kv_heads, n, head_dim, generator=gen).to(dtype)
        slots = torch.arange(n)
        blocks = block_table[r, slots // block_size].long()
        key_cache[blocks.to(DEVICE), (slots % block_size).to(DEVICE)] = k.transpose(0, 1).to(DEVICE)
        value_cache[blocks.to(DEVICE), (slots % block_size).to(DEVICE)] = v.transpose(0, 1).to(
            DEVICE
        )
        keys.append(k.float())
        values.append(v.float())
    return PagedBatch(
        kv_cache,
        key_cache,
        value_cache,
        block_table.to(DEVICE),
        torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        keys,
        values,
    )


def grouped_rows(q: Tensor, num_kv_heads: int) -> Tensor:
    """[T, Hq, d] -> [Hkv, g·T, d]: a KV head's query heads stacked as rows (the engine's order)."""
    t, hq, d = q.shape
    return q.permute(1, 0, 2).reshape(num_kv_heads, (hq // num_kv_heads) * t, d)


def tolerance(result_dtype: torch.dtype, reduction_length: int) -> float:
    """Relative error a kernel may show against its float32 twin on the same rounded inputs.

    Two sources, both fixed by the dtypes and the sizes: rounding the result to `result_dtype`
    (and fp16/bf16 operands entering a TF32 tl.dot on a GPU, which rounds the other float32
    operand to fp16's 11 significant bits), a few ulps of the result dtype; and summing
    `reduction_length` float32 terms in another order, one float32 ulp per term at worst.
    """
    return 4 * torch.finfo(result_dtype).eps + reduction_length * torch.finfo(torch.float32).eps


def assert_close_scaled(actual: Tensor, expected: Tensor, tol: float) -> None:
    """|actual - expected| <= tol·(|expected| + max|expected|): relative error tol, measured
    against the tensor's scale where an entry is a cancelled sum near 0."""
    expected = expected.float()
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(
        actual.float().cpu(), expected.cpu(), rtol=tol, atol=tol * max(scale, 1e-30)
    )
