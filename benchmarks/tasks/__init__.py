"""Fidelity tasks: what a task gives the harness (``benchmarks/fidelity.py``).

A task is a small object with

* ``name``; ``model_dir()`` -> the model directory vLLM serves;
* ``items(count, seed)`` -> ``Item`` s, each a vLLM prompt (``prompt_token_ids``, plus
  ``multi_modal_data`` for images), the expected answer and optionally a ``group`` (a kind of
  question, reported separately); items depend only on the seed;
* ``is_correct(item, token_ids)`` -> bool, the answer check on the generated token ids;
* ``max_tokens``; ``engine``: extra ``vllm.LLM`` arguments (context length, chunking);
  ``policy_defaults``: ``additional_config`` keys every cell of the task shares (sinks, window);
* ``has_images``: whether ablations that only differ on images (single vs dual state) run;
* ``min_full_accuracy``: the documented full-cache accuracy the quick check enforces.

Register a task with ``@register_task``; ``--task NAME`` picks it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

TASKS: dict[str, Callable[[], Any]] = {}


@dataclass(frozen=True)
class Item:
    prompt: dict[str, Any]
    answer: Any
    group: str = ""


def register_task(factory: Callable[[], Any]) -> Callable[[], Any]:
    TASKS[factory.name] = factory
    return factory


def make_task(name: str):
    if name not in TASKS:
        raise ValueError(f"--task: unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]()


from benchmarks.tasks import grid, recall  # noqa: E402, F401  (registration)
