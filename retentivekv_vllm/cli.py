"""The --kv-* flags of `vllm serve` (and every vLLM CLI that takes engine args).

Each flag is a spelling of an ``additional_config`` key: ``--kv-policy retentive``
is ``--additional-config.kv_policy retentive``.  Values stay strings here and are
parsed by KVPolicyConfig, so every bad value gets the same kind of message.
"""

from __future__ import annotations

import argparse

from retentivekv_vllm.config import ConfigError, KVPolicyConfig

GROUP_TITLE = "KVPolicy"


def flag(key: str) -> str:
    """The flag of an ``additional_config`` key: ``kv_budget`` -> ``--kv-budget``."""
    return "--" + key.replace("_", "-")


def add_kv_arguments(parser) -> None:
    group = parser.add_argument_group(
        title=GROUP_TITLE,
        description="--kv-policy and the other --kv-* flags: KV-cache compression "
        "by retentivekv-vllm (also accepted as --additional-config.kv_*).",
    )
    for knob in KVPolicyConfig.knobs():
        key = KVPolicyConfig.key(knob)
        group.add_argument(
            flag(key),
            dest=key,
            default=None,
            metavar=knob.metadata["kind"].__name__.upper(),
            # "%(default).0s" renders empty; it stops argparse from appending the
            # flag's own default (None), which is not the knob's default.
            help=f"{knob.metadata['help']} (default: {knob.default})%(default).0s",
        )


def merge_kv_arguments(args: argparse.Namespace) -> None:
    """Move the parsed --kv-* flags into args.additional_config."""
    given = {
        KVPolicyConfig.key(k): getattr(args, KVPolicyConfig.key(k), None)
        for k in KVPolicyConfig.knobs()
    }
    given = {key: value for key, value in given.items() if value is not None}
    if not given:
        return
    extra = dict(getattr(args, "additional_config", None) or {})
    for key, value in given.items():
        if key in extra and str(extra[key]) != str(value):
            raise ConfigError(
                f"{flag(key)} {value!r} conflicts with additional_config.{key}={extra[key]!r}"
            )
        extra[key] = value
    args.additional_config = extra
