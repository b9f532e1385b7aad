"""Where a request's image tokens sit: image index, row and column on the image's token grid.

vLLM's model runner keeps, per request, one ``MultiModalFeatureSpec`` per image
(``CachedRequestState.mm_features``): its placeholder range in the prompt (``offset``, ``length``
and an optional ``is_embed`` mask that marks which placeholder positions receive image
embeddings; the others are markers such as start/end or row-break tokens) and the processor's
outputs for it (``data``). The embedding positions of an image are its tokens in row-major order
on a grid that depends on the architecture: fixed by the vision config for LLaVA(-1.5), and
``image_grid_thw`` divided by the spatial merge (2x2 patches per token) for the Qwen-VL family.
Inputs whose layout is not known raise :class:`UnsupportedMultimodalInput` instead of getting a
wrong one (video among them, with Qwen3-VL's timestamp text between its frames).

Qwen3-VL's deepstack features need nothing more: they are added to the text model's hidden
states at the image tokens themselves (after its first layers), so they change what those
tokens' keys and values hold, not where the tokens sit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "ImagePlaceholder",
    "TokenLayout",
    "UnsupportedMultimodalInput",
    "layout_from_mm_features",
    "token_layout",
]

# Model types whose vLLM processor makes an image's placeholder exactly its
# image_grid_thw.prod() / merge**2 tokens, in the merged grid's row-major order (vLLM 0.32:
# Qwen2VLMultiModalProcessor, its Qwen2.5-VL subclass, Qwen3VLMultiModalProcessor).
QWEN_VL_TYPES = frozenset({"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"})
# LLaVA vision towers that see every image at one fixed size. (LLaVA with a Pixtral tower
# keeps the aspect ratio and puts break tokens between rows: not a fixed square grid.)
FIXED_SIZE_TOWERS = frozenset({"clip_vision_model", "siglip_vision_model"})


class UnsupportedMultimodalInput(ValueError):
    """An input whose per-token image layout cannot be derived (another modality, an unknown
    model)."""


@dataclass(frozen=True)
class ImagePlaceholder:
    """One image's placeholder range in the prompt and the grid its embeddings fill."""

    offset: int
    length: int
    is_embed: torch.Tensor | None  # [length] bool; None: every position is an image token
    rows: int
    cols: int


@dataclass(frozen=True)
class TokenLayout:
    """Per prompt token [n]: image index, row and column (-1 for text), and ``visual``
    (image >= 0, derived). ``grids[i]`` is image i's (rows, cols), images in prompt order.
    """

    image: torch.Tensor  # long
    row: torch.Tensor  # long
    col: torch.Tensor  # long
    grids: tuple[tuple[int, int], ...]
    visual: torch.Tensor = field(init=False)  # bool

    def __post_init__(self) -> None:
        object.__setattr__(self, "visual", self.image >= 0)


def token_layout(num_tokens: int, placeholders: Sequence[ImagePlaceholder]) -> TokenLayout:
    """The layout of a prompt of ``num_tokens`` tokens with these images, in prompt order."""
    image = torch.full((num_tokens,), -1, dtype=torch.long)
    row, col = image.clone(), image.clone()
    for index, p in enumerate(placeholders):
        slots = torch.arange(p.offset, p.offset + p.length)
        if p.is_embed is not None:
            if p.is_embed.shape != (p.length,):
                raise UnsupportedMultimodalInput(
                    f"image {index}: is_embed has shape {tuple(p.is_embed.shape)}, "
                    f"not ({p.length},)"
                )
            slots = slots[p.is_embed.bool()]
        if len(slots) != p.rows * p.cols:
            raise UnsupportedMultimodalInput(
                f"image {index} has {len(slots)} embedding positions, "
                f"not its {p.rows}x{p.cols} grid"
            )
        if p.offset < 0 or p.offset + p.length > num_tokens:
            raise UnsupportedMultimodalInput(
                f"image {index} at [{p.offset}, {p.offset + p.length}) lies outside the "
                f"prompt's {num_tokens} tokens"
            )
        if (image[slots] >= 0).any():
            raise UnsupportedMultimodalInput(f"image {index} overlaps an earlier image")
        patch = torch.arange(p.rows * p.cols)
        image[slots], row[slots], col[slots] = index, patch // p.cols, patch % p.cols
    return TokenLayout(image, row, col, tuple((p.rows, p.cols) for p in placeholders))


def _image_grid(feature: Any, hf_config: Any) -> tuple[int, int]:
    """(rows, cols) of the token grid of one image feature."""
    model_type = getattr(hf_config, "model_type", None)
    vision = getattr(hf_config, "vision_config", None)
    if model_type == "llava" and getattr(vision, "model_type", None) in FIXED_SIZE_TOWERS:
        # LLaVA-1.5: every image is resized to image_size; with the "default" feature
        # strategy the CLS token is dropped (with "full" the count check refuses it).
        side = vision.image_size // vision.patch_size
        return side, side
    if model_type in QWEN_VL_TYPES:
        if feature.data is None or "image_grid_thw" not in feature.data:
            raise UnsupportedMultimodalInput(
                "an image without image_grid_thw in the runner's features"
            )
        t, h, w = (int(x) for x in feature.data["image_grid_thw"].data.reshape(-1).tolist())
        if t != 1:
            raise UnsupportedMultimodalInput(f"an image with {t} temporal patches")
        merge = int(vision.spatial_merge_size)
        return h // merge, w // merge
    raise UnsupportedMultimodalInput(
        f"no image token grid known for model type {model_type!r}"
        f" (vision model {getattr(vision, 'model_type', None)!r})"
    )


def layout_from_mm_features(
    mm_features: Sequence[Any], hf_config: Any, num_tokens: int
) -> TokenLayout:
    """The layout of one request from the model runner's ``CachedRequestState.mm_features``.

    ``hf_config`` is the model's Hugging Face config (``model_config.hf_config``),
    ``num_tokens`` the request's prompt length.
    """
    placeholders = []
    for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
        if feature.modality != "image":
            raise UnsupportedMultimodalInput(
                f"modality {feature.modality!r}: only images have a token layout"
            )
        position = feature.mm_position
        rows, cols = _image_grid(feature, hf_config)
        placeholders.append(
            ImagePlaceholder(position.offset, position.length, position.is_embed, rows, cols)
        )
    return token_layout(num_tokens, placeholders)
