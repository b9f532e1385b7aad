"""A bounded fuzz round against one `vllm serve --kv-policy retentive`: a few hundred generated
requests (completions and chats, streamed or not, some with beam search, some dropped after the
first chunk) with vllm_xargs.kv_* values of every JSON type and extreme. Each gets 200 or a 400
naming its field; afterwards the server answers a normal request and the stats route, and every
KV block and recurrent state is back. The same properties without a server: tests/test_fuzz.py.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retentivekv_vllm.fixtures import build_tiny_model
from retentivekv_vllm.fixtures.server import Server

from ..test_fuzz import JSON_VALUES, KV_KEYS
from .test_metrics import scrape, wait_until

pytestmark = pytest.mark.slow

ROUND = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
PROMPTS = ["Hi", "Sentence one: the river carried sand past the mill. " * 40]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama")
    log_path = tmp_path_factory.mktemp("server") / "vllm-serve.log"
    # The prf state, so that states are held and must come back.
    args = ("--kv-policy", "retentive", "--kv-feature-map", "prf", "--kv-budget", "0.2")
    with Server(
        str(model_dir), args=args, env={"VLLM_PLUGINS": "retentivekv"}, log_path=log_path
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def model(server) -> str:
    return httpx.get(server.base_url + "/v1/models", timeout=60).json()["data"][0]["id"]


REQUESTS = st.fixed_dictionaries(
    {
        "chat": st.booleans(),
        "stream": st.booleans(),
        "drop_after_first_chunk": st.booleans(),
        "beam": st.sampled_from([False] * 7 + [True]),
        "prompt": st.sampled_from(PROMPTS),
        "max_tokens": st.integers(1, 4),
        "xargs": st.one_of(
            st.dictionaries(KV_KEYS, JSON_VALUES, max_size=3),
            st.fixed_dictionaries({"kv_budget": st.floats(0.01, 1.0) | st.integers(40, 2048)}),
        ),
    }
)


def body_of(case: dict, model: str) -> str:
    body = {
        "model": model,
        "max_tokens": case["max_tokens"],
        "temperature": 0,
        "stream": case["stream"] and not case["beam"],
        "vllm_xargs": case["xargs"],
    }
    if case["beam"]:
        body.update(use_beam_search=True, n=2)
    if case["chat"]:
        body["messages"] = [{"role": "user", "content": case["prompt"]}]
    else:
        body["prompt"] = case["prompt"]
    return json.dumps(body)  # NaN and Infinity as JavaScript spells them


@ROUND
@given(case=REQUESTS)
def test_generated_requests_get_200_or_400_naming_the_field(server, model, case):
    path = "/v1/chat/completions" if case["chat"] else "/v1/completions"
    with httpx.stream(
        "POST",
        server.base_url + path,
        content=body_of(case, model),
        headers={"Content-Type": "application/json"},
        timeout=120,
    ) as response:
        if response.status_code == 200 and case["drop_after_first_chunk"]:
            next(response.iter_bytes(), None)  # closing now aborts the request on the server
            return
        text = response.read().decode()
    assert response.status_code in (200, 400), (response.status_code, text[:2000])
    if response.status_code == 400:
        assert "vllm_xargs" in json.loads(text)["error"]["message"], text[:2000]
    elif case["stream"] and not case["beam"]:
        assert text.rstrip().endswith("data: [DONE]"), text[-2000:]


def test_after_the_round_the_server_serves_and_everything_is_back(server, model):
    completion = httpx.post(
        server.base_url + "/v1/completions",
        timeout=120,
        json={"model": model, "prompt": PROMPTS[1], "max_tokens": 4, "temperature": 0},
    )
    assert completion.status_code == 200, completion.text
    stats = httpx.get(server.base_url + "/v1/retentivekv/stats", timeout=60)
    assert stats.status_code == 200, stats.text
    assert stats.json()["totals"]["compressions_total"] > 0
    wait_until(lambda: scrape(server)["retentivekv:requests_live"][1] == 0, timeout=60)
    after = scrape(server)
    assert after["retentivekv:state_bytes"][1] == 0
    assert after["vllm:kv_cache_usage_perc"][1] == 0
