"""The settings of a KV policy: the common knobs, and each policy's own settings dataclass.

The common knobs (policy, budget, sinks, window, observation window, decode interval, ...) are
fields of ``KVPolicyConfig``; a policy's own parameters are a small dataclass next to the policy
(``policies/retentive.py``'s ``RetentiveSettings``), held in one field. Flags and keys stay flat
(``--kv-lambda``, ``kv_lambda``), and every knob is validated with an error naming its flag.

The settings travel inside vLLM's own ``additional_config`` (keys ``kv_policy``,
``kv_budget``, ...), so the same dictionary reaches the API server, the engine core
and every worker.  ``--kv-policy retentive`` and the other ``--kv-*`` flags are
spellings of those keys (see ``cli.py``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from retentivekv_vllm.knobs import (
    KEY_PREFIX,
    SHOWN_CHARACTERS,
    ConfigError,
    KnobError,
    check_choice,
    coerce,
    knob,
    knob_name,
    option,
    shown,
)
from retentivekv_vllm.policies import POLICIES
from retentivekv_vllm.policies.retentive import RetentiveSettings

__all__ = ["KEY_PREFIX", "ConfigError", "KVPolicyConfig", "RequestConfigError", "request_config"]

# Knobs a request may set for itself in the OpenAI request's extra fields (vllm_xargs, which
# vLLM hands on as SamplingParams.extra_args); every other knob is the server's.
REQUEST_KNOBS = ("policy", "budget")
# Whether the server lets requests set REQUEST_KNOBS (--kv-request-overrides).
REQUEST_OVERRIDES = ("allow", "deny")


class RequestConfigError(ConfigError):
    """A bad per-request setting; `field` is the request field it came from (vllm_xargs.kv_*)."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}")
        self.field = field


def _policy_settings(settings_class: type) -> Any:
    """The field of KVPolicyConfig that holds one policy's own settings dataclass."""
    return field(default_factory=settings_class, metadata={"settings": settings_class})


@dataclass(frozen=True)
class KVPolicyConfig:
    policy: str = knob(
        None,
        "KV-cache policy: full, streaming, h2o, snapkv, knorm, expected_attention, lookm, "
        "retentive.",
        str,
    )
    budget: float = knob(
        0.2,
        "Cache tokens kept per request: a ratio of the prompt (0 < b <= 1) or a "
        "token count (an integer > 1).",
        float,
    )
    sinks: int = knob(4, "First tokens of a request that are never compressed.", int)
    window: int = knob(32, "Most recent tokens that are never compressed.", int)
    observation_window: int = knob(
        32, "Last queries whose attention scores the cache (SnapKV's window).", int
    )
    decode_interval: int = knob(
        64,
        "Tokens over budget that decoding may add before compressing again (it then folds whole "
        "blocks, back to the highest block boundary that leaves the budget live).",
        int,
    )
    pool_kernel: int = knob(
        7, "Width of the 1-D average pooling of scores (odd; snapkv and retentive).", int
    )
    request_overrides: str = knob(
        "allow",
        "Whether a request may choose its own policy and budget (vllm_xargs.kv_policy, "
        "vllm_xargs.kv_budget): allow, or deny (such a request gets HTTP 400).",
        str,
    )
    # Each policy's own knobs, in a dataclass next to the policy (flags and keys stay flat).
    retentive: RetentiveSettings = _policy_settings(RetentiveSettings)

    @property
    def budget_is_ratio(self) -> bool:
        return self.budget <= 1

    @property
    def keeps_state(self) -> bool:
        """Whether folded tokens live on in recurrent states (memory reserved at start-up)."""
        return POLICIES[self.policy].keeps_state_under(self)

    def check_model_length(self, max_model_len: int) -> None:
        """Refuse (KnobError) a token-count budget longer than the model's maximum length, and
        sinks and window that leave no token of the longest request to compress."""
        if not self.budget_is_ratio and self.budget > max_model_len:
            raise KnobError(
                "budget",
                f"{int(self.budget)} tokens exceed the model's maximum length {max_model_len} "
                "(--max-model-len); use a ratio 0 < b <= 1 or a count up to that length",
            )
        if self.sinks + self.window >= max_model_len:
            raise KnobError(
                "sinks",
                f"{self.sinks} sinks and the {self.window}-token window ({option('window')}) "
                f"are never compressed, and together reach the model's maximum length "
                f"{max_model_len}: no request could be compressed",
            )

    def budget_tokens(self, num_prompt_tokens: int) -> int:
        """Cache tokens a request may keep (sinks, kept and window together)."""
        if self.budget_is_ratio:
            return max(1, math.ceil(self.budget * num_prompt_tokens))
        return int(self.budget)

    @classmethod
    def _fields(cls) -> tuple[list[dataclasses.Field], list[dataclasses.Field]]:
        """(the common knobs, the fields that hold a policy's own settings dataclass)."""
        fields = dataclasses.fields(cls)
        return (
            [f for f in fields if "settings" not in f.metadata],
            [f for f in fields if "settings" in f.metadata],
        )

    @classmethod
    def knobs(cls) -> list[dataclasses.Field]:
        """Every knob, the common ones first, then each policy's own (flat: one flag each)."""
        common, settings = cls._fields()
        return common + [k for f in settings for k in dataclasses.fields(f.metadata["settings"])]

    @staticmethod
    def key(f: dataclasses.Field) -> str:
        """The additional_config key of a knob (``lambda_`` is spelled ``kv_lambda``)."""
        return KEY_PREFIX + knob_name(f)

    @classmethod
    def from_additional_config(
        cls, additional_config: Mapping[str, Any] | None
    ) -> KVPolicyConfig | None:
        """The policy settings, or None when no policy was asked for.

        Raises ConfigError naming the option for unknown keys and bad values.
        """
        by_key = {cls.key(f): f for f in cls.knobs()}
        ours = {k: v for k, v in (additional_config or {}).items() if k.startswith(KEY_PREFIX)}
        unknown = sorted(set(ours) - set(by_key))
        if unknown:
            raise ConfigError(
                f"unknown KV-policy option(s) {unknown} in additional_config; "
                f"known: {sorted(by_key)}"
            )
        if ours.get("kv_policy") is None:
            if len(ours) > 0:
                raise ConfigError(
                    f"{option('policy')} is required when other KV options are set ({sorted(ours)})"
                )
            return None
        values = {by_key[key].name: coerce(by_key[key], value) for key, value in ours.items()}
        config = cls.from_knobs(**values)
        config.validate()
        return config

    @classmethod
    def from_knobs(cls, **values: Any) -> KVPolicyConfig:
        """The settings from knobs named flat, as in flags and keys (``feature_map="elu"``), each
        routed to the common settings or to the policy settings it belongs to; not validated."""
        nested = {}
        for f in cls._fields()[1]:
            names = {knob.name for knob in dataclasses.fields(f.metadata["settings"])}
            own = {name: values.pop(name) for name in names & values.keys()}
            nested[f.name] = f.metadata["settings"](**own)
        return cls(**values, **nested)

    def to_additional_config(self) -> dict[str, Any]:
        common, settings = self._fields()
        flat = {self.key(f): getattr(self, f.name) for f in common}
        for f in settings:
            own = getattr(self, f.name)
            flat.update({self.key(k): getattr(own, k.name) for k in dataclasses.fields(own)})
        return flat

    def validate(self) -> None:
        """KnobError naming the flag of the first bad value, the policies' own knobs included."""
        check_choice("policy", self.policy, sorted(POLICIES), "policy")
        if not (0 < self.budget <= 1 or (self.budget > 1 and self.budget == int(self.budget))):
            raise KnobError(
                "budget",
                f"got {shown(self.budget)}; use a ratio 0 < b <= 1 or a whole token count > 1",
            )
        for name in ("sinks", "window"):
            if getattr(self, name) < 0:
                raise KnobError(name, f"must be >= 0, got {getattr(self, name)}")
        if not self.budget_is_ratio and self.sinks + self.window > self.budget:
            raise KnobError(
                "budget",
                f"{int(self.budget)} tokens cannot hold the {self.sinks} sinks and the "
                f"{self.window}-token window ({option('sinks')}, {option('window')}), which "
                "are never compressed",
            )
        for name in ("observation_window", "decode_interval"):
            if getattr(self, name) < 1:
                raise KnobError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise KnobError("pool_kernel", f"must be a positive odd number, got {self.pool_kernel}")
        check_choice("request_overrides", self.request_overrides, REQUEST_OVERRIDES)
        for f in self._fields()[1]:
            getattr(self, f.name).validate()


def request_config(
    server: KVPolicyConfig | None,
    extra_args: Mapping[str, Any] | None,
    max_model_len: int | None = None,
) -> KVPolicyConfig | None:
    """The settings one request runs under: the server's, with the policy and budget the request
    chose in its extra fields (``vllm_xargs.kv_policy``, ``vllm_xargs.kv_budget``); a token-count
    budget must fit `max_model_len` when given.

    The API server validates with it (HTTP 400 naming the field); the scheduler's KV manager and
    the workers call it on the same extra_args, so both sides fold each request by the same rule.
    """
    ours = {k: v for k, v in (extra_args or {}).items() if k.startswith(KEY_PREFIX)}
    if not ours:
        return server
    allowed = {KEY_PREFIX + name: name for name in REQUEST_KNOBS}
    for key in sorted(ours):
        if key not in allowed:
            raise RequestConfigError(
                _xarg_field(key), f"not a per-request option; a request may set {sorted(allowed)}"
            )
    if server is None:
        raise RequestConfigError(
            _xarg_field(sorted(ours)[0]),
            "this server runs no KV policy (start it with --kv-policy to choose one per request)",
        )
    if server.request_overrides == "deny":
        raise RequestConfigError(
            _xarg_field(sorted(ours)[0]),
            f"this server does not let requests choose their KV settings (started with "
            f"{option('request_overrides')} deny); send the request without vllm_xargs.kv_*",
        )
    knobs = {f.name: f for f in server.knobs()}
    try:
        values = {allowed[k]: coerce(knobs[allowed[k]], v) for k, v in ours.items()}
        config = dataclasses.replace(server, **values)
        config.validate()
        if max_model_len is not None:
            config.check_model_length(max_model_len)
    except KnobError as error:
        raise RequestConfigError(f"vllm_xargs.{KEY_PREFIX}{error.knob}", error.why) from None
    if config.keeps_state and not server.keeps_state:
        raise RequestConfigError(
            "vllm_xargs.kv_policy",
            f"{config.policy!r} folds tokens into recurrent states, and this server's policy "
            f"{server.policy!r} reserved no memory for them; choose a policy without states",
        )
    return config


def _xarg_field(key: str) -> str:
    """The request field a vllm_xargs key is named by in an error (a long key cut short)."""
    if len(key) > SHOWN_CHARACTERS:
        key = f"{key[:SHOWN_CHARACTERS]}..."
    return f"vllm_xargs.{key}"
