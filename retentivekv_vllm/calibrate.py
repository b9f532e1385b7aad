"""Fit learned feature maps for a model: ``python -m retentivekv_vllm.calibrate MODEL --out FILE``.

MODEL is a Hugging Face checkpoint directory. The model reads calibration text (the documentation
Python ships in ``pydoc_data``, or ``--text FILE``) cut into sequences of ``--length`` tokens;
every attention layer hands over its post-RoPE queries, keys and values. Each sequence is
compressed at its own point, drawn between ``--min-prompt`` and ``length - span`` tokens (the
stored keys and queries carry their positions, so maps fitted at one point fit only the positions
around it): ``retentive``'s selection compresses that prompt to ``--budget`` exactly as the server
does (sinks, window, observation queries, top-k), which says which tokens are folded and with
which gates (retention γ, absorption a). The maps of each layer are then trained on the queries
past the compression point, with the loss the server's output makes: the squared error, per head
in value space, of the merged output (kept cache plus state readout through the shared
normaliser, `core.merge_with_state_readouts`, folded by `core.fold`) against full attention.
Sequences held out of training give the reported loss, next to the no-state residual (the error
of eviction with the same selection); their ratio is the share of eviction's error the state
leaves.

Serve the result with ``--kv-policy retentive --kv-maps FILE`` (the maps file alone turns on the
learned state).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from retentivekv_vllm.config import KVPolicyConfig
from retentivekv_vllm.core import (
    FeatureMap,
    LearnedFeatureMap,
    RecurrentState,
    accumulated_attention,
    attention_probs,
    fold,
    gather_tokens,
    local_attention,
    merge_with_state_readouts,
)
from retentivekv_vllm.learned_maps import LearnedMaps, model_identity
from retentivekv_vllm.policies import Observation, make_policy

DEFAULT_MIN_PROMPT = 128  # the earliest compression point calibration draws
DEFAULT_RANK = 16  # a state of r·(d_v + 1) numbers: about 8 cached tokens of K+V at d = 64
ATTENTION_NAME = "retentivekv_calibration"
DEFAULT_TEXT = "pydoc_data.topics"  # the settings' name for the default calibration text
SCALE_LR = 10.0  # the key scale's learning rate, as a multiple of --lr
# Key scales tried per head before training, as factors e^0 ... e^21 of the small initial one: a
# state of untrained features then starts at its best share instead of spending most of the
# steps growing from e^-9, and stays at the initial scale where any share only hurts.
SCALE_SEARCH = torch.arange(22.0)


def calibration_text(path: Path | None) -> str:
    """The text to calibrate on: the file at `path`, or the pydoc topics Python ships."""
    if path is not None:
        return path.read_text()
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def token_sequences(tokenizer, text: str, length: int, count: int) -> list[list[int]]:
    """`count` consecutive, non-overlapping windows of `length` tokens of `text`."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    available = len(ids) // length
    if available < count:
        raise SystemExit(
            f"--length {length}: the text has {len(ids)} tokens, enough for {available} "
            f"sequences; {count} are needed (fewer --sequences or --held-out, or a shorter "
            "--length)"
        )
    return [ids[i * length : (i + 1) * length] for i in range(count)]


@dataclasses.dataclass
class LayerExample:
    """What one layer of one sequence contributes: the folded tokens and their gates, and the
    sampled queries past the compression point with their full and kept-cache outputs."""

    keys: Tensor  # [H, F, d] folded keys, in fold order
    values: Tensor  # [H, F, dv]
    gamma: Tensor  # [H, F]
    absorption: Tensor  # [H, F]
    queries: Tensor  # [H, g·Q, d] grouped query rows
    out_full: Tensor  # [H, g·Q, dv]
    out_local: Tensor  # [H, g·Q, dv] attention over the kept cache only
    lse_local: Tensor  # [H, g·Q]
    key_positions: Tensor  # [H, F] of the folded keys (for maps that de-rotate)
    query_positions: Tensor  # [1, g·Q] of the query rows


def compression_example(policy, q, k, v, scale, prompt_len, query_positions) -> LayerExample:
    """One layer's example: q [Hq, L, d], k, v [H, L, d] (one sequence, post-RoPE); the prompt
    [0, prompt_len) is compressed to the policy's budget, queries at `query_positions` (>=
    prompt_len) read the result."""
    c = policy.config
    heads, length, dim = k.shape
    g = q.shape[0] // heads
    grouped = q.view(heads, g, length, dim)
    budget = c.budget_tokens(prompt_len)
    sinks = min(c.sinks, budget)
    window = min(c.window, budget - sinks)
    prompt_k, prompt_v = k[:, :prompt_len], v[:, :prompt_len]
    first_obs = max(0, prompt_len - c.observation_window)
    obs_q = grouped[:, :, first_obs:prompt_len].reshape(heads, -1, dim)
    positions = torch.arange(prompt_len)
    probs = attention_probs(
        obs_q, prompt_k, scale, torch.arange(first_obs, prompt_len).repeat(g), positions
    )
    candidates = ((positions >= sinks) & (positions < prompt_len - window)).expand(heads, -1)
    obs = Observation(
        probs, positions.expand(heads, -1), candidates, accumulated_attention(probs), keys=prompt_k
    )
    folded = candidates & ~policy.select(obs, budget - sinks - window)
    index, gamma, absorption = policy.fold_gates(obs, folded)
    rows_q = grouped[:, :, query_positions].reshape(heads, -1, dim)
    row_positions = query_positions.repeat(g)
    all_positions = torch.arange(length)
    out_full, _ = local_attention(rows_q, k, v, scale, row_positions, all_positions)
    keep = torch.cat([~folded, torch.ones(heads, length - prompt_len, dtype=torch.bool)], 1)
    out_local, lse_local = local_attention(rows_q, k, v, scale, row_positions, all_positions, keep)
    return LayerExample(
        gather_tokens(prompt_k.contiguous(), index),
        gather_tokens(prompt_v.contiguous(), index),
        gamma,
        absorption,
        rows_q.contiguous(),
        out_full,
        out_local,
        lse_local,
        index,
        row_positions[None],
    )


def text_model(model):
    """The decoder whose attention layers the maps are for: the model itself, or the language
    model of a vision-language model."""
    base = model.base_model
    return getattr(base, "language_model", base)


def rotary_frequencies(model) -> Tensor | None:
    """The model's rotary frequencies when its RoPE is the plain one-dimensional kind that maps can
    undo at a token's position (`core.derotate`); None (maps read the vectors as cached) for any
    other, with a note."""
    rotary = getattr(text_model(model), "rotary_emb", None)
    inv_freq = getattr(rotary, "inv_freq", None)
    rope = getattr(model.config.get_text_config(), "rope_scaling", None) or {}
    if (
        inv_freq is None
        or getattr(rotary, "attention_scaling", 1.0) != 1.0
        or "mrope_section" in rope
    ):
        print("note: no plain rotary embedding found; the maps read keys and queries as cached")
        return None
    return inv_freq.detach().float().clone()


def capture_examples(model, sequences, policy, prompt_lens, queries, seed, progress):
    """Run the model over every sequence (full attention) and build each layer's examples:
    examples[layer][sequence]; sequence i is compressed after its first prompt_lens[i] tokens.
    A sequence is a list of token ids, or the model's inputs as a dict of tensors (``input_ids``
    [1, L] and, for a vision-language model, ``pixel_values``); only the decoder's attention
    layers are captured, and sequences may differ in length."""
    from transformers import AttentionInterface

    generator = torch.Generator().manual_seed(seed)
    layers = model.config.get_text_config().num_hidden_layers
    examples: list[list[LayerExample]] = [[] for _ in range(layers)]
    query_positions, prompt_len = None, None

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        q, k, v = query[0].float(), key[0].float(), value[0].float()  # [H, L, d]
        examples[module.layer_idx].append(
            compression_example(policy, q, k, v, scaling, prompt_len, query_positions)
        )
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling, enable_gqa=True
        )
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(ATTENTION_NAME, attention)
    if model.config.get_text_config() is model.config:
        model.set_attn_implementation(ATTENTION_NAME)
    else:  # a vision-language model: the vision tower keeps its own attention
        model.set_attn_implementation({"text_config": ATTENTION_NAME})
    with torch.no_grad():
        for inputs, prompt_len in progress(
            list(zip(sequences, prompt_lens)), desc="capture q, k, v", unit="seq"
        ):
            if not isinstance(inputs, dict):
                inputs = {"input_ids": torch.tensor([inputs])}
            length = inputs["input_ids"].shape[-1]
            span = torch.randperm(length - prompt_len, generator=generator)[:queries]
            query_positions = prompt_len + span.sort().values
            model.base_model(**inputs)  # no logits: not needed
    return examples


# What a padding token of a shorter fold holds: it passes through the state untouched (γ = 1,
# a = 0), so sequences compressed at different points stack into one batch.
PADDING = {"keys": 0.0, "values": 0.0, "gamma": 1.0, "absorption": 0.0, "key_positions": 0}


def stack(examples: list[LayerExample]) -> LayerExample:
    """The examples as one batch; folds of different lengths are padded at their end."""
    folded = max(e.keys.shape[1] for e in examples)

    def padded(x: Tensor, name: str) -> Tensor:
        if name not in PADDING or x.shape[1] == folded:
            return x
        pad = x.new_full((x.shape[0], folded - x.shape[1], *x.shape[2:]), PADDING[name])
        return torch.cat([x, pad], 1)

    return LayerExample(
        *(
            torch.stack([padded(getattr(e, f.name), f.name) for e in examples])
            for f in dataclasses.fields(LayerExample)
        )
    )


def merged_output(
    feature_map: FeatureMap, batch: LayerExample, state_dtype: torch.dtype | None = None
) -> Tensor:
    """The server's output for the batch's query rows: the kept cache merged with one state into
    which the folded tokens were folded with `feature_map` ([S, H, g·Q, dv]); with `state_dtype`
    the state is stored in that dtype before it is read, as the engine stores it beside a cache
    (`core.storage_dtype`)."""
    sequences, heads = batch.keys.shape[:2]

    def flat(x: Tensor) -> Tensor:
        return x.flatten(0, 1)

    phi_k = feature_map.features(batch.keys, batch.key_positions)
    state = fold(
        RecurrentState.zeros(sequences * heads, feature_map.rank, batch.values.shape[-1]),
        flat(phi_k),
        flat(batch.values),
        flat(batch.gamma),
        flat(batch.absorption),
    )
    state = RecurrentState(
        state.S.unflatten(0, (sequences, heads)), state.z.unflatten(0, (sequences, heads))
    )
    if state_dtype is not None:
        state = state.stored_as(state_dtype)
    return merge_with_state_readouts(
        batch.out_local,
        batch.lse_local,
        batch.queries,
        [state],
        feature_map,
        q_positions=batch.query_positions,
    )


def squared_errors(
    feature_map: FeatureMap, batch: LayerExample, state_dtype: torch.dtype | None = None
) -> tuple[float, float]:
    """(state error, no-state residual): squared error per query row of the merged output and of
    the kept cache alone against full attention, means over rows."""
    with torch.no_grad():
        merged = merged_output(feature_map, batch, state_dtype)
        state = (merged - batch.out_full).square().sum(-1).mean()
        residual = (batch.out_local - batch.out_full).square().sum(-1).mean()
    return float(state), float(residual)


def rms(x: Tensor) -> Tensor:
    """Root mean square of each head's entries: x [S, H, n, d] -> [H]."""
    return x.square().mean(dim=(0, 2, 3)).sqrt().clamp(min=1e-6)


def batch_of(examples: LayerExample, index: Tensor) -> LayerExample:
    return LayerExample(
        *(getattr(examples, f.name)[index] for f in dataclasses.fields(LayerExample))
    )


def search_scale(feature_map: LearnedFeatureMap, batch: LayerExample) -> None:
    """Set each head's key scale to the factor of SCALE_SEARCH (times the initial scale) whose
    merged output has the least squared error on `batch`."""
    initial = feature_map.key_log_scale
    errors = []
    with torch.no_grad():
        for factor in SCALE_SEARCH:
            feature_map.key_log_scale = initial + factor
            error = merged_output(feature_map, batch) - batch.out_full
            errors.append(error.square().sum(-1).mean(dim=(0, 2)))  # [H]
    best = SCALE_SEARCH[torch.stack(errors).argmin(0)]
    feature_map.key_log_scale = (initial + best[:, None]).contiguous()


def fit_layer(
    train: LayerExample,
    rank: int,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    rope_inv_freq: Tensor | None = None,
) -> LearnedFeatureMap:
    """Adam on the merged-output error, `batch` training sequences a step; the query and key
    projections start as the same random directions, each scaled to its inputs' spread, so
    that a query and a key that point the same way start with the same features. With the
    model's rotary frequencies the maps de-rotate their inputs (`core.LearnedFeatureMap`)."""
    heads, dim = train.keys.shape[1], train.keys.shape[-1]
    feature_map = LearnedFeatureMap.initial(
        heads, dim, rank, seed=seed, rope_inv_freq=rope_inv_freq
    )
    feature_map.key_weight = feature_map.query_weight / rms(train.keys)[:, None, None]
    feature_map.query_weight = feature_map.query_weight / rms(train.queries)[:, None, None]
    search_scale(feature_map, batch_of(train, torch.arange(min(2 * batch, len(train.keys)))))
    params = feature_map.parameters()
    for p in params:
        p.requires_grad_(True)
    # The key scale may still have to travel several e-folds in a few hundred steps.
    scale = feature_map.key_log_scale
    optimiser = torch.optim.Adam(
        [
            {"params": [p for p in params if p is not scale]},
            {"params": [scale], "lr": SCALE_LR * lr},
        ],
        lr=lr,
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    generator = torch.Generator().manual_seed(seed)
    sequences = train.keys.shape[0]
    for _ in range(steps):
        step = batch_of(train, torch.randperm(sequences, generator=generator)[:batch])
        optimiser.zero_grad()
        loss = (merged_output(feature_map, step) - step.out_full).square().sum(-1).mean()
        loss.backward()
        optimiser.step()
        schedule.step()
    for p in params:
        p.requires_grad_(False)
    return feature_map


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m retentivekv_vllm.calibrate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", type=Path, help="Hugging Face checkpoint directory")
    parser.add_argument("--out", type=Path, required=True, help="maps file to write (safetensors)")
    parser.add_argument(
        "--text", type=Path, default=None, help="calibration text (default: pydoc topics)"
    )
    parser.add_argument(
        "--budget", type=float, default=0.2, help="budget ratio of the prompt fitted at"
    )
    parser.add_argument("--rank", type=int, default=DEFAULT_RANK, help="features per state (even)")
    defaults = KVPolicyConfig()
    parser.add_argument(
        "--sinks",
        type=int,
        default=defaults.sinks,
        help="first tokens the selection never folds (set it to what the server uses)",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=defaults.window,
        help="most recent tokens the selection never folds (set it to what the server uses)",
    )
    parser.add_argument(
        "--lambda",
        dest="lambda_",
        type=float,
        default=defaults.retentive.lambda_,
        help="retentive's weight of attention against entropy in the selection (set it to the "
        "server's --kv-lambda: the maps are fitted on the tokens that selection folds)",
    )
    parser.add_argument("--length", type=int, default=1024, help="tokens per sequence")
    parser.add_argument(
        "--span", type=int, default=256, help="fewest tokens after the compression point"
    )
    parser.add_argument(
        "--min-prompt",
        type=int,
        default=None,
        help="earliest compression point (default 128, or --length - --span if that is less); "
        "each sequence is compressed at a point drawn between it and --length - --span",
    )
    parser.add_argument(
        "--queries", type=int, default=64, help="query positions sampled per sequence"
    )
    parser.add_argument("--sequences", type=int, default=16, help="training sequences")
    parser.add_argument(
        "--held-out", type=int, default=4, help="sequences held out for the loss report"
    )
    parser.add_argument("--steps", type=int, default=300, help="Adam steps per layer")
    parser.add_argument("--batch", type=int, default=4, help="training sequences per step")
    parser.add_argument("--lr", type=float, default=0.01, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's; on a machine busy with other work 1 is faster)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.budget < 1:
        parser.error(f"--budget: a ratio in (0, 1) expected, got {args.budget}")
    if args.rank < 2 or args.rank % 2:
        parser.error(f"--rank: an even number >= 2 expected, got {args.rank}")
    if not 0 < args.span < args.length:
        parser.error(f"--span: between 1 and --length - 1 expected, got {args.span}")
    if args.min_prompt is None:
        args.min_prompt = min(DEFAULT_MIN_PROMPT, args.length - args.span)
    if not 0 < args.min_prompt <= args.length - args.span:
        parser.error(
            f"--min-prompt: between 1 and --length - --span expected, got {args.min_prompt}"
        )
    if not 0 < args.queries <= args.span:
        parser.error(f"--queries: between 1 and --span expected, got {args.queries}")
    for name in ("sequences", "held_out", "steps", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: at least 1 expected")
    if not (args.model / "config.json").is_file():
        parser.error(
            f"MODEL: {args.model} is not a Hugging Face checkpoint directory (no config.json)"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    sequences = token_sequences(
        tokenizer, calibration_text(args.text), args.length, args.sequences + args.held_out
    )
    # Each sequence is compressed at its own point: keys and queries are stored after RoPE, so
    # maps fitted at one compression point fit that range of positions only.
    latest = args.length - args.span
    points = torch.randint(
        args.min_prompt,
        latest + 1,
        (len(sequences),),
        generator=torch.Generator().manual_seed(args.seed),
    )
    text = str(args.text) if args.text else DEFAULT_TEXT
    fit_maps(args, model, sequences, points.tolist(), text, started)
    return 0


def fit_maps(args, model, sequences, points: list[int], text: str, started: float) -> LearnedMaps:
    """Capture every sequence (token ids, or a model's inputs as a dict: `capture_examples`),
    compressed at its point, fit each layer's maps on the first ``args.sequences``, report the
    rest as held out, and write the file ``args.out``; `text` names the calibration data in the
    file's settings. `args` as `parse_args` gives them."""
    from tqdm.auto import tqdm

    identity = model_identity(args.model)
    config = KVPolicyConfig.from_knobs(
        policy="retentive",
        budget=args.budget,
        states="single",
        sinks=args.sinks,
        window=args.window,
        lambda_=args.lambda_,
    )
    config.validate()
    policy = make_policy(config)
    inv_freq = rotary_frequencies(model)
    examples = capture_examples(model, sequences, policy, points, args.queries, args.seed, tqdm)
    del model
    layers, per_layer = [], []
    bar = tqdm(range(len(examples)), desc="fit layers", unit="layer")
    for layer in bar:
        train = stack(examples[layer][: args.sequences])
        held_out = stack(examples[layer][args.sequences :])
        examples[layer] = []  # freed as it goes: all layers' examples together are the peak
        feature_map = fit_layer(
            train, args.rank, args.steps, args.batch, args.lr, args.seed + layer, inv_freq
        )
        state_error, residual = squared_errors(feature_map, held_out)
        bf16_error, _ = squared_errors(feature_map, held_out, torch.bfloat16)
        train_error, train_residual = squared_errors(feature_map, train)
        layers.append(feature_map)
        per_layer.append(
            {
                "layer": layer,
                "held_out_state": state_error,
                "held_out_residual": residual,
                "held_out_state_bf16": bf16_error,
                "train_state": train_error,
                "train_residual": train_residual,
            }
        )
        bar.set_postfix(held_out_ratio=f"{state_error / max(residual, 1e-30):.3f}")
    total_state = sum(r["held_out_state"] for r in per_layer)
    total_residual = sum(r["held_out_residual"] for r in per_layer)
    total_bf16 = sum(r["held_out_state_bf16"] for r in per_layer)
    results = {
        "per_layer": per_layer,
        "held_out_state": total_state,
        "held_out_residual": total_residual,
        "held_out_ratio": total_state / max(total_residual, 1e-30),
        "held_out_ratio_bf16_state": total_bf16 / max(total_residual, 1e-30),
        "seconds": round(time.perf_counter() - started, 1),
    }
    settings = {
        "text": text,
        "policy": dataclasses.asdict(config),
        "rank": args.rank,
        "length": args.length,
        "span": args.span,
        "min_prompt": args.min_prompt,
        "queries": args.queries,
        "sequences": args.sequences,
        "held_out": args.held_out,
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "seed": args.seed,
    }
    maps = LearnedMaps(layers, identity, settings, results)
    maps.save(args.out)
    print_report(per_layer, results, args.out)
    return maps


def print_report(per_layer: list[dict], results: dict, out: Path) -> None:
    """Held-out squared error with the state and without (eviction), per layer and overall."""
    print(f"{'layer':>5} {'state':>11} {'no state':>11} {'ratio':>7}   (held-out, per row)")
    for row in per_layer:
        state, residual = row["held_out_state"], row["held_out_residual"]
        ratio = state / max(residual, 1e-30)
        print(f"{row['layer']:>5} {state:>11.4g} {residual:>11.4g} {ratio:>7.3f}")
    print(
        f"{'all':>5} {results['held_out_state']:>11.4g} {results['held_out_residual']:>11.4g} "
        f"{results['held_out_ratio']:>7.3f}"
    )
    print(f"wrote {out} in {results['seconds']:.0f} s")
    if not math.isfinite(results["held_out_ratio"]):
        print("warning: the held-out loss is not finite", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
