"""`expected_attention` against kvpress's ExpectedAttentionPress formula, written out in plain torch
over pre-RoPE queries built by hand and rotated with transformers' own Llama RoPE."""

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, PhiConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, rotate_half
from transformers.models.phi.modeling_phi import PhiRotaryEmbedding

from retentivekv_vllm.config import KVPolicyConfig
from retentivekv_vllm.core.feature_maps import UnsupportedRotary, rotary_frequencies_from_config
from retentivekv_vllm.policies import Observation, make_policy

Q_HEADS, KV_HEADS, DIM, N, WINDOW, SINKS = 4, 2, 16, 120, 24, 4


def llama_config(**rope) -> LlamaConfig:
    parameters = {"rope_type": "default", "rope_theta": 500.0, **rope}
    return LlamaConfig(
        hidden_size=Q_HEADS * DIM,
        num_attention_heads=Q_HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=DIM,
        rope_parameters=parameters,
    )


def transformers_rope(config, positions: torch.Tensor):
    """cos, sin [len, d] of transformers' Llama rotary embedding at `positions`."""
    rotary = LlamaRotaryEmbedding(config)
    cos, sin = rotary(torch.zeros(1, dtype=torch.float64), positions[None])
    return cos[0].double(), sin[0].double()


def kvpress_scores(pre_rope_q, keys, values, config, n_future=512, n_sink=SINKS):
    """kvpress 0.5's ExpectedAttentionPress.score, from its definition: pre_rope_q [Hq, m, d] (the
    queries whose statistics model the future ones), keys [Hkv, n, d] post-RoPE, values; the
    sinks' scores are left out (kvpress pads them with the maximum)."""
    q = pre_rope_q.double()
    hq, _, d = q.shape
    n = keys.shape[1]
    mean = q.mean(1)  # [Hq, d]
    centred = q - mean[:, None]
    cov = centred.transpose(1, 2) @ centred / q.shape[1]  # [Hq, d, d]
    cos, sin = transformers_rope(config, torch.arange(n, n + n_future))
    eye = torch.eye(d, dtype=torch.float64)
    rotate = torch.zeros(d, d, dtype=torch.float64)
    rotate[d // 2 :, : d // 2] = torch.eye(d // 2)
    rotate[: d // 2, d // 2 :] = -torch.eye(d // 2)
    rotation = (cos[:, :, None] * eye + sin[:, :, None] * rotate).mean(0)
    mean = mean @ rotation.T
    cov = rotation @ cov @ rotation.T
    k = keys.double()[:, n_sink:]
    v = values.double()[:, n_sink:]
    group = hq // keys.shape[0]
    scores = torch.zeros(hq, n - n_sink, dtype=torch.float64)
    for h in range(hq):  # repeat_kv: query head h reads KV head h // group
        kh = k[h // group]
        for j in range(kh.shape[0]):
            scores[h, j] = mean[h] @ kh[j] / math.sqrt(d) + kh[j] @ cov[h] @ kh[j] / d / 2
    probs = scores.softmax(-1).view(keys.shape[0], group, -1).mean(1)
    return probs * v.norm(dim=-1)


def observation(seed: int, config):
    """A prompt of N tokens: the last WINDOW queries (pre-RoPE, with a mean and a spread that
    differ per head), rotated at their positions by transformers' RoPE; keys and values."""
    generator = torch.Generator().manual_seed(seed)
    shift = torch.randn(Q_HEADS, 1, DIM, generator=generator) * 2
    spread = torch.rand(Q_HEADS, 1, DIM, generator=generator) * 2 + 0.2
    pre_rope = torch.randn(Q_HEADS, WINDOW, DIM, generator=generator) * spread + shift
    positions = torch.arange(N - WINDOW, N)
    cos, sin = transformers_rope(config, positions)
    post_rope = (pre_rope.double() * cos + rotate_half(pre_rope.double()) * sin).float()
    keys = torch.randn(KV_HEADS, N, DIM, generator=generator)
    values = (
        torch.randn(KV_HEADS, N, DIM, generator=generator)
        * torch.rand(KV_HEADS, N, 1, generator=generator)
        * 3
    )
    key_positions = torch.arange(N).expand(KV_HEADS, -1)
    candidates = (key_positions >= SINKS) & (key_positions < N - 8)
    obs = Observation(
        None,
        key_positions,
        candidates,
        torch.zeros(KV_HEADS, N),
        keys=keys,
        values=values,
        scale=DIM**-0.5,
        queries=post_rope.transpose(0, 1),  # [m, Hq, d], as the engine holds them
        query_positions=positions,
    )
    return obs, pre_rope


@pytest.mark.parametrize("seed", [0, 1])
def test_scores_equal_kvpress_formula_with_gqa(seed):
    config = llama_config()
    obs, pre_rope = observation(seed, config)
    policy = make_policy(
        KVPolicyConfig(policy="expected_attention", sinks=SINKS),
        rotary_frequencies_from_config(config),
    )
    ours = policy.score(obs)[:, SINKS:].double()
    reference = kvpress_scores(pre_rope, obs.keys, obs.values, config)
    torch.testing.assert_close(ours, reference, rtol=2e-4, atol=1e-7)
    # The same kept set as kvpress's top-k over the candidates.
    k = 30
    kept = policy.select(obs, k)
    expected = reference.masked_fill(~obs.candidates[:, SINKS:], -1.0).topk(k, -1).indices + SINKS
    assert torch.equal(kept.nonzero()[:, 1].view(KV_HEADS, k), expected.sort(-1).values)


def test_scores_depend_on_the_rotary_frequencies_and_the_query_positions():
    """The comparison above can fail: other frequencies, or each query de-rotated at another
    query's position, give other scores. (Shifting every position by the same amount changes
    nothing: de-rotation and the future rotation shift by the same angle, and rotations commute.)"""
    config = llama_config()
    obs, pre_rope = observation(0, config)
    reference = kvpress_scores(pre_rope, obs.keys, obs.values, config)
    settings = KVPolicyConfig(policy="expected_attention", sinks=SINKS)
    wrong = make_policy(settings, rotary_frequencies_from_config(llama_config(rope_theta=5000.0)))
    assert not torch.allclose(wrong.score(obs)[:, SINKS:].double(), reference, rtol=1e-2)
    right = make_policy(settings, rotary_frequencies_from_config(config))
    shifted = dataclasses.replace(obs, query_positions=obs.query_positions - 7)
    torch.testing.assert_close(
        right.score(shifted)[:, SINKS:].double(), reference, rtol=2e-4, atol=1e-7
    )
    swapped = dataclasses.replace(obs, query_positions=obs.query_positions.roll(1))
    assert not torch.allclose(right.score(swapped)[:, SINKS:].double(), reference, rtol=1e-2)


def test_rotary_frequencies_match_transformers():
    for config in (
        llama_config(),
        llama_config(rope_type="linear", factor=4.0),
        PhiConfig(hidden_size=64, num_attention_heads=4, partial_rotary_factor=0.5),
    ):
        rotary = (PhiRotaryEmbedding if isinstance(config, PhiConfig) else LlamaRotaryEmbedding)(
            config
        )
        assert rotary.attention_scaling == 1.0
        ours = torch.tensor(rotary_frequencies_from_config(config), dtype=torch.float32)
        torch.testing.assert_close(ours, rotary.inv_freq.float())


@pytest.mark.parametrize(
    "rope, message",
    [
        (
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            "'llama3' is not handled",
        ),
        ({"rope_type": "yarn", "factor": 4.0}, "'yarn' is not handled"),
        ({"mrope_section": [2, 3, 3]}, "mrope_section"),
    ],
)
def test_unhandled_rope_is_refused_at_start_up_naming_the_policy(rope, message):
    from retentivekv_vllm.engine.settings import policy_from_vllm_config, rotary_refusal

    config = llama_config(**rope)
    with pytest.raises(UnsupportedRotary, match=message):
        rotary_frequencies_from_config(config)
    vllm_config = SimpleNamespace(
        model_config=SimpleNamespace(hf_config=config),
        additional_config={"kv_policy": "expected_attention"},
    )
    refusal = rotary_refusal(KVPolicyConfig(policy="expected_attention"), vllm_config)
    assert refusal.startswith("--kv-policy expected_attention needs plain rotary")
    assert message in refusal
    # Other policies run on such models (their policy just has no frequencies).
    assert rotary_refusal(KVPolicyConfig(policy="snapkv"), vllm_config) is None
    assert policy_from_vllm_config(vllm_config).rotary is None


def test_without_queries_or_frequencies_names_the_policy():
    config = llama_config()
    obs, _ = observation(0, config)
    settings = KVPolicyConfig(policy="expected_attention")
    bare = Observation(obs.probs, obs.positions, obs.candidates, obs.accumulated, keys=obs.keys)
    policy = make_policy(settings, rotary_frequencies_from_config(config))
    with pytest.raises(ValueError, match="--kv-policy expected_attention"):
        policy.score(bare)
    with pytest.raises(ValueError, match="--kv-policy expected_attention needs the model's rotary"):
        make_policy(settings).score(obs)
