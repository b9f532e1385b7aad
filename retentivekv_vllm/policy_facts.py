"""What the settings must know of the policies without importing them (``policies/`` imports the
settings): the policies' names, the feature maps a state can use, and which settings keep a
recurrent state. ``tests/test_config.py`` checks these facts against the policies themselves."""

POLICY_NAMES = ("full", "streaming", "h2o", "snapkv", "knorm", "lookm", "retentive")
FEATURE_MAP_NAMES = ("prf", "elu", "learned")  # learned: per layer, from a maps file


def keeps_state(policy: str, states: str) -> bool:
    """Whether folded tokens live on in recurrent states (whose memory is reserved at start-up)."""
    return policy == "retentive" and states != "none"
