"""Merged-output error of each feature map against eviction at equal memory, per layer, on text
that calibration did not see.

    python -m benchmarks.feature_map_loss MODEL --maps FILE --out benchmarks/results/FILE.json

Runs MODEL over ``--sequences`` windows of the calibration text that follow the ones the maps
file was fitted and held out on, compresses each prompt as ``calibrate`` does (the file's budget,
length and span), and measures, per layer, the squared error against full attention of the
queries past the compression point for: eviction (the kept cache alone), eviction given the
state's bytes as extra cached tokens, and the kept cache merged with a state of each map —
``learned`` (the file, its state in float32 and rounded to bfloat16), ``prf`` at the default
rank and at the file's rank, ``elu``. A state of rank r costs r·(d_v + 1) numbers, as many as
r·(d_v + 1) / (d_k + d_v) cached tokens of the same dtype.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from retentivekv_vllm import calibrate
from retentivekv_vllm.config import KVPolicyConfig
from retentivekv_vllm.core import make_feature_map
from retentivekv_vllm.learned_maps import load_maps, model_identity
from retentivekv_vllm.policies import make_policy
from retentivekv_vllm.policies.retentive import RetentiveSettings

PRF_DEFAULT_RANK = RetentiveSettings().state_rank


def state_tokens(rank: int, head_dim: int) -> int:
    """Cached tokens (K and V, same dtype) that hold as many numbers as one state of `rank`."""
    return math.ceil(rank * (head_dim + 1) / (2 * head_dim))


def capture(model, sequences, policies, prompt_len, queries, seed):
    """examples[name][layer] = a stacked LayerExample of every sequence, for each policy."""
    from transformers import AttentionInterface

    generator = torch.Generator().manual_seed(seed)
    length = len(sequences[0])
    layers = model.config.num_hidden_layers
    examples = {name: [[] for _ in range(layers)] for name in policies}
    scales = {}
    query_positions = None

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        q, k, v = query[0].float(), key[0].float(), value[0].float()
        scales[module.layer_idx] = scaling
        for name, policy in policies.items():
            examples[name][module.layer_idx].append(
                calibrate.compression_example(policy, q, k, v, scaling, prompt_len, query_positions)
            )
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling, enable_gqa=True
        )
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("retentivekv_feature_map_loss", attention)
    model.set_attn_implementation("retentivekv_feature_map_loss")
    with torch.no_grad():
        for i, ids in enumerate(sequences):
            span = torch.randperm(length - prompt_len, generator=generator)[:queries]
            query_positions = prompt_len + span.sort().values
            model.base_model(input_ids=torch.tensor([ids]))
            print(f"captured sequence {i + 1}/{len(sequences)}", file=sys.stderr, flush=True)
    stacked = {name: [calibrate.stack(e) for e in layers] for name, layers in examples.items()}
    return stacked, scales


def evaluate(maps, examples, scales, extra) -> dict:
    """Per layer, the squared error of each map's merged output and of eviction, the latter also
    with `extra` tokens more; totals as ratios to eviction's."""
    head_dim = maps.model.head_dim
    rows = []
    for layer, learned in enumerate(maps.layers):
        base = examples["eviction"][layer]
        scale = scales[layer]
        maps_of = {
            "learned": learned,
            f"prf{PRF_DEFAULT_RANK}": make_feature_map("prf", head_dim, PRF_DEFAULT_RANK, scale),
            f"prf{maps.rank}": make_feature_map("prf", head_dim, maps.rank, scale),
            "elu": make_feature_map("elu", head_dim, head_dim, scale),
        }
        row = {"layer": layer}
        for name, feature_map in maps_of.items():
            row[name], row["eviction"] = calibrate.squared_errors(feature_map, base)
        row["learned_bf16"], _ = calibrate.squared_errors(learned, base, torch.bfloat16)
        for n in sorted(set(extra.values())):
            wider = examples[f"eviction+{n}"][layer]
            row[f"eviction+{n}"] = float((wider.out_local - wider.out_full).square().sum(-1).mean())
        rows.append(row)
    names = [k for k in rows[0] if k != "layer"]
    totals = {name: sum(r[name] for r in rows) for name in names}
    return {
        "state_tokens": {
            "learned": extra["learned"],
            f"prf{PRF_DEFAULT_RANK}": extra["prf"],
            "elu": state_tokens(head_dim, head_dim),
        },
        "ratio_to_eviction": {n: totals[n] / totals["eviction"] for n in names},
        "per_layer": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path, help="Hugging Face checkpoint directory")
    parser.add_argument("--maps", type=Path, required=True, help="learned maps of MODEL")
    parser.add_argument("--sequences", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    maps = load_maps(args.maps)
    maps.check_model(model_identity(args.model), f"maps file {args.maps}")
    s = maps.settings
    length, prompt_len = s["length"], s["length"] - s["span"]
    head_dim = maps.model.head_dim
    budget = KVPolicyConfig(budget=s["policy"]["budget"]).budget_tokens(prompt_len)
    extra = {
        "learned": state_tokens(maps.rank, head_dim),
        "prf": state_tokens(PRF_DEFAULT_RANK, head_dim),
    }
    policies = {"eviction": budget, **{f"eviction+{n}": budget + n for n in extra.values()}}
    policies = {
        name: make_policy(
            KVPolicyConfig.from_knobs(policy="retentive", budget=tokens, states="single")
        )
        for name, tokens in policies.items()
    }
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    used = s["sequences"] + s["held_out"]
    text = None if s["text"] == calibrate.DEFAULT_TEXT else Path(s["text"])
    windows = calibrate.token_sequences(
        tokenizer, calibrate.calibration_text(text), length, used + args.sequences
    )[used:]
    examples, scales = capture(model, windows, policies, prompt_len, s["queries"], s["seed"] + 1)
    result = {
        "model": str(args.model),
        "maps": str(args.maps),
        "budget_tokens": budget,
        "prompt_tokens": prompt_len,
        "sequences": args.sequences,
        **evaluate(maps, examples, scales, extra),
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"budget {budget} of {prompt_len} prompt tokens; squared error summed over layers, "
        "as a ratio to eviction's:"
    )
    for name, ratio in result["ratio_to_eviction"].items():
        print(f"  {name:>14} {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
