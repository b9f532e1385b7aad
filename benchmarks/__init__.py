"""Benchmarks of retentivekv-vllm against stock vLLM (see benchmarks/README.md)."""


def require_matplotlib() -> None:
    """Fail at start-up, not after the measurements: every benchmark ends by drawing its figure."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(
            "error: the benchmarks draw their figures with matplotlib, which is not installed; "
            "install the bench extra: pip install -e '.[bench]'"
        ) from None
