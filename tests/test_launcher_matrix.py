"""scripts/launcher_matrix.py on the CPU: the run list covers the documented configurations, and
the table judges finished runs from their logs and TensorBoard events (reference loss, bit-equal
curves, NaN / skipped iterations, refusals, crashes).
"""

from __future__ import annotations

import os

import pytest

from scripts import launcher_matrix
from scripts.launcher_matrix import Run, all_runs, table, with_prerequisites


def write_run(out, name: str, losses: dict[int, float], log: str = "", code: int = 0) -> None:
    from torch.utils.tensorboard import SummaryWriter

    if losses:
        writer = SummaryWriter(os.path.join(out, name, "tensorboard"))
        for step, loss in losses.items():
            writer.add_scalar("lm loss", loss, step)
            writer.add_scalar("iteration-time", 0.5, step)
            writer.add_scalar("mem-max-allocated-bytes", 3 * 2**30, step)
        writer.close()
    (out / f"{name}.log").write_text(log)
    (out / f"{name}.rc").write_text(str(code))


def curve(first: float, steps: int = 20) -> dict[int, float]:
    return {step: first - 0.1 * step for step in range(1, steps + 1)}


def rows(text: str) -> dict[str, str]:
    return {line.split(" | ")[0][2:]: line for line in text.splitlines()[2:]}


def test_run_list_covers_the_documented_configurations():
    names = {run.name for run in all_runs()}
    for layout in ("1gpu", "tp2", "cp2_p2p", "cp2_a2a", "cp2_allgather", "fsdp"):
        for model in ("proxy", "moe"):
            assert {f"{model}_{layout}", f"{model}_{layout}_packed"} <= names
    assert {"moe_ep2", "moe_cp2_ep2", "proxy_det_again", "proxy_det_resume10"} <= names
    assert {"proxy_tp2_det_resume10", "proxy_profile_torch", "proxy_cord_packed"} <= names
    assert {"proxy_recompute", "proxy_recompute_vision", "proxy_mtp0", "proxy_mtp2"} <= names
    assert {
        "proxy_vision_cuda_graph",
        "proxy_dp2_vision_cuda_graph",
        "moe_ep2_vision_cuda_graph_packed",
    } <= names
    assert {"moe_torch_experts", "moe_ep2_torch_experts_packed"} <= names
    qwen3_vl = {"1gpu", "1gpu_packed", "cp2_p2p_packed", "tp2_packed", "moe_ep2_packed"}
    assert {f"qwen3vl_{layout}" for layout in qwen3_vl} <= names
    by_name = {run.name: run for run in all_runs()}
    for run in all_runs():
        for other in (run.reference, run.equal_to, run.after):
            assert other is None or other in by_name, (run.name, other)


def test_table_judges_runs(tmp_path, monkeypatch):
    runs = [
        Run("ref", {}),
        Run("close", {}, reference="ref"),
        Run("far", {}, reference="ref"),
        Run("again", {}, equal_to="ref"),
        Run("nan", {}, reference="ref"),
        Run("refused", {}, expect_refusal=True),
        Run("crashed", {}, gpus=2),
    ]
    write_run(tmp_path, "ref", curve(12.5))
    write_run(tmp_path, "close", curve(12.5 * (1 + 5e-3)))
    write_run(tmp_path, "far", curve(12.5 * (1 + 5e-2)))
    write_run(tmp_path, "again", {**curve(12.5), 7: 11.0})
    write_run(
        tmp_path,
        "nan",
        curve(12.5),
        "iteration 3/ 20 | number of skipped iterations:   1 | number of nan iterations:   1 |",
    )
    write_run(tmp_path, "refused", {}, "run_qwen35_vl.sh: error: PP=2: not supported; use PP=1", 1)
    write_run(tmp_path, "crashed", {}, "[rank1]: ValueError: bad\nChildFailedError: x", 1)
    text, ok = table(str(tmp_path), runs)
    result = rows(text)
    assert not ok
    assert result["ref"].endswith("| 500 | 3.0 | pass |")
    assert result["close"].endswith("pass |") and "5.0e-03 vs ref" in result["close"]
    assert "FAIL: iteration-1 loss 5.0e-02 from ref" in result["far"]
    assert "19/20 iterations bit-equal to ref" in result["again"]
    assert "not bit-equal to ref at [7]" in result["again"]
    assert "FAIL: 1 NaN / 1 skipped iterations" in result["nan"]
    assert result["refused"].endswith(
        "| refused: run_qwen35_vl.sh: error: PP=2: not supported; use PP=1 |"
    )
    assert "FAIL (exit 1: [rank1]: ValueError: bad)" in result["crashed"]


def test_unfinished_run_fails(tmp_path):
    write_run(tmp_path, "short", curve(12.5, steps=7))
    text, ok = table(str(tmp_path), [Run("short", {})])
    assert not ok and "stopped at iteration 7" in text


def test_matrix_needs_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["launcher_matrix.py", str(tmp_path)])
    with pytest.raises(SystemExit, match="no GPU found"):
        launcher_matrix.main()


def test_only_brings_every_prerequisite():
    """A run's reference, the run it must equal and the run it resumes from come along."""
    names = {
        run.name
        for run in with_prerequisites({"proxy_det_again", "proxy_det_resume10"}, all_runs())
    }
    assert names == {"proxy_det_again", "proxy_det", "proxy_det_resume10", "proxy_1gpu"}
