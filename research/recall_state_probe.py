"""Why the state does or does not bring a folded pair back, on the recall model, in plain torch.

    python -m research.recall_state_probe [--items 50] [--ranks 64 256 1024]

For each item: the shipped recall model runs in transformers with the full cache; in its second
layer (where the question's key is matched against the context) the answer's value token is
folded, with every other context token but a random 20 % kept (sinks and window as the fidelity
task's), into a retentive state (gamma = a = 1) built with each feature map. Reported per map:
the state's share of the question's attention output, the share the exact softmax gives the
folded tokens, how often the merged output is nearer (cosine) to the answer's value vector than
to any other value in the context (the state's recall), and the range of the query's largest
log-feature (float32 features underflow to 0 below about -87); then the same readout in log space
in float64, i.e. what the state would give if the readout did not underflow. (The engine's readout
is now in log space, method.md section 6, so "mean_state_share" shows what the float32 readout of
φ(q) gave before; `research.recall_state_mass` measures every head on the engine's own fold.)
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from benchmarks.tasks import make_task
from retentivekv_vllm.core import (
    RecurrentState,
    compressed_attention,
    fold,
    local_attention,
    make_feature_map,
)
from retentivekv_vllm.fixtures import recall


def second_layer_tensors(model, ids: list[int]):
    """Post-RoPE q, k and v of layer 1 for the prompt: [H, T, d] each."""
    captured = {}
    layer = model.model.layers[1].self_attn
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    def hook(module, args, kwargs):
        hidden = kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        shape = (*hidden.shape[:-1], -1, module.head_dim)
        q = module.q_proj(hidden).view(shape).transpose(1, 2)
        k = module.k_proj(hidden).view(shape).transpose(1, 2)
        v = module.v_proj(hidden).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        captured.update(q=q[0], k=k[0], v=v[0], scale=module.scaling)

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    handle.remove()
    return captured


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=50)
    parser.add_argument("--ranks", type=int, nargs="+", default=[64, 256, 1024])
    args = parser.parse_args(argv)
    task = make_task("recall")
    model = AutoModelForCausalLM.from_pretrained(
        recall.recall_model_dir(), dtype=torch.float32
    ).eval()
    rng = random.Random(5)
    maps = [("prf", r) for r in args.ranks] + [("elu", 0)]
    stats = {
        f"{name}{r or ''}": {
            "state_share": 0.0,
            "recalled": 0,
            "log_phi_q": [],
            "log_space_share": 0.0,
            "log_space_recalled": 0,
        }
        for name, r in maps
    }
    exact_share = 0.0
    sinks, window = task.policy_defaults["kv_sinks"], task.policy_defaults["kv_window"]
    for item in task.items(args.items, 99):
        ids = item.prompt["prompt_token_ids"]
        t = second_layer_tensors(model, ids)
        n = len(ids) - 1  # the context; the last token is the question's key
        answer_pos = next(j for j in range(2, n, 2) if ids[j - 1] == ids[-1])  # the value after it
        candidates = [j for j in range(sinks, n - window) if j != answer_pos]
        kept = (
            set(rng.sample(candidates, len(candidates) // 5))
            | set(range(sinks))
            | set(range(n - window, n))
        )
        kept.add(n)  # the question itself
        keep = torch.tensor([j in kept for j in range(n + 1)])
        head = 0  # the matching head
        q = t["q"][head : head + 1, -1:]
        k, v = t["k"][head : head + 1], t["v"][head : head + 1]
        positions = torch.arange(n + 1)
        q_pos = torch.tensor([n])
        full_logits = t["scale"] * (q @ k.transpose(1, 2))[0, 0]
        exact_share += float(torch.softmax(full_logits, -1)[~keep].sum())
        values_in_context = v[0, 2:n:2]  # every value token's vector
        target = v[0, answer_pos]
        folded = (~keep).nonzero().squeeze(1)
        for name, rank in maps:
            phi = make_feature_map(name, k.shape[-1], rank or 1, t["scale"], seed=0)
            ones = torch.ones(1, len(folded))
            state = fold(
                RecurrentState.zeros(1, phi.rank, v.shape[-1]),
                phi.features(k[:, folded]),
                v[:, folded],
                ones,
                ones,
            )
            out = compressed_attention(
                q, k, v, t["scale"], q_pos, positions, keep[None], [state], phi
            )[0, 0]
            local, lse = local_attention(q, k, v, t["scale"], q_pos, positions, keep[None])
            den = float((phi.query_features(q) @ state.z[:, :, None]).squeeze())
            share = den / (den + float(lse.exp())) if den > 0 else 0.0
            cos = torch.nn.functional.cosine_similarity(values_in_context, out[None], dim=-1)
            key = f"{name}{rank or ''}"
            stats[key]["state_share"] += share
            stats[key]["log_phi_q"].append(float(phi.log_features(q).max()))
            # The same readout in log space (float64): what the state would give without underflow.
            log_kernel = torch.logsumexp(
                phi.log_features(q)[0, 0].double()[None, :]
                + phi.log_features(k[0, folded]).double(),
                dim=-1,
            )  # [folded]: log φ(q)·φ(k_i)
            log_den = torch.logsumexp(log_kernel, 0)
            stats[key]["log_space_share"] += float(torch.sigmoid(log_den - lse[0, 0].double()))
            weights = torch.softmax(log_kernel, 0)
            state_out = (weights[:, None] * v[0, folded].double()).sum(0)
            share = torch.sigmoid(log_den - lse[0, 0].double())
            merged = share * state_out + (1 - share) * local[0, 0].double()
            cos = torch.nn.functional.cosine_similarity(
                values_in_context.double(), merged[None], dim=-1
            )
            stats[key]["log_space_recalled"] += int(
                torch.allclose(values_in_context[cos.argmax()], target)
            )
            stats[key]["recalled"] += int(torch.allclose(values_in_context[cos.argmax()], target))
    report = {
        "items": args.items,
        "exact_softmax_share_of_folded_tokens": exact_share / args.items,
        # log φ(q) below about -87 underflows to 0 in float32: the state is then unreadable.
        "maps": {
            k: {
                "mean_state_share": s["state_share"] / args.items,
                "recall": s["recalled"] / args.items,
                "largest_log_phi_q": max(s["log_phi_q"]),
                "smallest_log_phi_q": min(s["log_phi_q"]),
                "log_space_mean_state_share": s["log_space_share"] / args.items,
                "log_space_recall": s["log_space_recalled"] / args.items,
            }
            for k, s in stats.items()
        },
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
