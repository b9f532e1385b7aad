"""`vllm serve --kv-policy retentive` as a user runs it: the OpenAI API and the CLI.

One server (tiny random-weight Llama, fp32, CPU) serves every API test of this
module; the CLI tests run `vllm` without starting a server.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import signal
import subprocess
import time

import httpx
import pytest
from openai import AsyncOpenAI, BadRequestError, OpenAI

from retentivekv_vllm.fixtures import build_tiny_model
from retentivekv_vllm.fixtures.server import CPU_DEFAULTS, Server, free_port, vllm_command

BUDGET = 0.2
SERVER_ARGS = ("--kv-policy", "retentive", "--kv-budget", str(BUDGET))
MAX_TOKENS = 16  # below the decode interval: the prompt is compressed at prefill
CLI_TIMEOUT = 300

LOG_LINE = re.compile(
    r"retentivekv: request (?P<id>\S+) kept (?P<kept>\d+) of (?P<cached>\d+) cached tokens "
    r"\(budget (?P<budget>\d+)\), folded (?P<folded>\d+) "
    r"\(prompt (?P<prompt>\d+), (?P<images>\d+) images, (?P<visual_folded>\d+) image-token slots "
    r"folded over layers and heads\) in (?P<compressions>\d+) compressions"
)


def long_prompt(n: int, topic: str = "the river carried sand and stones past the old mill") -> str:
    """n numbered sentences, ~27 tokens each with the shipped tokenizer."""
    return " ".join(f"Sentence {i}: {topic}." for i in range(1, n + 1))


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama"))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("server") / "vllm-serve.log"
    srv = Server(model=model_dir, args=SERVER_ARGS, log_path=log_path)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with OpenAI(base_url=server.base_url + "/v1", api_key="x", timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def served_model(client) -> str:
    return client.models.list().data[0].id


def complete(client, model, prompt, max_tokens=MAX_TOKENS):
    return client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0
    )


def chat(client, model, messages, **kwargs):
    return client.chat.completions.create(
        model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0, **kwargs
    )


def read_log(server) -> str:
    return server.log_path.read_text(errors="replace")


def wait_for_log_line(server, prompt_tokens: int, timeout: float = 60.0) -> re.Match:
    """The release line of the request with `prompt_tokens` (flushed by later requests)."""
    deadline = time.monotonic() + timeout
    while True:
        for match in LOG_LINE.finditer(read_log(server)):
            if int(match["prompt"]) == prompt_tokens:
                return match
        if time.monotonic() > deadline:
            tail = read_log(server)[-4000:]
            pytest.fail(f"no 'retentivekv: request' line with prompt {prompt_tokens}:\n{tail}")
        time.sleep(0.5)


# ---------------------------------------------------------------- API


def test_completion_long_prompt(client, served_model, tokenizer):
    prompt = long_prompt(20)
    expected_prompt_tokens = len(tokenizer(prompt).input_ids)
    assert expected_prompt_tokens >= 400

    response = complete(client, served_model, prompt)

    choice = response.choices[0]
    assert choice.text.strip(), response
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens == expected_prompt_tokens
    assert 0 < response.usage.completion_tokens <= MAX_TOKENS


def test_chat_completion(client, served_model):
    messages = [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": long_prompt(15) + " Which sentence mentions the mill?"},
    ]
    response = chat(client, served_model, messages)

    message = response.choices[0].message
    assert message.role == "assistant"
    assert message.content and message.content.strip(), response
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens > 400


def test_streaming_chat_matches_non_streamed(client, served_model):
    messages = [{"role": "user", "content": long_prompt(16, "a heron waited in the reeds")}]
    whole = chat(client, served_model, messages).choices[0].message.content

    pieces = []
    finish_reasons = []
    for chunk in chat(client, served_model, messages, stream=True):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        if delta.content:
            pieces.append(delta.content)
        if chunk.choices[0].finish_reason:
            finish_reasons.append(chunk.choices[0].finish_reason)

    assert len(pieces) > 1, pieces
    assert "".join(pieces) == whole
    assert finish_reasons, "the stream never reported a finish_reason"


def test_concurrent_requests_match_sequential(server, client, served_model):
    prompts = [long_prompt(18, "the wind bent the barley"), long_prompt(22, "a lamp burned late")]
    alone = [complete(client, served_model, p).choices[0].text for p in prompts]
    assert all(text.strip() for text in alone), alone

    async def together():
        async with AsyncOpenAI(base_url=server.base_url + "/v1", api_key="x", timeout=300) as ac:
            return await asyncio.gather(
                *(
                    ac.completions.create(
                        model=served_model, prompt=p, max_tokens=MAX_TOKENS, temperature=0
                    )
                    for p in prompts
                )
            )

    responses = asyncio.run(together())
    assert [r.choices[0].text for r in responses] == alone


def test_folding_happened_in_server(server, client, served_model, tokenizer):
    prompt = long_prompt(19, "seven gulls circled the harbour wall")
    prompt_tokens = len(tokenizer(prompt).input_ids)
    response = complete(client, served_model, prompt)
    assert response.usage.prompt_tokens == prompt_tokens
    # A request's memory is released (and logged) at the next engine step.
    complete(client, served_model, "Flush.", max_tokens=2)

    line = wait_for_log_line(server, prompt_tokens)
    kept, budget, folded = int(line["kept"]), int(line["budget"]), int(line["folded"])
    assert budget == math.ceil(BUDGET * prompt_tokens), line.group(0)
    # Short answers stay below the decode interval: only the prompt was compressed.
    assert folded == prompt_tokens - budget > 0, line.group(0)
    assert kept == int(line["cached"]) - folded, line.group(0)
    assert int(line["cached"]) == prompt_tokens + response.usage.completion_tokens - 1
    assert int(line["compressions"]) >= 1, line.group(0)


def test_start_up_says_that_retentive_keeps_no_state_without_a_maps_file(server):
    """Served without --kv-maps, retentive drops what it folds; the log says so with how to get a
    state: first the API server, at start-up, then once in each process that builds the policy
    (vLLM's worker)."""
    said = [
        line
        for line in read_log(server).splitlines()
        if "retentive keeps no state without a maps file" in line
    ]
    assert said and said[0].startswith("(APIServer pid="), said
    processes = [line.split(")")[0] for line in said]
    assert len(processes) == len(set(processes)), said
    assert all("--kv-maps FILE" in line and "--kv-feature-map prf" in line for line in said)


def test_request_chooses_its_budget(server, client, served_model, tokenizer):
    """vllm_xargs.kv_budget reaches the worker: the request folds to its own budget."""
    prompt = long_prompt(17, "an owl called twice from the barn")
    prompt_tokens = len(tokenizer(prompt).input_ids)
    client.completions.create(
        model=served_model,
        prompt=prompt,
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"vllm_xargs": {"kv_budget": 0.5}},
    )
    complete(client, served_model, "Flush.", max_tokens=2)
    line = wait_for_log_line(server, prompt_tokens)
    assert int(line["budget"]) == math.ceil(0.5 * prompt_tokens), line.group(0)
    assert int(line["folded"]) == prompt_tokens - int(line["budget"]), line.group(0)


@pytest.mark.parametrize(
    "xargs, field",
    [
        ({"kv_budget": 1.5}, "vllm_xargs.kv_budget"),
        ({"kv_policy": "nope"}, "vllm_xargs.kv_policy"),
        ({"kv_window": 8}, "vllm_xargs.kv_window"),
    ],
)
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_bad_request_settings_get_http_400_naming_the_field(
    client, served_model, xargs, field, endpoint
):
    with pytest.raises(BadRequestError) as refused:
        if endpoint == "chat":
            chat(
                client,
                served_model,
                [{"role": "user", "content": "Hi"}],
                extra_body={"vllm_xargs": xargs},
            )
        else:
            client.completions.create(
                model=served_model, prompt="Hi", max_tokens=2, extra_body={"vllm_xargs": xargs}
            )
    assert refused.value.status_code == 400
    assert field in refused.value.message, refused.value.message


# Budgets that once took the server down (a 200 and then no answer to anything: an int too large
# for the engine core's serializer) or answered HTTP 500; each must be a 400 naming the field.
# JSON as sent: numbers, strings, non-standard JSON constants, a boolean, a list.
HOSTILE_BUDGETS = [
    '"1e20"',
    "1e20",
    '"1e308"',
    "1e308",
    "Infinity",
    "-Infinity",
    "NaN",
    "1e309",
    '"inf"',
    '"Infinity"',
    '"1e309"',
    '"nan"',
    "true",
    "false",
    '"3000"',
    "3000",
    "[0.5]",
    '"0x10"',
]


def post_json(server, path: str, body: str) -> httpx.Response:
    return httpx.post(
        server.base_url + path,
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )


@pytest.mark.parametrize("budget", HOSTILE_BUDGETS)
def test_hostile_budgets_get_http_400_and_the_server_keeps_serving(server, served_model, budget):
    body = (
        f'{{"model": "{served_model}", "prompt": "Hi", "max_tokens": 2, '
        f'"vllm_xargs": {{"kv_budget": {budget}}}}}'
    )
    response = post_json(server, "/v1/completions", body)
    assert response.status_code == 400, (response.status_code, response.text)
    assert "vllm_xargs.kv_budget" in response.json()["error"]["message"], response.text
    # After such a request every completion used to hang.
    ok = post_json(
        server, "/v1/completions", f'{{"model": "{served_model}", "prompt": "Hi", "max_tokens": 1}}'
    )
    assert ok.status_code == 200, ok.text


def test_a_long_unknown_policy_is_not_echoed_whole(client, served_model):
    with pytest.raises(BadRequestError) as refused:
        client.completions.create(
            model=served_model,
            prompt="Hi",
            max_tokens=2,
            extra_body={"vllm_xargs": {"kv_policy": "x" * 100_000}},
        )
    assert "vllm_xargs.kv_policy" in refused.value.message
    assert len(refused.value.message) < 1000, len(refused.value.message)


def beam_search(client, model, endpoint, **extra_body):
    if endpoint == "chat":
        return chat(
            client,
            model,
            [{"role": "user", "content": "Hi"}],
            n=2,
            extra_body={"use_beam_search": True, **extra_body},
        )
    return client.completions.create(
        model=model,
        prompt="Hi",
        max_tokens=4,
        n=2,
        temperature=0,
        extra_body={"use_beam_search": True, **extra_body},
    )


@pytest.mark.parametrize(
    "xargs", [{"kv_budget": 0.5}, {"kv_budget": "1e20"}, {"kv_policy": "snapkv"}]
)
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_beam_search_refuses_per_request_kv_settings(client, served_model, xargs, endpoint):
    """vLLM builds beam search without vllm_xargs: the settings would be ignored unchecked."""
    with pytest.raises(BadRequestError) as refused:
        beam_search(client, served_model, endpoint, vllm_xargs=xargs)
    assert f"vllm_xargs.{next(iter(xargs))}" in refused.value.message, refused.value.message
    assert "beam search" in refused.value.message


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_beam_search_without_kv_settings_runs(client, served_model, endpoint):
    response = beam_search(client, served_model, endpoint)
    assert len(response.choices) == 2


def test_server_log_has_no_errors(server, client, served_model):
    complete(client, served_model, "Flush again.", max_tokens=2)
    log = read_log(server)
    assert "Traceback" not in log, log[-6000:]
    assert not re.search(r"^ERROR", log, re.MULTILINE), log[-6000:]


# ---------------------------------------------------------------- CLI, no server


def run_vllm(*args: str) -> subprocess.CompletedProcess:
    """Run `vllm ARGS` in its own process group; on a timeout the whole group is killed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [*vllm_command(), *args]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=CLI_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"{command} did not finish in {CLI_TIMEOUT}s")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_serve_help_lists_kv_flags():
    result = run_vllm("serve", "--help")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "--kv-policy" in result.stdout

    result = run_vllm("serve", "--help=KVPolicy")
    assert result.returncode == 0, result.stderr[-4000:]
    for flag in ("--kv-policy", "--kv-budget", "--kv-sinks", "--kv-window", "--kv-lambda"):
        assert flag in result.stdout, result.stdout


@pytest.mark.parametrize(
    "bad_args, expected",
    [
        (("--kv-policy", "nope"), ("--kv-policy", "nope")),
        (("--kv-policy", "retentive", "--kv-budget", "1.5"), ("--kv-budget",)),
        (("--kv-policy", "retentive", "--kv-budget", "inf"), ("error: --kv-budget",)),
    ],
    ids=["unknown-policy", "fractional-budget-over-one", "infinite-budget"],
)
def test_bad_kv_option_exits_naming_it(model_dir, bad_args, expected):
    port = str(free_port())
    result = run_vllm(
        "serve", model_dir, "--host", "127.0.0.1", "--port", port, *CPU_DEFAULTS, *bad_args
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-4000:]
    for text in expected:
        assert text in output, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
