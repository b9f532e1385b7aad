"""`--kv-maps FILE` in a real vLLM engine (in-process, tiny Llama, fp32, greedy): the maps file
alone turns on the learned state (`--kv-feature-map auto`, the default, is `learned` with a maps
file), maps fitted by the calibration command serve, and start-up refuses maps fitted for another
model, naming what differs."""

import gc

import pytest
import torch
from vllm import LLM, SamplingParams

from retentivekv_vllm import calibrate
from retentivekv_vllm.config import KVPolicyConfig
from retentivekv_vllm.engine.worker import worker_stats
from retentivekv_vllm.fixtures import build_tiny_model
from retentivekv_vllm.fixtures.build import BASE_CONFIG
from retentivekv_vllm.learned_maps import load_maps

from ..test_calibrate import TINY_CALIBRATION
from .hf_reference import reference_greedy

ENGINE = dict(
    dtype="float32",
    enforce_eager=True,
    kv_cache_memory_bytes=64 * 2**20,
    max_model_len=2048,
    seed=0,
)
MAX_TOKENS = 16  # below the decode interval: only the prefill compression runs


@pytest.fixture(scope="module")
def maps_file(model_dir, tmp_path_factory):
    """Maps for the tiny model, fitted briefly by the command (held-out ratio about 0.6)."""
    out = tmp_path_factory.mktemp("maps") / "tiny.safetensors"
    argv = [model_dir, "--out", str(out), *TINY_CALIBRATION.split()]
    assert calibrate.main(argv) == 0
    return str(out)


def learned(maps_file, **knobs):
    """The maps file alone: no --kv-feature-map."""
    return {"kv_policy": "retentive", "kv_budget": 0.2, "kv_maps": maps_file, **knobs}


def test_learned_maps_serve_what_the_reference_generates(model_dir, maps_file):
    """At 0.2 the engine folds each prompt into states of the file's per-layer maps (the maps
    file alone asks for them) and generates what a transformers run of the same policy generates;
    the state changes the answer of at least one prompt (else the comparison would not see the
    maps)."""
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 2000, (n,), generator=generator).tolist() for n in (300, 180)]
    config = learned(maps_file)
    llm = LLM(model=model_dir, additional_config=config, enable_prefix_caching=False, **ENGINE)
    try:
        (before,) = llm.collective_rpc(worker_stats)
        outputs = llm.generate(
            [{"prompt_token_ids": ids} for ids in prompts],
            SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
            use_tqdm=False,
        )
        llm.llm_engine.step()  # finished requests are released in the worker at the next step
        (after,) = llm.collective_rpc(worker_stats)
    finally:
        del llm
        gc.collect()
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    # One learned state per layer and KV head, of the file's rank, float32 like the cache.
    c, rank = BASE_CONFIG, load_maps(maps_file).rank
    state_bytes = c["num_hidden_layers"] * c["num_key_value_heads"] * rank * (c["head_dim"] + 1) * 4
    new = [s for rid, s in after["finished"].items() if rid not in before["finished"]]
    assert [s["state_bytes"] for s in new] == [state_bytes] * len(prompts)
    kv = KVPolicyConfig.from_additional_config(config)
    assert kv.retentive.state_feature_map == "learned"
    no_state = KVPolicyConfig.from_additional_config(
        {"kv_policy": "retentive", "kv_budget": 0.2, "kv_states": "none"}
    )
    assert tokens == [reference_greedy(model_dir, ids, kv, MAX_TOKENS) for ids in prompts]
    assert tokens != [reference_greedy(model_dir, ids, no_state, MAX_TOKENS) for ids in prompts]


def test_maps_of_another_model_are_refused_at_start_up(model_dir, maps_file, tmp_path):
    reseeded = build_tiny_model(tmp_path / "reseeded", arch="llama", seed=5)
    with pytest.raises(ValueError, match=r"--kv-maps .*fitted for another model \(fingerprint"):
        LLM(model=str(reseeded), additional_config=learned(maps_file), **ENGINE)
    fewer_heads = build_tiny_model(tmp_path / "fewer", arch="llama", num_key_value_heads=1)
    with pytest.raises(ValueError, match=r"num_kv_heads: 2 in the file, 1 served"):
        LLM(model=str(fewer_heads), additional_config=learned(maps_file), **ENGINE)
