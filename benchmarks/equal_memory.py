"""What the harnesses share to compare policies at equal memory and paired over items.

* `token_bytes`: the bytes one cached token costs (every layer and KV head);
* `keeps_no_state`: an eviction cell, one that runs again with a state's bytes as cached tokens;
  `held_no_state`: the same of a measured cell;
* `equal_memory_budget`: a request's budget given extra tokens on top of the cell's ratio;
* `request_stats`: the plugin's stats of each request of one ``LLM.generate`` call, in order;
* `paired_bootstrap`, `mcnemar_exact`: paired comparisons of two cells on the same items.

Used by ``benchmarks/real_model.py`` and ``benchmarks/fidelity.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

BOOTSTRAP_SEED = 0
BOOTSTRAP_RESAMPLES = 5000


def token_bytes(model_dir: Path, dtype: str = "float32") -> int:
    """Bytes one cached token takes over all layers and KV heads in a cache of `dtype` (the
    language model's, for a vision-language model)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config = config.get("text_config", config)
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv_heads = config.get("num_key_value_heads") or heads
    element_bytes = 4 if dtype == "float32" else 2
    return config["num_hidden_layers"] * kv_heads * 2 * head_dim * element_bytes


def keeps_no_state(config: dict[str, Any]) -> bool:
    """An eviction cell: it runs again with the reference's state bytes as extra cached tokens.
    `config` is a cell's additional_config, read by the plugin's own rule (`retentive` keeps a
    state only with a feature map, a maps file or ``kv_feature_map``, and ``kv_states`` not
    ``none``)."""
    if config["kv_policy"] == "full":
        return False
    from retentivekv_vllm.config import KVPolicyConfig

    return not KVPolicyConfig.from_additional_config(config).keeps_state


def held_no_state(cell: dict[str, Any]) -> bool:
    """A measured eviction cell at a compressed budget: a policy other than full whose requests
    held no state bytes. Recorded results are read by this, not by their configs: a cell recorded
    as plain ``{"kv_policy": "retentive"}`` ran with the prf state, the default until retentive
    kept no state without a maps file."""
    return cell["config"]["kv_policy"] != "full" and cell["state_bytes"] == 0


def equal_memory_budget(ratio: float, prompt_len: int, extra_tokens: int) -> float | int:
    """A request's budget: the cell's `ratio` of its prompt, plus `extra_tokens` (a state's bytes
    as tokens) as a token count, at most the whole prompt; the ratio itself without extra."""
    if not extra_tokens:
        return ratio
    return min(prompt_len, math.ceil(ratio * prompt_len) + extra_tokens)


def state_tokens(state_bytes: float, per_token: int) -> int:
    """A state's bytes as whole cached tokens, rounded up: an eviction cell given them never
    holds less memory than the cell with the state."""
    return math.ceil(state_bytes / per_token)


def request_stats(before: dict, after: dict, outputs) -> list[dict]:
    """The plugin's stats (``retentivekv_stats`` / ``worker_stats`` snapshots taken before and
    after one ``LLM.generate``) of each of its requests, in the outputs' order. The worker
    releases a finished request at the next step, so the last ones may still be live; the engine
    core's ids are the output's with a random suffix ("7" -> "7-1a2b3c4d")."""
    seen = set(before["finished"]) | set(before["live"])
    new = {
        rid.rsplit("-", 1)[0]: s
        for rid, s in {**after["finished"], **after["live"]}.items()
        if rid not in seen
    }
    return [new[out.request_id] for out in outputs]


def paired_bootstrap(a, b, seed: int = BOOTSTRAP_SEED, resamples: int = BOOTSTRAP_RESAMPLES):
    """Mean of a - b over paired items and its 95 % percentile-bootstrap interval."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if diff.size == 0:
        raise ValueError("paired_bootstrap: no items")
    index = np.random.default_rng(seed).integers(0, diff.size, size=(resamples, diff.size))
    means = diff[index].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(diff.mean()), float(low), float(high)


def mcnemar_exact(a, b) -> dict[str, float]:
    """McNemar's exact test of paired right/wrong: a right where b is wrong (a_only) and the
    reverse (b_only); two-sided binomial p-value of the discordant pairs at 1/2."""
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    n, k = a_only + b_only, min(a_only, b_only)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return {"a_only": a_only, "b_only": b_only, "p": p}
