"""The engine reads learned maps as calibration evaluates them: on the same q, k, v, the
executor's compression plus the merge with the policy's map for that layer gives calibration's
merged output (same folded tokens, same gates, same layer's map, same GQA grouping)."""

import pytest
import torch

from retentivekv_vllm import calibrate
from retentivekv_vllm.config import KVPolicyConfig
from retentivekv_vllm.core import LearnedFeatureMap, local_attention, merge_with_state_readouts
from retentivekv_vllm.engine.executor import compress_tensors, group_queries
from retentivekv_vllm.learned_maps import LearnedMaps, ModelIdentity
from retentivekv_vllm.policies import make_policy

HEADS, GROUP, DIM, LAYERS, PROMPT, SPAN = 2, 3, 16, 3, 96, 24


# Maps that read the vectors as cached, and maps that first undo RoPE at each token's position.
ROTARY = {"as cached": None, "de-rotated": 10000 ** -(torch.arange(0, DIM, 2) / DIM)}


@pytest.mark.parametrize("rotary", ROTARY, ids=list(ROTARY))
def test_engine_path_equals_calibrations_merged_output(tmp_path, rotary):
    maps = []
    for layer in range(LAYERS):  # a distinct, non-trivial map per layer
        m = LearnedFeatureMap.initial(
            HEADS, DIM, 8, key_scale=0.5, seed=layer, rope_inv_freq=ROTARY[rotary]
        )
        m.query_log_magnitude = 0.3 * torch.randn(HEADS, DIM)
        m.key_log_magnitude = 0.3 * torch.randn(HEADS, DIM)
        maps.append(m)
    identity = ModelIdentity("Tiny", LAYERS, HEADS * GROUP, HEADS, DIM, "0")
    path = tmp_path / "maps.safetensors"
    LearnedMaps(maps, identity, {}).save(path)
    engine = make_policy(
        KVPolicyConfig.from_additional_config(
            {"kv_policy": "retentive", "kv_feature_map": "learned", "kv_maps": str(path)}
        )
    )
    reference = make_policy(
        KVPolicyConfig.from_additional_config({"kv_policy": "retentive", "kv_states": "single"})
    )
    generator = torch.Generator().manual_seed(0)
    length, scale = PROMPT + SPAN, DIM**-0.5
    budget = engine.config.budget_tokens(PROMPT)
    for layer in range(LAYERS):
        q = 2 * torch.randn(HEADS * GROUP, length, DIM, generator=generator)
        k = 2 * torch.randn(HEADS, length, DIM, generator=generator)
        v = torch.randn(HEADS, length, DIM, generator=generator)
        positions = PROMPT + torch.arange(SPAN)
        example = calibrate.compression_example(reference, q, k, v, scale, PROMPT, positions)
        expected = calibrate.merged_output(maps[layer], calibrate.stack([example]))[0]

        slots, memory, _, kept = compress_tensors(
            engine,
            q[:, :PROMPT].transpose(0, 1),
            k[:, :PROMPT],
            v[:, :PROMPT],
            scale,
            budget,
            layer,
        )
        assert int((~kept).sum(1)[0]) == example.keys.shape[1]
        live = slice(PROMPT - budget, PROMPT)
        keys = torch.cat([slots.keys[:, live], k[:, PROMPT:]], 1)
        values = torch.cat([slots.values[:, live], v[:, PROMPT:]], 1)
        key_positions = torch.cat([memory.positions[:, live], positions.expand(HEADS, -1)], 1)
        rows = group_queries(q[:, PROMPT:].transpose(0, 1), HEADS)
        out, lse = local_attention(
            rows, keys, values, scale, positions.repeat(GROUP), key_positions
        )
        feature_map = engine.feature_map(DIM, scale, layer)
        merged = merge_with_state_readouts(
            out, lse, rows, memory.states, feature_map, q_positions=positions.repeat(GROUP)
        )
        assert not torch.allclose(merged, out, atol=1e-3)  # the state matters in this test
        torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
