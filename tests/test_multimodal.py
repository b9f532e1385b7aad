"""The per-token image layout: the pure function on hand-made placeholders, and the adapter on the
request state of a real in-process vLLM engine, checked against the Hugging Face processor."""

import gc
from types import SimpleNamespace

import pytest
import torch

from retentivekv_vllm.fixtures import IMAGE_MARKUP, VLM_ARCHS, build_tiny_vlm
from retentivekv_vllm.multimodal import (
    ImagePlaceholder,
    UnsupportedMultimodalInput,
    layout_from_mm_features,
    token_layout,
)

from .images import decode, png_bytes, processor_layout

# ---------------------------------------------------------------- the pure function


def feature(modality, offset, length, is_embed=None, grid_thw=None):
    """A stand-in for vLLM's MultiModalFeatureSpec (only the fields the adapter reads)."""
    data = (
        None
        if grid_thw is None
        else {"image_grid_thw": SimpleNamespace(data=torch.tensor(grid_thw))}
    )
    position = SimpleNamespace(offset=offset, length=length, is_embed=is_embed)
    return SimpleNamespace(modality=modality, mm_position=position, data=data)


LLAVA = SimpleNamespace(
    model_type="llava",
    vision_config=SimpleNamespace(model_type="clip_vision_model", image_size=56, patch_size=14),
)
QWEN2_VL = SimpleNamespace(
    model_type="qwen2_vl", vision_config=SimpleNamespace(spatial_merge_size=2)
)


def test_two_images_with_text_between_and_marker_tokens():
    # Image 0: a 2x3 grid at 2..7; image 1: a 2x2 grid inside 10..15 with start/end markers.
    marked = torch.tensor([False, True, True, True, True, False])
    layout = token_layout(
        18, [ImagePlaceholder(2, 6, None, 2, 3), ImagePlaceholder(10, 6, marked, 2, 2)]
    )
    assert layout.image.tolist() == [-1, -1] + [0] * 6 + [-1] * 3 + [1] * 4 + [-1] * 3
    assert layout.row.tolist()[2:8] == [0, 0, 0, 1, 1, 1]
    assert layout.col.tolist()[2:8] == [0, 1, 2, 0, 1, 2]
    assert layout.row.tolist()[11:15] == [0, 0, 1, 1] and layout.col.tolist()[11:15] == [0, 1, 0, 1]
    assert layout.row[layout.image < 0].eq(-1).all() and layout.col[layout.image < 0].eq(-1).all()
    assert layout.grids == ((2, 3), (2, 2))
    assert layout.visual.tolist() == (layout.image >= 0).tolist() and int(layout.visual.sum()) == 10


def test_qwen_grid_is_image_grid_thw_over_the_merge_in_prompt_order():
    # Features listed out of prompt order: image numbers follow the prompt.
    later = feature("image", 40, 6, grid_thw=[1, 4, 6])  # 4x6 patches -> 2x3 tokens
    earlier = feature("image", 3, 24, grid_thw=[1, 8, 12])  # -> 4x6 tokens
    layout = layout_from_mm_features([later, earlier], QWEN2_VL, 50)
    assert layout.grids == ((4, 6), (2, 3))
    assert layout.image[3:27].eq(0).all() and layout.image[40:46].eq(1).all()
    assert layout.row[3:27].tolist() == [r for r in range(4) for _ in range(6)]
    assert layout.col[40:46].tolist() == [0, 1, 2, 0, 1, 2]
    assert int(layout.visual.sum()) == 30


def test_llava_grid_comes_from_the_vision_config():
    layout = layout_from_mm_features([feature("image", 5, 16)], LLAVA, 30)
    assert layout.grids == ((4, 4),)
    assert layout.row[5:21].tolist() == [r for r in range(4) for _ in range(4)]
    # With the "full" feature strategy LLaVA adds CLIP's CLS token: 17 positions, refused.
    with pytest.raises(
        UnsupportedMultimodalInput, match="17 embedding positions, not its 4x4 grid"
    ):
        layout_from_mm_features([feature("image", 5, 17)], LLAVA, 30)


@pytest.mark.parametrize("modality", ["video", "audio"])
def test_unsupported_modality_is_named(modality):
    features = [feature("image", 0, 16), feature(modality, 20, 4)]
    with pytest.raises(UnsupportedMultimodalInput, match=f"modality '{modality}'"):
        layout_from_mm_features(features, LLAVA, 30)


def test_images_without_a_known_grid_are_refused():
    with pytest.raises(UnsupportedMultimodalInput, match="without image_grid_thw"):
        layout_from_mm_features([feature("image", 0, 4)], QWEN2_VL, 10)
    with pytest.raises(UnsupportedMultimodalInput, match="2 temporal patches"):
        layout_from_mm_features([feature("image", 0, 4, grid_thw=[2, 4, 4])], QWEN2_VL, 10)
    gemma = SimpleNamespace(model_type="gemma3", vision_config=SimpleNamespace())
    with pytest.raises(UnsupportedMultimodalInput, match="'gemma3'"):
        layout_from_mm_features([feature("image", 0, 4)], gemma, 10)
    pixtral_tower = SimpleNamespace(model_type="pixtral", image_size=56, patch_size=14)
    with pytest.raises(UnsupportedMultimodalInput, match="'pixtral'"):
        layout_from_mm_features(
            [feature("image", 0, 16)],
            SimpleNamespace(model_type="llava", vision_config=pixtral_tower),
            20,
        )


@pytest.mark.parametrize(
    "placeholders, match",
    [
        ([ImagePlaceholder(0, 8, None, 3, 3)], "8 embedding positions, not its 3x3 grid"),
        ([ImagePlaceholder(0, 4, torch.ones(3, dtype=torch.bool), 2, 2)], "is_embed has shape"),
        ([ImagePlaceholder(8, 4, None, 2, 2)], "outside the prompt"),
        ([ImagePlaceholder(0, 4, None, 2, 2), ImagePlaceholder(2, 4, None, 2, 2)], "overlaps"),
    ],
)
def test_malformed_placeholders_are_refused(placeholders, match):
    with pytest.raises(UnsupportedMultimodalInput, match=match):
        token_layout(10, placeholders)


# ---------------------------------------------------------------- the adapter inside vLLM

ENGINE = dict(
    dtype="float32",
    enforce_eager=True,
    max_model_len=1024,
    kv_cache_memory_bytes=64 * 2**20,
    seed=0,
)


# Different sizes, one not a multiple of Qwen's 28-pixel merged patch: different Qwen grids.
IMAGES = [decode(png_bytes(4, 6, 28, seed=0)), decode(png_bytes(5, 7, 30, seed=1))]

# Prompt parts: text, or the index of an image in IMAGES.
CASES = {
    "one image": ["Describe", 0, "in a few words."],
    "two images, text between": ["Left:", 0, "and right:", 1, "what differs?"],
    "image first and last": [1, "then", 0],
}


@pytest.fixture(scope="module", params=sorted(VLM_ARCHS))
def vlm(request, tmp_path_factory):
    """An in-process vLLM engine and the Hugging Face processor of one tiny VLM."""
    arch = request.param
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        mp.setenv("HF_HUB_OFFLINE", "1")
        from transformers import AutoProcessor
        from vllm import LLM

        model_dir = build_tiny_vlm(tmp_path_factory.mktemp("models") / f"tiny-{arch}", arch)
        limits = {"image": 2} if arch == "llava" else {"image": 2, "video": 0}
        handle = SimpleNamespace(
            arch=arch,
            llm=LLM(model=str(model_dir), limit_mm_per_prompt=limits, **ENGINE),
            processor=AutoProcessor.from_pretrained(model_dir),
        )
        try:
            yield handle
        finally:
            handle.llm = None
            gc.collect()


def runner_request_state(llm, req_id: str, prompt: str, images: list):
    """The model runner's CachedRequestState of a request, read after its prefill step."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    engine.add_request(
        req_id,
        {"prompt": prompt, "multi_modal_data": {"image": images}},
        SamplingParams(max_tokens=1),
    )
    engine.step()  # the prompt fits one step's token budget: the runner now holds the request
    runner = engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    # vLLM appends "-<8 random characters>" to the caller's request id.
    (state,) = [s for rid, s in runner.requests.items() if rid.rsplit("-", 1)[0] == req_id]
    while engine.has_unfinished_requests():
        engine.step()
    return state


@pytest.mark.parametrize("case", CASES)
def test_layout_from_vllm_request_state_matches_the_processor(vlm, case):
    parts = CASES[case]
    prompt = " ".join(IMAGE_MARKUP[vlm.arch] if isinstance(p, int) else p for p in parts)
    images = [IMAGES[p] for p in parts if isinstance(p, int)]
    state = runner_request_state(vlm.llm, case, prompt, images)
    layout = layout_from_mm_features(
        state.mm_features, vlm.llm.llm_engine.model_config.hf_config, state.num_prompt_tokens
    )
    inputs = vlm.processor(text=prompt, images=images, return_tensors="pt")
    truth = processor_layout(vlm.processor, vlm.arch, inputs)
    assert list(state.prompt_token_ids) == inputs["input_ids"][0].tolist()
    assert layout.grids == truth.grids
    if vlm.arch != "llava":
        assert len(set(truth.grids)) == len(
            truth.grids
        )  # the two images really have different grids
    assert torch.equal(layout.image, truth.image)
    assert torch.equal(layout.row, truth.row) and torch.equal(layout.col, truth.col)
    assert torch.equal(layout.visual, truth.image >= 0)
