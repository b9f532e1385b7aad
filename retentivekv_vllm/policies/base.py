"""What every KV policy shares: the observation it scores, top-k selection, folding.

A policy is a small dataclass that turns an Observation into one score per cached
token (higher = keep).  The engine keeps sinks and the recent window itself, keeps
the `k` best-scoring candidates per KV head (the same `k` for every head and layer,
so that each head can keep different tokens in the same physical slots), and hands
the rest to ``absorb``: eviction policies drop them, retentive folds them into its
recurrent state; merging policies (``lookm``) average them into kept tokens (``merge``).
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from retentivekv_vllm.core import (
    PatchLayout,
    RecurrentState,
    accumulated_attention,
    modality_entropy,
    select_topk,
)

if TYPE_CHECKING:  # the settings import the policies, never the other way round
    from retentivekv_vllm.config import KVPolicyConfig


@dataclass(frozen=True)
class Observation:
    """One request in one layer at the moment it is compressed.

    probs: [Hkv, rows, n] softmax attention of the observation queries (GQA query
        heads stacked as rows) over the n cached tokens; hidden tokens get 0. None when
        `statistics` were computed without forming them (the CPU backend's kernel).
    positions: [Hkv, n] token position of each cached slot, per head.
    candidates: [Hkv, n] bool, tokens that may be folded (live, not sink, not window).
    accumulated: [Hkv, n] attention each token received from every observation
        window since the request started (H2O's heavy-hitter statistic).
    layout: where image tokens sit on their patch grids; None for a text-only request.
    statistics: (alpha, entropy) as `core.observation_statistics` gives them, or None: then
        they are computed from `probs`, once, on first use.
    keys: [Hkv, n, d] the cached keys (post-RoPE, as they sit in the cache), for policies that
        score keys themselves (`knorm`); None where a caller has none to give.
    values: [Hkv, n, dv] the cached values, for policies that score values (`retentive` with
        ``--kv-recall-weight``); None where a caller has none to give.
    scale: the layer's attention scale; layer: the layer's index in the model (per-layer feature
        maps). None where a caller has none to give.
    queries: [m, Hq, d] the observation window's queries (post-RoPE, as the engine holds them,
        ungrouped) and query_positions: [m] their positions, for policies that model the queries
        themselves (`expected_attention`); None where a caller has none to give.
    """

    probs: torch.Tensor | None
    positions: torch.Tensor
    candidates: torch.Tensor
    accumulated: torch.Tensor
    layout: PatchLayout | None = None
    statistics: tuple[torch.Tensor, torch.Tensor] | None = None
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    scale: float | None = None
    layer: int | None = None
    queries: torch.Tensor | None = None
    query_positions: torch.Tensor | None = None

    @functools.cached_property
    def alpha(self) -> torch.Tensor:
        """[Hkv, n] attention each token received from this window's queries."""
        return accumulated_attention(self.probs) if self.statistics is None else self.statistics[0]

    @functools.cached_property
    def entropy(self) -> torch.Tensor:
        """[Hkv, n] entropy potential of each token, per modality (`core.modality_entropy`)."""
        return (
            modality_entropy(self.probs, self.layout)
            if self.statistics is None
            else self.statistics[1]
        )


@dataclass
class KVPolicy(ABC):
    config: KVPolicyConfig
    # The served model's rotary frequencies (RoPE's inv_freq, [d_rot / 2]), for policies that
    # move queries between positions (`needs_rotary`). Not a knob: the model's config decides
    # them, so whoever builds the policy for a model fills them in (the engine from vLLM's model
    # config, `engine/settings.py`); None where unknown. A tuple: policies are cached by value.
    rotary: tuple[float, ...] | None = None
    name: ClassVar[str]
    # False for `full`: the engine never compresses, whatever the budget.
    compresses: ClassVar[bool] = True
    # True for `expected_attention`: the server refuses a model whose RoPE it cannot read.
    needs_rotary: ClassVar[bool] = False

    @classmethod
    def keeps_state_under(cls, config: KVPolicyConfig) -> bool:
        """Whether folded tokens live on in recurrent states read by later queries (whose memory
        is reserved at start-up), under `config`."""
        return False

    @property
    def keeps_state(self) -> bool:
        return self.keeps_state_under(self.config)

    @abstractmethod
    def score(self, obs: Observation) -> torch.Tensor:
        """[Hkv, n] score per token, higher = keep; only candidates are compared."""

    def select(self, obs: Observation, k: int) -> torch.Tensor:
        """[Hkv, n] bool: the candidates kept, k per head."""
        scores = self.score(obs).masked_fill(~obs.candidates, float("-inf"))
        return select_topk(scores, k) & obs.candidates

    def absorb(
        self,
        states: list[RecurrentState],
        obs: Observation,
        folded: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        scale: float,
        layer: int | None = None,
    ) -> list[RecurrentState]:
        """Fold the tokens marked in `folded` [Hkv, n] into the states of layer `layer` (its index
        in the model, for per-layer feature maps); eviction drops them."""
        return states

    def merge(
        self, obs: Observation, kept: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [Hkv, n, d] to write back for the kept tokens (`kept` [Hkv, n]);
        merging policies fold evicted tokens into kept ones here, the rest keep them as they are."""
        return keys, values


POLICIES: dict[str, type[KVPolicy]] = {}


def register_policy(cls: type[KVPolicy]) -> type[KVPolicy]:
    POLICIES[cls.name] = cls
    return cls


def make_policy(config: KVPolicyConfig, rotary: tuple[float, ...] | None = None) -> KVPolicy:
    return POLICIES[config.policy](config, rotary)
