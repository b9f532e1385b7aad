"""The speed benchmark's bookkeeping: the step times it attributes to the largest batch, the
ratios to stock, and the README table written between its markers (the measurement itself is
`python -m benchmarks.speed --quick`, too long for the test tiers)."""

import sys

import pytest

from benchmarks import speed


def result(name, tpot, ttft, tok_s, kv_bytes, running, largest_tpot, load=0.7):
    """One process's result, as `speed.run_one` returns it (the fields the report reads)."""
    return {
        "name": name,
        "additional_config": None,
        "latency": {"tpot_s": tpot, "ttft_s": ttft, "load_before": [0.5, 0, 0]},
        "throughput": {
            "output_tokens_per_s": tok_s,
            "kv_bytes_per_request": kv_bytes,
            "max_running": running,
            "blocks_per_request": kv_bytes / 2**20,
            "tpot_at_largest_batch_s": largest_tpot,
            "largest_decode_batch": running,
            "decode_tokens_per_s_at_largest_batch": running / largest_tpot,
            "load_before": [load, 0, 0],
            "errors": [],
        },
    }


def test_tpot_at_largest_batch_uses_only_steps_that_decode_the_largest_batch():
    # Step durations 1..8 (counts after each step). Step 3 ends the third prefill (3 decoding after
    # it, but it prefilled). Steps 4, 7 and 8 begin with all 3 running requests decoding and admit
    # nobody: pure decode of the batch (in step 8 one request finishes, after decoding). Step 5 also
    # begins so, but admits a waiting request (its prefill ran in that step); step 6 begins with
    # that
    # one still without output.
    series = {
        "time_s": [1, 3, 6, 10, 15, 21, 28, 36],
        "running": [1, 2, 3, 3, 3, 3, 3, 2],
        "decoding": [0, 1, 3, 3, 2, 3, 3, 2],
        "waiting": [3, 2, 1, 1, 0, 0, 0, 0],
    }
    assert speed.tpot_at_largest_batch(series) == (3, 7.0)  # the median of 4, 7 and 8 s


def test_ratios_and_readme_table(tmp_path):
    results = [
        speed.merge_passes([result("stock", 0.02, 4.0, 50.0, 8 * 2**20, 4, 0.04)]),
        speed.merge_passes([result("retentive 0.2", 0.01, 4.4, 150.0, 2 * 2**20, 16, 0.08)]),
    ]
    speed.add_ratios(results)
    ratios = results[1]["vs_stock"]
    assert ratios["kv_memory"] == 4.0
    assert ratios["tpot_batch1_speedup"] == 2.0
    assert ratios["output_tokens_per_s"] == 3.0
    assert ratios["max_concurrency"] == 4.0
    assert ratios["decode_tokens_per_s_at_largest_batch"] == 2.0
    assert abs(ratios["prefill_overhead"] - 0.1) < 1e-9

    data = {
        "meta": {
            "mode": "quick",
            "date": "d",
            "cpu_count": 2,
            "settings": {
                "latency_prompt": 8192,
                "latency_repeats": 3,
                "passes": 1,
                "throughput": {"num_requests": 12, "prompt_tokens": 2048, "max_tokens": 48},
            },
        },
        "results": results,
    }
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{speed.TABLE_START}\nold table\n{speed.TABLE_END}\nafter\n")
    speed.write_readme_table(data, readme)
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith(f"{speed.TABLE_END}\nafter\n")
    assert "old table" not in text
    row = next(line for line in text.splitlines() if line.startswith("| retentive 0.2 |"))
    assert (
        "| 2.0 MiB | 4.0x | 16 |" in row and "| +10% |" in row and "| 80.0 ms (16) | 2.0x |" in row
    )
    assert row.endswith("| 150.0 | 3.0x |")


def test_passes_report_medians_and_each_pass_against_its_own_stock():
    stock = [
        result("stock", 0.020, 4.0, 50.0, 8, 4, 0.040),
        result("stock", 0.030, 5.0, 40.0, 8, 4, 0.050),
        result("stock", 0.025, 4.5, 45.0, 8, 4, 0.045, load=1.5),
    ]
    ours = [
        result("r", 0.010, 4.4, 150.0, 2, 16, 0.080),
        result("r", 0.030, 5.0, 100.0, 2, 16, 0.100),
        result("r", 0.012, 4.8, 120.0, 2, 15, 0.060),
    ]
    ours[1]["throughput"]["errors"] = ["one"]
    results = [speed.merge_passes(stock), speed.merge_passes(ours)]
    speed.add_ratios(results)
    merged = results[1]
    assert merged["latency"] == {"tpot_s": 0.012, "ttft_s": 4.8, "load_before": [0.5, 0, 0]}
    assert (
        merged["throughput"]["max_running"] == 16
        and merged["throughput"]["tpot_at_largest_batch_s"] == 0.08
    )
    assert merged["throughput"]["errors"] == ["one"] and merged["passes"] == ours
    assert results[0]["throughput"]["load_before"] == [1.5, 0, 0]  # the highest load any pass saw
    # Ratios between medians: stock's TPOT 0.025 against 0.012; each pass against its own stock.
    assert merged["vs_stock"]["tpot_batch1_speedup"] == 2.08
    assert [p["tpot_batch1_speedup"] for p in merged["vs_stock_by_pass"]] == [2.0, 1.0, 2.08]
    assert [p["output_tokens_per_s"] for p in merged["vs_stock_by_pass"]] == [3.0, 2.5, 2.67]


def test_a_run_without_matplotlib_stops_before_measuring(monkeypatch, tmp_path):
    """The figure is drawn last; without matplotlib the run must refuse at once, not after its
    measurements, and say which extra to install."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with pytest.raises(SystemExit, match=r"matplotlib.*\.\[bench\]"):
        speed.main(["--quick", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_smollm2_shape_is_the_converted_models():
    """The real model's rows size its pools from `speed.SMOLLM2`: it must be the checkpoint's shape
    (45 KiB of fp32 KV a token: 30 layers x 3 KV heads x 64 x keys and values x 4 bytes)."""
    import json

    from retentivekv_vllm.fixtures.smollm2 import default_smollm2_dir

    assert speed.kv_bytes_per_token(speed.SMOLLM2) == 2 * 30 * 3 * 64 * 4 == 46080
    config_path = default_smollm2_dir() / "config.json"
    if not config_path.is_file():
        pytest.skip("SmolLM2 not converted (python -m retentivekv_vllm.fixtures smollm2)")
    config = json.loads(config_path.read_text())
    config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
    assert {key: config[key] for key in speed.SMOLLM2} == speed.SMOLLM2


@pytest.mark.parametrize("flags", [["--quick"], ["--readme"]])
def test_smollm2_has_one_setting_of_its_own(flags, tmp_path, capsys):
    with pytest.raises(SystemExit):
        speed.main(["--model", "smollm2", *flags, "--out", str(tmp_path)])
    assert "--model smollm2 has one setting of its own" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
