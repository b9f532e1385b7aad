"""What `retentive` keeps without a maps file: no state (folded tokens are dropped, eviction by the
retention score), said once at start-up with how to get a state; ``--kv-maps FILE`` alone turns
on the learned state, ``--kv-feature-map prf`` or ``elu`` the random-feature or elu state
(docs/results.md, sections 8 and 9, for the numbers that decided it)."""

import logging

import pytest
import torch

from retentivekv_vllm.config import ConfigError, KVPolicyConfig
from retentivekv_vllm.learned_maps import SHIPPED_MAPS_DIR, load_maps
from retentivekv_vllm.policies import Observation, make_policy
from retentivekv_vllm.policies import retentive as retentive_module

MAPS = str(SHIPPED_MAPS_DIR / "recall.safetensors")  # a 2-layer model's maps, head size 64
HEAD_DIM = 64
NO_STATE_LINE = "retentive keeps no state without a maps file"


def config(**knobs) -> KVPolicyConfig:
    return KVPolicyConfig.from_additional_config(
        {"kv_policy": "retentive", **{f"kv_{k}": v for k, v in knobs.items()}}
    )


@pytest.mark.parametrize(
    "knobs, feature_map, num_states, rank",
    [
        ({}, None, 0, 0),
        ({"states": "single"}, None, 0, 0),  # --kv-states says which states, given a map
        ({"maps": MAPS}, "learned", 1, 16),
        ({"maps": MAPS, "feature_map": "learned"}, "learned", 1, 16),
        ({"maps": MAPS, "states": "none"}, "learned", 0, 16),
        ({"feature_map": "prf"}, "prf", 1, 64),
        ({"feature_map": "prf", "state_rank": 8}, "prf", 1, 8),
        ({"feature_map": "elu"}, "elu", 1, HEAD_DIM),
    ],
)
def test_the_state_follows_the_feature_map_in_use(knobs, feature_map, num_states, rank):
    policy = make_policy(config(**knobs))
    assert policy.settings.state_feature_map == feature_map
    assert policy.keeps_state == (num_states > 0)
    assert policy.num_states(has_images=False) == num_states
    assert policy.num_states(has_images=True) == num_states * (2 if num_states else 1)
    assert policy.state_rank(HEAD_DIM) == rank
    if feature_map is None:
        with pytest.raises(ValueError, match="no state without a maps file.*--kv-maps FILE"):
            policy.feature_map(HEAD_DIM, HEAD_DIM**-0.5, 0)
    else:
        assert policy.feature_map(HEAD_DIM, HEAD_DIM**-0.5, 0).rank == rank


def test_the_maps_file_alone_reads_each_layers_learned_map():
    policy = make_policy(config(maps=MAPS))
    maps = load_maps(MAPS)
    assert policy.feature_map(HEAD_DIM, HEAD_DIM**-0.5, 1) is maps.layers[1]
    assert policy.state_rank(HEAD_DIM) == maps.rank


@pytest.mark.parametrize(
    "knobs, option, says",
    [
        # A maps file is read by the learned map only.
        ({"maps": MAPS, "feature_map": "prf"}, "--kv-maps", "--kv-feature-map learned"),
        ({"maps": MAPS, "feature_map": "elu"}, "--kv-maps", "--kv-feature-map learned"),
        ({"feature_map": "learned"}, "--kv-maps", "retentivekv_vllm.calibrate"),
        ({"feature_map": "cosine"}, "--kv-feature-map", "auto"),
        # The self-recall error is read through the state's feature map: with none, say how.
        ({"recall_weight": 1.0}, "--kv-recall-weight", "--kv-feature-map prf"),
    ],
)
def test_settings_without_a_way_to_read_them_are_refused_naming_the_flag(knobs, option, says):
    with pytest.raises(ConfigError) as refused:
        config(**knobs)
    assert str(refused.value).startswith(option) and says in str(refused.value)


def test_the_recall_term_reads_the_feature_map_asked_for():
    assert config(recall_weight=1.0, feature_map="prf").retentive.recall_weight == 1.0
    assert config(recall_weight=1.0, maps=MAPS).retentive.state_feature_map == "learned"


def test_without_a_state_nothing_is_absorbed():
    """Folded tokens are dropped: absorb returns no state, as with --kv-states none."""
    n = 12
    probs = torch.rand(2, 4, n).softmax(-1)
    candidates = torch.ones(2, n, dtype=torch.bool)
    obs = Observation(probs, torch.arange(n).expand(2, -1), candidates, probs.sum(1))
    folded = torch.zeros(2, n, dtype=torch.bool)
    folded[:, 2:8] = True
    keys, values = torch.randn(2, n, HEAD_DIM), torch.randn(2, n, HEAD_DIM)
    assert make_policy(config()).absorb([], obs, folded, keys, values, 0.125, 0) == []
    states = make_policy(config(feature_map="prf")).absorb([], obs, folded, keys, values, 0.125, 0)
    assert len(states) == 1 and states[0].z.abs().sum() > 0


@pytest.fixture
def plugin_log():
    """The lines logged to vLLM's logger of the plugin, with the once-per-process memory of the
    no-state line cleared before and after."""
    lines = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = retentive_module.logger
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    retentive_module.log_no_state.cache_clear()
    yield lines
    retentive_module.log_no_state.cache_clear()
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_the_no_state_default_is_said_once_with_how_to_get_a_state(plugin_log):
    make_policy(config(feature_map="prf"))
    make_policy(config(maps=MAPS))
    assert not [line for line in plugin_log if NO_STATE_LINE in line]
    make_policy(config())
    make_policy(config(budget=0.5))  # another request's policy: not said again
    (line,) = [line for line in plugin_log if NO_STATE_LINE in line]
    assert "python -m retentivekv_vllm.calibrate MODEL --out FILE" in line
    assert "--kv-maps FILE" in line and "--kv-feature-map prf" in line
    assert retentive_module.logger.name == "vllm.retentivekv_vllm"
