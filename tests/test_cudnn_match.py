"""One cuDNN per process: `scripts/torch_cudnn.sh` points the launchers at torch's own cuDNN, and
the model factory refuses to build when torch and Transformer Engine run different cuDNN versions
(a system cuDNN 9.14 under torch built for 9.19 gave non-finite THD attention gradients on H100).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from models.qwen35_vl.factory import cudnn_version_tuple, require_matching_cudnn

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sourced_environment(python: str, **env: str) -> dict[str, str]:
    """CUDNN_HOME and LD_LIBRARY_PATH after sourcing scripts/torch_cudnn.sh under `set -eu`."""
    script = (
        "set -euo pipefail; source scripts/torch_cudnn.sh; "
        'echo "CUDNN_HOME=${CUDNN_HOME-unset}"; echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH-unset}"'
    )
    base = {"PATH": os.environ["PATH"], "PYTHON": python}
    result = subprocess.run(
        ["bash", "-c", script], cwd=REPO_ROOT, env={**base, **env}, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return dict(line.split("=", 1) for line in result.stdout.splitlines())


def fake_python(tmp_path, cudnn_dir: str | None) -> str:
    """A 'python' whose only answer is where torch's nvidia.cudnn package lives (None: a torch
    without that package, where the import fails)."""
    path = tmp_path / "python"
    answer = f"echo {cudnn_dir}" if cudnn_dir else "exit 1"
    path.write_text(f"#!/bin/sh\n{answer}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_torch_cudnn_is_put_first(tmp_path):
    python = fake_python(tmp_path, "/site/nvidia/cudnn")
    env = sourced_environment(python, LD_LIBRARY_PATH="/usr/local/nvidia/lib64")
    assert env["CUDNN_HOME"] == "/site/nvidia/cudnn"
    assert env["LD_LIBRARY_PATH"] == "/site/nvidia/cudnn/lib:/usr/local/nvidia/lib64"


def test_a_users_cudnn_home_is_kept(tmp_path):
    python = fake_python(tmp_path, "/site/nvidia/cudnn")
    env = sourced_environment(python, CUDNN_HOME="/opt/my-cudnn")
    assert env == {"CUDNN_HOME": "/opt/my-cudnn", "LD_LIBRARY_PATH": "unset"}


def test_without_torchs_cudnn_nothing_is_set(tmp_path):
    env = sourced_environment(fake_python(tmp_path, None))
    assert env == {"CUDNN_HOME": "unset", "LD_LIBRARY_PATH": "unset"}


def test_version_decoding():
    assert cudnn_version_tuple(91900) == (9, 19, 0)
    assert cudnn_version_tuple(90501) == (9, 5, 1)


@pytest.fixture
def cudnn_versions(monkeypatch):
    """Set what TE reports (a tuple) and what torch reports (an int, None, or an exception)."""

    def install(te_version: tuple[int, int, int], torch_version) -> None:
        te_utils = SimpleNamespace(get_cudnn_version=lambda: te_version)
        monkeypatch.setitem(sys.modules, "transformer_engine.pytorch.utils", te_utils)

        def version():
            if isinstance(torch_version, Exception):
                raise torch_version
            return torch_version

        monkeypatch.setattr(torch.backends.cudnn, "version", version)

    return install


def test_matching_cudnn_builds(cudnn_versions):
    cudnn_versions((9, 19, 0), 91900)
    require_matching_cudnn()


def test_no_cudnn_in_torch_builds(cudnn_versions):
    cudnn_versions((9, 19, 0), None)
    require_matching_cudnn()


def test_torch_refusing_an_older_runtime_stops_the_build(cudnn_versions):
    refusal = RuntimeError(
        "cuDNN version incompatibility: PyTorch was compiled  against (9, 19, 0) but found "
        "runtime version (9, 14, 0). PyTorch already comes bundled with cuDNN."
    )
    cudnn_versions((9, 14, 0), refusal)
    with pytest.raises(RuntimeError) as error:
        require_matching_cudnn()
    message = str(error.value)
    assert "found runtime version (9, 14, 0)" in message
    assert "Transformer Engine loaded cuDNN (9, 14, 0)" in message
    assert "CUDNN_HOME" in message and "LD_LIBRARY_PATH" in message


def test_te_on_another_cudnn_than_torch_stops_the_build(cudnn_versions):
    cudnn_versions((9, 14, 0), 91900)
    with pytest.raises(RuntimeError, match=r"torch runs cuDNN \(9, 19, 0\) but Transformer Engine"):
        require_matching_cudnn()
