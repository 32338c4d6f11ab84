"""Bad input to the launcher (DRY_RUN) and the checkpoint converter, one row per case of issue 21's
table: each ends with exit status 1 and one error line naming the variable (or flag, or file) and
a valid value, and no traceback. Launcher checks run in bash where they can (no Python started).
"""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from safetensors.torch import save_file

from models.qwen35_vl.configuration import get_variant
from tests.test_launcher import PYTHON, REPO_ROOT, dry_run, fake_checkpoint

CONVERTER = os.path.join(REPO_ROOT, "scripts", "convert_hf_checkpoint.py")


def assert_one_error_line(result: subprocess.CompletedProcess, *needles: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"


def tokenizer_dir(tmp_path) -> str:
    """A directory that passes the launcher's tokenizer-files check."""
    directory = tmp_path / "tokenizer"
    directory.mkdir(exist_ok=True)
    (directory / "tokenizer_config.json").write_text("{}")
    return str(directory)


def empty_dir(tmp_path) -> str:
    (tmp_path / "empty").mkdir(exist_ok=True)
    return str(tmp_path / "empty")


# id, environment, arguments after the script name, what the error line names. Values may
# name the fixtures {empty}, {tokenizer}, {proxy_import} and {import_without_mtp}.
LAUNCHER_ROWS = [
    ("seq-len-negative", {"SEQ_LEN": "-5"}, [], ["SEQ_LEN=-5", "positive integer", "1, 2, 3"]),
    ("seq-len-zero", {"SEQ_LEN": "0"}, [], ["SEQ_LEN=0", "positive integer"]),
    ("mbs-zero", {"MBS": "0"}, [], ["MBS=0", "positive integer", "1, 2, 3"]),
    (
        "train-iters-below-warmup",
        {"TRAIN_ITERS": "5"},
        [],
        ["WARMUP_ITERS=10 must be below TRAIN_ITERS=5", "raise TRAIN_ITERS"],
    ),
    ("tp-abc", {"TP": "abc"}, [], ["TP=abc", "positive integer", "1, 2, 3"]),
    ("tp-zero", {"TP": "0"}, [], ["TP=0", "positive integer"]),
    ("ep-zero", {"EP": "0"}, [], ["EP=0", "positive integer"]),
    ("lr-abc", {"LR": "abc"}, [], ["LR=abc", "not a positive number", "LR=3e-4"]),
    ("packed-2", {"PACKED": "2"}, [], ["PACKED=2", "use 0 (off) or 1 (on)"]),
    ("recompute-yes", {"RECOMPUTE": "yes"}, [], ["RECOMPUTE=yes", "use 0 (off) or 1 (on)"]),
    ("num-workers-negative", {"NUM_WORKERS": "-1"}, [], ["NUM_WORKERS=-1", "0, 1, 2"]),
    ("train-iters-zero", {"TRAIN_ITERS": "0"}, [], ["TRAIN_ITERS=0", "positive integer"]),
    (
        "seq-len-not-split-by-cp",
        {"CP": "2", "SEQ_LEN": "4095", "GPUS_PER_NODE": "2"},
        [],
        ["SEQ_LEN=4095", "multiple of 4 (2 x CP=2)", "SEQ_LEN=4092 or 4096"],
    ),
    (
        "gbs-not-whole-micro-batches",
        {"GBS": "7", "GPUS_PER_NODE": "2"},
        [],
        ["GBS=7", "MBS x DP = 1 x 2 = 2", "GBS=6 or 8"],
    ),
    (
        "tokenizer-path-missing",
        {"HF_TOKENIZER_PATH": "{empty}/nonexistent"},
        [],
        ["HF_TOKENIZER_PATH", "no such directory", "--local-dir DIR"],
    ),
    (
        "tokenizer-path-empty",
        {"HF_TOKENIZER_PATH": "{empty}"},
        [],
        ["HF_TOKENIZER_PATH", "no tokenizer.json or tokenizer_config.json", "--local-dir DIR"],
    ),
    ("dataset-unknown", {"DATASET": "foo"}, [], ["DATASET", "valid providers: cord_v2, mock"]),
    (
        "cord-v2-without-shards",
        {"DATASET": "cord_v2", "DATA_PATH": "{empty}", "HF_TOKENIZER_PATH": "{tokenizer}"},
        [],
        ["DATA_PATH", "no train shards", "naver-clova-ix/cord-v2"],
    ),
    (
        "checkpoint-of-another-variant",
        {"MODEL_VARIANT": "9b", "CKPT_LOAD": "{proxy_import}", "CKPT_RESUME": "0"},
        [],
        ["CKPT_LOAD", "MODEL_VARIANT", "hidden_size 512 (9b: 4096)", "set MODEL_VARIANT=proxy"],
    ),
    (
        "import-without-mtp-and-mtp-on",
        {"CKPT_LOAD": "{import_without_mtp}", "CKPT_RESUME": "0"},
        [],
        ["CKPT_LOAD", "no MTP tensors", "set MTP_NUM_LAYERS=0"],
    ),
    (
        "architecture-flag-after-the-script",
        {},
        ["--hidden-size", "1024"],
        ["--hidden-size 1024", "MODEL_VARIANT=proxy", "has 512", "--hf-config-path"],
    ),
    # Beyond the table: the other variables the launcher checks.
    ("octal-looking-integer", {"CP": "08"}, [], ["CP=08", "positive integer"]),
    ("ckpt-resume-yes", {"CKPT_RESUME": "yes"}, [], ["CKPT_RESUME=yes", "use 0 (off) or 1"]),
    ("min-lr-abc", {"MIN_LR": "abc"}, [], ["MIN_LR=abc", "MIN_LR=3e-5"]),
    ("master-port", {"MASTER_PORT": "70000"}, [], ["MASTER_PORT=70000", "1 to 65535"]),
    ("node-rank", {"NODE_RANK": "2", "NNODES": "2"}, [], ["NODE_RANK=2", "use 0 to 1"]),
    ("profile-steps", {"PROFILE": "torch", "PROFILE_STEPS": "7"}, [], ["PROFILE_STEPS=7", "5:7"]),
    ("launcher", {"LAUNCHER": "srun"}, [], ["LAUNCHER=srun", "LAUNCHER=torchrun"]),
    (
        "experts-not-split-by-ep",
        {"MODEL_VARIANT": "proxy-moe", "EP": "3", "GPUS_PER_NODE": "3"},
        [],
        ["EP=3", "16 experts", "dividing 16"],
    ),
    (
        "load-balancing-on-dense",
        {"FORCE_LOAD_BALANCING": "1"},
        [],
        ["FORCE_LOAD_BALANCING=1", "dense", "FORCE_LOAD_BALANCING=0"],
    ),
    ("seq-len-beyond-positions", {"SEQ_LEN": "300000"}, [], ["SEQ_LEN=300000", "262144"]),
    ("expert-gemm-unknown", {"EXPERT_GEMM": "cutlass"}, [], ["EXPERT_GEMM=cutlass", "te", "torch"]),
    (
        "expert-gemm-torch-on-dense",
        {"EXPERT_GEMM": "torch"},
        [],
        ["EXPERT_GEMM=torch", "dense", "EXPERT_GEMM=te"],
    ),
    (
        "expert-gemm-torch-with-fsdp",
        {"MODEL_VARIANT": "proxy-moe", "EXPERT_GEMM": "torch", "FSDP": "1", "GPUS_PER_NODE": "2"},
        [],
        ["EXPERT_GEMM=torch with FSDP=1", "FSDP=0 or EXPERT_GEMM=te"],
    ),
    (
        "expert-gemm-torch-with-expert-tp",
        {"MODEL_VARIANT": "proxy-moe", "EXPERT_GEMM": "torch", "TP": "2", "GPUS_PER_NODE": "2"},
        [],
        ["EXPERT_GEMM=torch", "expert tensor parallelism 2", "--expert-tensor-parallel-size 1"],
    ),
]


# What a row's {name} stands for, built only for the rows that name it.
FIXTURES = {
    "empty": empty_dir,
    "tokenizer": tokenizer_dir,
    "proxy_import": lambda tmp: fake_checkpoint(
        tmp / "proxy_import", "release", torch_dist=True, hf_config_of="proxy"
    ),
    "import_without_mtp": lambda tmp: fake_checkpoint(
        tmp / "import_without_mtp", "release", torch_dist=True, mtp=False
    ),
}


@pytest.mark.parametrize(
    ("knobs", "argv", "needles"),
    [row[1:] for row in LAUNCHER_ROWS],
    ids=[row[0] for row in LAUNCHER_ROWS],
)
def test_launcher_refuses_with_one_line(tmp_path, knobs, argv, needles):
    named = "".join(knobs.values())
    paths = {name: build(tmp_path) for name, build in FIXTURES.items() if f"{{{name}}}" in named}
    env = {name: value.format(**paths) for name, value in knobs.items()}
    assert_one_error_line(dry_run(tmp_path, *argv, **env), *needles)


def converter(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, CONVERTER, *argv],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def hf_directory(tmp_path, with_config: bool, truncated: bool = False) -> str:
    """A directory shaped like an HF checkpoint: one safetensors file (optionally cut in half)
    and, with `with_config`, the proxy's config.json."""
    directory = tmp_path / "hf"
    directory.mkdir()
    path = str(directory / "model.safetensors")
    save_file({"model.language_model.norm.weight": torch.ones(512)}, path)
    if truncated:
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
    if with_config:
        get_variant("proxy").to_hf_config().to_json_file(str(directory / "config.json"))
    return str(directory)


def test_converter_names_a_missing_hf_path(tmp_path):
    missing = str(tmp_path / "nowhere")
    result = converter("import", "--hf-path", missing, "--out", str(tmp_path / "out"))
    assert_one_error_line(result, f"--hf-path {missing}: no such directory")


def test_converter_names_a_missing_config(tmp_path):
    hf = hf_directory(tmp_path, with_config=False)
    result = converter("import", "--hf-path", hf, "--out", str(tmp_path / "out"))
    assert_one_error_line(result, f"--hf-path {hf} has no config.json")


def test_converter_names_a_truncated_shard(tmp_path):
    hf = hf_directory(tmp_path, with_config=True, truncated=True)
    result = converter("import", "--hf-path", hf, "--out", str(tmp_path / "out"))
    shard = os.path.join(hf, "model.safetensors")
    assert_one_error_line(result, f"{shard}: not a readable safetensors file", "download it")


def test_converter_export_refuses_a_non_empty_output(tmp_path):
    ckpt = fake_checkpoint(tmp_path, "release", torch_dist=True, hf_config_of="proxy")
    out = tmp_path / "hf_out"
    out.mkdir()
    (out / "keep.txt").write_text("not to be overwritten")
    result = converter("export", "--megatron-path", ckpt, "--out", str(out))
    assert_one_error_line(result, f"{out} is not empty", "new --out directory")
    assert os.listdir(out) == ["keep.txt"]
