"""KVPolicyConfig and the --kv-* flags, without an engine."""

import argparse
import dataclasses
import math

import pytest

from retentivekv_vllm.cli import add_kv_arguments, merge_kv_arguments
from retentivekv_vllm.config import ConfigError, KVPolicyConfig, RequestConfigError, request_config


def parse(**extra):
    return KVPolicyConfig.from_additional_config({f"kv_{k}": v for k, v in extra.items()})


def test_no_policy_means_inactive():
    assert KVPolicyConfig.from_additional_config(None) is None
    assert KVPolicyConfig.from_additional_config({"other_plugin": 1}) is None


@pytest.mark.parametrize(
    "budget, prompt, expected",
    [
        (0.2, 300, 60),
        (0.2, 7, 2),
        (1.0, 300, 300),
        (1, 300, 300),
        (2048, 300, 2048),
        ("512", 9000, 512),
    ],
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
    assert (config.budget, config.sinks, config.window, config.retentive.feature_map) == (
        0.2,
        4,
        32,
        "auto",
    )
    # Without a maps file retentive keeps no state (docs/results.md, sections 8 and 9).
    assert config.retentive.state_feature_map is None and not config.keeps_state


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
        ({"policy": "retentive", "request_overrides": "maybe"}, "--kv-request-overrides"),
        ({"request_overrides": "deny"}, "--kv-policy"),
        ({"budget": 0.5}, "--kv-policy"),
        ({"policy": "retentive", "bogus": 1}, "kv_bogus"),
    ],
)
def test_bad_values_name_the_option(extra, option):
    with pytest.raises(ConfigError, match=option):
        parse(**extra)


def test_lambda_key_and_round_trip():
    config = parse(policy="retentive", **{"lambda": 0.25})
    assert config.retentive.lambda_ == 0.25
    assert KVPolicyConfig.from_additional_config(config.to_additional_config()) == config


def flags_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--additional-config", type=dict, default={})
    add_kv_arguments(parser)
    return parser


def test_flags_land_in_additional_config():
    args = flags_parser().parse_args(
        ["--kv-policy", "h2o", "--kv-budget", "0.5", "--kv-lambda", "0.3"]
    )
    merge_kv_arguments(args)
    assert args.additional_config == {"kv_policy": "h2o", "kv_budget": "0.5", "kv_lambda": "0.3"}
    config = KVPolicyConfig.from_additional_config(args.additional_config)
    assert (config.policy, config.budget, config.retentive.lambda_) == ("h2o", 0.5, 0.3)


def test_every_knob_has_a_flag():
    parser = flags_parser()
    for knob in KVPolicyConfig.knobs():
        flag = "--" + KVPolicyConfig.key(knob).replace("_", "-")
        assert flag in parser._option_string_actions


def test_the_maps_flag_alone_turns_on_the_learned_state():
    from retentivekv_vllm.learned_maps import SHIPPED_MAPS_DIR

    maps = str(SHIPPED_MAPS_DIR / "recall.safetensors")
    args = flags_parser().parse_args(["--kv-policy", "retentive", "--kv-maps", maps])
    merge_kv_arguments(args)
    config = KVPolicyConfig.from_additional_config(args.additional_config)
    assert config.retentive.feature_map == "auto"
    assert config.retentive.state_feature_map == "learned" and config.keeps_state


def test_flag_conflicting_with_additional_config_is_refused():
    args = flags_parser().parse_args(["--kv-policy", "h2o"])
    args.additional_config = {"kv_policy": "snapkv"}
    with pytest.raises(ConfigError, match="--kv-policy"):
        merge_kv_arguments(args)


def test_the_flag_reference_documents_every_flag():
    import pathlib

    reference = (pathlib.Path(__file__).parents[1] / "docs" / "flags.md").read_text()
    for knob in KVPolicyConfig.knobs():
        assert "`--" + KVPolicyConfig.key(knob).replace("_", "-") in reference


def test_a_request_may_choose_its_policy_and_budget():
    server = parse(policy="retentive", budget=0.2)
    assert request_config(server, None) is server
    assert request_config(server, {"session_id": "abc"}) is server
    own = request_config(server, {"kv_policy": "H2O", "kv_budget": "0.5"})
    assert own == dataclasses.replace(server, policy="h2o", budget=0.5)
    assert request_config(server, {"kv_budget": 300}).budget_tokens(5000) == 300


@pytest.mark.parametrize(
    "server, extra_args, field",
    [
        ({"policy": "retentive"}, {"kv_budget": 1.5}, "vllm_xargs.kv_budget"),
        ({"policy": "retentive"}, {"kv_budget": [0.5]}, "vllm_xargs.kv_budget"),
        ({"policy": "retentive"}, {"kv_policy": "nope"}, "vllm_xargs.kv_policy"),
        ({"policy": "retentive"}, {"kv_window": 8}, "vllm_xargs.kv_window"),
        # States are reserved at start-up only for a server whose policy keeps them.
        (
            {"policy": "streaming", "feature_map": "prf"},
            {"kv_policy": "retentive"},
            "vllm_xargs.kv_policy",
        ),
        ({"policy": "retentive", "states": "none"}, {"kv_policy": "retentive"}, None),
        (None, {"kv_budget": 0.5}, "vllm_xargs.kv_budget"),
        # A server that denies overrides refuses them, even values it would accept.
        (
            {"policy": "retentive", "request_overrides": "deny"},
            {"kv_budget": 0.5},
            "vllm_xargs.kv_budget",
        ),
        (
            {"policy": "retentive", "request_overrides": "deny"},
            {"kv_policy": "h2o"},
            "vllm_xargs.kv_policy",
        ),
        ({"policy": "retentive", "request_overrides": "deny"}, {"session_id": "abc"}, None),
    ],
)
def test_bad_request_settings_name_the_field(server, extra_args, field):
    server_config = None if server is None else parse(**server)
    if field is None:
        assert request_config(server_config, extra_args) == server_config
        return
    with pytest.raises(RequestConfigError) as refused:
        request_config(server_config, extra_args)
    assert refused.value.field == field and str(refused.value).startswith(field)
    if (server or {}).get("request_overrides") == "deny":
        assert "--kv-request-overrides" in str(refused.value)


def test_a_request_may_choose_retentive_without_states_on_a_server_without_them():
    """Without a maps file or feature map retentive keeps no state, so a server that reserved
    none may run it."""
    server = parse(policy="streaming")
    own = request_config(server, {"kv_policy": "retentive"})
    assert own.policy == "retentive" and not own.keeps_state


def test_request_overrides_default_to_allow():
    assert parse(policy="retentive").request_overrides == "allow"
    assert parse(policy="retentive", request_overrides=" DENY ").request_overrides == "deny"


def test_only_retentive_with_a_feature_map_and_states_keeps_state():
    """retentive keeps states with a feature map in use (a maps file, or prf or elu asked for)
    and --kv-states other than none; without a maps file it keeps none."""
    from retentivekv_vllm.learned_maps import SHIPPED_MAPS_DIR
    from retentivekv_vllm.policies import POLICIES, make_policy

    maps = str(SHIPPED_MAPS_DIR / "recall.safetensors")
    feature_maps = [
        ({}, False),
        ({"maps": maps}, True),
        ({"feature_map": "learned", "maps": maps}, True),
        ({"feature_map": "prf"}, True),
        ({"feature_map": "elu"}, True),
    ]
    for policy in POLICIES:
        for states in ("dual", "single", "none"):
            for knobs, feature_map_in_use in feature_maps:
                config = KVPolicyConfig.from_knobs(policy=policy, states=states, **knobs)
                config.validate()
                expected = policy == "retentive" and feature_map_in_use and states != "none"
                assert config.keeps_state == make_policy(config).keeps_state == expected


def test_every_knob_has_its_own_flat_name():
    """A policy's own settings share the flat flag namespace with the common ones."""
    keys = [KVPolicyConfig.key(knob) for knob in KVPolicyConfig.knobs()]
    assert len(keys) == len(set(keys)), keys
    assert "kv_lambda" in keys and "kv_retentive" not in keys


def test_the_policies_import_no_settings():
    """The settings import the policies (for their names and own settings), never the reverse:
    no import cycle."""
    import subprocess
    import sys

    code = (
        "import sys, retentivekv_vllm.policies; "
        "print(sorted(m for m in sys.modules if m.startswith('retentivekv_vllm.config')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
