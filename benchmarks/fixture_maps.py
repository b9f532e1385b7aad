"""Fit learned feature maps for a shipped fixture model on its own task's data.

    python -m benchmarks.fixture_maps --task recall  # retentivekv_vllm/maps/recall.safetensors
    python -m benchmarks.fixture_maps --task grid    # retentivekv_vllm/maps/grid_vlm.safetensors

`python -m retentivekv_vllm.calibrate` fits maps on text (Python's documentation by default).
The fixture models understand nothing of it: the recall model is a written induction circuit on
its own word vocabulary, the grid model answers questions about a board image. So each fixture
is calibrated on its own task, on sequences drawn with CALIBRATION_SEED (not the fidelity
harness's ITEM_SEED), through calibrate's own fit (`calibrate.fit_maps`, the same loss, fit and
held-out report):

* recall: training-format sequences ``<bos> k1 v1 ... k127 v127 ? q1 a1 q2 a2 ...`` (127 pairs
  as the task's prompts, then 64 queries and their answers), compressed after the ``?``
  (token 256, where the harness's second compression falls) with the task's 2 sinks and 8-token
  window; the maps are fitted on queries sampled among the question tokens after it.
* grid: the task's items (board image, question, the expected answer appended), each compressed
  where its last question starts, with the task's 4 sinks and 16-token window; the queries are
  the question's and the answer's tokens. The selection scores the image as text (1-D pooling)
  and folds it in position order into one state, where the server pools it on its grid and folds
  it ring by ring into the visual state: the maps are fitted on the same keys and queries with
  slightly different selection and gates.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

from retentivekv_vllm import calibrate
from retentivekv_vllm.learned_maps import SHIPPED_MAPS_DIR

CALIBRATION_SEED = 20_261_301  # != benchmarks.fidelity.ITEM_SEED: the evaluation items are unseen
RECALL_QUERIES = 64  # questions after each recall context


def recall_sequences(count: int, seed: int) -> tuple[list[list[int]], int]:
    """`count` training-format recall sequences and the point each is compressed at."""
    from benchmarks.tasks.recall import RecallTask
    from retentivekv_vllm.fixtures import recall

    rng = random.Random(seed)
    pairs = RecallTask().num_pairs
    sequences = [recall.sample_sequence(rng, pairs, RECALL_QUERIES)[0] for _ in range(count)]
    return sequences, 2 * pairs + 2  # <bos>, the pairs, "?": the context the harness compresses


def grid_sequences(model_dir: Path, count: int, seed: int) -> tuple[list[dict], list[int]]:
    """`count` grid items as the model's inputs (prompt and expected answer) and, for each, the
    position where its last question starts."""
    from transformers import AutoProcessor

    from retentivekv_vllm.fixtures import grid

    processor = AutoProcessor.from_pretrained(model_dir)
    tokenizer = processor.tokenizer
    sequences, points = [], []
    for item in grid.make_items(count, seed):
        inputs = processor(
            text=item.prompt + item.answer + "<|im_end|>", images=[item.image], return_tensors="pt"
        )
        ids = inputs["input_ids"][0].tolist()
        question = item.messages[-1]["content"][-1]["text"]
        tail = question + "<|im_end|>\n<|im_start|>assistant\n" + item.answer + "<|im_end|>"
        tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
        if ids[-len(tail_ids) :] != tail_ids:
            raise SystemExit(f"grid item: the question's tokens are not the prompt's end: {tail!r}")
        sequences.append({"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"]})
        points.append(len(ids) - len(tail_ids))
    return sequences, points


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", choices=("recall", "grid"), required=True)
    parser.add_argument("--out", type=Path, default=None, help="default: the shipped maps file")
    parser.add_argument("--sequences", type=int, default=256, help="training sequences")
    parser.add_argument("--held-out", type=int, default=64, help="held-out sequences")
    parser.add_argument("--steps", type=int, default=600, help="Adam steps per layer")
    parser.add_argument("--rank", type=int, default=calibrate.DEFAULT_RANK)
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from benchmarks.tasks import make_task

    task = make_task(args.task)
    model_dir = task.model_dir()
    out = args.out or SHIPPED_MAPS_DIR / f"{model_dir.name}.safetensors"
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    count = args.sequences + args.held_out
    if args.task == "recall":
        sequences, point = recall_sequences(count, CALIBRATION_SEED)
        points = [point] * count
        length = len(sequences[0])
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        queries = RECALL_QUERIES
    else:
        sequences, points = grid_sequences(model_dir, count, CALIBRATION_SEED)
        length = max(s["input_ids"].shape[-1] for s in sequences)
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
        model = model.eval()
        queries = min(s["input_ids"].shape[-1] - p for s, p in zip(sequences, points))
    # calibrate's own argument checks and settings record; the sequences are this task's.
    defaults = task.policy_defaults
    calibration_args = calibrate.parse_args(
        [
            str(model_dir),
            "--out",
            str(out),
            "--budget",
            str(args.budget),
            "--rank",
            str(args.rank),
            "--sinks",
            str(defaults["kv_sinks"]),
            "--window",
            str(defaults["kv_window"]),
            "--length",
            str(length),
            "--span",
            str(length - min(points)),
            "--min-prompt",
            str(min(points)),
            "--queries",
            str(queries),
            "--sequences",
            str(args.sequences),
            "--held-out",
            str(args.held_out),
            "--steps",
            str(args.steps),
            "--seed",
            "0",
        ]
    )
    text = f"benchmarks.fixture_maps --task {args.task} (seed {CALIBRATION_SEED})"
    calibrate.fit_maps(calibration_args, model, sequences, points, text, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
