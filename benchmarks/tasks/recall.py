"""Multi-query associative recall on the trained text fixture, with the question deferred.

The prompt is ``<bos> k1 v1 ... kN vN ? q``; the answer is q's value. vLLM prefills it in chunks
of ``CHUNK`` tokens (``long_prefill_token_threshold``), and a policy compresses after every chunk
that ends over budget. N is chosen so that ``<bos>``, the pairs and ``?`` fill exactly
``CONTEXT_CHUNKS`` chunks: the query key then arrives alone in a last step, after the whole
context was compressed, so no policy can know which pair will be asked for, and the answer is
read from exactly the budget's cache (plus the states).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, ClassVar

from benchmarks.tasks import Item, register_task
from retentivekv_vllm.fixtures import recall

CHUNK = 128
CONTEXT_CHUNKS = 2


@register_task
@dataclass
class RecallTask:
    name: ClassVar[str] = "recall"
    num_pairs: int = CONTEXT_CHUNKS * CHUNK // 2 - 1  # 1 + 2N + 1 = CONTEXT_CHUNKS * CHUNK
    max_tokens: int = 1
    has_images: bool = False
    # Measured through vLLM on the shipped model (docs/results.md); the quick check enforces it.
    min_full_accuracy: float = 0.95
    engine: dict[str, Any] = field(
        default_factory=lambda: {
            "max_model_len": 512,
            "enable_chunked_prefill": True,
            "max_num_batched_tokens": 2048,
            "long_prefill_token_threshold": CHUNK,
            "block_size": 32,
        }
    )
    # A prompt is ~2*num_pairs tokens; sinks and window (never compressed, inside the budget)
    # are scaled down from 4/32 so that budgets of 5-10 % still leave tokens to choose.
    policy_defaults: dict[str, Any] = field(default_factory=lambda: {"kv_sinks": 2, "kv_window": 8})

    def model_dir(self):
        return recall.recall_model_dir()

    def items(self, count: int, seed: int) -> list[Item]:
        rng = random.Random(seed)
        out = []
        for _ in range(count):
            item = recall.sample_item(rng, self.num_pairs)
            out.append(Item({"prompt_token_ids": item.prompt_token_ids}, item.answer_token_id))
        return out

    def is_correct(self, item: Item, token_ids: list[int]) -> bool:
        return bool(token_ids) and token_ids[0] == item.answer
