import math

import pytest
import torch
import torch.nn.functional as F

from retentivekv_vllm.core import FEATURE_MAPS, EluPlusOne, PositiveRandomFeatures, make_feature_map


def test_registry_rejects_unknown_name():
    with pytest.raises(ValueError, match=r"'bogus'.*elu.*prf"):
        make_feature_map("bogus", head_dim=8, rank=16, scale=0.1)


def test_registry_builds_each_map():
    assert set(FEATURE_MAPS) == {"elu", "prf"}
    elu = make_feature_map("elu", head_dim=8, rank=999, scale=0.1)
    assert isinstance(elu, EluPlusOne) and elu.rank == 8
    prf = make_feature_map("prf", head_dim=8, rank=16, scale=0.1, seed=3)
    assert isinstance(prf, PositiveRandomFeatures) and prf.rank == 16
    assert prf.features(torch.randn(5, 8)).shape == (5, 16)


def test_elu_log_features_are_log_of_elu_plus_one():
    x = torch.linspace(-30, 30, 101)
    torch.testing.assert_close(EluPlusOne(101).features(x), F.elu(x) + 1)
    assert torch.isfinite(EluPlusOne(1).log_features(torch.tensor([-1e4]))).all()


def test_prf_weights_are_fixed_by_seed():
    a, b, c = (PositiveRandomFeatures(8, 32, 0.1, seed) for seed in (5, 5, 6))
    assert torch.equal(a.weight, b.weight) and not torch.equal(a.weight, c.weight)


def test_prf_kernel_estimate_is_unbiased_within_three_standard_errors():
    # φ(q)·φ(k) = mean over the r rows w of W of X_w = exp(w·(q̃+k̃) − ‖q̃‖²/2 − ‖k̃‖²/2), with
    # E[X_w] = exp(scale·q·k).
    # Dividing by the exact kernel and averaging over pairs gives one value Y_w per row of W; the
    # Y_w are i.i.d.
    # with mean 1, so their sample mean lies within 3 standard errors (std(Y)/√r) of 1 with
    # probability ≈ 99.7%.
    d, r, pairs = 16, 4096, 256
    scale = d**-0.5
    feature_map = PositiveRandomFeatures(d, r, scale, seed=0)
    gen = torch.Generator().manual_seed(1)  # not W's seed, else q would copy rows of W
    # Moderate norms keep the log-normal samples light-tailed enough for the sample std to be
    # reliable.
    q, k = 0.5 * torch.randn(pairs, d, generator=gen), 0.5 * torch.randn(pairs, d, generator=gen)
    samples = (r * feature_map.features(q) * feature_map.features(k)).double()  # [pairs, r]
    exact = torch.exp(scale * (q.double() * k.double()).sum(-1))
    torch.testing.assert_close(
        samples.mean(-1), (feature_map.features(q) * feature_map.features(k)).sum(-1).double()
    )
    per_row = (samples / exact[:, None]).mean(0)
    standard_error = per_row.std() / math.sqrt(r)
    assert abs(per_row.mean() - 1) < 3 * standard_error
    assert 3 * standard_error < 0.05  # the bound is tight enough to catch a 5% bias


def test_retentive_builds_the_readout_its_knobs_ask_for():
    from retentivekv_vllm.config import KVPolicyConfig
    from retentivekv_vllm.core import FixedQuery, PositiveRandomFeatures, ScaledReadout
    from retentivekv_vllm.policies import make_policy

    def built(**knobs):
        config = KVPolicyConfig.from_additional_config(
            {"kv_policy": "retentive", "kv_feature_map": "prf", **knobs}
        )
        return make_policy(config).feature_map(16, 0.25)

    assert isinstance(built(), PositiveRandomFeatures)
    scaled = built(kv_state_readout="normalised", kv_state_log_gain=3.0)
    assert isinstance(scaled, ScaledReadout) and scaled.normalise and scaled.log_gain == 3.0
    gained = built(kv_state_log_gain=-2.0, kv_state_query="fixed")
    assert isinstance(gained, ScaledReadout) and not gained.normalise
    assert isinstance(gained.inner, FixedQuery)


def test_derotate_undoes_the_models_rotary_embedding():
    """`derotate` against transformers' own RoPE (Llama's rotate-half form, as vLLM's neox style
    stores keys): rotating at a position and de-rotating there gives the vector back; the dims
    past the rotary part pass unchanged."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from retentivekv_vllm.core.feature_maps import derotate

    config = LlamaConfig(hidden_size=128, num_attention_heads=2, rope_theta=10000.0)
    rotary = LlamaRotaryEmbedding(config)
    positions = torch.arange(0, 3000, 7)
    cos, sin = rotary(torch.zeros(1, len(positions), 1), positions[None])
    x = torch.randn(1, 3, len(positions), 64, generator=torch.Generator().manual_seed(0))
    rotated, _ = apply_rotary_pos_emb(x, x, cos, sin)
    assert not torch.allclose(rotated, x, atol=1e-2)
    back = derotate(rotated, positions, rotary.inv_freq)
    torch.testing.assert_close(back, x, atol=1e-4, rtol=1e-4)
    # Partial rotary: only the first 2·len(inv_freq) dims are rotated.
    wide = torch.cat([rotated, x], -1)
    torch.testing.assert_close(
        derotate(wide, positions, rotary.inv_freq), torch.cat([x, x], -1), atol=1e-4, rtol=1e-4
    )
