"""Image tokens: modality-aware entropy, 2-D pooling over the patch grid, and the dual state's
fold order (root patch, Manhattan rings far to near), each against a plain-loop definition."""

import math

import pytest
import torch

from retentivekv_vllm.config import KVPolicyConfig
from retentivekv_vllm.core import (
    PatchLayout,
    RecurrentState,
    entropy_potential,
    fold_sequential,
    modality_entropy,
    pool_scores,
    visual_fold_plan,
)
from retentivekv_vllm.policies import Observation, make_policy

# 3 text tokens, a 3x4 image, 2 text tokens, a 2x2 image, 3 text tokens: 24 slots.
SEGMENTS = [("text", 3), ("image", (3, 4)), ("text", 2), ("image", (2, 2)), ("text", 3)]


def make_layout(heads: int = 2) -> PatchLayout:
    image, row, col, grids = [], [], [], []
    for kind, size in SEGMENTS:
        if kind == "text":
            image += [-1] * size
            row += [-1] * size
            col += [-1] * size
        else:
            rows, cols = size
            image += [len(grids)] * (rows * cols)
            row += [r for r in range(rows) for _ in range(cols)]
            col += [c for _ in range(rows) for c in range(cols)]
            grids.append(size)
    expand = lambda x: torch.tensor(x).expand(heads, -1).clone()  # noqa: E731
    return PatchLayout(expand(image), expand(row), expand(col), tuple(grids))


def test_visual_keys_take_entropy_within_the_visual_attention_only():
    torch.manual_seed(0)
    layout = make_layout()
    probs = torch.rand(2, 5, 24).softmax(-1)
    entropy = modality_entropy(probs, layout)
    for h in range(2):
        visual = layout.visual[h]
        for subset in (visual, ~visual):
            p = probs[h][:, subset]
            p = p / p.sum(-1, keepdim=True)
            naive = -(p * p.log()).sum(0) / math.log(int(subset.sum()))
            torch.testing.assert_close(entropy[h, subset], naive)
    # Text-only requests keep the all-keys definition.
    torch.testing.assert_close(modality_entropy(probs, None), entropy_potential(probs))


def test_pooling_is_2d_within_each_image_and_1d_among_text():
    torch.manual_seed(1)
    layout = make_layout()
    x = torch.rand(2, 24)
    # Head 1 misses one patch (folded earlier): its neighbours average only present patches.
    present = torch.ones(2, 24, dtype=torch.bool)
    present[1, 8] = False
    layout = PatchLayout(
        torch.where(present, layout.image, -2), layout.row, layout.col, layout.grids
    )
    pooled = pool_scores(x, layout, kernel_1d=3)
    for h in range(2):
        for j in range(24):
            if layout.image[h, j] == -2:
                continue
            if layout.image[h, j] >= 0:
                neighbours = [
                    i
                    for i in range(24)
                    if layout.image[h, i] == layout.image[h, j]
                    and abs(int(layout.row[h, i] - layout.row[h, j])) <= 1
                    and abs(int(layout.col[h, i] - layout.col[h, j])) <= 1
                ]
            else:
                neighbours = [
                    i for i in range(max(0, j - 1), min(24, j + 2)) if layout.image[h, i] == -1
                ]
            assert pooled[h, j] == pytest.approx(float(x[h, neighbours].mean()), rel=1e-5), (h, j)


def naive_visual_order(folded: list[int], layout: PatchLayout, score: torch.Tensor, h: int):
    """Folded visual slots of head h: image by image, far from the root first, then slot order."""
    entries = []
    for image in range(len(layout.grids)):
        mine = [i for i in range(score.shape[1]) if layout.image[h, i] == image]
        root = max(mine, key=lambda i: (float(score[h, i]), -i))
        for i in folded:
            if layout.image[h, i] == image:
                d = abs(int(layout.row[h, i] - layout.row[h, root])) + abs(
                    int(layout.col[h, i] - layout.col[h, root])
                )
                entries.append((image, -d, i, d))
    entries.sort()
    return [(i, image, d) for image, _, i, d in entries]


def test_fold_plan_runs_from_the_farthest_ring_to_the_root():
    torch.manual_seed(2)
    layout = make_layout()
    score = torch.rand(2, 24)
    folded = torch.tensor(
        [[0, 3, 4, 5, 8, 10, 13, 14, 16, 17, 19, 21], [1, 3, 6, 7, 9, 12, 14, 15, 17, 18, 19, 20]]
    )
    plan = visual_fold_plan(folded, layout, score)
    for h in range(2):
        expected = naive_visual_order(folded[h].tolist(), layout, score, h)
        got = folded[h][plan.order[h]][plan.member[h]].tolist()
        assert got == [i for i, _, _ in expected]
        distances = plan.distance[h][plan.member[h]].tolist()
        assert distances == [d for _, _, d in expected]
        steps, previous = [], None
        for _, image, d in expected:
            steps.append(1 if previous is None or previous[0] != image else previous[1] - d)
            previous = (image, d)
        assert plan.decay_steps[h][plan.member[h]].tolist() == steps
        assert all(s >= 0 for s in steps)


def observation(layout, heads=2, n=24, seed=3):
    generator = torch.Generator().manual_seed(seed)
    probs = torch.rand(heads, 6, n, generator=generator).softmax(-1)
    candidates = torch.ones(heads, n, dtype=torch.bool)
    candidates[:, :2] = False
    return Observation(probs, torch.arange(n).expand(heads, -1), candidates, probs.sum(1), layout)


@pytest.mark.parametrize("states", ["dual", "single", "none"])
def test_each_state_receives_exactly_its_modality_in_its_order(states):
    config = KVPolicyConfig.from_knobs(
        policy="retentive", states=states, feature_map="elu", gamma0=0.9
    )
    policy = make_policy(config)
    layout = make_layout()
    obs = observation(layout)
    generator = torch.Generator().manual_seed(4)
    keys, values = (
        torch.randn(2, 24, 8, generator=generator),
        torch.randn(2, 24, 8, generator=generator),
    )
    folded = torch.zeros(2, 24, dtype=torch.bool)
    folded[0, [2, 3, 5, 6, 9, 12, 15, 17, 20, 22]] = True
    folded[1, [4, 7, 8, 10, 11, 14, 16, 18, 19, 23]] = True
    result = policy.absorb([], obs, folded, keys, values, scale=1.0)
    if states == "none":
        assert result == []
        return
    assert len(result) == (2 if states == "dual" else 1)

    from retentivekv_vllm.core import (
        absorption_from_attention,
        normalize_by_max,
        retention_from_entropy,
    )

    phi = policy.feature_map(8, 1.0)
    score = policy.score(obs)
    entropy_hat = normalize_by_max(modality_entropy(obs.probs, layout), obs.candidates)
    alpha = obs.probs.sum(1)
    for h in range(2):
        slots = folded[h].nonzero().squeeze(1).tolist()
        absorption = dict(zip(slots, absorption_from_attention(alpha[h, slots], 0.5, 2.0).tolist()))
        gamma = {i: float(retention_from_entropy(entropy_hat[h, i], 0.9)) for i in slots}

        def sequential(order, gates, h=h, absorption=absorption):
            state = RecurrentState.zeros(1, phi.rank, 8)
            return fold_sequential(
                state,
                phi.features(keys[h, order])[None],
                values[h, order][None],
                torch.tensor([gates])[:, : len(order)].reshape(1, -1),
                torch.tensor([[absorption[i] for i in order]]),
            )

        text = [i for i in slots if states == "single" or layout.image[h, i] < 0]
        expected_text = sequential(text, [gamma[i] for i in text])
        torch.testing.assert_close(result[0].S[h], expected_text.S[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(result[0].z[h], expected_text.z[0], rtol=1e-4, atol=1e-5)
        if states == "dual":
            visual = naive_visual_order(slots, layout, score, h)
            gates, previous = [], None
            for i, image, d in visual:
                steps = 1 if previous is None or previous[0] != image else previous[1] - d
                gates.append(gamma[i] ** steps)
                previous = (image, d)
            expected_visual = sequential([i for i, _, _ in visual], gates)
            torch.testing.assert_close(result[1].S[h], expected_visual.S[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(result[1].z[h], expected_visual.z[0], rtol=1e-4, atol=1e-5)


def test_a_state_folded_with_the_other_modality_masked_out_is_unchanged_by_it():
    """The text state of a fold that removes only image tokens stays empty."""
    policy = make_policy(KVPolicyConfig.from_knobs(policy="retentive", feature_map="elu"))
    layout = make_layout()
    folded = torch.zeros(2, 24, dtype=torch.bool)
    folded[:, 3:15] = True  # exactly the first image
    keys, values = torch.randn(2, 24, 8), torch.randn(2, 24, 8)
    text, visual = policy.absorb([], observation(layout), folded, keys, values, 1.0)
    assert text.z.abs().max() == 0 and text.S.abs().max() == 0
    assert (visual.z > 0).all()
