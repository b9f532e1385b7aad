"""Train the multi-query associative-recall fixture: a small Llama (2 layers, hidden 128, two heads
of 64, tied embeddings) on CPU with plain torch + transformers.

    python -m training.recall --out retentivekv_vllm/fixtures/trained/recall               # shipped
    python -m training.recall --init random --out .cache/recall/scratch --max-minutes 55   # from
    scratch

``--init induction`` (the default, and the shipped model) writes the two-layer recall circuit into
the weights (``training/induction_init.py``) and fine-tunes it; ``--init random`` trains from
scratch with an adaptive curriculum, which on two shared cores stayed at chance for the first
~900 steps (docs/results.md). Seeded: weights, data order and evaluation items follow ``--seed``.
The model is saved in fp16 with a word-level tokenizer (``retentivekv_vllm.fixtures.recall``) and
served by vLLM as any Llama. The evaluation here is teacher-forced; the accuracy that counts is
measured through vLLM by ``benchmarks/fidelity.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from retentivekv_vllm.fixtures import recall
from training import induction_init

# hidden 128, head size 64 (vLLM's CPU attention supports it), block size 32 in serving.
MODEL_CONFIG = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    hidden_act="silu",
    # Tied: reading a value token out of the context and writing it to the output then
    # needs no separate unembedding to be learnt for each of the 512 values.
    tie_word_embeddings=True,
    attention_bias=False,
    mlp_bias=False,
)


def vocab_size() -> int:
    return (len(recall.VOCAB) + 63) // 64 * 64


def make_model(seed: int, num_heads: int, num_layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    head_dim = MODEL_CONFIG["hidden_size"] // num_heads
    config = LlamaConfig(
        **{
            **MODEL_CONFIG,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_heads,
            "head_dim": head_dim,
            "num_hidden_layers": num_layers,
        },
        vocab_size=vocab_size(),
        bos_token_id=recall.BOS_ID,
        eos_token_id=recall.EOS_ID,
        pad_token_id=recall.PAD_ID,
    )
    return LlamaForCausalLM(config)


def batch(rng: random.Random, size: int, num_pairs: int, num_queries: int):
    seqs, targets = zip(*(recall.sample_sequence(rng, num_pairs, num_queries) for _ in range(size)))
    ids = torch.tensor(seqs)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for row, positions in enumerate(targets):
        mask[row, positions] = True
    return ids, mask


def answer_loss(model, ids, mask):
    logits = model(input_ids=ids).logits
    picked = logits[mask]  # logits at query keys predict their values
    answers = ids[:, 1:][mask[:, :-1]]
    return F.cross_entropy(picked.float(), answers), (picked.argmax(-1) == answers).float().mean()


@torch.no_grad()
def evaluate(model, seed: int, num_pairs: int, sequences: int = 64) -> float:
    model.eval()
    ids, mask = batch(random.Random(seed), sequences, num_pairs, 16)
    _, accuracy = answer_loss(model, ids, mask)
    model.train()
    return float(accuracy)


def write_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(
        models.WordLevel({w: i for i, w in enumerate(recall.VOCAB)}, unk_token=recall.PAD)
    )
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": recall.BOS,
                "eos_token": recall.EOS,
                "pad_token": recall.PAD,
                "unk_token": recall.PAD,
                "model_max_length": MODEL_CONFIG["max_position_embeddings"],
            },
            indent=2,
        )
        + "\n"
    )


def save(model, out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    (out / "model.safetensors").chmod(0o644)  # safetensors writes it owner-only
    model.to(torch.float32)
    (out / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": recall.BOS_ID,
                "eos_token_id": recall.EOS_ID,
                "pad_token_id": recall.PAD_ID,
            },
            indent=2,
        )
        + "\n"
    )
    write_tokenizer(out)
    (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=recall.TRAINED_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20000, help="most optimiser steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--min-pairs", type=int, default=2)
    parser.add_argument("--start-pairs", type=int, default=8, help="largest context at step 0")
    parser.add_argument("--max-pairs", type=int, default=120)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument(
        "--grow-at",
        type=float,
        default=0.9,
        help="training accuracy (running mean) at which the largest context grows by 25%%",
    )
    parser.add_argument(
        "--target",
        type=float,
        default=0.99,
        help="stop once the evaluation at --max-pairs reaches this accuracy",
    )
    parser.add_argument(
        "--heads", type=int, default=2, help="attention heads (head size 128 / heads)"
    )
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument(
        "--init",
        choices=("random", "induction"),
        default="induction",
        help="random: from scratch; induction: the recall circuit written into the "
        "weights (training/induction_init.py), then fine-tuned",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-minutes", type=float, default=55.0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    if args.init == "induction":
        MODEL_CONFIG["rope_theta"] = induction_init.ROPE_THETA
    model = make_model(args.seed, args.heads, args.layers)
    if args.init == "induction":
        induction_init.write_induction_circuit(model, args.seed)
        # Fine-tuning starts at the full context range: the circuit already solves it.
        args.start_pairs = args.max_pairs
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.98)
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / args.warmup_steps)
    )
    started = time.monotonic()
    # Adaptive curriculum: contexts are drawn uniformly up to `cap` pairs, and `cap` grows by a
    # quarter whenever the running training accuracy passes --grow-at, so the recall circuit
    # forms on short contexts (fast) and is then stretched to --max-pairs.
    cap, running = args.start_pairs, 0.0
    for step in range(args.steps):
        num_pairs = rng.randint(args.min_pairs, cap)
        ids, mask = batch(rng, args.batch_size, num_pairs, args.queries)
        loss, accuracy = answer_loss(model, ids, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        running = 0.95 * running + 0.05 * accuracy.item()
        if running > args.grow_at and cap < args.max_pairs:
            cap, running = min(args.max_pairs, math.ceil(cap * 1.25)), 0.0
            print(f"step {step}: contexts up to {cap} pairs", flush=True)
        minutes = (time.monotonic() - started) / 60
        if step % 50 == 0:
            print(
                f"step {step} pairs {num_pairs} loss {loss.item():.3f} acc {accuracy.item():.3f} "
                f"running {running:.3f} {minutes:.1f} min",
                flush=True,
            )
        if cap == args.max_pairs and step % 100 == 99:
            score = evaluate(model, args.seed + 1, args.max_pairs)
            print(f"  eval@{args.max_pairs} pairs: {score:.3f}", flush=True)
            if score >= args.target:
                break
        if minutes > args.max_minutes:
            print(f"stopping at step {step}: time limit", flush=True)
            break
    final = evaluate(model, args.seed + 1, args.max_pairs, sequences=128)
    print(f"final teacher-forced accuracy at {args.max_pairs} pairs: {final:.4f}", flush=True)
    save(
        model,
        args.out,
        {
            "args": {
                k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"
            },
            "steps_run": step + 1,
            "minutes": round((time.monotonic() - started) / 60, 1),
            "teacher_forced_accuracy": final,
        },
    )


if __name__ == "__main__":
    main()
