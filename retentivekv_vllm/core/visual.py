"""The visual state's fold order: root patch per image, Manhattan rings from far to near.

Per KV head, over the tokens a fold removes from the cache (after compaction each head may
hold different tokens in the same slots).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .scores import PatchLayout


@dataclass(frozen=True)
class VisualFoldPlan:
    """How one fold feeds the visual state: `order` [H, f] indexes the f folded tokens of each
    head (visual first: image by image, far from the root first; then the rest, which the state
    ignores), `member` [H, f] marks the visual ones in that order, `decay_steps` [H, f] is the
    ring distance Δd covered since the previous visual token (1 at the start of each image), and
    `distance` [H, f] is each token's Manhattan distance from its image's root patch."""

    order: Tensor
    member: Tensor
    decay_steps: Tensor
    distance: Tensor


def root_patches(score: Tensor, layout: PatchLayout) -> tuple[Tensor, Tensor]:
    """Per head and image the highest-scoring cached patch: (row, col), each [H, images] long.

    Scores off candidates are -inf; an image none of whose patches is a candidate roots at its
    first cached patch, and one with no cached patch at (0, 0)."""
    heads, images = score.shape[0], len(layout.grids)
    rows = torch.zeros(heads, images, dtype=torch.long)
    cols = torch.zeros(heads, images, dtype=torch.long)
    finite = torch.where(torch.isfinite(score), score.float(), torch.finfo(torch.float32).min)
    for image in range(images):
        mine = layout.image == image
        ranked = torch.where(mine, finite, float("-inf"))
        best = ranked.argmax(-1, keepdim=True)
        has = mine.any(-1)
        rows[:, image] = torch.where(has, layout.row.gather(1, best).squeeze(1), 0)
        cols[:, image] = torch.where(has, layout.col.gather(1, best).squeeze(1), 0)
    return rows, cols


def visual_fold_plan(folded_index: Tensor, layout: PatchLayout, score: Tensor) -> VisualFoldPlan:
    """Order the folded tokens folded_index [H, f] (slot indices, ascending) for the visual state.

    The root of each image is its highest-scoring patch (score [H, n]); folding runs from the
    farthest Manhattan ring to the root's own ring, so the root's neighbourhood is absorbed last
    and decays least: the 2-D analogue of a causal scan's recency.
    """
    root_row, root_col = root_patches(score, layout)
    image = layout.image.gather(1, folded_index)
    member = image >= 0
    safe_image = image.clamp(min=0)
    distance = (layout.row.gather(1, folded_index) - root_row.gather(1, safe_image)).abs() + (
        layout.col.gather(1, folded_index) - root_col.gather(1, safe_image)
    ).abs()
    distance = torch.where(member, distance, 0)
    f = folded_index.shape[1]
    span = int(distance.max()) + 1 if f else 1
    # Sort key: visual before the rest, then image, then distance descending, then slot order.
    rank = torch.arange(f).expand_as(folded_index)
    images = len(layout.grids) + 1
    key = torch.where(member, safe_image, images) * span + (span - 1 - distance)
    key = key * f + rank
    order = key.argsort(dim=1, stable=True)
    member, image, distance = (
        member.gather(1, order),
        image.gather(1, order),
        distance.gather(1, order),
    )
    previous_image = torch.cat([torch.full_like(image[:, :1], -1), image[:, :-1]], dim=1)
    previous_distance = torch.cat([distance[:, :1], distance[:, :-1]], dim=1)
    new_image = image != previous_image
    decay_steps = torch.where(new_image, 1, previous_distance - distance)
    return VisualFoldPlan(order, member, torch.where(member, decay_steps, 0), distance)
