"""From vLLM's config to this process's policy, and the start-up checks."""

from __future__ import annotations

import functools

from retentivekv_vllm.config import KEY_PREFIX, ConfigError, KVPolicyConfig, request_config
from retentivekv_vllm.core.feature_maps import UnsupportedRotary, rotary_frequencies_from_config
from retentivekv_vllm.policies import POLICIES, KVPolicy, make_policy


def kv_config_from_vllm_config(vllm_config) -> KVPolicyConfig | None:
    extra = getattr(vllm_config, "additional_config", None)
    return KVPolicyConfig.from_additional_config(extra if isinstance(extra, dict) else None)


# Bounded: requests may choose their own budgets (the server's config has the largest share).
@functools.lru_cache(maxsize=64)
def _policy(config: KVPolicyConfig, rotary: tuple[float, ...] | None = None) -> KVPolicy:
    # One instance per process and config, so the builder and every layer share
    # its caches (e.g. the random-feature projection).
    return make_policy(config, rotary)


def model_rotary(vllm_config) -> tuple[float, ...] | str | None:
    """The served model's rotary frequencies, for policies that move queries between positions
    (`KVPolicy.rotary`): vLLM's attention layers get queries already rotated and never see the
    model's rotary module, so they are read from its config. A string says why they cannot be
    (`rotary_refusal` refuses the policies that need them); None: no model config."""
    model = getattr(vllm_config, "model_config", None)
    if model is None:
        return None
    try:
        return rotary_frequencies_from_config(model.hf_config)
    except UnsupportedRotary as error:
        return str(error)


def policy_from_vllm_config(vllm_config) -> KVPolicy | None:
    config = kv_config_from_vllm_config(vllm_config)
    if config is None:
        return None
    rotary = model_rotary(vllm_config)
    return _policy(config, rotary if isinstance(rotary, tuple) else None)


def request_policy(server: KVPolicy, request_state) -> KVPolicy:
    """The policy a request runs under in the worker: the server's, or the policy and budget it
    chose in its extra fields (request_state: the runner's CachedRequestState)."""
    params = getattr(request_state, "sampling_params", None)
    extra_args = (params.extra_args if params is not None else None) or {}
    ours = tuple(sorted((k, v) for k, v in extra_args.items() if k.startswith(KEY_PREFIX)))
    return _request_policy(server.config, ours, server.rotary) if ours else server


@functools.lru_cache(maxsize=64)
def _request_policy(server: KVPolicyConfig, ours: tuple, rotary) -> KVPolicy:
    # Validated by the API server already; cached because the builder asks every step.
    return _policy(request_config(server, dict(ours)), rotary)


def rotary_refusal(config: KVPolicyConfig, vllm_config) -> str | None:
    """Why the served model cannot run `config`'s policy, which needs its rotary frequencies
    (start-up and per-request checks); None when it can, or the policy needs none."""
    if not POLICIES[config.policy].needs_rotary:
        return None
    rotary = model_rotary(vllm_config)
    if not isinstance(rotary, str):
        return None
    return f"--kv-policy {config.policy} needs plain rotary position embeddings: {rotary}"


def _unsupported_engine_options(c) -> dict[str, str]:
    """vLLM option -> why the policy cannot serve it, for the options in use."""
    cache_dtype, pipeline = c.cache_config.cache_dtype, c.parallel_config.pipeline_parallel_size
    why = {
        "--kv-cache-dtype": cache_dtype != "auto"
        and f"the cache is {cache_dtype}; compression reads and packs the cache in the model's "
        "dtype (use --kv-cache-dtype auto)",
        "--speculative-config": c.speculative_config is not None
        and "speculative decoding adds and rolls back tokens within a step, which the folding "
        "rule shared by the scheduler and the workers does not model",
        "--pipeline-parallel-size": pipeline > 1
        and f"got {pipeline}; pipeline parallelism is not supported (tensor parallelism is)",
        "--kv-transfer-config": c.kv_transfer_config is not None
        and "a KV connector would move blocks whose tokens the policy has folded or packed",
    }
    return {option: reason for option, reason in why.items() if reason}


def refuse_unsupported_layer(policy: KVPolicy | None, impl, sliding_window: bool) -> None:
    """Refuse, while the model loads, a decoder layer (a backend's attention impl) with features
    the policy cannot serve."""
    from vllm.v1.attention.backend import AttentionType

    if policy is None or impl.attn_type != AttentionType.DECODER:
        return
    unsupported = {
        "sliding window": sliding_window,
        "ALiBi": impl.alibi_slopes is not None,
        "logits soft-capping": bool(impl.logits_soft_cap),
        "attention sinks": impl.sinks is not None,
    }
    found = [name for name, present in unsupported.items() if present]
    if found:
        raise ValueError(
            f"--kv-policy {policy.name}: models with {', '.join(found)} are not supported"
        )


def validate_engine(vllm_config) -> None:
    """Refuse, at start-up, combinations the policy cannot serve correctly."""
    config = kv_config_from_vllm_config(vllm_config)
    if config is None:
        return
    flag = f"--kv-policy {config.policy}"
    if vllm_config.cache_config.enable_prefix_caching:
        raise ConfigError(
            f"{flag} needs prefix caching off (--enable-prefix-caching is on): a compressed "
            "cache cannot be shared between requests; pass --no-enable-prefix-caching"
        )
    for option, why in _unsupported_engine_options(vllm_config).items():
        raise ConfigError(f"{flag} cannot run with {option}: {why}")
    from vllm.platforms import current_platform

    on_cpu = current_platform.is_cpu()
    if not on_cpu:
        if not current_platform.is_cuda():
            raise ConfigError(f"{flag}: only CPU and CUDA platforms are supported")
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        backend = vllm_config.attention_config.backend
        if backend is not AttentionBackendEnum.CUSTOM:
            raise ConfigError(
                f"{flag} runs on its own GPU attention backend: pass --attention-backend CUSTOM "
                f"or no --attention-backend (got {backend.name})"
            )
    model = vllm_config.model_config
    if model is None:
        return
    config.check_model_length(model.max_model_len)
    refusal = rotary_refusal(config, vllm_config)
    if refusal:
        raise ConfigError(refusal)
    if config.retentive.maps:  # first: the states' reservation reads the file's rank
        check_maps(config, vllm_config)
    kv_memory = vllm_config.cache_config.kv_cache_memory_bytes
    if kv_memory:
        from retentivekv_vllm.engine.memory import check_state_reservation

        check_state_reservation(kv_memory, vllm_config)
    if model.use_mla:
        raise ConfigError(f"{flag}: MLA models are not supported")
    if model.get_sliding_window() is not None:
        raise ConfigError(f"{flag}: sliding-window models are not supported")
    head_size = model.get_head_size()
    if not on_cpu:
        from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend

        if not TritonAttentionBackend.supports_head_size(head_size):
            raise ConfigError(f"{flag}: the model's head size {head_size} is not supported on GPU")
        return
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_size not in supported:
        raise ConfigError(
            f"{flag}: the model's head size {head_size} is not supported on CPU "
            f"(supported: {supported})"
        )


def check_maps(config: KVPolicyConfig, vllm_config) -> None:
    """Refuse a learned-maps file fitted for another model than the one served (naming what
    differs), and tensor parallelism, which would split the file's KV heads across workers."""
    from retentivekv_vllm.learned_maps import MapsFileError, check_maps_for_model

    option = f"--kv-maps {config.retentive.maps}"
    tensor_parallel = vllm_config.parallel_config.tensor_parallel_size
    if tensor_parallel > 1:
        raise ConfigError(
            f"{option}: learned maps need --tensor-parallel-size 1 (got {tensor_parallel})"
        )
    try:
        check_maps_for_model(config.retentive.maps, vllm_config.model_config.model)
    except MapsFileError as error:
        raise ConfigError(f"{option}: {error}") from None
