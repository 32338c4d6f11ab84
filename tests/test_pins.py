"""The version pins: constraints.txt pins every package the requirements files and setup.sh name,
exactly and in one place, at the stack measured on the GPUs (docs/results.md), and the running
interpreter has those versions installed. Reads files and installed metadata only (no network).
"""

from __future__ import annotations

import importlib.metadata
import os
import re

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONSTRAINTS = "constraints.txt"
REQUIREMENT_FILES = ("requirements.txt", "requirements-gpu.txt")
SETUP = os.path.join("scripts", "setup.sh")
# The versions every GPU row of docs/results.md ran on.
MEASURED = {
    "torch": "2.11.0",
    "triton": "3.6.0",
    "megatron-core": "0.19.2",
    "transformers": "5.23.0",
    "qwen-vl-utils": "0.0.14",
    "transformer-engine": "2.20.2",
    "transformer-engine-torch": "2.20.2",
    "transformer-engine-cu13": "2.20.2",
    "flash-linear-attention": "0.6.0",
    "fla-core": "0.6.0",
    "tilelang": "0.1.15",
}
# setup.sh installs these by name before compiling Transformer Engine; no package needs them at
# run time, so another version that something else brought in is no drift.
BUILD_TOOLS = ("ninja", "wheel")


def read_lines(name: str) -> list[str]:
    """The file's lines without comments and blanks."""
    with open(os.path.join(REPO_ROOT, name)) as handle:
        lines = (line.split("#", 1)[0].strip() for line in handle)
        return [line for line in lines if line]


def pins() -> dict[str, str]:
    result = {}
    for line in read_lines(CONSTRAINTS):
        requirement = Requirement(line)
        specifiers = list(requirement.specifier)
        assert len(specifiers) == 1 and specifiers[0].operator == "==", (
            f"{CONSTRAINTS}: {line!r} is not an exact pin (name==version)"
        )
        assert not requirement.extras and not requirement.marker, (
            f"{CONSTRAINTS}: {line!r}: a constraint takes no extras or markers"
        )
        name = canonicalize_name(requirement.name)
        assert name not in result, f"{CONSTRAINTS}: {name} is pinned twice"
        result[name] = specifiers[0].version
    return result


def requirements(name: str) -> list[Requirement]:
    return [Requirement(line) for line in read_lines(name) if not line.startswith("-")]


@pytest.mark.parametrize("name", REQUIREMENT_FILES)
def test_requirements_are_pinned_in_constraints_only(name):
    pinned = pins()
    assert f"-c {CONSTRAINTS}" in read_lines(name), f"{name} does not include -c {CONSTRAINTS}"
    for requirement in requirements(name):
        package = canonicalize_name(requirement.name)
        assert package in pinned, f"{name}: {requirement.name} has no exact pin in {CONSTRAINTS}"
        assert not requirement.specifier, (
            f"{name}: {requirement} carries its own version; pin it in {CONSTRAINTS} only"
        )


def test_measured_stack_is_pinned():
    pinned = pins()
    assert {name: pinned.get(name) for name in MEASURED} == MEASURED


def test_torchvision_matches_torch():
    # torchvision 0.(N+15) is the release built for torch 2.N.
    pinned = pins()
    torch_minor = int(pinned["torch"].split(".")[1])
    assert pinned["torchvision"].startswith(f"0.{torch_minor + 15}."), (
        f"torchvision {pinned['torchvision']} is not the release for torch {pinned['torch']}"
    )


def test_setup_installs_with_constraints():
    with open(os.path.join(REPO_ROOT, SETUP)) as handle:
        installs = [
            line
            for line in handle
            if re.search(r"pip install\b", line) and "--upgrade pip" not in line
        ]
    assert installs, f"{SETUP} runs no pip install"
    for line in installs:
        assert f"-c {CONSTRAINTS}" in line, f"{SETUP} installs without the pins: {line.strip()}"
    pinned = pins()
    for tool in BUILD_TOOLS:
        assert tool in pinned, f"{SETUP} installs {tool}, which {CONSTRAINTS} does not pin"


def test_installed_versions_are_the_pins():
    wrong = []
    for name, version in pins().items():
        if name in BUILD_TOOLS:
            continue
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # a GPU extra on a CPU machine
        # pip's own test: a local build such as 2.11.0+cu130 satisfies ==2.11.0.
        if installed not in SpecifierSet(f"=={version}"):
            wrong.append(f"{name} {installed} (pinned {version})")
    assert not wrong, (
        f"installed versions differ from {CONSTRAINTS}: {', '.join(wrong)}; "
        "rebuild the venv: rm -rf .venv && bash scripts/setup.sh"
    )
