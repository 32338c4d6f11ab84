"""Qwen3-VL through the generic entry points on the CPU: its registry entry, the megatron layer
pattern, the launcher's dry runs (megatron's own validation) for the layouts it trains with, the
settings it refuses, and the collate's MRoPE positions from its spec.
"""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

from data.collate import CollateConfig, pack_or_pad_batch
from data.mock import interleaved_sample
from models import get_model_spec
from models.qwen3_vl.configuration import get_variant
from models.qwen35_vl.mrope import build_mrope_position_ids
from tests.test_launcher import dry_run

SPEC = get_model_spec("qwen3_vl")


def test_layer_pattern_pairs_attention_with_each_layers_mlp():
    assert get_variant("proxy").hybrid_layer_pattern() == "*-" * 8
    assert get_variant("30b_a3b").hybrid_layer_pattern() == "*E" * 48
    moe = get_variant("proxy-moe")
    mixed = dataclasses.replace(moe, text=dataclasses.replace(moe.text, mlp_only_layers=(0, 3)))
    assert mixed.hybrid_layer_pattern() == "*-*E*E*-*E*E"


def test_shape_counts_experts_and_layers_as_megatron_does():
    config = get_variant("proxy-moe")
    shape, counts = SPEC.shape(config), config.parameter_counts()
    assert shape.layers == 2 * config.text.num_hidden_layers
    assert shape.dense + shape.experts == counts.total
    assert shape.num_experts == 16 and shape.mtp_layers == 0 and shape.full_recompute_problem


@pytest.mark.parametrize(
    "knobs",
    [
        dict(MODEL_VARIANT="proxy"),
        dict(MODEL_VARIANT="proxy", PACKED="1", CP="2", GPUS_PER_NODE="2"),
        dict(MODEL_VARIANT="proxy-moe", EP="2", TP="2", GPUS_PER_NODE="4", RECOMPUTE_VISION="1"),
    ],
)
def test_launcher_plans_qwen3_vl_layouts(tmp_path, knobs):
    result = dry_run(tmp_path, MODEL="qwen3_vl", **knobs)
    assert result.returncode == 0, result.stderr[-3000:]
    config = get_variant(knobs["MODEL_VARIANT"])
    assert f"DRY RUN qwen3_vl / {config.name} " in result.stdout
    assert f"total {config.parameter_counts().total:,} " in result.stdout
    assert "DeepStack from blocks [0, 1, 2]" in result.stdout


@pytest.mark.parametrize(
    "knobs, needle",
    [
        (dict(RECOMPUTE="1"), "DeepStack feeds vision features into the recomputed decoder"),
        (dict(MTP_NUM_LAYERS="1"), "Qwen3-VL has no multi-token-prediction layers"),
        (dict(MODEL_VARIANT="nope"), "unknown Qwen3-VL variant 'nope'"),
    ],
)
def test_launcher_refuses_what_qwen3_vl_cannot_train(tmp_path, knobs, needle):
    result = dry_run(tmp_path, MODEL="qwen3_vl", **{"MODEL_VARIANT": "proxy", **knobs})
    assert result.returncode != 0 and needle in result.stderr, result.stderr[-3000:]


def test_planner_suggests_no_full_recompute_for_qwen3_vl(tmp_path):
    result = dry_run(
        tmp_path, MODEL="qwen3_vl", MODEL_VARIANT="235b_a22b", NNODES="8", GPUS_PER_NODE="8",
        TP="4", EP="8",
    )  # fmt: skip
    assert "smallest changes that fit" in result.stdout
    suggestions = result.stdout.split("smallest changes that fit")[1]
    assert "FSDP=1" in suggestions and "RECOMPUTE=1" not in suggestions


def test_collate_takes_qwen3_vl_positions_from_its_spec():
    config = get_variant("proxy")
    sample = interleaved_sample(config, seed=3, text_lengths=(5, 7), image_sizes=((64, 96),))
    assert int((sample["input_ids"] == config.image_token_id).sum()) == 2 * 3
    collate = CollateConfig(
        mode="thd", seq_length=64, pad_token_id=0, model_inputs=SPEC.model_inputs(config)
    )
    batch = pack_or_pad_batch([sample, sample], collate)
    expected = build_mrope_position_ids(
        sample["input_ids"], sample["image_grid_thw"], config.image_token_id, 2
    )
    length = sample["input_ids"].numel()
    positions = batch["position_ids"]
    assert torch.equal(positions.reshape(-1, 3)[:length].T, expected)
    assert torch.equal(positions.reshape(-1, 3)[length : 2 * length].T, expected)


def test_mock_conversations_use_qwen3_vl_token_ids():
    """The mock provider builds Qwen3-VL conversations from its own tokenizer's ids (151k vocab),
    not Qwen3.5's (248k)."""
    config = get_variant("proxy")
    args = argparse.Namespace(
        micro_batch_size=1, data_parallel_size=1, total_seq_length=512, seed=1,
        min_pixels=4 * 32 * 32, max_pixels=64 * 32 * 32, mock_max_images=2,
    )  # fmt: skip
    splits = SPEC.dataset_provider("mock").build(args, config, (2, 1, 1))
    ids = torch.cat([splits.train[i]["input_ids"] for i in range(2)])
    assert int(ids.max()) < config.text.vocab_size
    assert {config.im_start_token_id, config.im_end_token_id, config.image_token_id} <= set(
        ids.tolist()
    )
    assert splits.pad_token_id == config.pad_token_id == 151643
