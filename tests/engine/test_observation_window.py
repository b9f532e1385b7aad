"""The observation window a layer remembers between steps (`LayerMemory.remember_queries`): after
prefill chunks and decode steps of any size, the last m queries and their positions, as if every
query ever seen were kept and the last m taken."""

import pytest
import torch

from retentivekv_vllm.engine.memory import LayerMemory

HEADS, HEAD_SIZE = 2, 4


@pytest.mark.parametrize("window", [1, 5, 8])
def test_observation_queries_are_the_last_window_of_every_step(window):
    generator = torch.Generator().manual_seed(0)
    memory = LayerMemory.empty(HEADS, 64)
    every_query, every_position, position = [], [], 0
    for step_size in [7, 3, 12, 1, 1, 2, 1, 5, 1, 1, 1, 9, 1]:  # prefill chunks, then decode steps
        queries = torch.randn(step_size, HEADS, HEAD_SIZE, generator=generator)
        kept = queries[-window:]  # the caller remembers at most a window of a step
        memory.remember_queries(kept.clone(), position + step_size - kept.shape[0], window)
        every_query.append(kept)
        every_position.append(
            torch.arange(position + step_size - kept.shape[0], position + step_size)
        )
        position += step_size

        got_queries, got_positions = memory.observation_queries(window)
        assert torch.equal(got_queries, torch.cat(every_query)[-window:])
        assert torch.equal(got_positions, torch.cat(every_position)[-window:])
        # Trimmed: without its oldest step the window would be short.
        assert memory.recent_rows == sum(q.shape[0] for q, _ in memory.recent)
        assert memory.recent_rows - memory.recent[0][0].shape[0] < window
