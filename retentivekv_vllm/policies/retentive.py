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
reads each layer's states with that layer's maps from ``--kv-maps`` (``calibrate``); the default,
``auto``, is ``learned`` with a maps file and no state without one (folded tokens are dropped: at
equal memory only learned maps beat giving the state's bytes to cached tokens, docs/results.md
section 10), so ``--kv-states`` says which states there are when a feature map is in use
(``--kv-maps``, or ``--kv-feature-map prf`` or ``elu``).  Scoring is the same in every mode:
entropy within each modality, 1-D pooling over text, 2-D pooling over each image;
``--kv-recall-weight`` adds LoLA's self-recall error (keep the tokens the state would reconstruct
worst), off by default.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from retentivekv_vllm.core import (
    FEATURE_MAPS,
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
    self_recall_error,
    visual_fold_plan,
)
from retentivekv_vllm.knobs import KnobError, check_choice, knob, option
from retentivekv_vllm.learned_maps import MapsFileError, load_maps
from retentivekv_vllm.policies.base import KVPolicy, Observation, register_policy

# learned: per layer, from a maps file; auto: learned with a maps file, no state without one.
FEATURE_MAP_NAMES = ("auto", *FEATURE_MAPS, "learned")
NO_STATE_HINT = (
    "for a state, fit maps with `python -m retentivekv_vllm.calibrate MODEL --out FILE` and pass "
    "--kv-maps FILE, or ask for the random-feature state with --kv-feature-map prf"
)
STATE_MODES = ("dual", "single", "none")
STATE_QUERIES = ("query", "fixed")
STATE_READOUTS = ("unbiased", "normalised")

logger = logging.getLogger("vllm.retentivekv_vllm")


@dataclass(frozen=True)
class RetentiveSettings:
    """`retentive`'s own knobs (``KVPolicyConfig.retentive``); flat like the common ones:
    ``--kv-lambda`` is ``additional_config.kv_lambda``. The last four are ablations."""

    lambda_: float = knob(0.5, "Weight of attention against entropy in the retention score.", float)
    feature_map: str = knob(
        "auto",
        "State feature map: auto (learned with --kv-maps; without a maps file no state: folded "
        "tokens are dropped), learned (per layer and KV head, read from --kv-maps), prf "
        "(positive random features) or elu.",
        str,
    )
    maps: str = knob(
        "",
        "Learned feature maps, which turn on the learned state: the file `python -m "
        "retentivekv_vllm.calibrate MODEL --out FILE` wrote for the served model.",
        Path,
    )
    state_rank: int = knob(
        64, "Feature dimension r of the recurrent state (prf; a maps file sets its own).", int
    )
    gamma0: float = knob(0.99, "Base retention of the state per folded token.", float)
    absorption_min: float = knob(0.5, "Lower clamp of the absorption weight.", float)
    absorption_max: float = knob(2.0, "Upper clamp of the absorption weight.", float)
    seed: int = knob(0, "Seed of the random-feature projection.", int)
    recall_weight: float = knob(
        0.0,
        "Weight of LoLA's self-recall error in the retention score: the tokens the state would "
        "give back worst are kept (0: off).",
        float,
    )
    states: str = knob(
        "dual",
        "Recurrent states of retentive when a feature map is in use (--kv-maps, or "
        "--kv-feature-map prf or elu): dual (visual and text), single (one for both) or none "
        "(folded tokens are dropped: eviction by the retention score).",
        str,
    )
    state_query: str = knob(
        "query",
        "How retentive reads its states: query (each query reads them through its own "
        "features) or fixed (every query reads them through the zero query's features, so "
        "each folded token weighs the same whatever the query: the no-query-conditioned-"
        "retrieval ablation).",
        str,
    )
    state_readout: str = knob(
        "unbiased",
        "How a state's readout is scaled: unbiased (φ(q)ᵀS, the random-feature estimate of the "
        "folded tokens' softmax terms) or normalised (divided by φ(q)·φ(0), the feature map's "
        "own estimate of exp(0) = 1: a ratio estimator whose error does not grow with the "
        "query's norm, biased; pair it with --kv-state-log-gain).",
        str,
    )
    state_log_gain: float = knob(
        0.0, "Natural log of the gain g every state's readout is multiplied by in the merge.", float
    )

    @property
    def state_feature_map(self) -> str | None:
        """The feature map states are folded and read with: ``--kv-feature-map`` with ``auto``
        resolved (``learned`` with a maps file), None for ``auto`` without one: no state."""
        if self.feature_map != "auto":
            return self.feature_map
        return "learned" if self.maps else None

    @property
    def keeps_state(self) -> bool:
        """Whether folded tokens live on in states: a feature map is in use and ``--kv-states``
        is not ``none``."""
        return self.state_feature_map is not None and self.states != "none"

    def validate(self) -> None:
        """KnobError naming the flag of the first bad value."""
        if not 0 <= self.lambda_ <= 1:
            raise KnobError("lambda", f"must lie in [0, 1], got {self.lambda_}")
        check_choice("feature_map", self.feature_map, sorted(FEATURE_MAP_NAMES), "feature map")
        if self.feature_map == "learned" and not self.maps:
            raise KnobError(
                "maps",
                "--kv-feature-map learned needs a maps file; fit one with "
                "python -m retentivekv_vllm.calibrate MODEL --out FILE",
            )
        if self.maps and self.state_feature_map != "learned":
            raise KnobError(
                "maps",
                "a maps file is read with --kv-feature-map learned (or auto, the default) only, "
                f"got {self.feature_map}",
            )
        if self.maps:
            try:
                load_maps(self.maps)
            except MapsFileError as error:
                raise KnobError("maps", str(error)) from None
        if self.state_rank < 1:
            raise KnobError("state_rank", f"must be >= 1, got {self.state_rank}")
        if not 0 < self.gamma0 <= 1:
            raise KnobError("gamma0", f"must lie in (0, 1], got {self.gamma0}")
        if not 0 <= self.absorption_min <= self.absorption_max:
            raise KnobError(
                "absorption_min",
                f"need 0 <= absorption_min <= absorption_max ({option('absorption_max')}), "
                f"got {self.absorption_min} and {self.absorption_max}",
            )
        if not (math.isfinite(self.recall_weight) and self.recall_weight >= 0):
            raise KnobError(
                "recall_weight", f"must be a finite number >= 0, got {self.recall_weight}"
            )
        if self.recall_weight > 0 and self.state_feature_map is None:
            raise KnobError(
                "recall_weight",
                "the self-recall error is read through the state's feature map, and without a "
                f"maps file retentive keeps no state; {NO_STATE_HINT}",
            )
        check_choice("states", self.states, STATE_MODES)
        check_choice("state_query", self.state_query, STATE_QUERIES)
        check_choice("state_readout", self.state_readout, STATE_READOUTS)
        if not math.isfinite(self.state_log_gain):
            raise KnobError("state_log_gain", f"must be finite, got {self.state_log_gain}")


@functools.cache
def log_no_state() -> None:
    """The start-up line of a `retentive` without a maps file: no state, and how to get one. Once
    per process that builds such a policy (under `vllm serve`: the API server at start-up, then
    the worker)."""
    logger.info(
        "retentivekv: retentive keeps no state without a maps file: folded tokens are dropped "
        "(eviction by the retention score); %s",
        NO_STATE_HINT,
    )


@register_policy
@dataclass
class RetentivePolicy(KVPolicy):
    name = "retentive"
    _feature_maps: dict[tuple[int, float, int | None], FeatureMap] = field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self) -> None:
        if self.settings.state_feature_map is None:
            log_no_state()

    @classmethod
    def keeps_state_under(cls, config) -> bool:
        return config.retentive.keeps_state

    @property
    def settings(self) -> RetentiveSettings:
        return self.config.retentive

    def num_states(self, has_images: bool) -> int:
        if not self.keeps_state:
            return 0
        return {"single": 1, "dual": 2 if has_images else 1}[self.settings.states]

    def feature_map(self, head_dim: int, scale: float, layer: int | None = None) -> FeatureMap:
        """The map layer `layer` (its index in the model) folds and reads its states with; every
        layer shares one map except with learned maps, where `layer` is required. ValueError
        when no feature map is in use (``auto`` without a maps file)."""
        c = self.settings
        name = c.state_feature_map
        if name is None:
            raise ValueError(f"retentive keeps no state without a maps file; {NO_STATE_HINT}")
        key = (head_dim, scale, layer if name == "learned" else None)
        if key not in self._feature_maps:
            if name == "learned":
                feature_map = self._learned_map(head_dim, layer)
            else:
                feature_map = make_feature_map(name, head_dim, c.state_rank, scale, c.seed)
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
        memory can be planned without a layer index; 0 when no feature map is in use."""
        name = self.settings.state_feature_map
        if name is None:
            return 0
        if name == "learned":
            return load_maps(self.settings.maps).rank
        return self.feature_map(head_dim, 1.0).rank

    def _learned_map(self, head_dim: int, layer: int | None) -> FeatureMap:
        feature_map = load_maps(self.settings.maps).layer(layer)
        if feature_map.head_dim != head_dim:
            raise ValueError(
                f"--kv-maps {self.settings.maps}: maps for head size {feature_map.head_dim}, "
                f"the model's is {head_dim}"
            )
        return feature_map

    def score(self, obs: Observation) -> torch.Tensor:
        """R = λ·α̂ + (1−λ)·Ĥ (`core.retention_score`), plus w·ê with ``--kv-recall-weight`` w > 0:
        ê the self-recall error of each candidate under the state the candidates would form
        (`core.self_recall_error`, LoLA's rule: keep what the state would reconstruct worst),
        divided by its max over the head's candidates. The error is read through this layer's
        feature map even with ``--kv-states none``, where it only selects. -inf off candidates."""
        score = retention_score(
            obs.alpha,
            obs.entropy,
            self.settings.lambda_,
            obs.candidates,
            self.config.pool_kernel,
            obs.layout,
        )
        weight = self.settings.recall_weight
        if weight > 0:
            score = score + weight * normalize_by_max(self.recall_error(obs), obs.candidates)
        return score

    def recall_error(self, obs: Observation) -> torch.Tensor:
        """[Hkv, n] each token's self-recall error under the state of the candidates."""
        if obs.keys is None or obs.values is None or obs.scale is None:
            raise ValueError(
                f"{option('recall_weight')} needs the observation's keys, values and attention "
                "scale; this caller gives none"
            )
        phi = self.feature_map(obs.keys.shape[-1], obs.scale, obs.layer)
        return self_recall_error(phi, obs.keys, obs.values, obs.candidates, obs.positions)

    def fold_gates(self, obs, folded):
        """The folded tokens' slots index [H, f] (in position order) and their gates: retention γ
        from the entropy potential, absorption a from the accumulated attention, both [H, f]."""
        c = self.settings
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
        phi_k = phi.features(gather_tokens(keys, index), obs.positions.gather(1, index))
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
