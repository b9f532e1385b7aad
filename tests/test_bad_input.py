"""The bad-input matrix: every invalid --kv-* value and every engine option the policies cannot
serve is refused before the engine starts, with a message naming the option.

Each row runs what `vllm serve` runs up to the engine: vLLM's own serve parser, then
`AsyncEngineArgs.from_cli_args(...).create_engine_config()` (where the plugin validates), in this
process and without loading weights.  `tests/server/test_server.py` checks that the real command
exits the same way.
"""

from __future__ import annotations

import json
import shutil

import pytest

from retentivekv_vllm.config import KVPolicyConfig
from retentivekv_vllm.fixtures import TOKENIZER_DIR, model_config

ENGINE_FLAGS = (
    "--dtype",
    "float32",
    "--enforce-eager",
    "--max-model-len",
    "2048",
    "--kv-cache-memory-bytes",
    str(64 * 2**20),
)
POLICY = ("--kv-policy", "retentive")

# Config-only model directories (the engine config reads config.json and the tokenizer).
MODELS = {
    "llama": model_config("llama"),
    "sliding-window": model_config("llama", sliding_window=128),
    "head-size-48": model_config("llama", head_dim=48),
    "mla": {
        **model_config("llama"),
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "kv_lora_rank": 64,
        "q_lora_rank": None,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 32,
        "v_head_dim": 64,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "n_shared_experts": 1,
        "first_k_dense_replace": 4,
    },
}

# (id, model, flags, text the message must contain: the option it names)
BAD_FLAG_VALUES = [
    ("policy-unknown", "llama", ("--kv-policy", "nope"), "--kv-policy"),
    ("budget-over-one", "llama", (*POLICY, "--kv-budget", "1.5"), "--kv-budget"),
    ("budget-zero", "llama", (*POLICY, "--kv-budget", "0"), "--kv-budget"),
    ("budget-negative", "llama", (*POLICY, "--kv-budget", "-3"), "--kv-budget"),
    ("budget-text", "llama", (*POLICY, "--kv-budget", "lots"), "--kv-budget"),
    ("budget-infinite", "llama", (*POLICY, "--kv-budget", "inf"), "--kv-budget"),
    ("budget-nan", "llama", (*POLICY, "--kv-budget", "nan"), "--kv-budget"),
    ("budget-overflows-a-float", "llama", (*POLICY, "--kv-budget", "1e309"), "--kv-budget"),
    ("budget-huge", "llama", (*POLICY, "--kv-budget", "1e20"), "--kv-budget"),
    ("budget-over-model-length", "llama", (*POLICY, "--kv-budget", "4096"), "--kv-budget"),
    ("budget-under-sinks-and-window", "llama", (*POLICY, "--kv-budget", "30"), "--kv-budget"),
    ("sinks-over-model-length", "llama", (*POLICY, "--kv-sinks", "5000"), "--kv-sinks"),
    ("sinks-huge", "llama", (*POLICY, "--kv-sinks", "1e300"), "--kv-sinks"),
    ("sinks-negative", "llama", (*POLICY, "--kv-sinks", "-1"), "--kv-sinks"),
    ("sinks-fraction", "llama", (*POLICY, "--kv-sinks", "2.5"), "--kv-sinks"),
    ("window-negative", "llama", (*POLICY, "--kv-window", "-1"), "--kv-window"),
    (
        "observation-window-zero",
        "llama",
        (*POLICY, "--kv-observation-window", "0"),
        "--kv-observation-window",
    ),
    ("lambda-over-one", "llama", (*POLICY, "--kv-lambda", "1.5"), "--kv-lambda"),
    ("pool-kernel-even", "llama", (*POLICY, "--kv-pool-kernel", "4"), "--kv-pool-kernel"),
    ("pool-kernel-zero", "llama", (*POLICY, "--kv-pool-kernel", "0"), "--kv-pool-kernel"),
    ("feature-map-unknown", "llama", (*POLICY, "--kv-feature-map", "cos"), "--kv-feature-map"),
    (
        "maps-missing-file",
        "llama",
        (*POLICY, "--kv-maps", "no-such-maps.safetensors"),
        "--kv-maps",
    ),
    (
        "maps-with-prf",
        "llama",
        (*POLICY, "--kv-feature-map", "prf", "--kv-maps", "maps.safetensors"),
        "--kv-maps",
    ),
    ("learned-without-maps", "llama", (*POLICY, "--kv-feature-map", "learned"), "--kv-maps"),
    ("state-rank-zero", "llama", (*POLICY, "--kv-state-rank", "0"), "--kv-state-rank"),
    ("gamma0-zero", "llama", (*POLICY, "--kv-gamma0", "0"), "--kv-gamma0"),
    ("gamma0-over-one", "llama", (*POLICY, "--kv-gamma0", "1.5"), "--kv-gamma0"),
    (
        "absorption-min-over-max",
        "llama",
        (*POLICY, "--kv-absorption-min", "3"),
        "--kv-absorption-min",
    ),
    (
        "absorption-max-under-min",
        "llama",
        (*POLICY, "--kv-absorption-max", "0.1"),
        "--kv-absorption-max",
    ),
    (
        "decode-interval-zero",
        "llama",
        (*POLICY, "--kv-decode-interval", "0"),
        "--kv-decode-interval",
    ),
    ("seed-text", "llama", (*POLICY, "--kv-seed", "abc"), "--kv-seed"),
    (
        "recall-weight-negative",
        "llama",
        (*POLICY, "--kv-recall-weight", "-1"),
        "--kv-recall-weight",
    ),
    (
        # The term reads the state's feature map; without a maps file retentive has none.
        "recall-weight-without-a-state",
        "llama",
        (*POLICY, "--kv-recall-weight", "1"),
        "--kv-recall-weight",
    ),
    ("states-unknown", "llama", (*POLICY, "--kv-states", "many"), "--kv-states"),
    ("state-query-unknown", "llama", (*POLICY, "--kv-state-query", "key"), "--kv-state-query"),
    (
        "state-readout-unknown",
        "llama",
        (*POLICY, "--kv-state-readout", "exact"),
        "--kv-state-readout",
    ),
    (
        "state-log-gain-infinite",
        "llama",
        (*POLICY, "--kv-state-log-gain", "inf"),
        "--kv-state-log-gain",
    ),
    (
        "request-overrides-unknown",
        "llama",
        (*POLICY, "--kv-request-overrides", "maybe"),
        "--kv-request-overrides",
    ),
    ("option-unknown", "llama", (*POLICY, "--additional-config.kv_bogus", "1"), "kv_bogus"),
    ("option-without-policy", "llama", ("--kv-budget", "0.5"), "--kv-policy"),
    (
        "flag-conflicts-with-additional-config",
        "llama",
        ("--kv-policy", "h2o", "--additional-config.kv_policy", "snapkv"),
        "--kv-policy",
    ),
]

UNSUPPORTED_COMBINATIONS = [
    ("prefix-caching", "llama", (*POLICY, "--enable-prefix-caching"), "--no-enable-prefix-caching"),
    ("fp8-kv-cache", "llama", (*POLICY, "--kv-cache-dtype", "fp8"), "--kv-cache-dtype"),
    (
        "speculative-decoding",
        "llama",
        (
            *POLICY,
            "--speculative-config",
            json.dumps({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}),
        ),
        "--speculative-config",
    ),
    (
        "pipeline-parallel",
        "llama",
        (*POLICY, "--pipeline-parallel-size", "2"),
        "--pipeline-parallel-size",
    ),
    (
        "kv-connector",
        "llama",
        (
            *POLICY,
            "--kv-transfer-config",
            json.dumps({"kv_connector": "ExampleConnector", "kv_role": "kv_both"}),
        ),
        "--kv-transfer-config",
    ),
    ("sliding-window-model", "sliding-window", POLICY, "sliding-window models"),
    ("mla-model", "mla", POLICY, "MLA models"),
    ("head-size", "head-size-48", POLICY, "head size 48"),
    (
        "states-outgrow-kv-memory",
        "llama",
        (
            *POLICY,
            "--kv-feature-map",
            "prf",
            "--max-num-seqs",
            "256",
            "--kv-cache-memory-bytes",
            str(8 * 2**20),
        ),
        "--max-num-seqs",
    ),
]

MATRIX = BAD_FLAG_VALUES + UNSUPPORTED_COMBINATIONS


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("config-only-models")
    for name, config in MODELS.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(config))
        for tokenizer_file in TOKENIZER_DIR.glob("*.json"):
            shutil.copy(tokenizer_file, root / name / tokenizer_file.name)
    return root


def start_up(model_dir, flags) -> None:
    """`vllm serve MODEL FLAGS` up to the engine: parse, then build the engine config."""
    import vllm
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    serve = ServeSubcommand()
    parser = FlexibleArgumentParser(prog="vllm")
    serve.subparser_init(parser.add_subparsers())
    args = parser.parse_args(["serve", str(model_dir), *ENGINE_FLAGS, *flags])
    args.model = args.model_tag
    serve.validate(args)
    vllm.AsyncEngineArgs.from_cli_args(args).create_engine_config()


@pytest.fixture(scope="module", autouse=True)
def offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


def test_a_valid_start_up_passes(model_dirs):
    """The baseline of the matrix: the same start-up without the bad input succeeds."""
    start_up(model_dirs / "llama", (*POLICY, "--kv-budget", "0.3"))
    # Without a state nothing is reserved: the memory that states would outgrow is enough.
    start_up(
        model_dirs / "llama",
        (*POLICY, "--max-num-seqs", "256", "--kv-cache-memory-bytes", str(8 * 2**20)),
    )


@pytest.mark.parametrize(
    "model, flags, option", [row[1:] for row in MATRIX], ids=[row[0] for row in MATRIX]
)
def test_start_up_refuses_naming_the_option(model_dirs, model, flags, option):
    with pytest.raises((ValueError, SystemExit)) as refused:
        start_up(model_dirs / model, flags)
    assert option in str(refused.value), str(refused.value)


@pytest.mark.parametrize("model", ["sliding-window", "mla", "head-size-48"])
def test_refused_models_start_without_a_policy(model_dirs, model):
    """The models refused under a policy pass vLLM's own start-up checks: the refusal is the
    plugin's."""
    start_up(model_dirs / model, ())


def test_the_matrix_covers_every_flag():
    flags = {"--" + KVPolicyConfig.key(knob).replace("_", "-") for knob in KVPolicyConfig.knobs()}
    covered = {option for *_, option in BAD_FLAG_VALUES}
    assert flags <= covered, sorted(flags - covered)
