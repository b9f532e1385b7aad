"""How much of the folded tokens' softmax mass the retentive state carries on the recall model.

    python -m research.recall_state_mass [--items 50] [--budgets 0.1 0.2] [--ranks 64 256 1024 4096]
    python -m research.recall_state_mass --sweep [--items 100] ...   # simulated accuracy of state
    knobs

The shipped recall model runs in transformers with an attention function that compresses the
prompt as the engine does on the recall task: the context arrives in two 128-token chunks, each
chunk's rows attend to the live cache plus the states, after each chunk that ends over budget the
`retentive` policy (task defaults: 2 sinks, 8-token window) scores the live cache with the last
32 queries, keeps its top k and folds the rest with its own gates γ and absorptions a; the
question token then reads the budget's cache and the states. The fold is tracked exactly: each
folded token's weight w_i (a_i times the decays after it), so any feature map's state can be
evaluated afterwards without rerunning the fold.

Per budget, layer and head, at the question's row, the report gives (medians over items, logs
natural):

* ``log_true_folded - lse_kept``: log of Σ_folded w_i·exp(scale·q·k_i), the mass the state should
  return, against the kept cache's log-sum-exp (> 0: the folded part outweighs the kept part);
* ``answer_share_true``: the answer's (the queried value token's) share of that folded mass, over
  items where the answer was folded in this head;
* per feature map (prf at each rank, elu): ``log_err``, log of the state's estimate φ(q)ᵀz minus
  log of the true folded mass, computed exactly in float64 log space; ``underflow``: share of
  items whose float32 readout φ(q)ᵀz (as the engine computes it, features exponentiated in float32)
  is 0 although tokens were folded; ``answer_share_est``: the answer's share of the estimate;
  ``state_share``: the state's share of the merged output, g·den / (e^lse + g·den), in log space.

``--sweep`` instead measures the greedy answer's accuracy under state variants (feature map,
rank, a query/key temperature τ for which φ estimates exp(τ·scale·q·k), a log-gain), against
the no-state ablation on the same items, all through this simulation (fast; the fidelity harness
checks what matters through vLLM).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import torch

from benchmarks.tasks import make_task
from retentivekv_vllm.config import KVPolicyConfig
from retentivekv_vllm.core import (
    RecurrentState,
    accumulated_attention,
    attention_probs,
    fold,
    local_attention,
    make_feature_map,
)
from retentivekv_vllm.fixtures import recall
from retentivekv_vllm.policies import Observation, make_policy

ITEM_SEED = 99  # the probe's seed, distinct from fidelity.ITEM_SEED and calibrate's seed
CHUNK = 128


@dataclasses.dataclass(frozen=True)
class Variant:
    """How the question (and chunk-2 rows) read the state. feature None: no state (eviction).
    tau: temperature (φ estimates exp(tau·scale·q·k)), scalar or {layer: [per head]};
    log_gain likewise; exact: log-space readout, else the engine's float32 readout."""

    name: str
    feature: str | None = "prf"
    rank: int = 64
    tau: object = 1.0
    log_gain: object = 0.0
    exact: bool = True
    normalise: bool = False  # divide the readout by φ(q)·φ(0), the map's own estimate of exp(0) = 1
    balance: object = 1.0  # c: features of q/c and c·k (the same kernel; prf's variance changes)


def _per_head(value, layer: int, heads: int) -> torch.Tensor:
    if isinstance(value, dict):
        return torch.tensor(
            value.get(layer, value.get(str(layer), [0.0] * heads)), dtype=torch.float64
        )
    return torch.full((heads,), float(value), dtype=torch.float64)


class Simulation:
    """Chunked prefill of one prompt with retentive's compression, per layer; see the module doc."""

    def __init__(self, config: KVPolicyConfig, variant: Variant, num_prompt: int):
        self.policy = make_policy(config)
        self.config = config
        self.variant = variant
        self.budget = config.budget_tokens(num_prompt)
        self.layers: dict[int, dict] = {}

    # -- the fold, tracked as per-token weights --------------------------------------------------
    def _fold_weights(self, weights, obs, folded, num_tokens):
        heads = folded.shape[0]
        index, gamma, absorption = self.policy.fold_gates(obs, folded)
        per_head = index.shape[1]
        positions = obs.positions.gather(1, index)
        one_hot = torch.nn.functional.one_hot(positions, num_tokens).float()  # φ(k_i) = e_{pos_i}
        state = RecurrentState(torch.zeros(heads, num_tokens, 1), weights)
        return fold(state, one_hot, torch.zeros(heads, per_head, 1), gamma, absorption).z

    # -- readout of a state given by per-token weights -------------------------------------------
    def log_kernel(self, layer, q, k, scale, variant=None):
        """log φ(√τ q)·φ(√τ k_j) [H, m, n] float64 for the variant's map (exact, log space)."""
        v = variant or self.variant
        heads = q.shape[0]
        tau = _per_head(v.tau, layer, heads)
        out = []
        for h in range(heads):
            fm = make_feature_map(
                v.feature, q.shape[-1], v.rank, scale * float(tau[h]), self.config.retentive.seed
            )
            # prf folds τ into its scale; elu (scale-free) reads √τ·x.
            stretch = 1.0 if v.feature == "prf" else math.sqrt(float(tau[h]))
            c = float(_per_head(v.balance, layer, heads)[h]) or 1.0
            lq = fm.log_features(q[h] * stretch / c).double()
            lk = fm.log_features(k[h] * stretch * c).double()
            if v.normalise:
                lq = lq - torch.logsumexp(
                    lq + fm.log_features(torch.zeros_like(q[h, :1])).double(), -1, keepdim=True
                )
            out.append(torch.logsumexp(lq[:, None, :] + lk[None, :, :], -1))
        return torch.stack(out)

    def read(self, layer, q, k, v, weights, scale, out_local, lse_local):
        """Merge local attention with the state of `weights` [H, n] for rows q [H, m, d] -> [H, m, "
        "dv]."""
        var = self.variant
        if var.feature is None or not (weights > 0).any():
            return out_local
        heads = q.shape[0]
        log_gain = _per_head(var.log_gain, layer, heads)[:, None]
        folded = weights > 0
        if var.exact:
            log_w = torch.where(folded, weights.double().log(), float("-inf"))
            logits = self.log_kernel(layer, q, k, scale) + log_w[:, None, :]  # [H, m, n]
            log_den = torch.logsumexp(logits, -1) + log_gain
            out_state = torch.softmax(logits, -1) @ v.double()
        else:
            tau = _per_head(var.tau, layer, heads)
            dens, nums = [], []
            for h in range(heads):
                fm = make_feature_map(
                    var.feature,
                    q.shape[-1],
                    var.rank,
                    scale * float(tau[h]),
                    self.config.retentive.seed,
                )
                phi_k = fm.features(k[h]) * weights[h, :, None]  # float32, as the engine folds
                z, S = phi_k.sum(0), phi_k.T @ v[h].float()
                phi_q = fm.features(q[h])
                dens.append(phi_q @ z)
                nums.append(phi_q @ S)
            den, num = torch.stack(dens).double(), torch.stack(nums).double()
            log_den = (
                torch.where(den > 0, den, 1.0).log().masked_fill(den <= 0, float("-inf")) + log_gain
            )
            out_state = num / torch.where(den > 0, den, 1.0)[..., None]
        lse = lse_local.double()
        top = torch.maximum(lse, log_den)
        wl, ws = (lse - top).exp(), (log_den - top).exp()
        merged = (wl[..., None] * out_local.double() + ws[..., None] * out_state) / (wl + ws)[
            ..., None
        ]
        return torch.where(torch.isfinite(log_den)[..., None], merged, out_local.double()).float()

    # -- one layer, the whole prompt -------------------------------------------------------------
    def layer(self, index, q, k, v, scale):
        """q, k, v [H, L, d] (post-RoPE) -> out [H, L, dv]; records what the last row saw."""
        c = self.config
        heads, length, _ = q.shape
        positions = torch.arange(length)
        live = torch.ones(heads, length, dtype=torch.bool)  # not folded
        weights = torch.zeros(heads, length)
        out = torch.empty(heads, length, v.shape[-1])
        sinks = min(c.sinks, self.budget)
        window = min(c.window, self.budget - sinks)
        for start in range(0, length, CHUNK):
            end = min(start + CHUNK, length)
            rows = slice(start, end)
            out_local, lse_local = local_attention(
                q[:, rows],
                k[:, :end],
                v[:, :end],
                scale,
                positions[rows],
                positions[:end],
                live[:, :end],
            )
            out[:, rows] = self.read(
                index,
                q[:, rows],
                k[:, :end],
                v[:, :end],
                weights[:, :end],
                scale,
                out_local,
                lse_local,
            )
            if end == length:
                self.layers[index] = dict(
                    q=q[:, -1:],
                    k=k,
                    v=v,
                    live=live.clone(),
                    weights=weights.clone(),
                    lse=lse_local[:, -1],
                    scale=scale,
                )
                break
            if int(live[0, :end].sum()) <= self.budget:
                continue
            # Compress: the live tokens of each head, in position order.
            n_live = int(live[0, :end].sum())
            index_live = live[:, :end].nonzero()[:, 1].view(heads, n_live)
            keys = k.gather(1, index_live[..., None].expand(-1, -1, k.shape[-1]))
            key_pos = index_live
            obs_rows = torch.arange(max(0, end - c.observation_window), end)
            probs = attention_probs(q[:, obs_rows], keys, scale, obs_rows, key_pos)
            candidates = (key_pos >= sinks) & (key_pos < end - window)
            obs = Observation(probs, key_pos, candidates, accumulated_attention(probs), None)
            kept = ~candidates | self.policy.select(obs, self.budget - sinks - window)
            weights[:, :end] = self._fold_weights(weights[:, :end], obs, ~kept, end)
            live.scatter_(1, key_pos, kept)
        return out


def run_model(model, ids, sim: Simulation) -> int:
    from transformers import AttentionInterface

    calls = iter(range(10**6))

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        out = sim.layer(next(calls), query[0].float(), key[0].float(), value[0].float(), scaling)
        return out.transpose(0, 1).unsqueeze(0).to(query.dtype), None

    AttentionInterface.register("recall_state_mass", attention)
    model.config._attn_implementation = "recall_state_mass"
    for layer in model.model.layers:
        layer.self_attn.config._attn_implementation = "recall_state_mass"
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    return int(logits.argmax())


def mass_stats(sim: Simulation, answer_pos: int, ranks: list[int]) -> dict:
    """Per layer and head, the quantities of the module doc for the question row."""
    out = {}
    for layer, rec in sim.layers.items():
        q, k, w, scale = rec["q"], rec["k"], rec["weights"], rec["scale"]
        folded = w > 0
        logits = scale * (q.double() @ k.double().transpose(1, 2))[:, 0]  # [H, L]
        log_w = torch.where(folded, w.double().log(), float("-inf"))
        log_true = torch.logsumexp(logits + log_w, -1)  # [H]
        ans_true = (logits[:, answer_pos] + log_w[:, answer_pos] - log_true).exp()
        for h in range(q.shape[0]):
            row = {
                "answer_folded": bool(folded[h, answer_pos]),
                "n_folded": int(folded[h].sum()),
                "log_true_minus_lse": float(log_true[h] - rec["lse"][h]),
                "answer_share_true": float(ans_true[h]) if folded[h, answer_pos] else None,
                "q_norm_scaled": float(q[h, 0].norm() * math.sqrt(scale)),
                "k_norm_scaled_max": float(k[h][folded[h]].norm(dim=-1).max() * math.sqrt(scale))
                if folded[h].any()
                else None,
                "maps": {},
            }
            for name, rank in [("prf", r) for r in ranks] + [("elu", 0)]:
                var = Variant(name, name, rank or 64)
                lk = sim.log_kernel(layer, q[h : h + 1], k[h : h + 1], scale, var)[0, 0]  # [L]
                log_est = torch.logsumexp(lk + log_w[h], -1)
                fm = make_feature_map(
                    name, q.shape[-1], rank or 64, scale, sim.config.retentive.seed
                )
                z = (fm.features(k[h]) * w[h, :, None]).sum(0)
                den32 = float(fm.features(q[h, 0]) @ z)
                key = f"{name}{rank or ''}"
                row["maps"][key] = {
                    "log_err": float(log_est - log_true[h]) if name == "prf" else None,
                    "log_est_minus_true": float(log_est - log_true[h]),
                    "underflow": den32 == 0.0,
                    "answer_share_est": float(
                        (lk[answer_pos] + log_w[h, answer_pos] - log_est).exp()
                    )
                    if folded[h, answer_pos]
                    else None,
                    "answer_top_est": bool((lk + log_w[h]).argmax() == answer_pos)
                    if folded[h, answer_pos]
                    else None,
                    "state_share": float(torch.sigmoid(log_est - rec["lse"][h].double())),
                }
            out[f"layer{layer}/head{h}"] = row
    return out


def _median(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarise(rows: list[dict]) -> dict:
    summary = {}
    for key in rows[0]:
        per = [r[key] for r in rows]
        s = {
            "answer_folded": sum(p["answer_folded"] for p in per) / len(per),
            "n_folded": _median([p["n_folded"] for p in per]),
            "log_true_minus_lse": _median([p["log_true_minus_lse"] for p in per]),
            "answer_share_true_median": _median([p["answer_share_true"] for p in per]),
            "q_norm_scaled_median": _median([p["q_norm_scaled"] for p in per]),
            "k_norm_scaled_max_median": _median([p["k_norm_scaled_max"] for p in per]),
            "maps": {},
        }
        for m in per[0]["maps"]:
            ms = [p["maps"][m] for p in per]
            s["maps"][m] = {
                "log_est_minus_true_median": _median([x["log_est_minus_true"] for x in ms]),
                "log_est_minus_true_min": min(x["log_est_minus_true"] for x in ms),
                "log_est_minus_true_max": max(x["log_est_minus_true"] for x in ms),
                "float32_underflow": sum(x["underflow"] for x in ms) / len(ms),
                "answer_share_est_median": _median([x["answer_share_est"] for x in ms]),
                "answer_top_est": _mean([x["answer_top_est"] for x in ms]),
                "state_share_median": _median([x["state_share"] for x in ms]),
            }
        summary[key] = s
    return summary


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=50)
    parser.add_argument("--seed", type=int, default=ITEM_SEED)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2])
    parser.add_argument("--ranks", type=int, nargs="+", default=[64, 256, 1024, 4096])
    parser.add_argument(
        "--sweep", type=Path, default=None, help="JSON list of Variant fields; accuracy mode"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    task = make_task("recall")
    model = AutoModelForCausalLM.from_pretrained(
        recall.recall_model_dir(), dtype=torch.float32
    ).eval()
    items = task.items(args.items, args.seed)
    report = {"items": args.items, "item_seed": args.seed, "budgets": {}}
    for budget in args.budgets:
        config = KVPolicyConfig.from_additional_config(
            {**task.policy_defaults, "kv_policy": "retentive", "kv_budget": budget}
        )
        if args.sweep is None:
            rows, correct = [], 0
            for item in items:
                ids = item.prompt["prompt_token_ids"]
                sim = Simulation(config, Variant("none", None), len(ids))
                correct += run_model(model, ids, sim) == item.answer
                answer_pos = ids.index(ids[-1]) + 1
                rows.append(mass_stats(sim, answer_pos, args.ranks))
            report["budgets"][str(budget)] = {
                "no_state_accuracy": correct / len(items),
                **summarise(rows),
            }
        else:
            variants = [Variant(**v) for v in json.loads(args.sweep.read_text())]
            acc = {}
            for var in variants:
                hits = sum(
                    run_model(
                        model,
                        it.prompt["prompt_token_ids"],
                        Simulation(config, var, len(it.prompt["prompt_token_ids"])),
                    )
                    == it.answer
                    for it in items
                )
                acc[var.name] = hits / len(items)
                print(f"budget {budget} {var.name}: {100 * acc[var.name]:.1f} %", flush=True)
            report["budgets"][str(budget)] = acc
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
