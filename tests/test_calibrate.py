"""`python -m retentivekv_vllm.calibrate` and the maps files it writes: format, model matching,
the --kv-maps knob's validation, and what calibration optimises."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from retentivekv_vllm import calibrate
from retentivekv_vllm.config import ConfigError, KVPolicyConfig
from retentivekv_vllm.core import LearnedFeatureMap
from retentivekv_vllm.fixtures import build_tiny_model
from retentivekv_vllm.learned_maps import (
    SHIPPED_MAPS_DIR,
    LearnedMaps,
    MapsFileError,
    ModelIdentity,
    check_maps_for_model,
    load_maps,
    model_identity,
)

# Calibration of the tiny model in about 20 s on two cores (held-out ratio about 0.6).
TINY_CALIBRATION = (
    "--length 256 --span 64 --queries 16 --sequences 4 --held-out 2 --steps 30 --batch 2 --rank 8"
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama")


@pytest.fixture(scope="module")
def maps_file(tiny_model, tmp_path_factory):
    """Maps fitted by the command itself, briefly (about 20 s on two cores), on the tiny model."""
    out = tmp_path_factory.mktemp("maps") / "tiny.safetensors"
    # A λ other than the default: the file must record the selection it was fitted on.
    argv = [str(tiny_model), "--out", str(out), *TINY_CALIBRATION.split(), "--lambda", "0.75"]
    assert calibrate.main(argv) == 0
    return out


def test_the_file_holds_the_model_settings_and_results(maps_file, tiny_model):
    maps = LearnedMaps.load(maps_file)
    identity = model_identity(tiny_model)
    assert maps.model == identity
    config = json.loads((tiny_model / "config.json").read_text())
    assert len(maps.layers) == config["num_hidden_layers"] == identity.num_layers
    assert maps.rank == 8 and maps.layers[0].num_heads == identity.num_kv_heads
    # A Llama model has plain RoPE: the maps de-rotate (and the engine tests read them so).
    assert maps.layers[0].rope_inv_freq is not None and maps.settings["min_prompt"] >= 1
    assert maps.settings["policy"]["budget"] == 0.2 and maps.settings["text"] == "pydoc_data.topics"
    assert maps.settings["policy"]["retentive"]["lambda_"] == 0.75
    per_layer = maps.results["per_layer"]
    assert [row["layer"] for row in per_layer] == list(range(identity.num_layers))
    assert all(row["held_out_residual"] >= 0 and row["held_out_state"] >= 0 for row in per_layer)


def test_calibration_brings_the_held_out_error_below_eviction(maps_file):
    """On sequences it was not fitted on, the kept cache merged with the fitted state is closer
    to full attention than the kept cache alone (eviction with the same selection), in every
    layer of the tiny model and by a clear margin overall."""
    results = LearnedMaps.load(maps_file).results
    for row in results["per_layer"]:
        assert row["held_out_state"] < row["held_out_residual"], row
    assert results["held_out_ratio"] < 0.85
    # Rounding the state to bfloat16 costs little next to what it recovers.
    assert results["held_out_ratio_bf16_state"] < 0.9


def test_save_and_load_round_trip_bit_for_bit(tmp_path):
    gen = torch.Generator().manual_seed(0)
    layers = [
        LearnedFeatureMap(
            torch.randn(2, 8, 3, generator=gen),
            torch.randn(2, 8, 3, generator=gen),
            torch.randn(2, 8, generator=gen),
            torch.randn(2, 8, generator=gen),
            torch.randn(2, 6, generator=gen),
        )
        for _ in range(3)
    ]
    identity = ModelIdentity("LlamaForCausalLM", 3, 4, 2, 8, "abc")
    LearnedMaps(layers, identity, {"rank": 6}, {"held_out_ratio": 0.5}).save(
        tmp_path / "m.safetensors"
    )
    loaded = LearnedMaps.load(tmp_path / "m.safetensors")
    assert loaded.model == identity and loaded.settings == {"rank": 6}
    for mine, theirs in zip(layers, loaded.layers, strict=True):
        for a, b in zip(mine.parameters(), theirs.parameters(), strict=True):
            assert torch.equal(a, b)


def test_a_mismatching_model_is_refused_naming_every_difference(maps_file, tmp_path):
    other = build_tiny_model(tmp_path / "other", arch="llama", seed=1, num_key_value_heads=1)
    with pytest.raises(MapsFileError) as error:
        check_maps_for_model(maps_file, str(other))
    message = str(error.value)
    assert "num_kv_heads: 2 in the file, 1 served" in message
    assert "fingerprint" in message and "calibrate" in message
    assert "num_layers" not in message and "head_dim" not in message


def test_same_shapes_other_weights_differ_by_fingerprint_only(maps_file, tmp_path):
    other = build_tiny_model(tmp_path / "reseeded", arch="llama", seed=7)
    with pytest.raises(
        MapsFileError, match=r"\(fingerprint: '[0-9a-f]+' in the file, '[0-9a-f]+' served\)"
    ):
        check_maps_for_model(maps_file, str(other))


def test_the_fingerprint_ignores_the_dtype_the_weights_are_stored_in(tmp_path):
    # float16 weights widened to float32 are the same numbers: the same fingerprint.
    half = build_tiny_model(tmp_path / "half", arch="llama", dtype="float16")
    from safetensors.torch import load_file, save_file

    widened = tmp_path / "widened"
    widened.mkdir()
    for file in half.iterdir():
        if file.suffix == ".safetensors":
            save_file({k: v.float() for k, v in load_file(file).items()}, widened / file.name)
        else:
            (widened / file.name).write_bytes(file.read_bytes())
    assert model_identity(half).fingerprint == model_identity(widened).fingerprint


def config(**knobs):
    return KVPolicyConfig.from_additional_config({"kv_policy": "retentive", **knobs})


def test_kv_maps_knob_validation(maps_file, tmp_path):
    learned = config(kv_feature_map="learned", kv_maps=str(maps_file))
    assert learned.retentive.maps == str(maps_file)  # a path keeps its case
    with pytest.raises(ConfigError, match=r"--kv-maps .*needs a maps file"):
        config(kv_feature_map="learned")
    with pytest.raises(ConfigError, match=r"--kv-maps .*--kv-feature-map learned \(or auto"):
        config(kv_feature_map="prf", kv_maps=str(maps_file))
    # The maps file alone turns the learned state on (--kv-feature-map auto, the default).
    assert config(kv_maps=str(maps_file)).retentive.state_feature_map == "learned"
    with pytest.raises(ConfigError, match=r"--kv-maps .*missing\.safetensors: (?i:no such file)"):
        config(kv_maps=str(tmp_path / "missing.safetensors"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match=r"--kv-maps .*junk\.safetensors: unreadable maps file"):
        config(kv_feature_map="learned", kv_maps=str(junk))


def test_the_policy_gives_each_layer_its_own_map(maps_file):
    from retentivekv_vllm.policies import make_policy

    policy = make_policy(config(kv_feature_map="learned", kv_maps=str(maps_file)))
    maps = load_maps(maps_file)
    head_dim = maps.model.head_dim
    first, second = (policy.feature_map(head_dim, head_dim**-0.5, layer) for layer in (0, 1))
    assert first is maps.layers[0] and second is maps.layers[1]
    with pytest.raises(MapsFileError, match="layer None"):
        policy.feature_map(head_dim, head_dim**-0.5)
    with pytest.raises(ValueError, match="head size"):
        policy.feature_map(head_dim * 2, 1.0, 0)


def synthetic_examples(sequences=6, heads=2, folded=12, rows=10, dim=8, seed=0):
    """Examples whose full output is exactly a kept cache merged with a state of `target`'s
    features: calibration can drive the error far below the no-state residual."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(sequences, heads, folded, dim, generator=gen)
    values = torch.randn(sequences, heads, folded, dim, generator=gen)
    ones = torch.ones(sequences, heads, folded)
    queries = torch.randn(sequences, heads, rows, dim, generator=gen)
    out_local = torch.randn(sequences, heads, rows, dim, generator=gen)
    lse_local = torch.zeros(sequences, heads, rows)
    target = LearnedFeatureMap.initial(heads, dim, 4, key_scale=1.0, seed=99)
    key_positions = torch.zeros(sequences, heads, folded, dtype=torch.long)
    query_positions = torch.zeros(sequences, 1, rows, dtype=torch.long)
    example = calibrate.LayerExample(
        keys,
        values,
        ones,
        ones,
        queries,
        out_local,
        out_local,
        lse_local,
        key_positions,
        query_positions,
    )
    out_full = calibrate.merged_output(target, example)
    return dataclasses.replace(example, out_full=out_full)


def test_fitting_reduces_the_merged_output_error_well_below_eviction():
    train, held_out = synthetic_examples(seed=0), synthetic_examples(seed=0)
    untrained = LearnedFeatureMap.initial(2, 8, 4, seed=0)
    before, residual = calibrate.squared_errors(untrained, held_out)
    assert before == pytest.approx(residual, rel=1e-2)  # an untrained state adds almost nothing
    fitted = calibrate.fit_layer(train, rank=4, steps=150, batch=4, lr=0.05, seed=0)
    after, _ = calibrate.squared_errors(fitted, held_out)
    assert after < 0.2 * residual


def test_folds_of_different_lengths_stack_without_changing_any_output():
    """Sequences compressed at different points fold different numbers of tokens; `stack` pads the
    shorter folds, and each sequence's merged output is the one it has alone."""
    long, short = (
        synthetic_examples(sequences=1, folded=12),
        synthetic_examples(sequences=1, folded=5, seed=3),
    )
    feature_map = LearnedFeatureMap.initial(2, 8, 4, key_scale=1.0, seed=0)
    alone = [calibrate.merged_output(feature_map, e)[0] for e in (long, short)]
    unbatched = [
        calibrate.LayerExample(*(getattr(e, f.name)[0] for f in dataclasses.fields(e)))
        for e in (long, short)
    ]
    batch = calibrate.stack(unbatched)
    assert batch.keys.shape[2] == 12
    together = calibrate.merged_output(feature_map, batch)
    torch.testing.assert_close(together[0], alone[0])
    torch.testing.assert_close(together[1], alone[1])


def test_the_scale_search_keeps_a_state_that_only_hurts_at_its_small_initial_scale():
    """Where full attention is the kept cache's output (nothing folded mattered), every share of
    the state is an error: the search leaves the initial scale."""
    example = synthetic_examples(seed=1)
    example = dataclasses.replace(example, out_full=example.out_local)
    feature_map = LearnedFeatureMap.initial(2, 8, 4, key_scale=1e-4, seed=0)
    initial = feature_map.key_log_scale.clone()
    calibrate.search_scale(feature_map, example)
    assert torch.equal(feature_map.key_log_scale, initial)
    # Where the state is needed, the search raises the scale by several e-folds.
    calibrate.search_scale(feature_map, synthetic_examples(seed=1))
    assert (feature_map.key_log_scale > initial + 3).all()


@pytest.mark.slow
def test_command_line_entry_point_shows_progress_and_the_report(tiny_model, tmp_path):
    out = tmp_path / "cli.safetensors"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "retentivekv_vllm.calibrate",
            str(tiny_model),
            "--out",
            str(out),
            "--length",
            "96",
            "--span",
            "24",
            "--queries",
            "8",
            "--sequences",
            "2",
            "--held-out",
            "1",
            "--steps",
            "2",
            "--batch",
            "1",
            "--rank",
            "4",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "capture q, k, v" in run.stderr and "fit layers" in run.stderr
    assert "no state" in run.stdout and f"wrote {out}" in run.stdout
    assert out.is_file()


def test_bad_arguments_are_named(tiny_model, tmp_path):
    with pytest.raises(SystemExit):
        calibrate.main([str(tiny_model), "--out", str(tmp_path / "x"), "--rank", "5"])
    with pytest.raises(SystemExit):
        calibrate.main([str(tmp_path), "--out", str(tmp_path / "x")])


@pytest.mark.slow
def test_the_shipped_maps_fit_the_converted_smollm2_and_beat_eviction():
    """The shipped file matches the model the fixture converts, de-rotates its inputs, and its
    held-out error (over compression points drawn between 128 and 768 tokens) is below eviction's
    overall (0.88 when fitted) with no layer more than a few percent above."""
    from retentivekv_vllm.fixtures import default_smollm2_dir, smollm2_model_dir

    maps_path = SHIPPED_MAPS_DIR / "smollm2-135m-instruct.safetensors"
    check_maps_for_model(maps_path, str(smollm2_model_dir(default_smollm2_dir())))
    maps = LearnedMaps.load(maps_path)
    assert maps.rank == calibrate.DEFAULT_RANK
    assert maps.layers[0].rope_inv_freq is not None
    assert maps.results["held_out_ratio"] < 0.9
    for row in maps.results["per_layer"]:
        assert row["held_out_state"] < 1.05 * row["held_out_residual"], row
