"""The vision tower's fixed-shape inputs for CUDA graphs (`PatchBudget`) and the vision config that
turns megatron-core's per-layer graphs on, on the CPU; tests/test_vision_cuda_graph.py runs the
graphs themselves on a GPU."""

from __future__ import annotations

import pytest
import torch

from models.qwen35_vl.configuration import get_variant
from models.qwen35_vl.factory import vision_config
from models.qwen35_vl.vision import PatchBudget


def padded(patches: int, cu_seqlens: list[int], budget: PatchBudget):
    hidden = torch.arange(patches * 3, dtype=torch.float).reshape(patches, 1, 3)
    rotary = torch.ones(patches, 1, 1, 4)
    return budget.pad(hidden, rotary, torch.tensor(cu_seqlens, dtype=torch.int32))


def test_padding_fills_the_budget_with_zero_rows_split_over_the_unused_segments():
    hidden, rotary, cu_seqlens = padded(10, [0, 4, 10], PatchBudget(patches=16, images=4))
    assert hidden.shape == (16, 1, 3) and rotary.shape == (16, 1, 1, 4)
    assert torch.equal(hidden[:10].flatten(), torch.arange(30, dtype=torch.float))
    assert not hidden[10:].any() and not rotary[10:].any() and rotary[:10].all()
    # Two images, then the 6 zero rows in the other three segments: images + 2 entries.
    assert cu_seqlens.tolist() == [0, 4, 10, 12, 14, 16]
    assert cu_seqlens.dtype == torch.int32


def test_uneven_padding_ends_at_the_budget_with_empty_segments_last():
    _, _, cu_seqlens = padded(9, [0, 9], PatchBudget(patches=16, images=4))
    assert cu_seqlens.tolist() == [0, 9, 11, 13, 15, 16]
    _, _, cu_seqlens = padded(15, [0, 15], PatchBudget(patches=16, images=3))
    assert cu_seqlens.tolist() == [0, 15, 16, 16, 16]


def test_every_micro_batch_gets_the_same_shapes():
    budget = PatchBudget(patches=64, images=3)
    shapes = {
        tuple(tuple(t.shape) for t in padded(n, bounds, budget))
        for n, bounds in ((64, [0, 64]), (7, [0, 3, 5, 7]), (20, [0, 20]))
    }
    assert shapes == {((64, 1, 3), (64, 1, 1, 4), (5,))}


def test_a_full_budget_leaves_an_empty_padding_segment():
    _, _, cu_seqlens = padded(16, [0, 16], PatchBudget(patches=16, images=1))
    assert cu_seqlens.tolist() == [0, 16, 16]


@pytest.mark.parametrize(
    "patches, cu_seqlens, what",
    [(17, [0, 17], "17 image patches in 1 images"), (8, [0, 2, 4, 8], "8 image patches in 3")],
)
def test_a_micro_batch_over_the_budget_says_what_to_raise(patches, cu_seqlens, what):
    with pytest.raises(ValueError, match=f"{what}.*VISION_GRAPH_PATCHES / VISION_GRAPH_IMAGES"):
        padded(patches, cu_seqlens, PatchBudget(patches=16, images=2))


def base_config():
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4)


def test_the_vision_config_asks_megatron_for_its_local_graphs_only_when_told():
    config = get_variant("proxy")
    assert vision_config(config, base_config()).cuda_graph_impl == "none"
    assert vision_config(config, base_config(), cuda_graph=True).cuda_graph_impl == "local"


def test_graphs_and_vision_recomputation_are_refused_together():
    with pytest.raises(ValueError, match="VISION_CUDA_GRAPH=0 or RECOMPUTE_VISION=0"):
        vision_config(get_variant("proxy"), base_config(), recompute=True, cuda_graph=True)
