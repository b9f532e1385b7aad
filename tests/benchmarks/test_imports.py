"""Importing a benchmark module leaves the environment alone: the test run imports them, and every
`vllm serve` it starts afterwards inherits os.environ (a module that set VLLM_LOGGING_LEVEL at
import
once silenced the servers' release lines)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULES = sorted(
    ".".join(path.relative_to(ROOT).with_suffix("").parts)
    for path in (ROOT / "benchmarks").rglob("*.py")
    # kvpress's dump runs in kvpress's own environment (benchmarks/kvpress/__init__.py).
    if path.name != "__init__.py" and path != ROOT / "benchmarks" / "kvpress" / "dump.py"
)


@pytest.mark.parametrize("module", MODULES)
def test_import_does_not_change_the_environment(module):
    check = (
        "import importlib, os, sys; before = dict(os.environ); "
        "importlib.import_module(sys.argv[1]); "
        "changed = "
        "{k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}; "
        "print(sorted(changed)); sys.exit(1 if changed else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", check, module], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, (
        f"importing {module} changed {result.stdout.strip()} {result.stderr[-2000:]}"
    )
