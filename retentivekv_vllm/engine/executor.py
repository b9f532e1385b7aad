"""The compression of one request in one layer, for every backend and the test reference.

``compress`` runs the sequence docs/method.md defines: observe (the observation window's
attention over the live slots), select (sinks, the recent window and each head's top-k), absorb
(stateful policies fold the rest into their states) or merge (``lookm`` averages it into kept
tokens), pack (each head's kept tokens, in position order, into the slots right below the
newest token). Every step uses the request's own policy (``RequestPlan.policy``), never the
server's, and the layer's index in the model (per-layer feature maps). The cache is reached only
through a ``slots.Slots`` object, implemented once per backend (vLLM's CPU blocks, the paged GPU
cache, plain tensors for the transformers reference and the benchmarks).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from vllm.model_executor.models.utils import extract_layer_index

from retentivekv_vllm.budget import folded_after_step
from retentivekv_vllm.core import (
    accumulated_attention,
    gather_tokens,
    merge_with_state_readouts,
    storage_dtype,
)
from retentivekv_vllm.engine.memory import LayerMemory, RequestMemory
from retentivekv_vllm.engine.slots import DenseSlots, Slots
from retentivekv_vllm.policies import KVPolicy, Observation


@dataclass
class RequestPlan:
    """What every layer does for one request in this step."""

    memory: RequestMemory
    policy: KVPolicy  # the request's own (vllm_xargs.kv_policy / kv_budget) or the server's
    row: int
    query_start: int
    query_end: int
    seq_len: int
    live_start: int  # tokens folded before this step: live slots are [live_start, seq_len)
    fold_to: int  # tokens folded after this step

    @classmethod
    def make(
        cls,
        policy: KVPolicy,
        memory: RequestMemory,
        row: int,
        start: int,
        end: int,
        seq_len: int,
        block_size: int,
    ) -> RequestPlan:
        """The plan of a step that adds tokens [start, end) of the batch (the request's newest
        end - start) to a cache of seq_len tokens, by the folding rule the KV manager applies."""
        fold_to = folded_after_step(
            policy.config,
            memory.num_prompt_tokens,
            memory.num_folded,
            seq_len - (end - start),
            seq_len,
            block_size,
        )
        return cls(memory, policy, row, start, end, seq_len, memory.num_folded, fold_to)

    @property
    def sinks(self) -> int:
        return min(self.policy.config.sinks, self.memory.budget)

    @property
    def window(self) -> int:
        """The recent tokens always kept."""
        return min(self.policy.config.window, self.memory.budget - self.sinks)

    @property
    def compress(self) -> bool:
        return self.fold_to != self.live_start

    @property
    def recomputed(self) -> bool:
        """Its rows are not stock attention: it has folded tokens."""
        return self.live_start > 0

    @property
    def decodes(self) -> bool:
        return self.query_end - self.query_start == 1

    @property
    def budget(self) -> int:
        return self.seq_len - self.fold_to


@functools.cache
def layer_index(layer_name: str) -> int:
    """The index in the model of the attention layer vLLM names `layer_name`."""
    return extract_layer_index(layer_name)


def group_queries(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[T, Hq, d] -> [Hkv, g·T, d]: query head h reads KV head h // g."""
    t, hq, d = q.shape
    return q.permute(1, 0, 2).reshape(num_kv_heads, (hq // num_kv_heads) * t, d)


def grouped_positions(seq_len: int, num_tokens: int, group: int, device=None) -> torch.Tensor:
    """[g·T] positions of `group_queries`' rows for the newest num_tokens of a seq_len cache."""
    return torch.arange(seq_len - num_tokens, seq_len, device=device).repeat(group)


def ungroup_rows(out: torch.Tensor, num_heads: int, num_tokens: int) -> torch.Tensor:
    """[Hkv, g·T, dv] -> [T, Hq, dv], the inverse of `group_queries`."""
    return out.view(num_heads, num_tokens, -1).permute(1, 0, 2)


def attend_live(
    plan: RequestPlan,
    memory: LayerMemory,
    q: torch.Tensor,
    slots: Slots,
    scale: float,
    layer: int,
    merge=None,
) -> torch.Tensor:
    """The step's rows q [T, Hq, d] (the newest T tokens) over the request's live slots
    (``Slots.attend``), merged with the states of layer `layer` -> [T, Hq, dv] float32; `merge`
    as in `core.merge_with_state_readouts`."""
    heads, n = memory.positions.shape[0], plan.seq_len
    grouped = group_queries(q, heads)
    q_positions = grouped_positions(n, q.shape[0], q.shape[1] // heads, q.device)
    live_positions = memory.positions[:, plan.live_start : n]
    out, lse = slots.attend(grouped, q.shape[0], scale, q_positions, live_positions)
    if memory.states:
        feature_map = plan.policy.feature_map(q.shape[-1], scale, layer)
        out = merge_with_state_readouts(
            out, lse, grouped, memory.states, feature_map, merge, q_positions
        )
    return ungroup_rows(out, q.shape[1], q.shape[0])


def compress(
    plan: RequestPlan, memory: LayerMemory, slots, scale: float, layer: int
) -> tuple[Observation, torch.Tensor]:
    """Fold the request's live slots [live_start, seq_len) in layer `layer` down to its budget.

    slots: the request's live slots (``slots.Slots``); memory: its memory in this layer, whose
    remembered queries are the observation window. Afterwards slots [fold_to, seq_len) hold each
    head's kept tokens in position order and `memory` their positions, statistics and states.
    Returns the observation and the kept mask [Hkv, n] over the live slots (for benchmarks); the
    observation's keys and values are the slots' as read, which the packing may have overwritten.
    """
    policy, n = plan.policy, plan.seq_len
    live = slice(plan.live_start, n)
    keys, values = slots.read()
    heads = keys.shape[0]
    positions = memory.positions[:, live].clone()  # the observation outlives the packing below
    layout = plan.memory.patch_layout(positions)
    queries, q_positions = memory.observation_queries(policy.config.observation_window)
    probs, statistics = slots.observe(
        group_queries(queries, heads),
        keys,
        scale,
        q_positions.repeat(queries.shape[1] // heads),
        positions,
        layout,
    )
    alpha = accumulated_attention(probs) if statistics is None else statistics[0]
    accumulated = memory.accumulated[:, live] + alpha
    candidates = (positions >= plan.sinks) & (positions < n - plan.window)
    scored = (keys, values, scale, layer, queries, q_positions)  # for policies that read them
    obs = Observation(probs, positions, candidates, accumulated, layout, statistics, *scored)
    kept = ~candidates | policy.select(obs, plan.budget - plan.sinks - plan.window)
    if layout is not None:
        plan.memory.visual_slots_folded += int((layout.visual & ~kept).sum())
    if policy.keeps_state:
        states = policy.absorb(memory.states, obs, ~kept, keys, values, scale, layer=layer)
        memory.states = [state.stored_as(storage_dtype(slots.dtype)) for state in states]
    # Merging policies (lookm) return the kept tokens' new keys and values; the rest as read.
    keys, values = policy.merge(obs, kept, keys, values)
    # Each head keeps the same number of tokens; nonzero() lists them in slot order, which is
    # position order.
    index = kept.nonzero()[:, 1].view(heads, plan.budget)
    packed = slice(plan.fold_to, n)
    memory.positions[:, packed] = positions.gather(1, index)
    memory.accumulated[:, packed] = accumulated.gather(1, index)
    memory.accumulated[:, plan.live_start : plan.fold_to] = 0.0
    slots.write(plan.fold_to, *(gather_tokens(x, index, token_major=True) for x in (keys, values)))
    return obs, kept


def compress_tensors(
    policy: KVPolicy,
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float,
    budget: int,
    layer: int,
    token_layout=None,
) -> tuple[DenseSlots, LayerMemory, Observation, torch.Tensor]:
    """`compress` of a prompt held as plain tensors (the transformers reference, the benchmarks):
    keys and values [Hkv, n, d] down to `budget` tokens, scored by the prompt's last queries
    [T, Hq, d]. Returns the slots (kept tokens in [n - budget, n)), the layer's memory (their
    positions, the states), the observation and the kept mask."""
    heads, n, _ = keys.shape
    memory = LayerMemory.empty(heads, n, keys.device)
    window = policy.config.observation_window
    memory.remember_queries(queries[-window:], n - min(window, queries.shape[0]), window)
    request = RequestMemory("tensors", n, budget, token_layout=token_layout)
    plan = RequestPlan(request, policy, 0, 0, n, n, 0, n - budget)
    slots = DenseSlots(keys, values)
    return slots, memory, *compress(plan, memory, slots, scale, layer)
