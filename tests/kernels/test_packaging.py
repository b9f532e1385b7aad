"""pyproject.toml lists the packages explicitly (kernels/ and csrc/ are mapped in from outside the
package tree); the list must match the source tree, or a wheel silently lacks a subpackage."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "retentivekv_vllm"


def setuptools_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def package_directory(name: str, package_dir: dict[str, str]) -> Path:
    """Where setuptools takes package `name` from: the longest mapped prefix, else its dotted "
    "path."""
    for mapped in sorted(package_dir, key=len, reverse=True):
        if name == mapped or name.startswith(mapped + "."):
            return ROOT / package_dir[mapped] / Path(*name[len(mapped) :].split(".")[1:])
    return ROOT / Path(*name.split("."))


def source_packages(package_dir: dict[str, str]) -> set[str]:
    """Every directory holding Python modules under the package and its mapped directories."""
    roots = {PACKAGE: ROOT / PACKAGE} | {name: ROOT / path for name, path in package_dir.items()}
    found = set()
    for name, root in roots.items():
        for module in root.rglob("*.py"):
            relative = module.parent.relative_to(root).parts
            if "__pycache__" not in relative:
                found.add(".".join((name, *relative)))
    return found


def test_every_source_package_is_listed():
    config = setuptools_config()
    listed = set(config["packages"])
    missing = source_packages(config["package-dir"]) - listed
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"


def test_every_listed_package_exists_with_its_data():
    config = setuptools_config()
    for name in config["packages"]:
        directory = package_directory(name, config["package-dir"])
        assert directory.is_dir(), (
            f"{name} is listed but {directory.relative_to(ROOT)} does not exist"
        )
    for name, patterns in config["package-data"].items():
        directory = package_directory(name, config["package-dir"])
        for pattern in patterns:
            assert list(directory.glob(pattern)), f"package data {name}: {pattern} matches no file"


def test_kernels_and_csrc_are_mapped_in():
    config = setuptools_config()
    assert package_directory(f"{PACKAGE}.kernels", config["package-dir"]) == ROOT / "kernels"
    assert package_directory(f"{PACKAGE}.csrc", config["package-dir"]) == ROOT / "csrc"
