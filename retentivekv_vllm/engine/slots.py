"""The read/write interface the compression executor has over one request's live slots.

Each backend implements it once over its cache: vLLM's CPU blocks (``cpu_layout.RequestSlots``),
the paged GPU cache (``gpu_backend.PagedSlots``), plain tensors (``DenseSlots``, for the
transformers reference and the benchmarks). ``observe`` is the backend's way of scoring the live
keys, ``attend`` its way of attending a step's rows over them; the defaults are the torch
definitions, which a backend replaces by its kernels.
"""

from __future__ import annotations

import torch

from retentivekv_vllm.core import PatchLayout, attention_probs, local_attention


class Slots:
    """A request's live slots [start, end) in one layer, in a cache of dtype `dtype` (the states
    beside it are stored in `core.storage_dtype` of it)."""

    dtype: torch.dtype

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the live slots, [Hkv, end - start, d] float32."""
        raise NotImplementedError

    def write(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite slots [start, start + m) with keys and values [Hkv, m, d]."""
        raise NotImplementedError

    def attend(
        self,
        queries: torch.Tensor,
        num_new: int,
        scale: float,
        q_positions: torch.Tensor,
        positions: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's rows queries [Hkv, g·num_new, d] (`executor.group_queries` of its newest
        num_new tokens) at q_positions, causal over the live keys at positions [Hkv, n] -> out
        [Hkv, rows, d] float32 and its log-sum-exp [Hkv, rows]."""
        return local_attention(queries, *self.read(), scale, q_positions, positions)

    def observe(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        scale: float,
        q_positions: torch.Tensor,
        positions: torch.Tensor,
        layout: PatchLayout | None,
    ) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]:
        """The observation rows queries [Hkv, rows, d] at q_positions [rows] over the live keys
        [Hkv, n, d] at positions [Hkv, n]: (probs, None), or (None, (α, H)) where a kernel gives
        the statistics without the probabilities (`core.observation_statistics`)."""
        return attention_probs(queries, keys, scale, q_positions, positions), None


class DenseSlots(Slots):
    """Live slots held as plain tensors [Hkv, n, d]; slot i of the request is row i - start."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, start: int = 0) -> None:
        self.keys, self.values, self.start = keys.float().clone(), values.float().clone(), start
        self.dtype = keys.dtype

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys, self.values

    def write(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        rows = slice(start - self.start, start - self.start + keys.shape[1])
        self.keys[:, rows], self.values[:, rows] = keys, values
