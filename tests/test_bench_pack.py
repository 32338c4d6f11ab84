"""scripts/bench/bench_vs_hf.py's inputs and arithmetic on CPU: the THD pack holds exactly the
requested tokens of mixed-length samples with images, every sequence padded to a multiple of 8 and
of 2 x CP; the single-row layout holds the same tokens and images as one sequence, as HF gets
them; per-GPU rates divide by the GPUs of the run, and the FLOPs run leave out the output layer
on the tokens without loss."""

from __future__ import annotations

import pytest
import torch

from models.qwen35_vl.flops import training_flops
from scripts.bench.bench_vs_hf import (
    bench_config,
    make_pack,
    make_row,
    parse_config_override,
    rates,
)


@pytest.mark.parametrize("cp", [1, 2, 8])
def test_pack_fills_the_requested_tokens(cp):
    config = bench_config(4)
    samples, batch = make_pack(config, 8192, cp)
    lengths = [int(s["input_ids"].numel()) for s in samples]
    assert sum(lengths) == 8192 and len(set(lengths)) == len(lengths)
    padded = batch["cu_seqlens_padded"].diff().tolist()
    assert all(p % 8 == 0 and p % (2 * cp) == 0 for p in padded)
    assert all(0 <= p - n < max(8, 2 * cp) for p, n in zip(padded, lengths, strict=True))
    assert batch["vision"].grid_thw.shape[0] == sum(s["image_grid_thw"].shape[0] for s in samples)


@pytest.mark.parametrize("cp", [1, 2])
def test_row_is_the_pack_as_one_sequence(cp):
    config = bench_config(4)
    samples, pack = make_pack(config, 8192, cp)
    row = make_row(config, samples, cp)
    assert row["input_ids"].shape == (1, 8192)  # 8192 is a multiple of 8 and of 2 x CP
    assert "cu_seqlens" not in row
    torch.testing.assert_close(row["input_ids"][0], torch.cat([s["input_ids"] for s in samples]))
    torch.testing.assert_close(row["vision"].grid_thw, pack["vision"].grid_thw)
    # One sequence: MRoPE positions never restart, unlike the pack's per-sample positions.
    text_positions = row["position_ids"][0, :, 0]
    assert bool((text_positions.diff() >= 0).all())
    assert int(pack["position_ids"][0, :, 0].diff().min()) < 0


def test_rates_are_per_gpu():
    config = bench_config(4)
    flops = training_flops(config, [1000, 3000], [], include_mtp=False).total
    result = rates({"step_seconds": 2.0}, config, [1000, 3000], [], 4000, gpus=2, peak=989.0)
    assert result["tokens_per_s_per_gpu"] == 1000.0
    assert result["model_tflops_per_gpu"] == pytest.approx(flops / 4 / 1e12)
    assert result["mfu"] == pytest.approx(flops / (2.0 * 2 * 989e12))

    assert "mfu_of_flops_run" not in result


def test_flops_run_leave_out_the_output_layer_on_tokens_without_loss():
    config = bench_config(4)
    breakdown = training_flops(config, [1000, 3000], [], include_mtp=False)
    result = rates({"step_seconds": 2.0}, config, [1000, 3000], [], 4000, 1, 989.0, 1000)
    run = breakdown.total - breakdown.lm_head * 3 / 4
    assert result["mfu"] == pytest.approx(breakdown.total / (2.0 * 989e12))
    assert result["mfu_of_flops_run"] == pytest.approx(run / (2.0 * 989e12))


def test_micro_batches_count_every_pass_over_the_pack():
    config = bench_config(4)
    one = rates({"step_seconds": 1.0}, config, [1000, 3000], [], 4000, 1, 989.0, 1000)
    four = rates({"step_seconds": 4.0}, config, [1000, 3000], [], 4000, 1, 989.0, 1000, 4)
    for key in ("tokens_per_s_per_gpu", "model_tflops_per_gpu", "mfu", "mfu_of_flops_run"):
        assert four[key] == pytest.approx(one[key])
    assert four["tokens_per_s_per_gpu"] == 4000.0


def test_config_overrides_are_fields_of_the_named_config_with_literal_values():
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer.transformer_config import TransformerConfig

    def model(item):
        return parse_config_override(item, TransformerConfig, "--config")

    assert model("use_transformer_engine_op_fuser=True") == (
        "use_transformer_engine_op_fuser",
        True,
    )
    assert model("moe_router_dtype=fp32") == ("moe_router_dtype", "fp32")
    assert parse_config_override(
        "use_precision_aware_optimizer=True", OptimizerConfig, "--optimizer-config"
    ) == ("use_precision_aware_optimizer", True)
    with pytest.raises(SystemExit, match=r"--config 'no_such_field=1'.*TransformerConfig field"):
        model("no_such_field=1")
    with pytest.raises(SystemExit, match="FIELD=VALUE"):
        model("use_transformer_engine_op_fuser")
    with pytest.raises(SystemExit, match="OptimizerConfig field"):
        parse_config_override("num_layers=2", OptimizerConfig, "--optimizer-config")
