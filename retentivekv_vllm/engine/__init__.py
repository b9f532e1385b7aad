"""The only code that imports vLLM internals: flags, backend, runner hooks, memory."""
