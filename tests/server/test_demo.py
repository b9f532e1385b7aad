"""The demo (`bash scripts/demo.sh`, `python -m retentivekv_vllm.demo`): the real SmolLM2-135M-
Instruct served by `vllm serve` with --kv-policy retentive --kv-budget 0.2 and the learned maps
shipped for it (--kv-maps) answers a question about Python's debugger documentation (about 5,300
tokens) as it does with the whole cache, and what it prints of the request is what the server's
stats route says, against the model's shape.

The served tests take a few minutes (two server starts, 5,300-token prefills): slow tier. The
report's arithmetic, the server's flags and the options' errors are checked in the default tier.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from retentivekv_vllm import demo
from retentivekv_vllm.learned_maps import load_maps

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[2]
# SmolLM2-135M: 30 layers, 3 KV heads of 64; the retentive state of a text request is one
# learned state per layer and KV head, of the shipped maps' rank r: S [r, 64] and z [r], fp32.
SMOLLM2_KV_BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 4
SMOLLM2_MAPS_RANK = 16  # calibrate's default rank
SMOLLM2_STATE_BYTES = 30 * 3 * SMOLLM2_MAPS_RANK * (64 + 1) * 4
MAX_TOKENS = 32  # below the decode interval (64): the prompt is folded once, at its end


def test_report_sets_kv_and_state_against_stock():
    stats = {
        "num_prompt_tokens": 5000,
        "budget_tokens": 1000,
        "tokens_cached": 5031,
        "tokens_kept": 1031,
        "tokens_folded": 4000,
        "compressions": 1,
        "state_bytes": 2**20,
    }
    lines = demo.report(stats, bytes_per_token=1024)
    assert lines[3].split()[3:5] == ["1.0", "MiB"]  # 1,031 tokens x 1 KiB
    assert lines[4].split()[2:4] == ["1.0", "MiB"]
    # stock holds 5,031 KiB; this request 1,031 KiB + 1 MiB of state = 2,055 KiB: 2.4x
    assert lines[5].split()[3:5] == ["4.9", "MiB"] and "2.4x this request's" in lines[5]


def test_retentive_serves_with_the_maps_shipped_for_smollm2():
    """The demo shows the method with its state: retentive reads the learned maps shipped for
    the model (without a maps file it would keep none); other policies take no maps."""
    flags = demo.server_args("retentive", "0.2")
    assert flags[flags.index("--kv-maps") + 1] == str(demo.SMOLLM2_MAPS)
    maps = load_maps(demo.SMOLLM2_MAPS)
    assert (maps.model.num_layers, maps.rank) == (30, SMOLLM2_MAPS_RANK)
    assert "--kv-maps" not in demo.server_args("snapkv", "0.2")
    assert "--kv-maps" not in demo.server_args("retentive", "0.2", maps="")


def test_kv_bytes_per_token_from_config(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"num_hidden_layers": 30, "num_key_value_heads": 3, "hidden_size": 576, '
        '"num_attention_heads": 9}'
    )
    assert demo.kv_bytes_per_token(tmp_path) == SMOLLM2_KV_BYTES_PER_TOKEN


def test_document_without_question_is_refused(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("some notes")
    for argv, message in (
        (["--document", str(text)], "--document needs a --question"),
        (["--document", str(tmp_path / "missing.txt")], "no such file"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "retentivekv_vllm.demo", *argv],
            check=False,
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=120,
        )
        assert result.returncode == 2 and message in result.stderr
        assert not (tmp_path / "models").exists()  # refused before converting anything


@pytest.fixture(scope="module")
def model_dir() -> str:
    from retentivekv_vllm.fixtures.smollm2 import smollm2_model_dir

    return str(smollm2_model_dir(REPO_ROOT / "models" / "smollm2-135m-instruct"))


@pytest.mark.slow
def test_demo_prints_the_answer_and_the_servers_numbers(model_dir, tmp_path):
    """`python -m retentivekv_vllm.demo` as `bash scripts/demo.sh` runs it, its own server. Before
    the tests of the module's `server`: that server stays up until the module ends, and two idle
    vLLM workers beside the demo's would take both cores of a small machine."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "retentivekv_vllm.demo",
            "--max-tokens",
            str(MAX_TOKENS),
            "--model-dir",
            model_dir,
        ],
        check=False,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    answer = next(line for line in lines if line.startswith("answer: "))
    assert "pdb" in answer
    # "  tokens cached   5,320  (...)": the first two words name the number
    numbers = {" ".join(line.split()[:2]): line.split()[2:] for line in lines if line[:2] == "  "}

    def tokens(name: str) -> int:
        return int(numbers[name][0].replace(",", ""))

    def mib(name: str, index: int) -> float:
        assert numbers[name][index + 1] == "MiB"
        return float(numbers[name][index]) * 2**20

    cached, kept = tokens("tokens cached"), tokens("tokens kept")
    assert tokens("tokens folded") == cached - kept > 0.75 * cached
    assert abs(mib("KV bytes", 1) - kept * SMOLLM2_KV_BYTES_PER_TOKEN) < 0.05 * 2**20
    assert numbers["state bytes"][0] == f"{SMOLLM2_STATE_BYTES / 2**20:.1f}"
    assert abs(mib("stock vLLM", 1) - cached * SMOLLM2_KV_BYTES_PER_TOKEN) < 0.05 * 2**20


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    from retentivekv_vllm.fixtures.server import Server

    log_path = tmp_path_factory.mktemp("demo") / "vllm-serve.log"
    srv = Server(
        model_dir,
        demo.server_args("retentive", "0.2"),
        log_path=log_path,
        env={"VLLM_PLUGINS": "retentivekv"},
    )
    srv.start(timeout=600)  # a longer wait than `with Server(...)` gives, on a busy machine
    try:
        yield srv
    finally:
        srv.stop()


@pytest.mark.slow
@pytest.mark.parametrize("budget", [0.2, 1.0])
def test_answer_at_a_fifth_of_the_cache_as_with_all_of_it(server, model_dir, budget):
    """The default question at the server's 0.2 and, through the request's own budget, at 1.0
    (no compression): both name the module the text describes."""
    xargs = None if budget == 0.2 else {"kv_budget": budget}
    reply = demo.ask(
        server.base_url,
        model_dir,
        demo.default_document(),
        demo.DEFAULT_QUESTION,
        MAX_TOKENS,
        xargs=xargs,
    )
    assert "pdb" in reply.choices[0].message.content

    stats = demo.request_stats(server.base_url, reply.id)
    prompt = reply.usage.prompt_tokens
    assert stats["num_prompt_tokens"] == prompt > 5000
    assert stats["tokens_cached"] == prompt + reply.usage.completion_tokens - 1
    if budget == 1.0:
        assert stats["tokens_folded"] == 0 and stats["state_bytes"] == 0
        return
    assert stats["budget_tokens"] == math.ceil(0.2 * prompt)  # KVPolicyConfig.budget_tokens
    assert stats["tokens_kept"] == stats["budget_tokens"] + reply.usage.completion_tokens - 1
    assert stats["tokens_folded"] == stats["tokens_cached"] - stats["tokens_kept"]
    assert stats["state_bytes"] == SMOLLM2_STATE_BYTES
