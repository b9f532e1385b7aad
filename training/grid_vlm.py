"""Build the image-grid fixture: a small LLaVA (CLIP tower, MLP projector, Llama), on CPU.

    python -m training.grid_vlm --out retentivekv_vllm/fixtures/trained/grid_vlm                 #
    shipped
    python -m training.grid_vlm --init random --steps 450 --out .cache/grid/scratch              #
    from scratch

``--init circuit`` (the default, and the shipped model) writes the circuit that answers the
three kinds of question into the weights (``training/grid_circuit.py``); training steps on top
are optional (``--steps``, default none). ``--init random`` trains from scratch, which on two
CPU cores plateaued at the answer prior (docs/results.md).

Seeded (weights, boards and evaluation items all follow ``--seed``), plain torch +
transformers, a fixed step budget so a run stays within an hour on two CPU cores (one thread).
Boards and questions come from ``retentivekv_vllm.fixtures.grid``; the tokenizer, processor
and checkpoint layout (the CLIP tower nested as vLLM loads it) from ``build_vlm``. Images are
``grid.IMAGE_SIZE`` pixels, so each of the 16 x 16 cells is one 14-pixel patch and one of 256
image tokens. The model is saved in fp16. The accuracy printed here is teacher-forced exact
match (every answer token and ``<|im_end|>`` the argmax), which equals greedy decoding's; the
accuracy through vLLM is checked by ``tests/fixtures/test_grid_vlm.py`` and the benchmarks.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from retentivekv_vllm.fixtures import grid
from retentivekv_vllm.fixtures.build_vlm import (
    LLAVA_PATCH_SIZE,
    _processor,
    extended_tokenizer,
    save_vlm,
    vlm_config,
)
from training import grid_circuit

# The circuit's shape (head size 64, which vLLM's CPU attention supports, grouped KV heads)
# serves both initialisations.
TEXT_CONFIG = grid_circuit.TEXT_CONFIG
VISION_CONFIG = grid_circuit.VISION_CONFIG
IMAGE_TOKENS = (grid.IMAGE_SIZE // LLAVA_PATCH_SIZE) ** 2


def make_model(seed: int):
    from transformers import AutoConfig, LlavaForConditionalGeneration

    kwargs = vlm_config("llava")
    kwargs["text_config"].update(TEXT_CONFIG)
    kwargs["vision_config"].update(VISION_CONFIG, image_size=grid.IMAGE_SIZE)
    kwargs["image_seq_length"] = IMAGE_TOKENS
    config = AutoConfig.for_model("llava", **kwargs)
    config.architectures = ["LlavaForConditionalGeneration"]
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config)


def make_processor():
    tokenizer = extended_tokenizer("llava")
    tokenizer.padding_side = "right"  # labels are placed from the start of each row
    return _processor("llava", tokenizer, tokenizer.chat_template, grid.IMAGE_SIZE)


def sample_dialogue(rng: random.Random, num_questions: int) -> tuple[tuple[str, ...], list[dict]]:
    """A board and a chat of up to ``num_questions`` answered questions about it.

    The first user turn holds the image and either the first question or the filler turn of
    the multi-turn items; every later user turn holds one question. Many answers per image
    make the most of each pass over its 256 image tokens.
    """
    board = grid.sample_board(rng)
    asked = [
        qa
        for qa in (grid.ask(rng, board, rng.choice(grid.KINDS)) for _ in range(num_questions))
        if qa
    ]
    turns = [(grid.FIRST_TURN, grid.ACKNOWLEDGEMENT)] if rng.random() < 0.5 else []
    messages = []
    for question, answer in turns + asked:
        content = [{"type": "text", "text": question}]
        if not messages:
            content.insert(0, {"type": "image"})
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    return board, messages


def batch(
    processor, dialogues: list[tuple[tuple[str, ...], list[dict]]]
) -> dict[str, torch.Tensor]:
    """Model inputs for whole chats, labels on each answer and its <|im_end|> (not the filler's
    reply)."""
    tokenizer = processor.tokenizer
    texts = [grid.chat_text(messages, add_generation_prompt=False) for _, messages in dialogues]
    images = [grid.render_board(board) for board, _ in dialogues]
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
    labels = torch.full_like(inputs["input_ids"], -100)
    image_expansion = IMAGE_TOKENS - 1  # the processor expands one <image> into IMAGE_TOKENS
    for i, (_, messages) in enumerate(dialogues):
        for turn, message in enumerate(messages):
            if message["role"] != "assistant" or message["content"] == grid.ACKNOWLEDGEMENT:
                continue
            start = len(tokenizer(grid.chat_text(messages[:turn]))["input_ids"]) + image_expansion
            answer = tokenizer(message["content"] + "<|im_end|>", add_special_tokens=False)[
                "input_ids"
            ]
            span = slice(start, start + len(answer))
            # Greedy decoding produces the answer token by token after its prompt: it must
            # tokenize there as it does on its own.
            if inputs["input_ids"][i, span].tolist() != answer:
                raise RuntimeError(
                    f"answer {message['content']!r} tokenizes differently after its prompt"
                )
            labels[i, span] = inputs["input_ids"][i, span]
    inputs["labels"] = labels
    return inputs


def item_dialogue(item: grid.GridItem) -> tuple[tuple[str, ...], list[dict]]:
    return item.board, [*item.messages, {"role": "assistant", "content": item.answer}]


@torch.no_grad()
def exact_match(model, processor, items: list[grid.GridItem], batch_size: int) -> dict[str, float]:
    """Teacher-forced exact match per kind (and overall)."""
    model.eval()
    hits: dict[str, list[bool]] = {kind: [] for kind in grid.KINDS}
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        inputs = batch(processor, [item_dialogue(item) for item in chunk])
        labels = inputs.pop("labels")
        logits = model(**inputs).logits[:, :-1]
        targets = labels[:, 1:]
        right = (logits.argmax(-1) == targets) | (targets == -100)
        for item, ok in zip(chunk, right.all(-1).tolist()):
            hits[item.kind].append(ok)
    model.train()
    scores = {kind: sum(h) / len(h) for kind, h in hits.items()}
    scores["all"] = sum(sum(h) for h in hits.values()) / len(items)
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory of the trained model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", choices=("circuit", "random"), default="circuit")
    parser.add_argument(
        "--steps", type=int, default=0, help="training steps (after the circuit, if any)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="chats per step")
    parser.add_argument("--questions", type=int, default=8, help="questions per training chat")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--eval-items", type=int, default=240)
    parser.add_argument("--eval-every", type=int, default=150)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = make_model(args.seed)
    processor = make_processor()
    if args.init == "circuit":
        grid_circuit.write_grid_circuit(model, processor)
    rng = random.Random(args.seed)
    eval_items = grid.make_items(args.eval_items, seed=args.seed + 1_000_003)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01
    )

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    history = []
    start = time.time()
    model.train()
    for step in range(1, args.steps + 1):
        inputs = batch(
            processor, [sample_dialogue(rng, args.questions) for _ in range(args.batch_size)]
        )
        loss = model(**inputs).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.4f} {time.time() - start:.0f}s", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            scores = exact_match(model, processor, eval_items, args.batch_size)
            history.append(
                {"step": step, "loss": loss.item(), "seconds": round(time.time() - start), **scores}
            )
            print(json.dumps(history[-1]), flush=True)

    if not history:  # the circuit as written
        scores = exact_match(model, processor, eval_items, args.batch_size)
        history.append({"step": 0, "seconds": round(time.time() - start), **scores})
        print(json.dumps(history[-1]), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    save_vlm(model.to(torch.float16), "llava", args.out, grid.IMAGE_SIZE)
    run = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"}
    (args.out / "training.json").write_text(
        json.dumps({"args": run, "history": history}, indent=2) + "\n"
    )
    print(f"saved to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
