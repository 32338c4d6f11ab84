"""`specs.PackedGatedDeltaNet` hands a packed batch's boundaries to the Gated DeltaNet kernels
as they are without context parallelism (megatron-core's checks read them back to the host in
every layer), and keeps megatron's checks, with their errors, under context parallelism."""

from __future__ import annotations

import pytest
import torch

from data.collate import THD, CollateConfig, pack_or_pad_batch
from models.qwen35_vl.configuration import get_variant
from models.qwen35_vl.specs import PackedGatedDeltaNet
from models.qwen35_vl.vision_inputs import SampleInputs

# The method reads nothing from the module, so an unbuilt one (no GPU, no TE) serves.
resolve = object.__new__(PackedGatedDeltaNet)._resolve_cu_seqlens


def test_without_context_parallelism_the_padded_boundaries_pass_through():
    padded, actual = torch.tensor([0, 8, 24], dtype=torch.int32), torch.tensor([0, 5, 20])
    assert resolve(padded, actual, 24, "cu_seqlens_q") is padded
    assert resolve(None, actual, 20, "cu_seqlens_q") is actual


def test_with_context_parallelism_megatron_still_checks_them():
    padded = torch.tensor([0, 6, 24], dtype=torch.int32)
    assert torch.equal(resolve(padded, None, 24, "cu_seqlens_q", cp_size=2), padded)
    with pytest.raises(ValueError, match="divisible by cp_size=4"):
        resolve(padded, None, 24, "cu_seqlens_q", cp_size=4)
    with pytest.raises(ValueError, match="does not match"):
        resolve(padded, None, 32, "cu_seqlens_q", cp_size=2)


def test_collated_packs_end_at_their_length_as_the_pass_through_assumes():
    samples = [
        {"input_ids": torch.arange(1, n + 1), "supervised": torch.ones(n, dtype=torch.bool)}
        for n in (5, 11, 3)
    ]
    config = CollateConfig(
        mode=THD,
        seq_length=64,
        pad_token_id=0,
        model_inputs=SampleInputs.of(get_variant("proxy")),
        pad_multiple=4,
    )
    batch = pack_or_pad_batch(samples, config)
    padded = batch["cu_seqlens_padded"]
    assert int(padded[-1]) == batch["input_ids"].shape[1]
    assert all(int(length) % 4 == 0 for length in padded.diff())
