"""`lookm` in the engine: its merged keys and values are what the cache holds afterwards."""

import math

from .test_engine import generate


def test_lookm_writes_merged_tokens_back(model_dir, prompts):
    """On text, lookm scores exactly as h2o (accumulated attention, no image to put behind
    text), so both keep the same tokens; only the merge differs. If the engine wrote the
    kept tokens back unmerged, the two would generate the same tokens."""
    runs = {
        policy: generate(model_dir, prompts, {"kv_policy": policy, "kv_budget": 0.2})
        for policy in ("h2o", "lookm")
    }
    for _, stats in runs.values():
        for ids, s in zip(prompts, stats):
            assert s["tokens_folded"] == len(ids) - math.ceil(0.2 * len(ids))
            assert s["state_elements"] == 0
    assert runs["lookm"][0] != runs["h2o"][0]
