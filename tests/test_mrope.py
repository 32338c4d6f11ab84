"""MRoPE: `build_mrope_position_ids` against HF `Qwen3_5Model.get_rope_index` (text, images in
any position, batches, THD packs, malformed samples) and `InterleavedMRopeEmbedding` against HF's
`Qwen3_5TextRotaryEmbedding`.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
from transformers.models.qwen3_5.modeling_qwen3_5 import (
    Qwen3_5Model,
    Qwen3_5TextRotaryEmbedding,
)

from data.collate import THD, CollateConfig, pack_or_pad_batch
from models.qwen35_vl.configuration import get_variant
from models.qwen35_vl.mrope import (
    InterleavedMRopeEmbedding,
    build_mrope_position_ids,
    mrope_axis_per_frequency,
)
from models.qwen35_vl.vision_inputs import SampleInputs

CONFIG = get_variant("proxy")
IMAGE = CONFIG.image_token_id
START, END = CONFIG.vision_start_token_id, CONFIG.vision_end_token_id
MERGE = CONFIG.vision.spatial_merge_size


def hf_rope_index(input_ids, image_grid_thw=None, attention_mask=None):
    """HF's get_rope_index on a stand-in `self` (it only reads the merge size)."""
    fake = SimpleNamespace(
        config=SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=MERGE))
    )
    fake.get_vision_position_ids = functools.partial(Qwen3_5Model.get_vision_position_ids, fake)
    mm_token_type_ids = (input_ids == IMAGE).int()
    positions, _ = Qwen3_5Model.get_rope_index(
        fake,
        input_ids,
        mm_token_type_ids,
        image_grid_thw=image_grid_thw,
        attention_mask=attention_mask,
    )
    return positions


def make_ids(layout, seed=0):
    """`layout`: ints (text runs of that length) and grid rows [t, h, w] (one image each)."""
    generator = torch.Generator().manual_seed(seed)
    ids, grids = [], []
    for part in layout:
        if isinstance(part, int):
            ids += torch.randint(1000, 5000, (part,), generator=generator).tolist()
        else:
            t, h, w = part
            ids += [START] + [IMAGE] * (t * h * w // MERGE**2) + [END]
            grids.append(list(part))
    grid = torch.tensor(grids, dtype=torch.long) if grids else None
    return torch.tensor(ids, dtype=torch.long), grid


def image_first(grid):
    """A sample that starts directly with image tokens (no text, no vision_start before)."""
    t, h, w = grid
    ids = [IMAGE] * (t * h * w // MERGE**2) + [END, 1000, 1001, 1002]
    return torch.tensor(ids), torch.tensor([grid])


def image_last(grid):
    t, h, w = grid
    ids = [1000, 1001, START] + [IMAGE] * (t * h * w // MERGE**2)
    return torch.tensor(ids), torch.tensor([grid])


CASES = {
    "text_only": make_ids([17]),
    "one_image": make_ids([5, [1, 4, 6], 9]),
    "several_images": make_ids([3, [1, 4, 6], 2, [1, 8, 4], 7, [1, 2, 2], 4]),
    "adjacent_blocks": make_ids([2, [1, 6, 2], [1, 2, 10], 3]),
    "image_first": image_first([1, 6, 4]),
    "image_last": image_last([1, 4, 8]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_hf_get_rope_index(case):
    ids, grid = CASES[case]
    ours = build_mrope_position_ids(ids, grid, IMAGE, MERGE)
    hf = hf_rope_index(ids.unsqueeze(0), grid)[:, 0]
    assert ours.shape == (3, ids.numel())
    assert ours.dtype == torch.long
    assert torch.equal(ours, hf)


def test_one_image_positions_by_hand():
    ids, grid = make_ids([2, [1, 4, 6], 1])  # 2 text, start, 2x3 merged image, end, 1 text
    ours = build_mrope_position_ids(ids, grid, IMAGE, MERGE)
    # text 0, 1, vision_start 2; image at p=3: t=3, h=3+row, w=3+col
    assert ours[:, :3].tolist() == [[0, 1, 2]] * 3
    assert ours[0, 3:9].tolist() == [3] * 6
    assert ours[1, 3:9].tolist() == [3, 3, 3, 4, 4, 4]
    assert ours[2, 3:9].tolist() == [3, 4, 5, 3, 4, 5]
    # text resumes at 3 + max(2, 3) = 6
    assert ours[:, 9:].tolist() == [[6, 7]] * 3


def test_batch_of_two_samples_matches_hf():
    first, grid_a = make_ids([3, [1, 4, 6], 5, [1, 2, 2], 2], seed=1)
    second, grid_b = make_ids([6, [1, 8, 4], 1], seed=2)
    length = max(first.numel(), second.numel())
    batch = torch.zeros(2, length, dtype=torch.long)
    mask = torch.zeros(2, length, dtype=torch.long)
    for row, ids in enumerate((first, second)):
        batch[row, : ids.numel()] = ids
        mask[row, : ids.numel()] = 1
    hf = hf_rope_index(batch, torch.cat([grid_a, grid_b]), attention_mask=mask)
    for row, (ids, grid) in enumerate(((first, grid_a), (second, grid_b))):
        ours = build_mrope_position_ids(ids, grid, IMAGE, MERGE)
        assert torch.equal(ours, hf[:, row, : ids.numel()])


def test_thd_pack_restarts_positions_per_sample():
    layouts = [[3, [1, 4, 6], 5], [11], [2, [1, 8, 4], 4, [1, 2, 2], 1]]
    samples = []
    for seed, layout in enumerate(layouts):
        ids, grid = make_ids(layout, seed=seed)
        sample = {"input_ids": ids, "supervised": torch.ones_like(ids, dtype=torch.bool)}
        if grid is not None:
            sample["image_grid_thw"] = grid
            sample["pixel_values"] = torch.zeros(int(grid.prod(-1).sum()), 1536)
        samples.append(sample)
    config = CollateConfig(
        mode=THD,
        seq_length=256,
        pad_token_id=0,
        model_inputs=SampleInputs(IMAGE, CONFIG.vision),
        pad_multiple=8,
    )
    batch = pack_or_pad_batch(samples, config)
    positions = batch["position_ids"]
    total = int(batch["cu_seqlens_padded"][-1])
    assert positions.shape == (1, total, 3)
    starts = batch["cu_seqlens_padded"].tolist()
    for index, sample in enumerate(samples):
        ids, grid = sample["input_ids"], sample.get("image_grid_thw")
        start, length = starts[index], ids.numel()
        alone = build_mrope_position_ids(ids, grid, IMAGE, MERGE)
        segment = positions[0, start : start + length].T
        assert torch.equal(segment, alone)
        assert segment[:, 0].tolist() == [0, 0, 0]
        assert torch.equal(segment, hf_rope_index(ids.unsqueeze(0), grid)[:, 0])
        # Padding continues the text positions after the sample's largest position.
        padding = positions[0, start + length : starts[index + 1]]
        expected = alone.max() + 1 + torch.arange(padding.shape[0])
        assert torch.equal(padding, expected.unsqueeze(1).expand(-1, 3))


def test_more_blocks_than_grids_raises():
    ids, grid = make_ids([2, [1, 4, 4], 2, [1, 4, 4], 2])
    with pytest.raises(ValueError, match=r"more image placeholder runs than image grids \(1\)"):
        build_mrope_position_ids(ids, grid[:1], IMAGE, MERGE)


def test_fewer_blocks_than_grids_raises():
    ids, grid = make_ids([2, [1, 4, 4], 2])
    grids = torch.cat([grid, grid])
    with pytest.raises(ValueError, match="2 image grids but only 1 image placeholder runs"):
        build_mrope_position_ids(ids, grids, IMAGE, MERGE)


def test_block_size_mismatch_names_both_counts():
    ids = torch.tensor([1000, START] + [IMAGE] * 5 + [END])
    with pytest.raises(ValueError, match=r"has 5 placeholder tokens .*needs 4") as error:
        build_mrope_position_ids(ids, torch.tensor([[1, 4, 4]]), IMAGE, MERGE)
    assert "[1, 4, 4]" in str(error.value)


def test_rejects_batched_input():
    with pytest.raises(ValueError, match="1-D"):
        build_mrope_position_ids(torch.zeros(2, 4, dtype=torch.long), None, IMAGE, MERGE)


# ---- rotary angles ----------------------------------------------------------------------------

TEXT = CONFIG.text


def our_embedding():
    return InterleavedMRopeEmbedding(TEXT.rotary_dim, TEXT.rope_theta, list(TEXT.mrope_section))


def expected_axis(j: int) -> int:
    """Axis of frequency j for mrope_section [11, 11, 10] (interleaved t, h, w)."""
    if j % 3 == 1 and j < 33:
        return 1
    if j % 3 == 2 and j < 30:
        return 2
    return 0


def test_axis_per_frequency():
    assert TEXT.mrope_section == (11, 11, 10)
    axis = mrope_axis_per_frequency([11, 11, 10])
    assert axis.tolist() == [expected_axis(j) for j in range(32)]
    assert axis.bincount().tolist() == [11, 11, 10]


def test_text_positions_give_plain_rope_angles():
    embedding = our_embedding()
    positions = torch.arange(50, dtype=torch.long) * 37
    angles = embedding(positions.view(1, -1).expand(3, -1))  # THD form [3, T]
    assert angles.shape == (50, 1, 1, TEXT.rotary_dim)
    inv_freq = 1.0 / TEXT.rope_theta ** (torch.arange(0, 64, 2, dtype=torch.float) / 64)
    expected = positions.float()[:, None] * inv_freq
    assert torch.equal(angles[:, 0, 0, :32], expected)
    assert torch.equal(angles[:, 0, 0, 32:], expected)


def test_image_positions_pick_axis_per_frequency():
    embedding = our_embedding()
    generator = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 4000, (3, 2, 9), generator=generator)
    angles = embedding(positions)  # [S, B, 1, 64]
    assert angles.shape == (9, 2, 1, 64)
    for j in range(32):
        expected = positions[expected_axis(j)].float() * embedding.inv_freq[j]  # [B, S]
        assert torch.equal(angles[:, :, 0, j], expected.T)
        assert torch.equal(angles[:, :, 0, 32 + j], expected.T)


def test_cos_sin_match_hf_rotary_embedding():
    hf_rotary = Qwen3_5TextRotaryEmbedding(CONFIG.to_hf_config().text_config)
    generator = torch.Generator().manual_seed(1)
    positions = torch.randint(0, 100_000, (3, 2, 33), generator=generator)
    x = torch.zeros(2, 33, 8, dtype=torch.float32)
    hf_cos, hf_sin = hf_rotary(x, positions)
    assert hf_cos.shape == (2, 33, 64)
    angles = our_embedding()(positions)[:, :, 0].permute(1, 0, 2)  # [B, S, 64]
    torch.testing.assert_close(angles.cos(), hf_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(angles.sin(), hf_sin, atol=1e-6, rtol=0)


def test_embedding_rejects_bad_shapes():
    with pytest.raises(ValueError, match="does not cover rotary_dim"):
        InterleavedMRopeEmbedding(64, 1e7, [11, 11, 11])
    with pytest.raises(ValueError, match=r"\[3, B, S\]"):
        our_embedding()(torch.zeros(2, 1, 5, dtype=torch.long))
