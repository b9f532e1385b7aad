"""Real images for tests, and where the Hugging Face processor alone puts their tokens."""

import base64
import io

import numpy as np
import torch
from PIL import Image

from retentivekv_vllm.fixtures import IMAGE_TOKENS
from retentivekv_vllm.multimodal import TokenLayout


def png_bytes(rows: int, cols: int, cell: int, seed: int) -> bytes:
    """A PNG of rows x cols random-coloured squares of cell pixels."""
    colours = np.random.default_rng(seed).integers(0, 256, (rows, cols, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.kron(colours, np.ones((cell, cell, 1), dtype=np.uint8))).save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


def decode(png: bytes) -> Image.Image:
    return Image.open(io.BytesIO(png)).convert("RGB")


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def processor_layout(processor, arch: str, inputs) -> TokenLayout:
    """Per-token image, row and column of the processor's ``inputs`` (one prompt), from the
    processor's own outputs: the image-token runs in prompt order, each filling its grid."""
    ids = inputs["input_ids"][0]
    if arch == "llava":
        side = processor.image_processor.crop_size["height"] // processor.patch_size
        grids = [(side, side)] * len(inputs["pixel_values"])
    else:
        merge = processor.image_processor.merge_size
        grids = [(h // merge, w // merge) for _, h, w in inputs["image_grid_thw"].tolist()]
    positions = (
        (ids == processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKENS[arch])).nonzero().squeeze(1)
    )
    image, row, col = (torch.full(ids.shape, -1, dtype=torch.long) for _ in range(3))
    start = 0
    for index, (rows, cols) in enumerate(grids):
        mine = positions[start : start + rows * cols]
        start += rows * cols
        cells = torch.arange(rows * cols)
        image[mine], row[mine], col[mine] = index, cells // cols, cells % cols
    assert start == len(positions), "image tokens left over after filling every grid"
    return TokenLayout(image, row, col, tuple(grids))
