"""Lint of docker/Dockerfile.* without a Docker daemon or hadolint: the rules below are the
hadolint checks that matter for these images (pinned bases, no `latest`, no root at run time, no
pip or apt caches, COPY not ADD, exec-form entrypoint) plus the project's own (the GPU image
installs the package without touching vLLM, on the vLLM release the `gpu` extra names).
`docker/smoke.sh` builds and runs the images where a daemon exists."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).parents[1]
DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile.*"))


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    result, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        pending += " " + stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, arguments = pending.strip().partition(" ")
            result.append((keyword.upper(), arguments.strip()))
            pending = ""
    assert not pending, f"{path.name}: a continuation line ends the file"
    return result


def commands(path: Path, keyword: str) -> list[str]:
    return [args for kw, args in instructions(path) if kw == keyword]


def test_both_images_exist():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.gpu"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
class TestEveryImage:
    def test_base_images_are_pinned(self, path):
        for base in commands(path, "FROM"):
            image = base.split()[0]
            assert ":" in image and "$" not in image, f"{path.name}: {image} has no fixed tag"
            tag = image.rsplit(":", 1)[1]
            assert tag != "latest" and re.search(r"\d+\.\d+", tag), (
                f"{path.name}: tag {tag!r} is not a version"
            )

    def test_runs_as_a_user_that_is_not_root(self, path):
        users = commands(path, "USER")
        assert users, f"{path.name}: no USER: the server would run as root"
        assert users[-1].split(":")[0] not in ("root", "0")

    def test_no_add(self, path):
        assert not commands(path, "ADD"), (
            f"{path.name}: use COPY (ADD fetches URLs and unpacks archives)"
        )

    def test_package_caches_stay_out_of_the_image(self, path):
        no_pip_cache = "PIP_NO_CACHE_DIR=1" in " ".join(commands(path, "ENV"))
        for run in commands(path, "RUN"):
            if re.search(r"\bpip install\b", run):
                assert "--no-cache-dir" in run or no_pip_cache, (
                    f"{path.name}: pip cache kept: {run}"
                )
            if "apt-get install" in run:
                assert "--no-install-recommends" in run and "rm -rf /var/lib/apt/lists" in run, run
                assert "apt-get update" in run, (
                    f"{path.name}: install without update in the same layer"
                )

    def test_serves_with_vllm_serve_in_exec_form(self, path):
        (entrypoint,) = commands(path, "ENTRYPOINT")
        assert entrypoint.startswith("["), (
            f"{path.name}: shell-form ENTRYPOINT does not pass signals"
        )
        assert shlex.split(entrypoint.strip("[]").replace(",", " "))[:2] == ["vllm", "serve"]

    def test_plugin_routes_enabled_and_port_exposed(self, path):
        assert "VLLM_PLUGINS=retentivekv" in " ".join(commands(path, "ENV"))
        assert commands(path, "EXPOSE") == ["8000"]
        assert commands(path, "HEALTHCHECK"), f"{path.name}: no HEALTHCHECK"


def extra(name: str) -> list[Requirement]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return [Requirement(r) for r in pyproject["project"]["optional-dependencies"][name]]


def test_gpu_image_is_the_vllm_release_of_the_gpu_extra_and_leaves_vllm_alone():
    path = REPO / "docker" / "Dockerfile.gpu"
    (base,) = commands(path, "FROM")
    image, tag = base.split()[0].rsplit(":", 1)
    assert image == "vllm/vllm-openai"
    (vllm,) = [r for r in extra("gpu") if r.name == "vllm"]
    assert vllm.specifier.contains(tag.removeprefix("v")), (
        f"{tag} is outside the gpu extra's {vllm}"
    )
    installs = [run for run in commands(path, "RUN") if "pip install" in run]
    assert installs and all("--no-deps" in run for run in installs), installs


def test_cpu_image_installs_through_the_project_setup_script():
    """One way to set up: the image runs scripts/env.sh, which installs the `cpu` extra."""
    path = REPO / "docker" / "Dockerfile.cpu"
    assert any("scripts/env.sh" in run for run in commands(path, "RUN"))
    assert '".[cpu' in (REPO / "scripts" / "env.sh").read_text()


def test_build_context_keeps_what_the_package_needs():
    ignored = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = {"pyproject.toml", pyproject["project"]["readme"], "scripts"}
    needed |= {
        d.split("/")[0] for d in pyproject["tool"]["setuptools"].get("package-dir", {}).values()
    }
    needed |= {p.split(".")[0] for p in pyproject["tool"]["setuptools"]["packages"]}
    assert not needed & ignored, sorted(needed & ignored)


def test_the_lint_can_fail(tmp_path):
    """The parser sees what a bad Dockerfile says, and the rules refuse it."""
    bad = tmp_path / "Dockerfile.bad"
    bad.write_text("FROM python:latest\nRUN pip install \\\n    x\nENTRYPOINT vllm serve\n")
    assert instructions(bad) == [
        ("FROM", "python:latest"),
        ("RUN", "pip install x"),
        ("ENTRYPOINT", "vllm serve"),
    ]
    rules = TestEveryImage()
    for rule in (
        rules.test_base_images_are_pinned,
        rules.test_runs_as_a_user_that_is_not_root,
        rules.test_package_caches_stay_out_of_the_image,
        rules.test_serves_with_vllm_serve_in_exec_form,
    ):
        with pytest.raises(AssertionError):
            rule(bad)
