"""KVPolicyConfig and the --kv-* flags, without an engine."""

import argparse
import math

import pytest

from retentivekv_vllm.config import ConfigError, KVPolicyConfig
from retentivekv_vllm.engine.cli import add_kv_arguments, merge_kv_arguments


def parse(**extra):
    return KVPolicyConfig.from_additional_config({f"kv_{k}": v for k, v in extra.items()})


def test_no_policy_means_inactive():
    assert KVPolicyConfig.from_additional_config(None) is None
    assert KVPolicyConfig.from_additional_config({"other_plugin": 1}) is None


@pytest.mark.parametrize(
    "budget, prompt, expected",
    [(0.2, 300, 60), (0.2, 7, 2), (1.0, 300, 300), (1, 300, 300), (2048, 300, 2048), ("512", 9000, 512)],
)
def test_budget_is_a_ratio_or_a_token_count(budget, prompt, expected):
    config = parse(policy="retentive", budget=budget)
    assert config.budget_tokens(prompt) == expected
    assert config.budget_is_ratio == (float(budget) <= 1)
    if config.budget_is_ratio:
        assert expected == math.ceil(float(budget) * prompt)


def test_defaults_and_spelling():
    config = parse(policy=" Retentive ")
    assert config == KVPolicyConfig(policy="retentive")
    assert (config.budget, config.sinks, config.window, config.feature_map) == (0.2, 4, 32, "prf")


@pytest.mark.parametrize(
    "extra, option",
    [
        ({"policy": "nope"}, "--kv-policy"),
        ({"policy": "retentive", "budget": 1.5}, "--kv-budget"),
        ({"policy": "retentive", "budget": -0.1}, "--kv-budget"),
        ({"policy": "retentive", "budget": "lots"}, "--kv-budget"),
        ({"policy": "retentive", "budget": True}, "--kv-budget"),
        ({"policy": "retentive", "sinks": -1}, "--kv-sinks"),
        ({"policy": "retentive", "window": 2.5}, "--kv-window"),
        ({"policy": "retentive", "observation_window": 0}, "--kv-observation-window"),
        ({"policy": "retentive", "lambda": 1.5}, "--kv-lambda"),
        ({"policy": "retentive", "pool_kernel": 2}, "--kv-pool-kernel"),
        ({"policy": "retentive", "feature_map": "cos"}, "--kv-feature-map"),
        ({"policy": "retentive", "state_rank": 0}, "--kv-state-rank"),
        ({"policy": "retentive", "gamma0": 0}, "--kv-gamma0"),
        ({"policy": "retentive", "absorption_min": 3}, "--kv-absorption-min"),
        ({"policy": "retentive", "decode_interval": 0}, "--kv-decode-interval"),
        ({"budget": 0.5}, "--kv-policy"),
        ({"policy": "retentive", "bogus": 1}, "kv_bogus"),
    ],
)
def test_bad_values_name_the_option(extra, option):
    with pytest.raises(ConfigError, match=option):
        parse(**extra)


def test_lambda_key_and_round_trip():
    config = parse(policy="retentive", **{"lambda": 0.25})
    assert config.lambda_ == 0.25
    assert KVPolicyConfig.from_additional_config(config.to_additional_config()) == config


def flags_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--additional-config", type=dict, default={})
    add_kv_arguments(parser)
    return parser


def test_flags_land_in_additional_config():
    args = flags_parser().parse_args(["--kv-policy", "h2o", "--kv-budget", "0.5", "--kv-lambda", "0.3"])
    merge_kv_arguments(args)
    assert args.additional_config == {"kv_policy": "h2o", "kv_budget": "0.5", "kv_lambda": "0.3"}
    config = KVPolicyConfig.from_additional_config(args.additional_config)
    assert (config.policy, config.budget, config.lambda_) == ("h2o", 0.5, 0.3)


def test_every_knob_has_a_flag():
    parser = flags_parser()
    for knob in KVPolicyConfig.knobs():
        flag = "--" + KVPolicyConfig.key(knob).replace("_", "-")
        assert flag in parser._option_string_actions


def test_flag_conflicting_with_additional_config_is_refused():
    args = flags_parser().parse_args(["--kv-policy", "h2o"])
    args.additional_config = {"kv_policy": "snapkv"}
    with pytest.raises(ConfigError, match="--kv-policy"):
        merge_kv_arguments(args)


def test_readme_documents_every_flag():
    import pathlib

    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    for knob in KVPolicyConfig.knobs():
        assert "--" + KVPolicyConfig.key(knob).replace("_", "-") in readme
