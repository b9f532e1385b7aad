"""retentivekv-vllm: RetentiveKV and baseline KV-cache policies as a vLLM plugin.

``register`` is the ``vllm.general_plugins`` entry point.  vLLM calls it in every
process (API server, engine core, workers), possibly several times; it is idempotent
and changes nothing for a run that does not configure a KV policy.
"""

__version__ = "0.1.0"


def register() -> None:
    from retentivekv_vllm.engine.patches import apply_process_patches

    apply_process_patches()
