"""Every change this plugin makes to vLLM, in one place.

vLLM has no public API for KV compression, for extra CLI flags or for per-request
worker hooks, so the plugin wraps a few internal symbols.  Each wrapper calls the
original and only adds behaviour; the runner hooks are installed only once a policy
is active.  Checked against the versions in CHECKED_VLLM_VERSIONS; internals change
every release, so a new vLLM version must be re-checked here first.

Patched or overridden symbols, and why:

- ``AttentionBackendEnum.CPU_ATTN`` (``register_backend``): CPU attention with KV policies, a
  pass-through without one (the CPU platform ignores ``--attention-backend``).
- ``AttentionBackendEnum.CUSTOM`` (``register_backend``): GPU attention with KV policies
  (``engine/gpu_backend.py``, a subclass of the Triton backend), chosen by ``--kv-policy`` on CUDA.
- ``vllm.engine.arg_utils.EngineArgs``: ``add_cli_args`` adds the ``--kv-*`` flags,
  ``from_cli_args`` moves them into ``additional_config``, ``create_engine_config`` turns prefix
  caching off and picks ``CUSTOM`` on GPU under a policy, and validates at start-up.
- ``vllm.v1.engine.input_processor.InputProcessor._validate_params``: validates a request's own
  policy and budget (``vllm_xargs.kv_*``): HTTP 400 naming the field.
- ``CompletionRequest.to_beam_search_params`` and ``ChatCompletionRequest.to_beam_search_params``
  (``vllm.entrypoints.openai.{completion,chat_completion}.protocol``): refuse ``vllm_xargs.kv_*``
  with beam search, which vLLM builds without ``vllm_xargs`` (HTTP 400 naming the field).
- The ``vllm_xargs`` field of ``CompletionRequest``, ``ChatCompletionRequest`` and
  ``ResponsesRequest``: refuses JSON booleans in ``kv_*``, which pydantic would read as 1.
- ``vllm.v1.worker.worker_base.WorkerBase`` (added methods ``retentivekv_metrics``,
  ``retentivekv_stats``): read by ``collective_rpc`` from the API server (``serving.py``).
- ``vllm.v1.core.kv_cache_manager.KVCacheManager.allocate_slots``: hands each request's own
  settings to the KV manager (installed with a policy only).
- ``vllm.v1.worker.gpu_model_runner.GPUModelRunner``: ``_build_attention_metadata`` records the
  step's request ids, prompt lengths and multimodal features (``engine/worker.py``),
  ``execute_model`` commits the folds the step planned once its forward has run, and
  ``_update_states`` releases the memory of finished, aborted and preempted requests.
- ``determine_available_memory`` of ``vllm.v1.worker.cpu_worker.CPUWorker`` (``gpu_worker.Worker``
  on GPU): reserves the recurrent states of ``max_num_seqs`` requests out of the KV memory.

Extended through vLLM's own registries and subclassing (no patch): the CPU backend
trio (``engine/cpu_backend.py``) and, registered in ``KVCacheSpecRegistry``,
``RetentiveAttentionSpec(FullAttentionSpec)`` with
``RetentiveAttentionManager(FullAttentionManager)``
(``engine/kv_manager.py``), which overrides ``remove_skipped_blocks`` and ``free``.

The ``vllm`` console script of this package also patches
``importlib.metadata.version`` for the name "vllm" (see ``launcher.py``).
"""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger(__name__)

CHECKED_VLLM_VERSIONS = ("0.32.0",)
CPU_BACKEND_PATH = "retentivekv_vllm.engine.cpu_backend.RetentiveCPUAttentionBackend"
GPU_BACKEND_PATH = "retentivekv_vllm.engine.gpu_backend.RetentiveTritonAttentionBackend"

_applied: set[str] = set()


def _once(name: str) -> bool:
    if name in _applied:
        return False
    _applied.add(name)
    return True


def apply_process_patches() -> None:
    """Safe in every vLLM process, any number of times."""
    if not _once("process"):
        return
    import vllm

    base_version = vllm.__version__.split("+")[0]
    if base_version not in CHECKED_VLLM_VERSIONS:
        logger.warning(
            "retentivekv-vllm was checked against vLLM %s, not %s; its patches may not fit",
            ", ".join(CHECKED_VLLM_VERSIONS),
            vllm.__version__,
        )
    _register_backends()
    _patch_engine_args()
    _patch_request_validation()
    _patch_request_models()
    _add_worker_methods()


def _register_backends() -> None:
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND_PATH)
    # On every platform: CUSTOM is otherwise unregistered, the path is resolved only when a
    # GPU run asks for it, and the CPU platform never does (it ignores --attention-backend).
    register_backend(AttentionBackendEnum.CUSTOM, GPU_BACKEND_PATH)


def _select_gpu_backend(engine_args) -> None:
    """A policy on a GPU runs on the CUSTOM backend unless the user named a backend (then
    validate_engine refuses any other)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return
    if engine_args.attention_backend is None and engine_args.attention_config.backend is None:
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        engine_args.attention_backend = AttentionBackendEnum.CUSTOM


def _patch_engine_args() -> None:
    from vllm.engine.arg_utils import EngineArgs

    from retentivekv_vllm.cli import add_kv_arguments, merge_kv_arguments
    from retentivekv_vllm.config import ConfigError, KVPolicyConfig
    from retentivekv_vllm.engine.settings import validate_engine

    original_add = EngineArgs.add_cli_args

    @functools.wraps(original_add)
    def add_cli_args(parser, *args, **kwargs):
        parser = original_add(parser, *args, **kwargs)
        if "--kv-policy" not in parser._option_string_actions:
            add_kv_arguments(parser)
        return parser

    original_from = EngineArgs.from_cli_args.__func__

    @functools.wraps(original_from)
    def from_cli_args(cls, args):
        try:
            merge_kv_arguments(args)
            KVPolicyConfig.from_additional_config(args.additional_config)
        except ConfigError as error:
            # Command-line mistakes end like argparse's: one line, no traceback.
            raise SystemExit(f"error: {error}") from None
        return original_from(cls, args)

    original_create = EngineArgs.create_engine_config

    @functools.wraps(original_create)
    def create_engine_config(self, *args, **kwargs):
        extra = self.additional_config if isinstance(self.additional_config, dict) else None
        if KVPolicyConfig.from_additional_config(extra) is not None:
            if self.enable_prefix_caching is None:
                # A compressed cache cannot be shared; off unless the user insists
                # (then validate_engine refuses with a clear message).
                self.enable_prefix_caching = False
            _select_gpu_backend(self)
        vllm_config = original_create(self, *args, **kwargs)
        validate_engine(vllm_config)
        return vllm_config

    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)
    EngineArgs.create_engine_config = create_engine_config


def _patch_request_validation() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    from retentivekv_vllm.config import RequestConfigError, request_config
    from retentivekv_vllm.engine.settings import kv_config_from_vllm_config, rotary_refusal

    original = InputProcessor._validate_params

    @functools.wraps(original)
    def validate_params(self, params, *args, **kwargs):
        if isinstance(params, SamplingParams) and params.extra_args:
            try:
                config = request_config(
                    kv_config_from_vllm_config(self.vllm_config),
                    params.extra_args,
                    self.vllm_config.model_config.max_model_len,
                )
                # A policy the server's model cannot run (its RoPE), chosen by the request.
                refusal = config is not None and rotary_refusal(config, self.vllm_config)
                if refusal:
                    raise RequestConfigError("vllm_xargs.kv_policy", refusal)
            except RequestConfigError as error:
                raise VLLMValidationError(str(error), parameter=error.field) from None
        return original(self, params, *args, **kwargs)

    InputProcessor._validate_params = validate_params


def _patch_request_models() -> None:
    from typing import Annotated

    from pydantic import BeforeValidator
    from pydantic.fields import FieldInfo
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
    from vllm.exceptions import VLLMValidationError

    from retentivekv_vllm.config import KEY_PREFIX

    def refuse_kv_xargs(original):
        @functools.wraps(original)
        def to_beam_search_params(self, *args, **kwargs):
            ours = sorted(k for k in self.vllm_xargs or {} if k.startswith(KEY_PREFIX))
            if ours:
                field = f"vllm_xargs.{ours[0]}"
                raise VLLMValidationError(
                    f"{field}: per-request KV settings do not apply to beam search "
                    "(use_beam_search), which runs under the server's; send one or the other",
                    parameter=field,
                )
            return original(self, *args, **kwargs)

        return to_beam_search_params

    for request_class in (CompletionRequest, ChatCompletionRequest):
        request_class.to_beam_search_params = refuse_kv_xargs(request_class.to_beam_search_params)

    def refuse_booleans(xargs):
        for key, value in (xargs if isinstance(xargs, dict) else {}).items():
            if key.startswith(KEY_PREFIX) and isinstance(value, bool):
                raise ValueError(f"vllm_xargs.{key}: expected a number, got a boolean")
        return xargs

    for request_class in (CompletionRequest, ChatCompletionRequest, ResponsesRequest):
        field = request_class.model_fields["vllm_xargs"]
        checked = Annotated[field.annotation, BeforeValidator(refuse_booleans)]
        request_class.model_fields["vllm_xargs"] = FieldInfo.merge_field_infos(
            field, FieldInfo.from_annotation(checked)
        )
        request_class.model_rebuild(force=True)


def _add_worker_methods() -> None:
    # String method names are what collective_rpc can send from the API server (functions need
    # vLLM's insecure serialization); the worker wrapper resolves them on the worker.
    from vllm.v1.worker.worker_base import WorkerBase

    from retentivekv_vllm.engine.worker import worker_metrics, worker_stats

    WorkerBase.retentivekv_metrics = worker_metrics
    WorkerBase.retentivekv_stats = worker_stats


def install_scheduler_hooks() -> None:
    """Called by the KV manager of a compressing policy, in the engine core."""
    if not _once("scheduler"):
        return
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    original = KVCacheManager.allocate_slots

    @functools.wraps(original)
    def allocate_slots(self, request, *args, **kwargs):
        for manager in self.coordinator.single_type_managers:
            note_request = getattr(manager, "note_request", None)
            if note_request is not None:
                note_request(request)
        return original(self, request, *args, **kwargs)

    KVCacheManager.allocate_slots = allocate_slots


def install_worker_hooks() -> None:
    """Called by the policy's attention impls, in the worker, while the model loads (before
    vLLM sizes the KV cache)."""
    if not _once("worker"):
        return
    from vllm.platforms import current_platform

    from retentivekv_vllm.engine.memory import reserve_state_memory

    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_worker import CPUWorker as worker_class
    else:
        from vllm.v1.worker.gpu_worker import Worker as worker_class

    original = worker_class.determine_available_memory

    @functools.wraps(original)
    def determine_available_memory(self):
        return reserve_state_memory(original(self), self.vllm_config)

    worker_class.determine_available_memory = determine_available_memory


def install_runner_hooks() -> None:
    """Called by the policy's metadata builder, in the worker, when a policy is active."""
    if not _once("runner"):
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from retentivekv_vllm.engine.worker import WORKER

    original_build = GPUModelRunner._build_attention_metadata

    @functools.wraps(original_build)
    def build_attention_metadata(self, num_tokens, num_reqs, *args, **kwargs):
        WORKER.record_batch(self, num_reqs)
        return original_build(self, num_tokens, num_reqs, *args, **kwargs)

    original_update = GPUModelRunner._update_states

    @functools.wraps(original_update)
    def update_states(self, scheduler_output):
        WORKER.memories.release(scheduler_output.finished_req_ids)
        WORKER.memories.release(scheduler_output.preempted_req_ids or ())
        return original_update(self, scheduler_output)

    original_execute = GPUModelRunner.execute_model

    @functools.wraps(original_execute)
    def execute_model(self, *args, **kwargs):
        output = original_execute(self, *args, **kwargs)
        WORKER.commit()  # the step's forward has run every layer
        return output

    GPUModelRunner._build_attention_metadata = build_attention_metadata
    GPUModelRunner._update_states = update_states
    GPUModelRunner.execute_model = execute_model
