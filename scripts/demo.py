"""The main job: serve the bundled tiny model with `--kv-policy retentive`, ask it once.

Builds the tiny model if it is missing, starts `vllm serve` on 127.0.0.1 with the
retentive policy at a 20% budget, sends a chat request with the `openai` client,
prints the answer, and stops the server.
"""

import argparse
import sys
from pathlib import Path

from openai import OpenAI

from retentivekv_vllm.fixtures import build_tiny_model
from retentivekv_vllm.fixtures.server import Server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--policy", default="retentive")
    parser.add_argument("--budget", default="0.2")
    parser.add_argument("--model-dir", default="models/tiny-llama")
    args = parser.parse_args()

    model = build_tiny_model(args.model_dir, arch="llama")
    log = Path(args.model_dir).parent / "demo-server.log"
    print(f"serving {model} with --kv-policy {args.policy} --kv-budget {args.budget} (log: {log})")
    with Server(
        str(model), ("--kv-policy", args.policy, "--kv-budget", args.budget), log_path=log
    ) as server:
        client = OpenAI(base_url=server.base_url + "/v1", api_key="unused")
        question = "Summarise the following notes. " + " ".join(
            f"Note {i}: the value of key {i} is {i * 7 % 13}." for i in range(60)
        )
        reply = client.chat.completions.create(
            model=str(model),
            messages=[{"role": "user", "content": question}],
            max_tokens=32,
            temperature=0,
        )
        print(f"prompt tokens: {reply.usage.prompt_tokens}, "
              f"completion tokens: {reply.usage.completion_tokens}")
        print("answer (random weights, so not meaningful text):")
        print(reply.choices[0].message.content)
    return 0


if __name__ == "__main__":
    sys.exit(main())
