"""Learned maps of the fixture models (`python -m benchmarks.fixture_maps`): the calibration data
each fixture gets, calibration of a vision-language model, and the shipped files."""

import pytest

from benchmarks import fixture_maps
from benchmarks.fidelity import ITEM_SEED
from benchmarks.tasks import make_task
from retentivekv_vllm.learned_maps import (
    SHIPPED_MAPS_DIR,
    LearnedMaps,
    MapsFileError,
    check_maps_for_model,
)


def test_calibration_items_are_not_the_evaluation_items():
    assert fixture_maps.CALIBRATION_SEED != ITEM_SEED


def test_recall_sequences_are_the_task_prompts_context_then_questions():
    """Each sequence starts as a fidelity prompt does (<bos>, 127 pairs, ?) and is compressed
    where the harness compresses the whole context; questions and answers follow."""
    from retentivekv_vllm.fixtures import recall

    sequences, point = fixture_maps.recall_sequences(3, seed=1)
    prompt = make_task("recall").items(1, seed=1)[0].prompt["prompt_token_ids"]
    assert point == len(prompt) - 1  # the prompt is the context plus one query key
    for ids in sequences:
        assert len(ids) == point + 2 * fixture_maps.RECALL_QUERIES
        assert ids[0] == recall.BOS_ID and ids[point - 1] == recall.QUERY_ID
        assert recall.QUERY_ID not in ids[point:]


def test_grid_calibration_reads_the_image_and_fits_the_language_model(tmp_path):
    """A vision-language model calibrates on its items' images: the maps are the language
    model's (3 layers, 2 KV heads), de-rotate, and record the task's sinks and window; the
    compression point is where the last question starts."""
    out = tmp_path / "grid.safetensors"
    argv = ["--task", "grid", "--out", str(out), "--sequences", "2", "--held-out", "1"]
    assert fixture_maps.main([*argv, "--steps", "2", "--rank", "4"]) == 0
    maps = LearnedMaps.load(out)
    grid = make_task("grid")
    check_maps_for_model(out, str(grid.model_dir()))
    assert len(maps.layers) == 3 and maps.layers[0].num_heads == 2 and maps.rank == 4
    assert maps.layers[0].rope_inv_freq is not None
    policy = maps.settings["policy"]
    assert (policy["sinks"], policy["window"]) == (4, 16)
    assert all(row["held_out_residual"] > 0 for row in maps.results["per_layer"][2:])


def test_grid_compression_points_fall_before_the_question():
    from transformers import AutoTokenizer

    grid = make_task("grid")
    tokenizer = AutoTokenizer.from_pretrained(grid.model_dir())
    sequences, points = fixture_maps.grid_sequences(grid.model_dir(), 4, seed=3)
    for inputs, point in zip(sequences, points, strict=True):
        tail = tokenizer.decode(inputs["input_ids"][0, point:])
        assert tail.startswith(("What is at", "Where is", "How many")), tail


@pytest.mark.parametrize("task", ["recall", "grid"])
def test_the_shipped_fixture_maps_fit_their_model_only_and_beat_eviction(task):
    """The file for each fixture matches its model, de-rotates, was fitted with the task's sinks
    and window, has a held-out error below eviction's, and is refused for the other fixture."""
    model_dir = make_task(task).model_dir()
    path = SHIPPED_MAPS_DIR / f"{model_dir.name}.safetensors"
    check_maps_for_model(path, str(model_dir))
    maps = LearnedMaps.load(path)
    defaults = make_task(task).policy_defaults
    assert maps.settings["policy"]["sinks"] == defaults["kv_sinks"]
    assert maps.settings["policy"]["window"] == defaults["kv_window"]
    assert maps.layers[0].rope_inv_freq is not None
    assert maps.results["held_out_ratio"] < 0.8
    other = make_task("grid" if task == "recall" else "recall").model_dir()
    with pytest.raises(MapsFileError, match="fitted for another model"):
        check_maps_for_model(path, str(other))
