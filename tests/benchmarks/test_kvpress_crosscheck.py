"""The project's eviction policies against NVIDIA kvpress's presses on the same tensors."""

from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
KVPRESS_PYTHON = REPO / ".cache" / "kvpress-venv" / "bin" / "python"


@pytest.mark.slow
@pytest.mark.skipif(
    not KVPRESS_PYTHON.exists(),
    reason=f"kvpress needs its own environment at {KVPRESS_PYTHON.relative_to(REPO)} "
    "(docs/results.md says how to create it)",
)
def test_scores_and_kept_sets_agree_with_kvpress():
    import tempfile

    from benchmarks.kvpress.crosscheck import crosscheck
    from retentivekv_vllm.fixtures import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = crosscheck(KVPRESS_PYTHON, build_tiny_model(work / "tiny-llama", arch="llama"), work)
    by_press = {}
    for row in rows:
        by_press.setdefault(row["press"], []).append(row)
    assert len(by_press["snapkv"]) == 4  # every layer of the fixture
    for row in by_press["snapkv"]:
        # Equal up to the mean-vs-sum factor away from the pooling edges, and the same kept tokens.
        assert row["max_rel_diff_interior"] < 1e-4
        assert row["kept_overlap"] == 1.0
    for row in by_press["streaming"]:
        assert row["kept_overlap"] == 1.0
    for row in by_press["h2o (all prompt queries)"]:
        # Equal after kvpress's division by the number of queries that see each key.
        assert row["max_rel_diff_all"] < 1e-4
    assert len(by_press["knorm"]) == 4
    for row in by_press["knorm"]:
        # The same negated key norms, so the same kept tokens.
        assert row["max_rel_diff_all"] < 1e-5
        assert row["kept_overlap"] == 1.0
    assert len(by_press["expected_attention"]) == 4
    for row in by_press["expected_attention"]:
        # kvpress's statistics over the prompt's queries, reproduced from the cached (post-RoPE)
        # queries de-rotated, and the same averaged rotation, quadratic term and value norms.
        assert row["max_rel_diff_all"] < 1e-4
        assert row["kept_overlap"] == 1.0
