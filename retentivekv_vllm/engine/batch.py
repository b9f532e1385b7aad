"""The requests of the step being built, as the model runner sees them.

vLLM's attention metadata carries no request ids, prompt lengths or multimodal
placeholders, so the runner hook in ``patches.py`` records them here just before the
runner builds the step's attention metadata; the metadata builder (same process, same
step) reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class BatchView:
    req_ids: list[str | None]  # row i of the step's batch -> request id
    num_prompt_tokens: list[int]
    # The runner's request states (CachedRequestState by id: multimodal features) and
    # the model's Hugging Face config (vision settings).
    requests: dict[str, Any] = field(default_factory=dict)
    hf_config: Any = None


CURRENT: BatchView = BatchView([], [])


def record(req_ids, num_prompt_tokens, requests, hf_config) -> None:
    global CURRENT
    CURRENT = BatchView(list(req_ids), [int(n) for n in num_prompt_tokens], requests, hf_config)


def current() -> BatchView:
    return CURRENT
