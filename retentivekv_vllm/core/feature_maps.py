"""Feature maps φ: R^d → R^r_{>0} that turn softmax attention into a linear, foldable sum.

Every map is computed in log space: random-feature exponents overflow float32 for large-norm keys
long before their products do, and the merge already works with logs. Every map takes the
positions of its inputs (broadcastable to ``x.shape[:-1]``); only a learned map fitted on
de-rotated keys and queries reads them (`LearnedFeatureMap`), the others ignore them.
"""

import abc
import math
from typing import Any

import torch
from torch import Tensor


class FeatureMap(abc.ABC):
    rank: int

    @abc.abstractmethod
    def log_features(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        """x [..., d] (at `positions`) -> log φ(x) [..., r], float32."""

    def features(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        """x [..., d] -> φ(x) [..., r], float32, all entries > 0 (barring underflow)."""
        return self.log_features(x, positions).exp()

    def query_log_features(self, q: Tensor, positions: Tensor | None = None) -> Tensor:
        """log of the features a query reads a state with: log φ(q) [..., r], float32."""
        return self.log_features(q, positions)

    def query_features(self, q: Tensor, positions: Tensor | None = None) -> Tensor:
        """The features a query reads a state with: φ(q) (may underflow; the merge reads
        `query_log_features` instead)."""
        return self.query_log_features(q, positions).exp()


class FixedQuery(FeatureMap):
    """`inner` for keys, but every query reads the state through φ(0): each folded token then
    weighs what a zero query gives it (exp(0) = 1 for ``prf`` in expectation, 1 for ``elu``), so
    the state's readout is the absorption-weighted mean of its values with a fixed share, whatever
    the query. The no-query-conditioned-retrieval ablation."""

    def __init__(self, inner: FeatureMap):
        self.inner = inner
        self.rank = inner.rank

    def log_features(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        return self.inner.log_features(x, positions)

    def query_log_features(self, q: Tensor, positions: Tensor | None = None) -> Tensor:
        return self.inner.query_log_features(torch.zeros_like(q), positions)


class ScaledReadout(FeatureMap):
    """`inner` for keys; queries read the state through log φ(q) + log g and, with `normalise`,
    minus log(φ(q)·φ(0)).

    g multiplies every state's readout (numerator and denominator) in the merge. φ(q)·φ(0) is the
    map's own estimate of exp(scale·q·0) = 1: dividing by it gives the ratio estimator
    φ(q)·φ(k) / φ(q)·φ(0) of exp(scale·q·k), consistent as r grows but biased. For ``prf`` and a
    large-norm query the unbiased estimate is typically e^-300 or less of its mean (the
    feature with the largest w·q̃ dominates, and its −‖q̃‖²/2 is not made up); the ratio removes
    that common factor, keeping only how well the key matches the query's dominant features.
    """

    def __init__(self, inner: FeatureMap, log_gain: float = 0.0, normalise: bool = False):
        self.inner = inner
        self.rank = inner.rank
        self.log_gain = log_gain
        self.normalise = normalise

    def log_features(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        return self.inner.log_features(x, positions)

    def query_log_features(self, q: Tensor, positions: Tensor | None = None) -> Tensor:
        log_phi_q = self.inner.query_log_features(q, positions)
        if self.normalise:
            # A zero vector is the same at every position.
            log_phi_zero = self.inner.log_features(torch.zeros_like(q[..., :1, :]))
            log_phi_q = log_phi_q - torch.logsumexp(log_phi_q + log_phi_zero, -1, keepdim=True)
        return log_phi_q + self.log_gain


class EluPlusOne(FeatureMap):
    """φ(x) = elu(x) + 1 (Infini-attention); r = d. Cheap, but a biased stand-in for exp(q·k)."""

    def __init__(self, head_dim: int):
        self.rank = head_dim

    def log_features(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        x = x.float()
        # elu(x)+1 is exp(x) below 0 and 1+x above: its log is exact on both sides, never -inf.
        return torch.where(x < 0, x, torch.log1p(x.clamp(min=0)))


class PositiveRandomFeatures(FeatureMap):
    """φ(x) = exp(W x̃ − ‖x̃‖²/2)/√r with x̃ = x·√scale and W [r, d] ~ N(0, 1) fixed by `seed`.

    E_W[φ(q)·φ(k)] = exp(scale·q·k) (Performer's positive features), so a state built with φ
    estimates, without bias, exactly the softmax terms that folding removed from the cache.
    """

    def __init__(self, head_dim: int, rank: int, scale: float, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(rank, head_dim, generator=generator)
        self.rank = rank
        self.scale = scale

    def log_features(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        x = x.float() * math.sqrt(self.scale)
        projection = x @ self.weight.to(x.device).T
        return projection - 0.5 * x.square().sum(-1, keepdim=True) - 0.5 * math.log(self.rank)


class LearnedFeatureMap(FeatureMap):
    """One layer's learned maps (Hedgehog's features, LESS's small key scale), one per KV head.

    For KV head h, with W_q, W_k [d, r/2], u_q, u_k [d] and a per-feature key scale s [r]:
        log φ_q(q) = [log_softmax(q W_q), log_softmax(−q W_q)] + q·u_q
        log φ_k(k) = [log_softmax(k W_k), log_softmax(−k W_k)] + k·u_k + log s
    The softmax halves say which folded keys a query matches; the linear terms carry how much
    softmax mass they had (exp(scale·q·k) is as large as e^30 for sharp queries, a softmax
    feature at most 1). s starts small, so an untrained state adds almost nothing to the merge.
    Inputs are [..., H, n, d] (the head dim third from last), post-RoPE as cached. With
    `rope_inv_freq` (the model's rotary frequencies) every input is first rotated back from its
    position (`derotate`), so the maps see what a token says, not where it sits: maps of cached
    vectors fitted at one compression point fit only the positions around it. The parameters
    are plain tensors: calibration makes them leaves that require grad and trains them in place.
    """

    def __init__(
        self,
        query_weight: Tensor,
        key_weight: Tensor,
        query_log_magnitude: Tensor,
        key_log_magnitude: Tensor,
        key_log_scale: Tensor,
        rope_inv_freq: Tensor | None = None,
    ):
        heads, head_dim, half = query_weight.shape
        shapes = {
            "key_weight": (key_weight, (heads, head_dim, half)),
            "query_log_magnitude": (query_log_magnitude, (heads, head_dim)),
            "key_log_magnitude": (key_log_magnitude, (heads, head_dim)),
            "key_log_scale": (key_log_scale, (heads, 2 * half)),
        }
        for name, (tensor, shape) in shapes.items():
            if tuple(tensor.shape) != shape:
                raise ValueError(
                    f"learned map: {name} has shape {tuple(tensor.shape)}, expected {shape}"
                )
        self.query_weight = query_weight
        self.key_weight = key_weight
        self.query_log_magnitude = query_log_magnitude
        self.key_log_magnitude = key_log_magnitude
        self.key_log_scale = key_log_scale
        self.rope_inv_freq = rope_inv_freq
        self.num_heads, self.head_dim, self.rank = heads, head_dim, 2 * half

    @classmethod
    def initial(
        cls,
        num_heads: int,
        head_dim: int,
        rank: int,
        input_rms: float = 1.0,
        key_scale: float = 1e-4,
        seed: int = 0,
        rope_inv_freq: Tensor | None = None,
    ) -> "LearnedFeatureMap":
        """Untrained maps: seeded projections that give logits of unit spread for inputs whose
        entries have root mean square `input_rms`, no magnitude terms, key scale `key_scale`."""
        if rank < 2 or rank % 2:
            raise ValueError(f"a learned map's rank must be an even number >= 2, got {rank}")
        generator = torch.Generator().manual_seed(seed)
        std = 1.0 / (math.sqrt(head_dim) * input_rms)
        shape = (num_heads, head_dim, rank // 2)
        query_weight = torch.randn(shape, generator=generator) * std
        key_weight = torch.randn(shape, generator=generator) * std
        return cls(
            query_weight,
            key_weight,
            torch.zeros(num_heads, head_dim),
            torch.zeros(num_heads, head_dim),
            torch.full((num_heads, rank), math.log(key_scale)),
            rope_inv_freq,
        )

    def parameters(self) -> list[Tensor]:
        return [
            self.query_weight,
            self.key_weight,
            self.query_log_magnitude,
            self.key_log_magnitude,
            self.key_log_scale,
        ]

    def _log_features(
        self, x: Tensor, positions: Tensor | None, weight: Tensor, log_magnitude: Tensor
    ) -> Tensor:
        x = x.float()
        if self.rope_inv_freq is not None:
            if positions is None:
                raise ValueError("these learned maps de-rotate their inputs: positions are needed")
            x = derotate(x, positions, self.rope_inv_freq)
        logits = x @ weight.to(x.device)  # [..., H, n, d] @ [H, d, r/2]
        magnitude = x @ log_magnitude.to(x.device)[..., None]  # [..., H, n, 1]
        halves = torch.cat([logits.log_softmax(-1), (-logits).log_softmax(-1)], -1)
        return halves + magnitude

    def log_features(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        """Key features: x [..., H, n, d] -> log φ_k(x) [..., H, n, r]."""
        log_scale = self.key_log_scale.to(x.device)[:, None, :]
        features = self._log_features(x, positions, self.key_weight, self.key_log_magnitude)
        return features + log_scale

    def query_log_features(self, q: Tensor, positions: Tensor | None = None) -> Tensor:
        """Query features: q [..., H, m, d] -> log φ_q(q) [..., H, m, r]."""
        return self._log_features(q, positions, self.query_weight, self.query_log_magnitude)


def derotate(x: Tensor, positions: Tensor, inv_freq: Tensor) -> Tensor:
    """Undo rotary position embedding (RoPE, rotate-half style, as Llama-family models and vLLM's
    neox style apply it): x [..., d] rotated at `positions` (broadcastable to x.shape[:-1]) ->
    the vector before rotation. inv_freq [d_rot / 2] are the model's rotary frequencies; the
    first d_rot dims are rotated, the rest pass unchanged."""
    inv_freq = inv_freq.to(x.device)
    half = inv_freq.shape[0]
    angle = positions.to(x.device, torch.float32)[..., None] * inv_freq  # [..., d_rot / 2]
    cos, sin = angle.cos(), angle.sin()
    first, second, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    # Rotation by θ maps (a, b) to (a cos θ − b sin θ, b cos θ + a sin θ); this is rotation by −θ.
    return torch.cat([first * cos + second * sin, second * cos - first * sin, rest], -1)


FEATURE_MAPS: dict[str, type[FeatureMap]] = {"elu": EluPlusOne, "prf": PositiveRandomFeatures}


def make_feature_map(
    name: str, head_dim: int, rank: int, scale: float, seed: int = 0
) -> FeatureMap:
    """Build a registered feature map; `elu` ignores rank, scale and seed (its rank is head_dim)."""
    if name not in FEATURE_MAPS:
        raise ValueError(f"unknown feature map {name!r}; valid names: {sorted(FEATURE_MAPS)}")
    if name == "elu":
        return EluPlusOne(head_dim)
    return FEATURE_MAPS[name](head_dim, rank, scale, seed)


# RoPE kinds whose frequencies a position-independent rescaling of the default ones gives.
HANDLED_ROPE_TYPES = ("default", "linear")


class UnsupportedRotary(ValueError):
    """The model's position embedding is not plain RoPE whose frequencies its config gives."""


def rotary_frequencies_from_config(hf_config: Any) -> tuple[float, ...]:
    """The rotary frequencies (inv_freq, [d_rot / 2]) of a Hugging Face model config, for plain
    rotate-half RoPE over the first d_rot = head_dim · partial_rotary_factor dims of each head,
    with linear position scaling or none; UnsupportedRotary saying why for anything else."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    # transformers >= 5 reads "rope_parameters", older configs "rope_scaling" (+ "rope_theta").
    rope = dict(getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {})
    if any(isinstance(v, dict) for v in rope.values()):
        raise UnsupportedRotary("the model uses a different RoPE per layer type")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in HANDLED_ROPE_TYPES:
        raise UnsupportedRotary(
            f"the model's RoPE scaling type {kind!r} is not handled (handled: "
            f"{', '.join(HANDLED_ROPE_TYPES)})"
        )
    if "mrope_section" in rope:
        raise UnsupportedRotary("the model uses multimodal RoPE (mrope_section)")
    theta = rope.get("rope_theta", getattr(text, "rope_theta", None))
    if theta is None:
        raise UnsupportedRotary("the model's config names no rotary embedding (rope_theta)")
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    factor = rope.get("partial_rotary_factor", getattr(text, "partial_rotary_factor", None) or 1.0)
    dim = int(head_dim * factor)
    inv_freq = 1.0 / float(theta) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    if kind == "linear":
        inv_freq = inv_freq / float(rope["factor"])
    return tuple(inv_freq.tolist())
