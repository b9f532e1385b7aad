"""The per-token image layout from placeholder ranges, against hand-written expectations."""

import pytest
import torch

from retentivekv_vllm.multimodal import ImagePlaceholder, UnsupportedMultimodalInput, token_layout


def test_two_images_with_text_between_and_marker_tokens():
    # Image 0: a 2x3 grid at 2..7; image 1: a 2x2 grid inside 10..15 with start/end markers.
    marked = torch.tensor([False, True, True, True, True, False])
    layout = token_layout(18, [ImagePlaceholder(2, 6, None, 2, 3), ImagePlaceholder(10, 6, marked, 2, 2)])
    assert layout.image.tolist() == [-1, -1] + [0] * 6 + [-1] * 3 + [1] * 4 + [-1] * 3
    assert layout.row.tolist()[2:8] == [0, 0, 0, 1, 1, 1]
    assert layout.col.tolist()[2:8] == [0, 1, 2, 0, 1, 2]
    assert layout.row.tolist()[11:15] == [0, 0, 1, 1] and layout.col.tolist()[11:15] == [0, 1, 0, 1]
    assert layout.grids == ((2, 3), (2, 2))
    assert int(layout.visual.sum()) == 10


def test_a_grid_that_does_not_match_the_placeholder_is_refused():
    with pytest.raises(UnsupportedMultimodalInput, match="not its 3x3 grid"):
        token_layout(20, [ImagePlaceholder(0, 8, None, 3, 3)])


def test_unsupported_modality_is_named():
    from types import SimpleNamespace

    from retentivekv_vllm.multimodal import layout_from_mm_features

    video = SimpleNamespace(modality="video", mm_position=SimpleNamespace(offset=0, length=4, is_embed=None), data=None)
    with pytest.raises(UnsupportedMultimodalInput, match="video"):
        layout_from_mm_features([video], SimpleNamespace(model_type="llava"), 10)
