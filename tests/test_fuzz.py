"""Fuzzing the settings a client or an operator can give, through the real validation functions.

Every value of every JSON type and extreme (and every string a flag can carry) is either accepted
with a finite, in-range meaning or refused with an error naming its field; nothing raises anything
else. The request path is run as the server runs it: the body decoded as Starlette decodes JSON
(NaN and Infinity included), vLLM's request model (with the plugin's patches), the extra_args it
hands on, then the plugin's check with the model's maximum length. The same properties against a
running `vllm serve` are in tests/server/test_fuzz_server.py (slow tier).
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retentivekv_vllm.config import (
    ConfigError,
    KVPolicyConfig,
    RequestConfigError,
    request_config,
)
from retentivekv_vllm.engine.patches import apply_process_patches

MAX_MODEL_LEN = 2048
SERVER = KVPolicyConfig(policy="retentive", budget=0.2)
# Deterministic in CI: the same examples each run (a failure reproduces as it was seen).
FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

NUMBER_TEXT = st.from_regex(r"\A[ ]?-?[0-9]{0,25}(\.[0-9]{0,5})?([eE][-+]?[0-9]{1,3})?[ ]?\Z")
EXTREMES = st.sampled_from(
    [
        "inf",
        "-inf",
        "Infinity",
        "nan",
        "NaN",
        "1e20",
        "1e308",
        "1e309",
        "-0",
        "0.0",
        "1",
        "1.0",
        "2",
        "2048",
        "2049",
        " 0.5 ",
        "0x10",
        "1_000",
        "",
        " ",
        "true",
        "None",
        2**64,
        -(2**63),
        10**400,
        1e-320,
        5e-324,
        2.0**53,
        2.0**53 + 2,
        float("inf"),
        float("nan"),
    ]
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=60),
    NUMBER_TEXT,
    EXTREMES,
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
KV_KEYS = st.one_of(
    st.sampled_from(["kv_policy", "kv_budget", "kv_sinks", "kv_window", "kv_maps", "kv_"]),
    st.text(max_size=200).map(lambda key: "kv_" + key),
)


def check_request_outcome(extra_args: dict) -> None:
    """Accepted: a config whose budget is finite and in range, and budget_tokens is a small int.
    Refused: a RequestConfigError naming a vllm_xargs.kv_* field, in a message of bounded size."""
    try:
        config = request_config(SERVER, extra_args, MAX_MODEL_LEN)
    except RequestConfigError as error:
        assert error.field.startswith("vllm_xargs.kv_"), error.field
        assert str(error).startswith(error.field)
        assert len(str(error)) < 500, len(str(error))
        return
    budget = config.budget
    assert math.isfinite(budget)
    assert 0 < budget <= 1 or (budget == int(budget) and 1 < budget <= MAX_MODEL_LEN), budget
    for prompt_tokens in (1, 100, MAX_MODEL_LEN):
        tokens = config.budget_tokens(prompt_tokens)
        assert type(tokens) is int and 1 <= tokens <= MAX_MODEL_LEN, tokens
    assert config.sinks + config.window < MAX_MODEL_LEN


@FUZZ
@given(value=JSON_VALUES)
def test_any_request_budget_is_accepted_in_range_or_refused_naming_it(value):
    check_request_outcome({"kv_budget": value})


@FUZZ
@given(value=JSON_VALUES)
def test_any_request_policy_is_a_known_one_or_refused_naming_it(value):
    check_request_outcome({"kv_policy": value})


@FUZZ
@given(extra_args=st.dictionaries(KV_KEYS, JSON_VALUES, max_size=4))
def test_any_request_keys_are_per_request_options_or_refused_naming_them(extra_args):
    check_request_outcome(extra_args)


@pytest.fixture(scope="module")
def patched_request_models():
    apply_process_patches()
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return CompletionRequest, ChatCompletionRequest


@FUZZ
@given(xargs=st.dictionaries(KV_KEYS, JSON_VALUES, max_size=3), chat=st.booleans())
def test_request_bodies_through_vllms_request_models(patched_request_models, xargs, chat):
    """What a client's JSON becomes on the server: a pydantic refusal that names vllm_xargs
    (HTTP 400), or extra_args the plugin accepts in range or refuses naming the field. JSON
    booleans never reach the plugin as numbers."""
    from pydantic import ValidationError
    from vllm.exceptions import VLLMValidationError

    completion, chat_completion = patched_request_models
    body = {"model": "m", "vllm_xargs": xargs}
    body.update({"messages": [{"role": "user", "content": "Hi"}]} if chat else {"prompt": "Hi"})
    decoded = json.loads(json.dumps(body))  # NaN and Infinity survive, as in Starlette's decoding
    try:
        request = (chat_completion if chat else completion).model_validate(decoded)
    except ValidationError as error:
        assert "vllm_xargs" in str(error), str(error)[:2000]
        return
    try:
        extra_args = request.to_sampling_params(16, {}).extra_args or {}
    except VLLMValidationError as error:  # vLLM's own bound on integers: HTTP 400 too
        assert error.parameter == "extra_args", error
        return
    booleans = {k for k, v in xargs.items() if isinstance(v, bool)}
    assert not booleans, f"{booleans} passed as numbers"
    check_request_outcome(extra_args)


def option(knob) -> str:
    return "--kv-" + KVPolicyConfig.key(knob).removeprefix("kv_").replace("_", "-")


@FUZZ
@given(
    knob=st.sampled_from([k for k in KVPolicyConfig.knobs() if k.name != "policy"]),
    value=st.one_of(SCALARS, NUMBER_TEXT),
)
def test_any_start_up_value_is_accepted_in_range_or_refused_naming_the_option(knob, value):
    """additional_config as the flags fill it (strings) or as a Python caller does (any value)."""
    additional_config = {"kv_policy": "retentive", KVPolicyConfig.key(knob): value}
    try:
        config = KVPolicyConfig.from_additional_config(additional_config)
        config.check_model_length(MAX_MODEL_LEN)
    except ConfigError as error:
        # A cross-field refusal names both options (e.g. absorption min and max, sinks and window).
        assert option(knob) in str(error) or knob.name in ("budget", "sinks", "window"), str(error)
        return
    values = config.to_additional_config()
    for name in ("budget", "sinks", "window", "lambda", "gamma0", "state_log_gain", "seed"):
        number = values[f"kv_{name}"]
        assert math.isfinite(number) and abs(number) <= 2**53, (name, number)
    assert config.budget_tokens(MAX_MODEL_LEN) <= MAX_MODEL_LEN
