"""Does a policy keep the answer? The tokens of the expected answer in the cache each policy keeps
at the compression point of `benchmarks.real_model`'s prompts (the same items and layouts).

    python -m benchmarks.real_model_kept --items 3

The model runs in transformers (float32, full attention) over the first chunk of every prompt;
in every layer the policy scores the chunk as the engine does when the chunk ends (the last
``observation_window`` queries, sinks and recent window kept, budget the share of the whole
prompt) and keeps its budget. Reported per protocol, policy and task: the share of the answer's
token slots kept, over layers, KV heads and items, and the share of (layer, KV head) pairs that
keep every token of at least one copy of each expected string. A policy that keeps the answer in
few heads cannot answer from its cache; the state is then all that can. Writes JSON
(``benchmarks/results/real_model_kept.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from benchmarks.real_model import ITEM_SEED, PROTOCOLS, REPO, Prompts
from retentivekv_vllm.config import KVPolicyConfig
from retentivekv_vllm.core import accumulated_attention, attention_probs
from retentivekv_vllm.policies import Observation, make_policy

POLICIES = ("retentive", "snapkv", "knorm", "h2o", "streaming")
ATTENTION_NAME = "real_model_kept"


def copies(prompt: list[int], needle: list[int]) -> list[range]:
    """Every place the token sequence `needle` occurs in `prompt`."""
    n = len(needle)
    return [range(i, i + n) for i in range(len(prompt) - n + 1) if prompt[i : i + n] == needle]


def kept_mask(policy, q, k, scale, cut: int, num_prompt_tokens: int) -> torch.Tensor:
    """[Hkv, cut] the cache `policy` keeps of the first `cut` tokens; q [Hq, cut, d] and k
    [Hkv, cut, d] post-RoPE."""
    c = policy.config
    heads, _, dim = k.shape
    g = q.shape[0] // heads
    budget = c.budget_tokens(num_prompt_tokens)
    first = max(0, cut - c.observation_window)
    rows = q.view(heads, g, cut, dim)[:, :, first:].reshape(heads, -1, dim)
    positions = torch.arange(cut)
    probs = attention_probs(rows, k, scale, torch.arange(first, cut).repeat(g), positions)
    candidates = ((positions >= c.sinks) & (positions < cut - c.window)).expand(heads, -1)
    obs = Observation(
        probs, positions.expand(heads, -1), candidates, accumulated_attention(probs), keys=k
    )
    return ~candidates | policy.select(obs, budget - c.sinks - c.window)


def answer_kept(mask: torch.Tensor, places: list[list[range]]) -> tuple[float, float]:
    """Share of the answers' token slots kept, and share of heads keeping every token of at
    least one copy of every answer; mask [Hkv, cut], places[answer] = its copies."""
    slots = [i for answer in places for copy in answer for i in copy]
    share = float(mask[:, slots].float().mean())
    whole = torch.ones(mask.shape[0], dtype=torch.bool)
    for answer in places:
        any_copy = torch.zeros_like(whole)
        for copy in answer:
            any_copy |= mask[:, list(copy)].all(1)
        whole &= any_copy
    return share, float(whole.float().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None, help="default: the SmolLM2 fixture")
    parser.add_argument(
        "--tasks", nargs="+", default=["niah_noise", "niah_text", "multikey", "multivalue"]
    )
    parser.add_argument("--items", type=int, default=3, help="items per task")
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=PROTOCOLS)
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "real_model_kept.json"
    )
    args = parser.parse_args(argv)
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    from benchmarks.tasks.ruler import make_items

    if args.model is None:
        from retentivekv_vllm.fixtures.smollm2 import smollm2_model_dir

        args.model = smollm2_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    policies = {
        name: make_policy(KVPolicyConfig(policy=name, budget=args.budget)) for name in POLICIES
    }
    layout = Prompts(tokenizer, args.chunk)
    # per (protocol, policy, task): [share of answer slots kept, share of heads keeping it whole]
    sums: dict[tuple[str, str, str], list[float]] = {}
    current: dict = {}

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        q, k = query[0].float(), key[0].float()
        for name, policy in policies.items():
            mask = kept_mask(policy, q, k, scaling, args.chunk, current["length"])
            share, whole = answer_kept(mask, current["places"])
            row = sums.setdefault((current["protocol"], name, current["task"]), [0.0, 0.0, 0])
            row[0], row[1], row[2] = row[0] + share, row[1] + whole, row[2] + 1
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling, enable_gqa=True
        )
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(ATTENTION_NAME, attention)
    model.set_attn_implementation(ATTENTION_NAME)
    for protocol in args.protocols:
        items = make_items(
            args.tasks, args.items, ITEM_SEED, tokenizer, layout.context_tokens(protocol)
        )
        for number, item in enumerate(items):
            prompt = layout.prompt(item, protocol)
            places = [copies(prompt[: args.chunk], layout.ids(a)) for a in item.answers]
            if not all(places):
                raise SystemExit(f"{item.task}: an answer's tokens are not in the first chunk")
            current.update(protocol=protocol, task=item.task, places=places, length=len(prompt))
            with torch.no_grad():
                model.base_model(input_ids=torch.tensor([prompt[: args.chunk]]))
            print(f"{protocol} {number + 1}/{len(items)} {item.task}", file=sys.stderr, flush=True)
    rows = [
        {
            "protocol": protocol,
            "policy": name,
            "task": task,
            "answer_slots_kept": total / count,
            "heads_keeping_answer": whole / count,
            "layer_items": count,
        }
        for (protocol, name, task), (total, whole, count) in sums.items()
    ]
    for row in rows:
        print(
            f"{row['protocol']:>8} {row['policy']:>10} {row['task']:>12}  "
            f"slots kept {100 * row['answer_slots_kept']:5.1f} %  "
            f"heads keeping it whole {100 * row['heads_keeping_answer']:5.1f} %"
        )
    settings = {"model": args.model.name, "item_seed": ITEM_SEED, "budget": args.budget}
    settings |= {"chunk": args.chunk, "items_per_task": args.items, "tasks": args.tasks}
    args.out.write_text(json.dumps({**settings, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
