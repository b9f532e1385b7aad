"""The requests of the step being built, as the model runner sees them.

vLLM's attention metadata carries no request ids and no prompt lengths, so the
runner hook in ``patches.py`` records them here just before the runner builds the
step's attention metadata; the metadata builder (same process, same step) reads them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchView:
    req_ids: list[str | None]  # row i of the step's batch -> request id
    num_prompt_tokens: list[int]


CURRENT: BatchView = BatchView([], [])


def record(req_ids, num_prompt_tokens) -> None:
    global CURRENT
    CURRENT = BatchView(list(req_ids), [int(n) for n in num_prompt_tokens])


def current() -> BatchView:
    return CURRENT
