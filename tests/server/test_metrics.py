"""The plugin seen by an operator: its metrics on vLLM's own /metrics and the stats route behind
the API key (VLLM_PLUGINS=retentivekv, --api-key), against counts computed from the tokenizer and
the model's shape; and a server that forbids per-request settings (--kv-request-overrides deny;
tests/server/test_server.py has the default, allow)."""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request

import pytest
from openai import BadRequestError, OpenAI
from prometheus_client.parser import text_string_to_metric_families

from retentivekv_vllm.fixtures import build_tiny_model
from retentivekv_vllm.fixtures.build import BASE_CONFIG
from retentivekv_vllm.fixtures.server import Server
from retentivekv_vllm.serving import REFRESH_SECONDS, STATS_ROUTE

from .test_server import long_prompt

API_KEY = "test-key"
BUDGET = 0.2
MAX_TOKENS = 8  # below the decode interval: each request folds its prompt once


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama")
    log_path = tmp_path_factory.mktemp("server") / "vllm-serve.log"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_PLUGINS", "retentivekv")
        args = (
            "--kv-policy",
            "retentive",
            "--kv-feature-map",  # a state to show (without a maps file retentive keeps none)
            "prf",
            "--kv-budget",
            str(BUDGET),
            "--api-key",
            API_KEY,
            "--kv-request-overrides",
            "deny",
        )
        with Server(model=str(model_dir), args=args, log_path=log_path) as srv:
            yield srv


@pytest.fixture(scope="module")
def client(server):
    with OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(server):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(server.model)


def scrape(server) -> dict[str, tuple[dict, float]]:
    """Every sample of /metrics: name -> (labels, value) of its last sample."""
    text = urllib.request.urlopen(server.base_url + "/metrics", timeout=30).read().decode()
    return {
        sample.name: (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def settled_scrape(
    server, names: tuple[str, ...], timeout: float = 60.0
) -> dict[str, tuple[dict, float]]:
    """/metrics once ``names`` held still over a refresh of the plugin's counters.

    The plugin's series refresh every REFRESH_SECONDS: requests an earlier test finished can still
    be counted a refresh later.
    """
    deadline = time.monotonic() + timeout
    last = scrape(server)
    while True:
        time.sleep(REFRESH_SECONDS * 1.5)
        now = scrape(server)
        if all(now.get(n, ({}, 0.0))[1] == last.get(n, ({}, 0.0))[1] for n in names):
            return now
        if time.monotonic() > deadline:
            pytest.fail(f"{names} kept changing for {timeout} s")
        last = now


def get_stats(server, key: str | None = API_KEY) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    request = urllib.request.Request(server.base_url + STATS_ROUTE, headers=headers)
    return json.loads(urllib.request.urlopen(request, timeout=60).read())


def wait_until(predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached")
        time.sleep(REFRESH_SECONDS / 2)


def state_bytes_per_text_request() -> int:
    """One float32 prf state (S [r, d] and z [r]) per layer and KV head at the default rank 64."""
    c = BASE_CONFIG
    return c["num_hidden_layers"] * c["num_key_value_heads"] * 64 * (c["head_dim"] + 1) * 4


def test_metrics_count_what_the_requests_folded(server, client, tokenizer):
    model = client.models.list().data[0].id
    before = scrape(server)
    prompts = [long_prompt(n, "a bell rang over the square") for n in (12, 20, 31)]
    completions = [
        client.completions.create(model=model, prompt=p, max_tokens=MAX_TOKENS, temperature=0)
        for p in prompts
    ]
    block_size = int(before["vllm:cache_config_info"][0]["block_size"])
    prompt_lengths = [len(tokenizer(p).input_ids) for p in prompts]
    folded = [n - math.ceil(BUDGET * n) for n in prompt_lengths]
    cached = [n + c.usage.completion_tokens - 1 for n, c in zip(prompt_lengths, completions)]

    def delta(name):
        return scrape(server)[name][1] - before.get(name, ({}, 0.0))[1]

    wait_until(lambda: delta("retentivekv:requests_released_total") == len(prompts))
    assert delta("retentivekv:tokens_folded_total") == sum(folded)
    assert delta("retentivekv:tokens_cached_total") == sum(cached)
    assert delta("retentivekv:blocks_freed_total") == sum(f // block_size for f in folded)
    assert delta("retentivekv:compressions_total") == len(prompts)
    assert delta("retentivekv:compress_seconds_total") > 0
    after = scrape(server)
    assert after["retentivekv:compression_ratio"][1] > 1
    assert after["retentivekv:requests_live"][1] == 0
    assert after["retentivekv:state_bytes"][1] == 0
    assert after["vllm:kv_cache_usage_perc"][1] == 0
    assert after["retentivekv:tokens_folded_total"][0] == {"model_name": model}


def test_a_live_request_shows_its_state_and_gives_it_back_when_aborted(server, client):
    model = client.models.list().data[0].id
    stream = client.completions.create(
        model=model,
        prompt=long_prompt(20, "the tide turned at noon"),
        max_tokens=1500,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    next(iter(stream))  # the prompt is in (and folded); decoding goes on
    live = get_stats(server)
    assert len(live["live"]) == 1, live["live"]
    assert live["totals"]["state_bytes"] == state_bytes_per_text_request()
    assert live["totals"]["tokens_kept"] > 0
    stream.close()  # the server aborts the request
    wait_until(lambda: scrape(server)["retentivekv:requests_live"][1] == 0)
    after = scrape(server)
    assert after["retentivekv:state_bytes"][1] == 0
    assert after["vllm:kv_cache_usage_perc"][1] == 0


def test_stats_route_is_read_only_and_behind_the_api_key(server):
    with pytest.raises(urllib.error.HTTPError) as refused:
        get_stats(server, key=None)
    assert refused.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as wrong_key:
        get_stats(server, key="wrong")
    assert wrong_key.value.code == 401
    stats = get_stats(server)
    assert stats["kv_policy"]["kv_policy"] == "retentive"
    assert stats["kv_policy"]["kv_budget"] == BUDGET
    assert stats["kv_policy"]["kv_request_overrides"] == "deny"
    request = urllib.request.Request(
        server.base_url + STATS_ROUTE, method="POST", headers={"Authorization": f"Bearer {API_KEY}"}
    )
    with pytest.raises(urllib.error.HTTPError) as post:
        urllib.request.urlopen(request, timeout=30)
    assert post.value.code == 405


@pytest.mark.parametrize(
    "xargs, field",
    [
        ({"kv_budget": 0.5}, "vllm_xargs.kv_budget"),  # a value an allowing server accepts
        ({"kv_policy": "h2o"}, "vllm_xargs.kv_policy"),
        ({"kv_budget": 1.0, "kv_policy": "snapkv"}, "vllm_xargs.kv_budget"),
    ],
)
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_denied_overrides_get_http_400_naming_the_field_and_the_flag(
    server, client, xargs, field, endpoint
):
    model = client.models.list().data[0].id
    counted = ("vllm:prompt_tokens_total", "retentivekv:tokens_cached_total")
    before = settled_scrape(server, counted)
    with pytest.raises(BadRequestError) as refused:
        if endpoint == "chat":
            client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "Hi"}],
                max_tokens=2,
                extra_body={"vllm_xargs": xargs},
            )
        else:
            client.completions.create(
                model=model, prompt="Hi", max_tokens=2, extra_body={"vllm_xargs": xargs}
            )
    assert refused.value.status_code == 400
    assert field in refused.value.message, refused.value.message
    assert "--kv-request-overrides" in refused.value.message, refused.value.message
    # Refused before the engine: nothing was scheduled or compressed (read after a refresh).
    time.sleep(REFRESH_SECONDS * 1.5)
    after = scrape(server)
    for name in counted:
        assert after.get(name, ({}, 0.0))[1] == before.get(name, ({}, 0.0))[1], name


def test_denied_overrides_leave_other_extra_fields_alone(server, client):
    """Only the kv_* fields are refused: other vllm_xargs still reach the engine."""
    model = client.models.list().data[0].id
    completion = client.completions.create(
        model=model,
        prompt="Hi",
        max_tokens=2,
        temperature=0,
        extra_body={"ignore_eos": True, "vllm_xargs": {"session_id": "abc"}},
    )
    assert completion.usage.completion_tokens == 2
