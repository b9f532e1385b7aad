"""Every knob of a KV policy in one dataclass, with defaults and start-up validation.

The settings travel inside vLLM's own ``additional_config`` (keys ``kv_policy``,
``kv_budget``, ...), so the same dictionary reaches the API server, the engine core
and every worker.  ``--kv-policy retentive`` and the other ``--kv-*`` flags are
spellings of those keys (see ``engine/cli.py``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retentivekv_vllm.policy_facts import FEATURE_MAP_NAMES, POLICY_NAMES, keeps_state

KEY_PREFIX = "kv_"
STATE_MODES = ("dual", "single", "none")
STATE_QUERIES = ("query", "fixed")
STATE_READOUTS = ("unbiased", "normalised")
# Knobs a request may set for itself in the OpenAI request's extra fields (vllm_xargs, which
# vLLM hands on as SamplingParams.extra_args); every other knob is the server's.
REQUEST_KNOBS = ("policy", "budget")
# Whether the server lets requests set REQUEST_KNOBS (--kv-request-overrides).
REQUEST_OVERRIDES = ("allow", "deny")
# Numbers beyond 2**53 are not exact in a float, and no knob means anything there; the largest
# token budget any model could use is its maximum length (checked where that is known).
LARGEST_NUMBER = 2**53
SHOWN_CHARACTERS = 40  # of a refused value, in an error message


def shown(value: Any) -> str:
    """A refused value as an error message shows it: its repr, cut to SHOWN_CHARACTERS."""
    text = repr(value)
    if len(text) <= SHOWN_CHARACTERS:
        return text
    return f"{text[:SHOWN_CHARACTERS]}... ({len(text)} characters)"


class ConfigError(ValueError):
    """A bad KV-policy setting; the message names the option."""


def _option(name: str) -> str:
    return f"--kv-{name.replace('_', '-')} (additional_config.{KEY_PREFIX}{name})"


class KnobError(ConfigError):
    """A bad value of one knob, named by its command-line spelling."""

    def __init__(self, knob: str, why: str) -> None:
        super().__init__(f"{_option(knob)}: {why}")
        self.knob, self.why = knob, why


class RequestConfigError(ConfigError):
    """A bad per-request setting; `field` is the request field it came from (vllm_xargs.kv_*)."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}")
        self.field = field


def _knob(default: Any, help: str, kind: type) -> Any:
    return field(default=default, metadata={"help": help, "kind": kind})


@dataclass(frozen=True)
class KVPolicyConfig:
    policy: str = _knob(
        None, "KV-cache policy: full, streaming, h2o, snapkv, knorm, lookm, retentive.", str
    )
    budget: float = _knob(
        0.2,
        "Cache tokens kept per request: a ratio of the prompt (0 < b <= 1) or a "
        "token count (an integer > 1).",
        float,
    )
    sinks: int = _knob(4, "First tokens of a request that are never compressed.", int)
    window: int = _knob(32, "Most recent tokens that are never compressed.", int)
    observation_window: int = _knob(
        32, "Last queries whose attention scores the cache (SnapKV's window).", int
    )
    lambda_: float = _knob(
        0.5, "Weight of attention against entropy in the retention score.", float
    )
    pool_kernel: int = _knob(7, "Width of the 1-D average pooling of scores (odd).", int)
    feature_map: str = _knob(
        "prf",
        "State feature map: prf (positive random features), elu, or learned (per layer and "
        "KV head, read from --kv-maps).",
        str,
    )
    maps: str = _knob(
        "",
        "Learned feature maps for --kv-feature-map learned: the file `python -m "
        "retentivekv_vllm.calibrate MODEL --out FILE` wrote for the served model.",
        Path,
    )
    state_rank: int = _knob(
        64, "Feature dimension r of the recurrent state (prf; a maps file sets its own).", int
    )
    gamma0: float = _knob(0.99, "Base retention of the state per folded token.", float)
    absorption_min: float = _knob(0.5, "Lower clamp of the absorption weight.", float)
    absorption_max: float = _knob(2.0, "Upper clamp of the absorption weight.", float)
    decode_interval: int = _knob(
        64,
        "Tokens over budget that decoding may add before compressing again (it then folds whole "
        "blocks, back to the highest block boundary that leaves the budget live).",
        int,
    )
    seed: int = _knob(0, "Seed of the random-feature projection.", int)
    state_query: str = _knob(
        "query",
        "How retentive reads its states: query (each query reads them through its own "
        "features) or fixed (every query reads them through the zero query's features, so "
        "each folded token weighs the same whatever the query: the no-query-conditioned-"
        "retrieval ablation).",
        str,
    )
    state_readout: str = _knob(
        "unbiased",
        "How a state's readout is scaled: unbiased (φ(q)ᵀS, the random-feature estimate of the "
        "folded tokens' softmax terms) or normalised (divided by φ(q)·φ(0), the feature map's "
        "own estimate of exp(0) = 1: a ratio estimator whose error does not grow with the "
        "query's norm, biased; pair it with --kv-state-log-gain).",
        str,
    )
    state_log_gain: float = _knob(
        0.0, "Natural log of the gain g every state's readout is multiplied by in the merge.", float
    )
    states: str = _knob(
        "dual",
        "Recurrent states of retentive: dual (visual and text), single (one for both) or "
        "none (folded tokens are dropped: eviction by the retention score).",
        str,
    )
    request_overrides: str = _knob(
        "allow",
        "Whether a request may choose its own policy and budget (vllm_xargs.kv_policy, "
        "vllm_xargs.kv_budget): allow, or deny (such a request gets HTTP 400).",
        str,
    )

    @property
    def budget_is_ratio(self) -> bool:
        return self.budget <= 1

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
                f"{self.sinks} sinks and the {self.window}-token window ({_option('window')}) "
                f"are never compressed, and together reach the model's maximum length "
                f"{max_model_len}: no request could be compressed",
            )

    def budget_tokens(self, num_prompt_tokens: int) -> int:
        """Cache tokens a request may keep (sinks, kept and window together)."""
        if self.budget_is_ratio:
            return max(1, math.ceil(self.budget * num_prompt_tokens))
        return int(self.budget)

    @classmethod
    def knobs(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls))

    @staticmethod
    def key(f: dataclasses.Field) -> str:
        """The additional_config key of a knob (``lambda_`` is spelled ``kv_lambda``)."""
        return KEY_PREFIX + f.name.rstrip("_")

    @classmethod
    def from_additional_config(
        cls, additional_config: Mapping[str, Any] | None
    ) -> KVPolicyConfig | None:
        """The policy settings, or None when no policy was asked for.

        Raises ConfigError naming the option for unknown keys and bad values.
        """
        extra = dict(additional_config or {})
        by_key = {cls.key(f): f for f in cls.knobs()}
        ours = {k: v for k, v in extra.items() if k.startswith(KEY_PREFIX)}
        unknown = sorted(set(ours) - set(by_key))
        if unknown:
            raise ConfigError(
                f"unknown KV-policy option(s) {unknown} in additional_config; "
                f"known: {sorted(by_key)}"
            )
        if ours.get("kv_policy") is None:
            if len(ours) > 0:
                raise ConfigError(
                    f"{_option('policy')} is required when other KV options are set "
                    f"({sorted(ours)})"
                )
            return None
        values = {}
        for key, value in ours.items():
            f = by_key[key]
            values[f.name] = _coerce(f, value)
        config = cls(**values)
        config.validate()
        return config

    def to_additional_config(self) -> dict[str, Any]:
        return {self.key(f): getattr(self, f.name) for f in self.knobs()}

    def validate(self) -> None:
        def fail(name: str, why: str) -> None:
            raise KnobError(name, why)

        if self.policy not in POLICY_NAMES:
            fail(
                "policy",
                f"unknown policy {shown(self.policy)}; choose one of {sorted(POLICY_NAMES)}",
            )
        if not (0 < self.budget <= 1 or (self.budget > 1 and self.budget == int(self.budget))):
            fail(
                "budget",
                f"got {shown(self.budget)}; use a ratio 0 < b <= 1 or a whole token count > 1",
            )
        for name in ("sinks", "window"):
            if getattr(self, name) < 0:
                fail(name, f"must be >= 0, got {getattr(self, name)}")
        if not self.budget_is_ratio and self.sinks + self.window > self.budget:
            fail(
                "budget",
                f"{int(self.budget)} tokens cannot hold the {self.sinks} sinks and the "
                f"{self.window}-token window ({_option('sinks')}, {_option('window')}), which "
                "are never compressed",
            )
        for name in ("observation_window", "state_rank", "decode_interval"):
            if getattr(self, name) < 1:
                fail(name, f"must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.lambda_ <= 1:
            fail("lambda", f"must lie in [0, 1], got {self.lambda_}")
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            fail("pool_kernel", f"must be a positive odd number, got {self.pool_kernel}")
        if self.feature_map not in FEATURE_MAP_NAMES:
            fail(
                "feature_map",
                f"unknown feature map {shown(self.feature_map)}; choose one of "
                f"{sorted(FEATURE_MAP_NAMES)}",
            )
        if self.feature_map == "learned" and not self.maps:
            fail(
                "maps",
                "--kv-feature-map learned needs a maps file; fit one with "
                "python -m retentivekv_vllm.calibrate MODEL --out FILE",
            )
        if self.maps and self.feature_map != "learned":
            fail(
                "maps",
                f"a maps file is read with --kv-feature-map learned only, got {self.feature_map}",
            )
        if self.maps:
            # Not at the top: reading maps needs torch, which the flags' parsing does not.
            from retentivekv_vllm.learned_maps import MapsFileError, load_maps

            try:
                load_maps(self.maps)
            except MapsFileError as error:
                fail("maps", str(error))
        if self.state_query not in STATE_QUERIES:
            fail(
                "state_query",
                f"unknown mode {self.state_query!r}; choose one of {list(STATE_QUERIES)}",
            )
        if self.state_readout not in STATE_READOUTS:
            fail(
                "state_readout",
                f"unknown mode {self.state_readout!r}; choose one of {list(STATE_READOUTS)}",
            )
        if not math.isfinite(self.state_log_gain):
            fail("state_log_gain", f"must be finite, got {self.state_log_gain}")
        if self.states not in STATE_MODES:
            fail("states", f"unknown mode {self.states!r}; choose one of {list(STATE_MODES)}")
        if self.request_overrides not in REQUEST_OVERRIDES:
            fail(
                "request_overrides",
                f"got {self.request_overrides!r}; choose one of {list(REQUEST_OVERRIDES)}",
            )
        if not 0 < self.gamma0 <= 1:
            fail("gamma0", f"must lie in (0, 1], got {self.gamma0}")
        if not 0 <= self.absorption_min <= self.absorption_max:
            fail(
                "absorption_min",
                f"need 0 <= absorption_min <= absorption_max ({_option('absorption_max')}), "
                f"got {self.absorption_min} and {self.absorption_max}",
            )


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
            f"{_option('request_overrides')} deny); send the request without vllm_xargs.kv_*",
        )
    knobs = {f.name: f for f in server.knobs()}
    try:
        values = {allowed[k]: _coerce(knobs[allowed[k]], v) for k, v in ours.items()}
        config = dataclasses.replace(server, **values)
        config.validate()
        if max_model_len is not None:
            config.check_model_length(max_model_len)
    except KnobError as error:
        raise RequestConfigError(f"vllm_xargs.{KEY_PREFIX}{error.knob}", error.why) from None
    if keeps_state(config.policy, config.states) and not keeps_state(server.policy, server.states):
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


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    kind = f.metadata["kind"]
    name = f.name.rstrip("_")
    if kind is Path:  # kept as written: a path is case-sensitive
        if not isinstance(value, str | os.PathLike):
            raise KnobError(name, f"expected a file path, got {value!r}")
        return str(value).strip()
    if kind is str:
        if not isinstance(value, str):
            raise KnobError(name, f"expected a string, got {shown(value)}")
        return value.strip().lower()
    # bool is an int to Python, not a number to a user; lists, None and objects are no numbers.
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise KnobError(name, f"expected a number, got {shown(value)}")
    try:
        number = float(value)
    except (ValueError, OverflowError):  # OverflowError: an int too large for a float
        raise KnobError(name, f"expected a number, got {shown(value)}") from None
    if not math.isfinite(number) or abs(number) > LARGEST_NUMBER:
        raise KnobError(name, f"must be a finite number of at most 2**53, got {shown(value)}")
    if kind is int:
        if number != int(number):
            raise KnobError(name, f"expected an integer, got {shown(value)}")
        return int(number)
    return number
