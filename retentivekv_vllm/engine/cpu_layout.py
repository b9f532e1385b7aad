"""Reading tokens out of vLLM's CPU KV cache, whatever order the kernel stores them in.

The CPU attention kernel packs each (block, KV head) region in an ISA-specific order
(for the AVX2 "vec" ISA keys are stored dimension-major, values token-major), and
that order is not part of any interface.  Instead of hard-coding it, the layout is
measured once per (ISA, block size, head size, dtype): vLLM's own
``cpu_attn_reshape_and_cache`` writes a probe block whose entries encode their
(token, dim) coordinates, and the result gives, for every element, where it lives.
Coordinates are written as base-16 digits (< 16) so the probe is exact in any dtype.

Decode attention reads the live blocks in place: in the C++ kernel of `cpu_kernel` where
the layout is the vec ISA's (keys dimension-major, values token-major), else in torch,
where a measured layout that is plain token-major or dimension-major makes each (block,
head) region a [bs, d] or [d, bs] matrix view and the attention a batched matrix product
over blocks. Compaction writes through vLLM's own cache op, so any layout is written right.
"""

from __future__ import annotations

import functools

import torch
from vllm import _custom_ops as ops

from retentivekv_vllm.engine.cpu_kernel import (
    decode_extension,
    observation_statistics,
    paged_decode_attention,
)
from retentivekv_vllm.engine.slots import Slots

DIGIT = 16
TOKEN_MAJOR, DIM_MAJOR = "token-major", "dim-major"


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
            digit.to(dtype),
            digit.to(dtype),
            key_cache,
            value_cache,
            torch.arange(block_size),
            isa,
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


@functools.cache
def block_orders(
    isa: str, block_size: int, head_size: int, dtype: torch.dtype
) -> tuple[str | None, str | None]:
    """For keys and values: TOKEN_MAJOR or DIM_MAJOR when a (block, head) region is that plain
    matrix, None for any other order (read through the offsets of `block_layout`)."""
    token_major = torch.arange(block_size * head_size)
    dim_major = (
        torch.arange(head_size)[None, :] * block_size + torch.arange(block_size)[:, None]
    ).reshape(-1)

    def order(offsets: torch.Tensor) -> str | None:
        if torch.equal(offsets, token_major):
            return TOKEN_MAJOR
        if torch.equal(offsets, dim_major):
            return DIM_MAJOR
        return None

    return tuple(order(o) for o in block_layout(isa, block_size, head_size, dtype))


class RequestSlots(Slots):
    """The cache blocks of one request covering slots [start, end), in token order."""

    def __init__(
        self, kv_cache: torch.Tensor, block_row: torch.Tensor, start: int, end: int, isa: str
    ):
        self.kv_cache, self.dtype = kv_cache, kv_cache.dtype
        self.caches = split_kv_cache(kv_cache)
        _, self.heads, self.block_size, self.head_size = self.caches[0].shape
        self.block_row, self.isa = block_row, isa
        first = start // self.block_size
        self.blocks = block_row[first : (end + self.block_size - 1) // self.block_size].long()
        self.first_slot = first * self.block_size
        self.span = slice(start - self.first_slot, end - self.first_slot)
        self._tokens: tuple[torch.Tensor, torch.Tensor] | None = None

    def _read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [Hkv, blocks * bs, d] in token order, cache dtype.  Where the measured
        layout stores plain matrices, the whole cache is viewed as keys and values in token order
        and the request's blocks are picked from those views: one copy, straight into token order
        (a gather of the blocks and then a reorder is two fresh copies of the span, and fresh
        memory of that size costs more in page faults than the copy itself).  Any other layout is
        reordered through the measured offsets, on the request's blocks only."""
        n, h, bs, d = len(self.blocks), self.heads, self.block_size, self.head_size
        if None in block_orders(self.isa, bs, d, self.kv_cache.dtype):
            # [n, h, d, bs], [n, h, bs, d]
            keys, values = stored_matrices(self.kv_cache[self.blocks], self.isa)
            picked = slice(None)
        else:
            keys, values = stored_matrices(self.kv_cache, self.isa)  # views of every block
            picked = self.blocks
        return (
            keys.permute(1, 0, 3, 2)[:, picked].reshape(h, n * bs, d),
            values.permute(1, 0, 2, 3)[:, picked].reshape(h, n * bs, d),
        )

    def attend(self, q, num_new, scale, q_positions, positions):
        """`Slots.attend` of a chunk of num_new new tokens, in torch's fused CPU attention
        (row r of q [Hkv, g·num_new, d] is token r % num_new of the step).

        The positions are not read: the slots below the step's first new token hold tokens
        older than every query of the step (compaction packs kept tokens there), and the step's
        own tokens sit at their positions, so the prefix is visible to every row and the new
        tokens causally. The fused attention, which returns the log-sum-exp, runs once over the
        prefix (no mask) and once causally over the new tokens; the two merge in log space.
        """
        keys, values = self.read()
        heads, m, d = q.shape
        group = m // num_new
        q = q.float()
        attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        # The new tokens: per query head, causal over the square of the step's tokens.
        new_k, new_v = (x[:, -num_new:, None].expand(-1, -1, group, -1) for x in (keys, values))
        per_query_head = lambda x: x.transpose(1, 2).reshape(1, heads * group, num_new, -1)  # noqa: E731
        out, lse = attention(
            q.view(1, heads * group, num_new, d),
            per_query_head(new_k),
            per_query_head(new_v),
            is_causal=True,
            scale=scale,
        )
        out, lse = out.reshape(heads, m, -1), lse.reshape(heads, m)
        if keys.shape[1] == num_new:
            return out, lse
        out_prefix, lse_prefix = attention(
            q[None], keys[None, :, :-num_new], values[None, :, :-num_new], scale=scale
        )
        total = torch.logaddexp(lse, lse_prefix[0])
        merged = (
            out * (lse - total).exp()[..., None]
            + out_prefix[0] * (lse_prefix[0] - total).exp()[..., None]
        )
        return merged, total

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the slots, [Hkv, end - start, d] float32 (read once: a step's chunk
        attention and its compression share the copy)."""
        if self._tokens is None:
            self._tokens = tuple(x[:, self.span].float() for x in self._read())
        return self._tokens

    def observe(self, queries, keys, scale, q_positions, positions, layout):
        """The C++ kernel's statistics (no probabilities formed) where it is built."""
        if decode_extension().module is None:
            return super().observe(queries, keys, scale, q_positions, positions, layout)
        return None, observation_statistics(queries, keys, scale, q_positions, positions, layout)

    def write(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite slots [start, start + m) (inside the span) with [Hkv, m, d] keys and values,
        through vLLM's own cache write: only those slots are touched, in the kernel's layout."""
        slots = torch.arange(start, start + keys.shape[1])
        mapping = (
            self.block_row[slots // self.block_size].long() * self.block_size
            + slots % self.block_size
        )
        dtype = self.kv_cache.dtype
        token_major = lambda x: x.transpose(0, 1).to(dtype).contiguous()  # noqa: E731
        ops.cpu_attn_reshape_and_cache(
            token_major(keys), token_major(values), *self.caches, mapping, self.isa
        )
        self._tokens = None


class DecodeBatch:
    """The decode requests of one step whose rows are recomputed, and where each one's live slots
    are, planned once per step (every layer shares the block table)."""

    def __init__(
        self,
        query_rows: list[int],
        block_rows: torch.Tensor,
        starts: list[int],
        ends: list[int],
        block_size: int,
    ) -> None:
        self.query_rows = torch.tensor(query_rows)  # each request's row in the step's queries
        self.block_rows = block_rows.int()  # [R, max_blocks], the requests' block-table rows
        # [R] int64: request i's live slots are [starts[i], ends[i])
        self.starts, self.ends = torch.tensor(starts), torch.tensor(ends)
        self.block_size = block_size

    def attend(
        self, kv_cache: torch.Tensor, q: torch.Tensor, scale: float, isa: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax attention of one query row per request and query head over its live slots, read
        from the blocks as stored: q [R, Hkv, g, d] -> out [R, Hkv, g, d] float32, lse [R, Hkv, g].
        The C++ kernel (`cpu_kernel`) where it is built and the cache has its layout, else
        `attend_torch`."""
        if kv_cache.is_contiguous() and uses_decode_kernel(
            isa, self.block_size, q.shape[-1], kv_cache.dtype
        ):
            blocks, heads, block_size, _ = kv_cache.shape
            # Keys, then values, per block and head.
            regions = kv_cache.view(blocks, heads, 2 * block_size, -1)
            return paged_decode_attention(
                q.float(), regions, self.block_rows, self.starts, self.ends, scale
            )
        return self.attend_torch(kv_cache, q, scale, isa)

    @functools.cached_property
    def _torch_plan(self) -> tuple[list[slice | torch.Tensor], torch.Tensor]:
        """Per request, its blocks as a slice of the cache when they are consecutive (the usual
        case: read in place), else their ids (gathered into a reused workspace); and the mask
        [R, N, 1, 1, bs], True for the slots outside a request's live span."""
        bs = self.block_size
        starts, ends = self.starts.tolist(), self.ends.tolist()
        first_blocks = [start // bs for start in starts]
        counts = [-(-end // bs) - first for first, end in zip(first_blocks, ends)]
        blocks = []
        for row, first, count in zip(self.block_rows.tolist(), first_blocks, counts):
            ids = row[first : first + count]
            consecutive = ids == list(range(ids[0], ids[0] + count))
            blocks.append(slice(ids[0], ids[0] + count) if consecutive else torch.tensor(ids))
        num_blocks = max(counts)
        slots = torch.tensor(first_blocks)[:, None] * bs + torch.arange(num_blocks * bs)
        hidden = (slots < self.starts[:, None]) | (slots >= self.ends[:, None])
        return blocks, hidden.view(len(starts), num_blocks, 1, 1, bs)

    def attend_torch(
        self, kv_cache: torch.Tensor, q: torch.Tensor, scale: float, isa: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`attend` in torch, for any measured layout: q·K and p·V are one product per request (over
        its blocks and heads, q broadcast over blocks) on the blocks in place; the softmax runs once
        for the batch. Blocks that are not consecutive are first gathered into a workspace that is
        kept between calls (a fresh allocation of that size costs more in page faults than the
        copy)."""
        block_lists, hidden = self._torch_plan
        requests, num_blocks, _, _, block_size = hidden.shape
        num_gathered = sum(len(b) for b in block_lists if isinstance(b, torch.Tensor))
        space = _workspace(num_gathered * kv_cache[0].numel(), kv_cache.dtype).view(
            -1, *kv_cache.shape[1:]
        )
        logits = torch.empty(requests, num_blocks, q.shape[1], q.shape[2], block_size)
        values, used = [], 0
        for i, blocks in enumerate(block_lists):
            if isinstance(blocks, slice):
                picked = kv_cache[blocks]
            else:
                picked = torch.index_select(
                    kv_cache, 0, blocks, out=space[used : used + len(blocks)]
                )
                used += len(blocks)
            keys, request_values = stored_matrices(picked, isa)
            if keys.dtype != torch.float32:
                keys, request_values = keys.float(), request_values.float()
            torch.matmul(q[i, None].float(), keys, out=logits[i, : len(picked)])
            values.append(request_values)
        # The padding blocks past a request's last block are hidden with the slots outside its span.
        logits.mul_(scale).masked_fill_(hidden, float("-inf"))
        lse = torch.logsumexp(logits, dim=(1, 4))
        probs = logits.sub_(lse[:, None, :, :, None]).exp_()
        out = torch.stack([(probs[i, : len(v)] @ v).sum(0) for i, v in enumerate(values)])
        return out, lse


@functools.cache
def uses_decode_kernel(isa: str, block_size: int, head_size: int, dtype: torch.dtype) -> bool:
    """Whether decode attention runs in the C++ kernel: it is built, and blocks hold keys
    dimension-major and values token-major (the layout it reads)."""
    if block_orders(isa, block_size, head_size, dtype) != (DIM_MAJOR, TOKEN_MAJOR):
        return False
    return decode_extension().module is not None


_workspaces: dict[torch.dtype, torch.Tensor] = {}


def _workspace(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """At least numel elements of dtype, the same memory from call to call (grown geometrically)."""
    space = _workspaces.get(dtype)
    if space is None or space.numel() < numel:
        space = _workspaces[dtype] = torch.empty(
            max(numel, 2 * (0 if space is None else space.numel())), dtype=dtype
        )
    return space[:numel]


def stored_matrices(picked: torch.Tensor, isa: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks [..., Hkv, bs, 2d] of the cache as stored -> keys [..., Hkv, d, bs] and values
    [..., Hkv, bs, d], the operands of q·K and p·V: views where the measured order allows,
    else reordered through the measured offsets."""
    *lead, heads, block_size, _ = picked.shape
    head_size = picked.shape[-1] // 2
    regions = picked.reshape(*lead, heads, 2, block_size * head_size)
    offsets = block_layout(isa, block_size, head_size, picked.dtype)
    orders = block_orders(isa, block_size, head_size, picked.dtype)
    matrices = []
    for which, wanted in enumerate((DIM_MAJOR, TOKEN_MAJOR)):
        region, order = regions[..., which, :], orders[which]
        if order is None:
            region, order = region[..., offsets[which]], TOKEN_MAJOR
        shape = (block_size, head_size) if order == TOKEN_MAJOR else (head_size, block_size)
        matrix = region.reshape(*lead, heads, *shape)
        matrices.append(matrix if order == wanted else matrix.transpose(-1, -2))
    return matrices[0], matrices[1]
