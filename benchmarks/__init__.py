"""Benchmarks of retentivekv-vllm against stock vLLM (see benchmarks/README.md)."""
