"""`--kv-feature-map learned --kv-maps FILE` in a real vLLM engine (in-process, tiny Llama, fp32,
greedy): maps fitted by the calibration command serve, and start-up refuses maps fitted for
another model, naming what differs."""

import gc

import pytest
import torch
from vllm import LLM, SamplingParams

from retentivekv_vllm import calibrate
from retentivekv_vllm.config import KVPolicyConfig
from retentivekv_vllm.fixtures import build_tiny_model

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
    return {
        "kv_policy": "retentive",
        "kv_budget": 0.2,
        "kv_feature_map": "learned",
        "kv_maps": maps_file,
        **knobs,
    }


def test_learned_maps_serve_what_the_reference_generates(model_dir, maps_file):
    """At 0.2 the engine folds each prompt into states of the file's per-layer maps and
    generates what a transformers run of the same policy generates; the state changes the
    answer of at least one prompt (else the comparison would not see the maps)."""
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 2000, (n,), generator=generator).tolist() for n in (300, 180)]
    config = learned(maps_file)
    llm = LLM(model=model_dir, additional_config=config, enable_prefix_caching=False, **ENGINE)
    try:
        outputs = llm.generate(
            [{"prompt_token_ids": ids} for ids in prompts],
            SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
            use_tqdm=False,
        )
    finally:
        del llm
        gc.collect()
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    kv = KVPolicyConfig.from_additional_config(config)
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
