"""`expected_attention` served by vLLM (in-process, the tiny Llama): no compression is stock vLLM
token for token; compressing, the engine folds each prompt to its budget and generates what the
transformers reference does (which reads the rotary frequencies from the model's config, as the
engine does); a request may choose the policy on a server started with another one."""

import gc
import math

from vllm import SamplingParams

from retentivekv_vllm.config import KVPolicyConfig

from .hf_reference import reference_greedy
from .test_engine import MAX_TOKENS, generate, stock_tokens  # noqa: F401  (fixture)
from .test_request_overrides import make_llm

POLICY = {"kv_policy": "expected_attention"}


def test_budget_one_gives_stock_tokens(model_dir, prompts, stock_tokens):  # noqa: F811
    tokens, stats = generate(model_dir, prompts, {**POLICY, "kv_budget": 1.0})
    assert tokens == stock_tokens
    assert [s["tokens_folded"] for s in stats] == [0] * len(prompts)


def test_compressed_generation_matches_reference(model_dir, prompts):
    config = {**POLICY, "kv_budget": 0.2}
    tokens, stats = generate(model_dir, prompts, config)
    kv = KVPolicyConfig.from_additional_config(config)
    for ids, got, s in zip(prompts, tokens, stats):
        budget = math.ceil(0.2 * len(ids))
        assert s["tokens_folded"] == len(ids) - budget > 0
        assert s["kept_after_compression"] == budget
        assert s["state_elements"] == 0
        assert got == reference_greedy(model_dir, ids, kv, MAX_TOKENS)


def test_decoding_compresses_again(model_dir, prompts):
    """The queries of decode steps are the window of the compressions during decoding."""
    config = {**POLICY, "kv_budget": 64, "kv_decode_interval": 32}
    tokens, stats = generate(model_dir, prompts[1:2], config, max_tokens=180)
    (s,) = stats
    assert len(tokens[0]) == 180
    assert s["compressions"] >= 3  # the prompt's and two during decoding (128-token blocks)
    assert 64 <= s["tokens_kept"] < 64 + 128


def test_a_request_choosing_it_on_a_snapkv_server_generates_what_its_server_does(
    model_dir, prompts
):
    """The request's policy gets the frequencies the server read from the model (the server's own
    policy needs none)."""
    llm = make_llm(model_dir, {"kv_policy": "snapkv", "kv_budget": 0.2})
    try:
        tokens = {}
        for policy in ("snapkv", "expected_attention"):
            params = SamplingParams(
                temperature=0,
                max_tokens=MAX_TOKENS,
                ignore_eos=True,
                extra_args={"kv_policy": policy},
            )
            outputs = llm.generate(
                [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False
            )
            tokens[policy] = [list(o.outputs[0].token_ids) for o in outputs]
    finally:
        del llm
        gc.collect()
    own, _ = generate(model_dir, prompts, {**POLICY, "kv_budget": 0.2})
    assert tokens["expected_attention"] == own
    # On these prompts the two policies generate differently: the request's policy ran.
    assert tokens["expected_attention"] != tokens["snapkv"]
