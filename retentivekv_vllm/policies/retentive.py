"""`retentive` (RetentiveKV): keep by attention + entropy, fold the rest into recurrent states.

Two states per layer and KV head (``--kv-states dual``): the text state absorbs folded text
tokens in position order, oldest first, like a causal scan; the visual state absorbs each
image's folded patches from the farthest Manhattan ring around the image's root patch (its
highest-scoring patch) to the nearest, decaying by γ per ring crossed, so the root's
neighbourhood is remembered best.  ``single`` folds every token into one state in position
order; ``none`` drops folded tokens (eviction by the retention score).  ``--kv-state-query
fixed`` reads the states with the zero query instead of each query's own (the ablation of
query-conditioned retrieval); ``--kv-state-readout normalised`` and ``--kv-state-log-gain``
rescale what a state returns (method.md section 6).  ``--kv-feature-map learned`` folds and
reads each layer's states with that layer's maps from ``--kv-maps`` (``calibrate``).  Scoring
is the same in every mode: entropy within each modality, 1-D pooling over text, 2-D pooling
over each image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from retentivekv_vllm.core import (
    FeatureMap,
    FixedQuery,
    RecurrentState,
    ScaledReadout,
    absorption_from_attention,
    fold,
    gather_tokens,
    make_feature_map,
    normalize_by_max,
    retention_from_entropy,
    retention_score,
    visual_fold_plan,
)
from retentivekv_vllm.policies.base import KVPolicy, Observation, register_policy
from retentivekv_vllm.policy_facts import keeps_state


@register_policy
@dataclass
class RetentivePolicy(KVPolicy):
    name = "retentive"
    _feature_maps: dict[tuple[int, float, int | None], FeatureMap] = field(
        default_factory=dict, init=False, repr=False
    )

    @property
    def keeps_state(self) -> bool:
        return keeps_state(self.name, self.config.states)

    def num_states(self, has_images: bool) -> int:
        return {"none": 0, "single": 1, "dual": 2 if has_images else 1}[self.config.states]

    def feature_map(self, head_dim: int, scale: float, layer: int | None = None) -> FeatureMap:
        """The map layer `layer` (its index in the model) folds and reads its states with; every
        layer shares one map except with ``--kv-feature-map learned``, where `layer` is required."""
        c = self.config
        key = (head_dim, scale, layer if c.feature_map == "learned" else None)
        if key not in self._feature_maps:
            if c.feature_map == "learned":
                feature_map = self._learned_map(head_dim, layer)
            else:
                feature_map = make_feature_map(c.feature_map, head_dim, c.state_rank, scale, c.seed)
            if c.state_query == "fixed":
                feature_map = FixedQuery(feature_map)
            if c.state_readout == "normalised" or c.state_log_gain != 0:
                feature_map = ScaledReadout(
                    feature_map, c.state_log_gain, normalise=c.state_readout == "normalised"
                )
            self._feature_maps[key] = feature_map
        return self._feature_maps[key]

    def state_rank(self, head_dim: int) -> int:
        """Features per state, r of a state's r·(d_v + 1) numbers: the same in every layer, so
        memory can be planned without a layer index."""
        if self.config.feature_map == "learned":
            from retentivekv_vllm.learned_maps import load_maps

            return load_maps(self.config.maps).rank
        return self.feature_map(head_dim, 1.0).rank

    def _learned_map(self, head_dim: int, layer: int | None) -> FeatureMap:
        from retentivekv_vllm.learned_maps import load_maps

        feature_map = load_maps(self.config.maps).layer(layer)
        if feature_map.head_dim != head_dim:
            raise ValueError(
                f"--kv-maps {self.config.maps}: maps for head size {feature_map.head_dim}, "
                f"the model's is {head_dim}"
            )
        return feature_map

    def score(self, obs: Observation) -> torch.Tensor:
        c = self.config
        return retention_score(
            obs.alpha,
            obs.entropy,
            c.lambda_,
            obs.candidates,
            c.pool_kernel,
            obs.layout,
        )

    def fold_gates(self, obs, folded):
        """The folded tokens' slots index [H, f] (in position order) and their gates: retention γ
        from the entropy potential, absorption a from the accumulated attention, both [H, f]."""
        c = self.config
        # The same number of tokens is folded in every head; nonzero() lists them in
        # slot order, which is position order (oldest first).
        index = folded.nonzero()[:, 1].view(folded.shape[0], int(folded[0].sum()))

        def take(x: torch.Tensor) -> torch.Tensor:
            return x.gather(1, index)

        entropy_hat = normalize_by_max(obs.entropy, obs.candidates)
        gamma = retention_from_entropy(take(entropy_hat), c.gamma0)
        alpha = obs.alpha
        absorption = absorption_from_attention(take(alpha), c.absorption_min, c.absorption_max)
        return index, gamma, absorption

    def absorb(self, states, obs, folded, keys, values, scale, layer=None):
        num_heads, _, head_dim = keys.shape
        if not folded[0].any() or not self.keeps_state:
            return states
        index, gamma, absorption = self.fold_gates(obs, folded)
        phi = self.feature_map(head_dim, scale, layer)
        phi_k = phi.features(gather_tokens(keys, index))
        v = gather_tokens(values, index).float()
        num_states = self.num_states(obs.layout is not None)
        states = list(states) or [
            RecurrentState.zeros(num_heads, phi.rank, values.shape[-1], device=keys.device)
            for _ in range(num_states)
        ]
        if num_states == 1:
            return [fold(states[0], phi_k, v, gamma, absorption)]
        visual = obs.layout.visual.gather(1, index)
        # A token of the other modality passes through a state untouched: γ = 1, a = 0.
        text_state = fold(
            states[0],
            phi_k,
            v,
            torch.where(visual, 1.0, gamma),
            torch.where(visual, 0.0, absorption),
        )
        plan = visual_fold_plan(index, obs.layout, self.score(obs))

        def order(x: torch.Tensor) -> torch.Tensor:
            return x.gather(1, plan.order)

        ring_gamma = order(gamma).pow(plan.decay_steps)
        visual_state = fold(
            states[1],
            gather_tokens(phi_k, plan.order),
            gather_tokens(v, plan.order),
            torch.where(plan.member, ring_gamma, 1.0),
            torch.where(plan.member, order(absorption), 0.0),
        )
        return [text_state, visual_state]
