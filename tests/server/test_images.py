"""Image chats through `vllm serve` and the `openai` client (tiny Qwen2-VL, Qwen2.5-VL and
Qwen3-VL, fp32, CPU): PNGs as data URLs, one and two per request. Stock vLLM, the plugin at
budget 1.0 and at 0.2 each serve the same chats; 1.0 answers with stock's tokens, 0.2 folds
image tokens and returns their blocks to vLLM's pool (read from /metrics)."""

from __future__ import annotations

import math
import time

import pytest
from openai import OpenAI

from retentivekv_vllm.fixtures import build_tiny_vlm
from retentivekv_vllm.fixtures.server import Server

from ..images import data_url, decode, png_bytes
from .test_metrics import scrape
from .test_server import LOG_LINE

MAX_TOKENS = 8  # below the decode interval: only the prompt is compressed
LIMITS = ("--limit-mm-per-prompt", '{"image": 2, "video": 0}', "--max-num-seqs", "4")
# 112x168 and 224x224 pixels: 4x6 and 8x8 image tokens.
PNGS = [png_bytes(4, 6, 28, seed=0), png_bytes(8, 8, 28, seed=1)]


def image_part(png: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(png)}}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


CHATS = {
    "one image": [image_part(PNGS[0]), text_part("What is in the picture?")],
    "two images": [
        text_part("Left:"),
        image_part(PNGS[0]),
        text_part("right:"),
        image_part(PNGS[1]),
        text_part("Which one has more red?"),
    ],
}
RUNS = {
    "stock": ((), {"VLLM_PLUGINS": ""}),
    "budget 1.0": (("--kv-policy", "retentive", "--kv-budget", "1.0"), {}),
    # A short window, so that the policy chooses which image tokens stay; small blocks, so that
    # the folded image tokens of these short prompts fill whole blocks; the prf state, so that
    # they fold into the visual state; the plugin's metrics on.
    "budget 0.2": (
        (
            "--kv-policy",
            "retentive",
            "--kv-feature-map",
            "prf",
            "--kv-budget",
            "0.2",
            "--kv-window",
            "8",
            "--block-size",
            "32",
        ),
        {"VLLM_PLUGINS": "retentivekv"},
    ),
}


# Three servers per model, about 30 s each on two cores: Qwen2-VL in the default tier, the
# others (the same processing with another vision tower and text model) in the slow one.
ARCHS = [
    "qwen2_vl",
    pytest.param("qwen2_5_vl", marks=pytest.mark.slow),
    pytest.param("qwen3_vl", marks=pytest.mark.slow),
]


@pytest.fixture(scope="module", params=ARCHS)
def model_dir(request, tmp_path_factory) -> str:
    arch = request.param
    return str(build_tiny_vlm(tmp_path_factory.mktemp("models") / f"tiny-{arch}", arch))


@pytest.fixture(scope="module")
def served(model_dir, tmp_path_factory) -> dict:
    """Per run: the replies to CHATS, the server's log and /metrics, one server after the other."""
    results = {}
    for run, (args, env) in RUNS.items():
        log_path = tmp_path_factory.mktemp("serve") / "vllm-serve.log"
        with Server(model_dir, args=(*LIMITS, *args), env=env, log_path=log_path) as server:
            with OpenAI(base_url=server.base_url + "/v1", api_key="unused", timeout=300) as client:
                replies = {
                    name: client.chat.completions.create(
                        model=model_dir,
                        messages=[{"role": "user", "content": content}],
                        max_tokens=MAX_TOKENS,
                        temperature=0,
                        extra_body={"return_token_ids": True},
                    )
                    for name, content in CHATS.items()
                }
                # A request's memory is released (and logged) at a later engine step.
                client.completions.create(model=model_dir, prompt="Flush.", max_tokens=2)
            # Read before the server stops: shutting down logs the engine's exit.
            log = wait_for_release_lines(log_path, len(CHATS) if args else 0)
            metrics = (
                released_metrics(server, len(CHATS) + 1)
                if env.get("VLLM_PLUGINS") == "retentivekv"
                else None
            )
        results[run] = (replies, log, metrics)
    return results


def wait_for_release_lines(log_path, count: int, timeout: float = 60.0) -> str:
    """The server's log once it holds `count` release lines of image requests."""
    deadline = time.monotonic() + timeout
    while True:
        log = log_path.read_text(errors="replace")
        if (
            sum(int(m["images"]) > 0 for m in LOG_LINE.finditer(log)) >= count
            or time.monotonic() > deadline
        ):
            return log
        time.sleep(0.5)


def released_metrics(server, count: int, timeout: float = 60.0) -> dict:
    """/metrics once the plugin's counters include `count` released requests (they refresh
    periodically)."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = scrape(server)
        released = metrics.get("retentivekv:requests_released_total", ({}, 0.0))[1]
        if released >= count or time.monotonic() > deadline:
            return metrics
        time.sleep(0.5)


def token_ids(reply) -> list[int]:
    return list(reply.choices[0].model_extra["token_ids"])


def test_stock_counts_every_image_token(served, model_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    replies, _, _ = served["stock"]
    for name, content in CHATS.items():
        parts = [{"type": "image"} if p["type"] == "image_url" else p for p in content]
        text = processor.apply_chat_template(
            [{"role": "user", "content": parts}], add_generation_prompt=True
        )
        images = [decode(png) for png in PNGS[: sum(p["type"] == "image" for p in parts)]]
        inputs = processor(text=text, images=images, add_special_tokens=False)
        assert replies[name].usage.prompt_tokens == len(inputs["input_ids"][0]), name
        assert replies[name].usage.completion_tokens == MAX_TOKENS


def test_budget_one_answers_with_stock_tokens(served):
    stock, _, _ = served["stock"]
    replies, log, _ = served["budget 1.0"]
    for name in CHATS:
        assert token_ids(replies[name]) == token_ids(stock[name]), name
        assert replies[name].choices[0].message.content == stock[name].choices[0].message.content
    lines = [m for m in LOG_LINE.finditer(log) if int(m["images"]) > 0]
    assert sorted(int(m["images"]) for m in lines) == [1, 2]
    assert all(int(m["folded"]) == 0 for m in lines)


def test_budget_point_two_folds_image_tokens(served):
    replies, log, metrics = served["budget 0.2"]
    lines = {int(m["prompt"]): m for m in LOG_LINE.finditer(log)}
    block_size = int(metrics["vllm:cache_config_info"][0]["block_size"])
    expected_blocks = 0
    for name, content in CHATS.items():
        reply = replies[name]
        assert reply.choices[0].message.content and reply.usage.completion_tokens == MAX_TOKENS
        line = lines[reply.usage.prompt_tokens]
        assert int(line["images"]) == sum(p["type"] == "image_url" for p in content)
        prompt_tokens = reply.usage.prompt_tokens
        assert int(line["folded"]) == prompt_tokens - math.ceil(0.2 * prompt_tokens), line.group(0)
        assert int(line["visual_folded"]) > 0, line.group(0)
        expected_blocks += (prompt_tokens - math.ceil(0.2 * prompt_tokens)) // block_size
    # Folded tokens are a request's oldest slots: their whole blocks went back to the pool. (The
    # flush request is shorter than sinks and window: it folds nothing.)
    assert expected_blocks > 0
    assert metrics["retentivekv:blocks_freed_total"][1] == expected_blocks
    assert "Traceback" not in log
