"""`retentive`'s optional LoLA term (``--kv-recall-weight``): the candidates the state would
reconstruct worst are kept; off, the score is exactly the attention-and-entropy one."""

import math

import pytest
import torch

from retentivekv_vllm.config import ConfigError, KVPolicyConfig
from retentivekv_vllm.core import retention_score
from retentivekv_vllm.knobs import KnobError
from retentivekv_vllm.policies import Observation, make_policy
from retentivekv_vllm.policies.retentive import RetentiveSettings

HEADS, N, D, DV = 2, 24, 16, 8
SINKS, WINDOW = 2, 4
OUTLIER = 11


def policy(**knobs):
    """retentive with the prf state unless `knobs` choose another: the term reads the state's
    feature map (without one, as retentive has without a maps file, it is refused)."""
    return make_policy(
        KVPolicyConfig.from_knobs(policy="retentive", **{"feature_map": "prf", **knobs})
    )


def outlier_observation(seed=0):
    """Uniform attention (every token has the same α and entropy), random keys, and one value
    shared by every candidate except OUTLIER's."""
    generator = torch.Generator().manual_seed(seed)
    positions = torch.arange(N).expand(HEADS, -1)
    candidates = (positions >= SINKS) & (positions < N - WINDOW)
    probs = torch.full((HEADS, 8, N), 1.0 / N)
    keys = torch.randn(HEADS, N, D, generator=generator) * 0.5
    values = torch.randn(DV, generator=generator).expand(HEADS, N, DV).clone()
    values[:, OUTLIER] = torch.randn(HEADS, DV, generator=generator) * 3
    values[:, :SINKS] = torch.randn(HEADS, SINKS, DV, generator=generator) * 3  # not candidates
    values[:, N - WINDOW :] = torch.randn(HEADS, WINDOW, DV, generator=generator) * 3
    return Observation(
        probs,
        positions,
        candidates,
        probs.sum(1),
        keys=keys,
        values=values,
        scale=1 / math.sqrt(D),
        layer=0,
    )


@pytest.mark.parametrize("feature_map", ["prf", "elu"])
@pytest.mark.parametrize("states", ["dual", "none"])
def test_the_outlier_value_is_kept_with_the_recall_term(feature_map, states):
    """With --kv-states none the term still reads the feature map: it is a selection rule."""
    obs = outlier_observation()
    plain = policy(feature_map=feature_map, states=states).score(obs)
    others = obs.candidates.clone()
    others[:, OUTLIER] = False
    # Without the term nothing tells the outlier apart: every candidate scores the same, up to
    # the rounding of the pooling's sums.
    gap = plain[:, OUTLIER, None] - plain.masked_fill(~others, 0.0)
    assert gap[others].abs().max() < 1e-6
    recall = policy(feature_map=feature_map, states=states, recall_weight=0.5)
    score = recall.score(obs)
    assert (score[:, OUTLIER, None] > score.masked_fill(~others, -math.inf) + 1e-3).all()
    assert torch.equal(recall.select(obs, 1), obs.candidates & (torch.arange(N) == OUTLIER))
    assert score[~obs.candidates].eq(-math.inf).all()
    assert torch.isfinite(score[obs.candidates]).all()


def test_recall_weight_zero_is_the_old_score():
    generator = torch.Generator().manual_seed(1)
    obs = outlier_observation()
    probs = torch.rand(HEADS, 8, N, generator=generator).softmax(-1)
    obs = Observation(
        probs, obs.positions, obs.candidates, probs.sum(1), None, None, obs.keys, obs.values, 1.0
    )
    config = KVPolicyConfig.from_knobs(policy="retentive", feature_map="prf", lambda_=0.3)
    old = retention_score(obs.alpha, obs.entropy, 0.3, obs.candidates, config.pool_kernel)
    assert torch.equal(make_policy(config).score(obs), old)
    assert not torch.equal(policy(lambda_=0.3, recall_weight=1.0).score(obs), old)


@pytest.mark.parametrize("missing", ["values", "scale", "keys"])
def test_the_term_without_values_or_scale_names_the_flag(missing):
    obs = outlier_observation()
    fields = {"keys": obs.keys, "values": obs.values, "scale": obs.scale, missing: None}
    bare = Observation(obs.probs, obs.positions, obs.candidates, obs.accumulated, **fields)
    with pytest.raises(ValueError, match="--kv-recall-weight"):
        policy(recall_weight=1.0).score(bare)
    policy().score(bare)  # off, nothing is needed


@pytest.mark.parametrize("value", [-1, "-1", "nan", "inf", float("nan"), float("inf"), "x"])
def test_bad_recall_weights_are_refused_naming_the_flag(value):
    with pytest.raises(ConfigError, match="--kv-recall-weight"):
        KVPolicyConfig.from_additional_config({"kv_policy": "retentive", "kv_recall_weight": value})


@pytest.mark.parametrize("value", [-1.0, -1e-9, math.nan, math.inf])
def test_the_settings_refuse_bad_recall_weights(value):
    with pytest.raises(KnobError, match="--kv-recall-weight"):
        RetentiveSettings(recall_weight=value).validate()


def test_the_recall_weight_knob():
    config = KVPolicyConfig.from_additional_config(
        {"kv_policy": "retentive", "kv_feature_map": "prf", "kv_recall_weight": "0.25"}
    )
    assert config.retentive.recall_weight == 0.25
    assert KVPolicyConfig(policy="retentive").retentive.recall_weight == 0.0
    assert KVPolicyConfig.from_additional_config(config.to_additional_config()) == config
