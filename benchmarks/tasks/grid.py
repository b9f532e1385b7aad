"""Image-grid questions on the shipped vision-language fixture, with the question deferred.

A 16 x 16 board of glyphs is one 224-pixel image, 256 image tokens (one per cell); the question
comes after it, in the same user turn or in a later one (``retentivekv_vllm.fixtures.grid``):
the glyph at a cell, where a glyph is, how many of a glyph there are. vLLM prefills the prompt
in chunks of ``CHUNK`` tokens (``long_prefill_token_threshold``) and a policy compresses after
every chunk that ends over budget, so most of the image is compressed before the chunk holding
the question arrives. Items cycle through the three kinds, half of them multi-turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from benchmarks.tasks import Item, register_task
from retentivekv_vllm.fixtures import grid

CHUNK = 64


@register_task
@dataclass
class GridTask:
    name: ClassVar[str] = "grid"
    max_tokens: int = 8  # the longest answer, "F,F", is 3 tokens, then <|im_end|>
    has_images: bool = True
    # Measured through vLLM on the shipped model (docs/results.md); the quick check enforces it.
    min_full_accuracy: float = 0.95
    engine: dict[str, Any] = field(
        default_factory=lambda: {
            "max_model_len": 512,
            "limit_mm_per_prompt": {"image": 1},
            "enable_chunked_prefill": True,
            "max_num_batched_tokens": 2048,
            "long_prefill_token_threshold": CHUNK,
            "block_size": 32,
        }
    )
    # A prompt is 275-300 tokens; the question and the assistant header after it are about 17
    # tokens, so a window of 16 (down from 32) keeps the question itself while budgets of
    # 10-20 % still leave image tokens to choose.
    policy_defaults: dict[str, Any] = field(
        default_factory=lambda: {"kv_sinks": 4, "kv_window": 16}
    )

    def model_dir(self):
        return grid.grid_vlm_dir()

    def items(self, count: int, seed: int) -> list[Item]:
        """Prompts with their image; the answer is the expected token ids, <|im_end|> included."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.model_dir())
        out = []
        for item in grid.make_items(count, seed):
            answer = tokenizer(item.answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
            prompt = {"prompt": item.prompt, "multi_modal_data": {"image": item.image}}
            out.append(
                Item(
                    prompt,
                    tuple(answer),
                    f"{item.kind}, {'multi' if item.multi_turn else 'single'}-turn",
                )
            )
        return out

    def is_correct(self, item: Item, token_ids: list[int]) -> bool:
        return tuple(token_ids[: len(item.answer)]) == item.answer
