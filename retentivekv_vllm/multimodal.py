"""Where a request's image tokens sit: image index, row and column on the patch grid.

vLLM's model runner keeps, per request, one ``MultiModalFeatureSpec`` per image: its placeholder
range in the prompt (``offset``, ``length`` and an optional ``is_embed`` mask for placeholder
positions that are not image embeddings, e.g. start/end markers) and the processor's outputs.
The embedding positions of an image are its patches in row-major order on a grid that depends
on the architecture: fixed by the vision config for LLaVA, ``image_grid_thw`` over the spatial
merge for the Qwen-VL family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class UnsupportedMultimodalInput(ValueError):
    """An input whose token layout the policy cannot derive (the request is scored as text)."""


@dataclass(frozen=True)
class ImagePlaceholder:
    offset: int
    length: int
    is_embed: torch.Tensor | None  # [length] bool; None = every position is a patch
    rows: int
    cols: int


@dataclass(frozen=True)
class TokenLayout:
    """Per prompt token [n]: image index, row and column (-1 for text); grids[i] = (rows, cols)."""

    image: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    grids: tuple[tuple[int, int], ...]

    @property
    def visual(self) -> torch.Tensor:
        return self.image >= 0


def token_layout(num_tokens: int, placeholders: list[ImagePlaceholder]) -> TokenLayout:
    image = torch.full((num_tokens,), -1, dtype=torch.long)
    row, col = image.clone(), image.clone()
    for index, p in enumerate(placeholders):
        slots = torch.arange(p.offset, p.offset + p.length)
        if p.is_embed is not None:
            slots = slots[p.is_embed.bool()]
        if len(slots) != p.rows * p.cols:
            raise UnsupportedMultimodalInput(
                f"image {index} has {len(slots)} embedding positions, not its {p.rows}x{p.cols} grid"
            )
        if int(slots[-1]) >= num_tokens:
            raise UnsupportedMultimodalInput(f"image {index} lies beyond the prompt's {num_tokens} tokens")
        patch = torch.arange(p.rows * p.cols)
        image[slots], row[slots], col[slots] = index, patch // p.cols, patch % p.cols
    return TokenLayout(image, row, col, tuple((p.rows, p.cols) for p in placeholders))


def _grid(feature, hf_config) -> tuple[int, int]:
    vision = getattr(hf_config, "vision_config", None)
    data = feature.data
    if data is not None and "image_grid_thw" in data:
        t, h, w = (int(x) for x in data["image_grid_thw"].data.reshape(-1).tolist())
        merge = int(getattr(vision, "spatial_merge_size", 1))
        if t != 1:
            raise UnsupportedMultimodalInput(f"an image with {t} temporal patches")
        return h // merge, w // merge
    if hf_config.model_type == "llava" and vision is not None:
        side = vision.image_size // vision.patch_size
        return side, side
    raise UnsupportedMultimodalInput(
        f"no patch grid known for model type {hf_config.model_type!r}"
    )


def layout_from_mm_features(mm_features, hf_config, num_tokens: int) -> TokenLayout:
    """The layout of one request from the model runner's ``CachedRequestState.mm_features``."""
    placeholders = []
    for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
        if feature.modality != "image":
            raise UnsupportedMultimodalInput(f"modality {feature.modality!r} (only images are placed)")
        position = feature.mm_position
        rows, cols = _grid(feature, hf_config)
        placeholders.append(ImagePlaceholder(position.offset, position.length, position.is_embed, rows, cols))
    return token_layout(num_tokens, placeholders)
