"""The C++ observation statistics of a compression (`cpu_kernel.observation_statistics`) against
their
plain-torch definition, `core.observation_statistics` (softmax probabilities, their column sums and
the entropy potential restricted to each key's modality)."""

import pytest
import torch

from retentivekv_vllm.core import PatchLayout, observation_statistics
from retentivekv_vllm.engine import cpu_kernel
from retentivekv_vllm.engine.cpu_kernel import decode_extension

HEADS, HEAD_SIZE = 4, 64
SCALE = HEAD_SIZE**-0.5

pytestmark = pytest.mark.skipif(
    decode_extension().module is None, reason="the CPU kernel is not built here"
)


def layout_with_an_image(heads: int, n: int, start: int, rows: int, cols: int) -> PatchLayout:
    """Text, then one image of rows x cols patches at slots [start, start + rows·cols), then "
    "text."""
    image, row, col = (torch.full((heads, n), -1, dtype=torch.long) for _ in range(3))
    cells = torch.arange(rows * cols)
    image[:, start : start + rows * cols] = 0
    row[:, start : start + rows * cols] = cells // cols
    col[:, start : start + rows * cols] = cells % cols
    return PatchLayout(image, row, col, ((rows, cols),))


@pytest.mark.parametrize("per_head_positions", [False, True])
@pytest.mark.parametrize("with_image", [False, True])
@pytest.mark.parametrize("n", [7, 300])
def test_statistics_match_the_torch_definition(per_head_positions, with_image, n):
    generator = torch.Generator().manual_seed(n + 2 * with_image + per_head_positions)
    m = 12  # observation rows: 3 queries of 4 query heads, say, stacked per KV head
    q = torch.randn(HEADS, m, HEAD_SIZE, generator=generator) * 2
    keys = torch.randn(HEADS, n, HEAD_SIZE, generator=generator)
    # The last rows see fewer keys (causal); in a compacted cache each head has its own positions.
    if per_head_positions:
        k_positions = torch.stack(
            [torch.randperm(n + 5, generator=generator)[:n].sort().values for _ in range(HEADS)]
        )
    else:
        k_positions = torch.arange(n)
    q_positions = torch.tensor([n + 5, n - 1, n - 3, 2] * (m // 4))
    layout = layout_with_an_image(HEADS, n, 2, 2, n // 4) if with_image and n >= 8 else None
    if with_image and layout is None:
        layout = layout_with_an_image(HEADS, n, 1, 1, 3)

    want_alpha, want_entropy = observation_statistics(
        q, keys, SCALE, q_positions, k_positions, layout
    )
    got_alpha, got_entropy = cpu_kernel.observation_statistics(
        q, keys, SCALE, q_positions, k_positions, layout
    )

    torch.testing.assert_close(got_alpha, want_alpha, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_entropy, want_entropy, atol=1e-5, rtol=1e-5)
    assert want_entropy.abs().sum() > 0 and want_alpha.abs().sum() > 0  # not vacuous


def test_a_row_that_sees_no_key_adds_nothing():
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(HEADS, 2, HEAD_SIZE, generator=generator)
    keys = torch.randn(HEADS, 5, HEAD_SIZE, generator=generator)
    k_positions = torch.arange(10, 15)
    blind = cpu_kernel.observation_statistics(
        q, keys, SCALE, torch.tensor([3, 4]), k_positions, None
    )
    assert all(torch.equal(x, torch.zeros(HEADS, 5)) for x in blind)
    one = cpu_kernel.observation_statistics(
        q, keys, SCALE, torch.tensor([3, 20]), k_positions, None
    )
    alone = cpu_kernel.observation_statistics(
        q[:, 1:], keys, SCALE, torch.tensor([20]), k_positions, None
    )
    torch.testing.assert_close(one, alone)


def test_strided_keys_as_the_cache_read_hands_them_over():
    """The read gives the live span as a slice of a larger buffer; the kernel takes it as it "
    "lies."""
    generator = torch.Generator().manual_seed(4)
    q = torch.randn(HEADS, 6, HEAD_SIZE, generator=generator)
    buffer = torch.randn(HEADS, 90, HEAD_SIZE, generator=generator)
    keys = buffer[:, 10:80]
    positions = torch.arange(70)
    q_positions = torch.full((6,), 69)
    got = cpu_kernel.observation_statistics(q, keys, SCALE, q_positions, positions, None)
    want = observation_statistics(q, keys.contiguous(), SCALE, q_positions, positions, None)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_keys_out_of_position_order_are_refused():
    q, keys = torch.zeros(HEADS, 1, HEAD_SIZE), torch.zeros(HEADS, 3, HEAD_SIZE)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        cpu_kernel.observation_statistics(
            q, keys, SCALE, torch.tensor([9]), torch.tensor([0, 2, 1]), None
        )
