"""Qwen3-VL MRoPE positions: `build_mrope_position_ids` (shared with Qwen3.5) against HF
`Qwen3VLModel.get_rope_index` / `Qwen3VLMoeModel.get_rope_index` (models built on the meta device
from the proxies) for text, images of any size and position, timestamped videos, random samples
and padded batches; plus positions worked by hand and malformed samples.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeModel

from models.qwen3_vl.configuration import get_variant
from models.qwen35_vl.mrope import build_mrope_position_ids

CONFIG = get_variant("proxy")
IMAGE, VIDEO = CONFIG.image_token_id, CONFIG.video_token_id
START, END = CONFIG.vision_start_token_id, CONFIG.vision_end_token_id
MERGE = CONFIG.vision.spatial_merge_size


@pytest.fixture(scope="module", params=["proxy", "proxy-moe"])
def hf_model(request):
    """A real HF Qwen3-VL(-MoE) model object on the meta device; get_rope_index runs on CPU."""
    config = get_variant(request.param)
    model_class = Qwen3VLMoeModel if config.text.is_moe else Qwen3VLModel
    with torch.device("meta"):
        return model_class(config.to_hf_config())


def hf_rope_index(model, input_ids, image_grid_thw=None, video_grid_thw=None, attention_mask=None):
    """HF positions [3, B, L]; the token types mark image (1) and video (2) placeholders, as the
    HF processor's mm_token_type_ids do."""
    mm_token_type_ids = (input_ids == IMAGE).int() + 2 * (input_ids == VIDEO).int()
    positions, _ = model.get_rope_index(
        input_ids,
        mm_token_type_ids,
        image_grid_thw=image_grid_thw,
        video_grid_thw=video_grid_thw,
        attention_mask=attention_mask,
    )
    return positions


def text_tokens(count: int, rng: random.Random) -> list[int]:
    return [rng.randrange(1000, 5000) for _ in range(count)]


def grid_tensor(rows: list[list[int]]) -> torch.Tensor | None:
    return torch.tensor(rows, dtype=torch.long) if rows else None


def make_sample(layout, seed=0):
    """`layout`: ints (text runs of that length), ("image", t, h, w) and ("video", t, h, w) parts.
    Images are wrapped in vision_start/end; a video becomes t frames, each a timestamp (two text
    tokens) and vision_start, h*w/merge^2 video tokens, vision_end, as Qwen3-VL prompts do."""
    rng = random.Random(seed)
    ids: list[int] = []
    images, videos = [], []
    for part in layout:
        if isinstance(part, int):
            ids += text_tokens(part, rng)
            continue
        kind, t, h, w = part
        frame_tokens = h * w // MERGE**2
        if kind == "image":
            ids += [START] + [IMAGE] * (t * frame_tokens) + [END]
            images.append([t, h, w])
        else:
            for _ in range(t):
                ids += text_tokens(2, rng) + [START] + [VIDEO] * frame_tokens + [END]
            videos.append([t, h, w])
    return torch.tensor(ids, dtype=torch.long), grid_tensor(images), grid_tensor(videos)


def ours(ids, images, videos):
    return build_mrope_position_ids(ids, images, IMAGE, MERGE, videos, VIDEO)


def random_layout(rng: random.Random) -> list:
    layout: list = []
    for _ in range(rng.randint(1, 6)):
        choice = rng.random()
        if choice < 0.4:
            layout.append(rng.randint(1, 12))
        else:
            kind = "image" if choice < 0.8 else "video"
            t = 1 if kind == "image" else rng.randint(1, 3)
            layout.append((kind, t, MERGE * rng.randint(1, 7), MERGE * rng.randint(1, 7)))
    return layout


CASES = {
    "text_only": [17],
    "one_image": [5, ("image", 1, 4, 6), 9],
    "several_images": [3, ("image", 1, 4, 6), 2, ("image", 1, 8, 4), 7, ("image", 1, 2, 2), 4],
    "adjacent_images": [2, ("image", 1, 6, 2), ("image", 1, 2, 10), 3],
    "image_first": [("image", 1, 6, 4), 3],
    "image_last": [2, ("image", 1, 4, 8)],
    "only_an_image": [("image", 1, 10, 14)],
    "wide_and_tall": [1, ("image", 1, 2, 30), 1, ("image", 1, 30, 2), 1],
    "image_with_two_temporal_patches": [3, ("image", 2, 4, 4), 3],
    "video": [4, ("video", 3, 4, 6), 5],
    "images_and_videos": [2, ("image", 1, 4, 4), 3, ("video", 2, 6, 4), ("image", 1, 2, 8), 1],
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_hf_get_rope_index(hf_model, case):
    ids, images, videos = make_sample(CASES[case])
    positions = ours(ids, images, videos)
    hf_positions = hf_rope_index(hf_model, ids.unsqueeze(0), images, videos)
    assert positions.shape == (3, ids.numel())
    assert positions.dtype == torch.long
    assert torch.equal(positions, hf_positions[:, 0])


@pytest.mark.parametrize("seed", range(20))
def test_random_samples_match_hf(hf_model, seed):
    ids, images, videos = make_sample(random_layout(random.Random(seed)), seed=seed)
    hf_positions = hf_rope_index(hf_model, ids.unsqueeze(0), images, videos)
    positions = ours(ids, images, videos)
    assert torch.equal(positions, hf_positions[:, 0])


def test_bare_image_tokens_at_both_ends_match_hf(hf_model):
    """Image tokens as the very first and last tokens (no vision_start/end around them)."""
    ids = torch.tensor([IMAGE] * 6 + [1000, 1001] + [IMAGE] * 4)
    images = torch.tensor([[1, 4, 6], [1, 2, 8]])
    positions = build_mrope_position_ids(ids, images, IMAGE, MERGE)
    hf_positions = hf_rope_index(hf_model, ids.unsqueeze(0), images)
    assert torch.equal(positions, hf_positions[:, 0])


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_batch_matches_hf(hf_model, padding_side):
    """HF indexes a batch's grids in order across samples and skips padding by attention mask;
    each sample alone gives the same positions."""
    samples = [
        make_sample([3, ("image", 1, 4, 6), 5, ("image", 1, 2, 2), 2], seed=1),
        make_sample([6, ("video", 2, 8, 4), 1], seed=2),
        make_sample([9], seed=3),
        make_sample([("image", 1, 4, 4), 2, ("video", 1, 2, 2), 4, ("image", 1, 6, 2)], seed=4),
    ]
    length = max(ids.numel() for ids, _, _ in samples) + 3
    batch = torch.zeros(len(samples), length, dtype=torch.long)
    mask = torch.zeros(len(samples), length, dtype=torch.long)
    spans = []
    for row, (ids, _, _) in enumerate(samples):
        begin = 0 if padding_side == "right" else length - ids.numel()
        batch[row, begin : begin + ids.numel()] = ids
        mask[row, begin : begin + ids.numel()] = 1
        spans.append(slice(begin, begin + ids.numel()))
    images = torch.cat([grid for _, grid, _ in samples if grid is not None])
    videos = torch.cat([grid for _, _, grid in samples if grid is not None])
    hf_positions = hf_rope_index(hf_model, batch, images, videos, attention_mask=mask)
    for row, (ids, image_grid, video_grid) in enumerate(samples):
        positions = ours(ids, image_grid, video_grid)
        assert torch.equal(positions, hf_positions[:, row, spans[row]])


def test_one_image_positions_by_hand():
    ids, images, _ = make_sample([2, ("image", 1, 4, 6), 1])  # text, start, 2x3 image, end, text
    positions = build_mrope_position_ids(ids, images, IMAGE, MERGE)
    # text 0, 1, vision_start 2; image at p = 3: t = 3, h = 3 + row, w = 3 + col
    assert positions[:, :3].tolist() == [[0, 1, 2]] * 3
    assert positions[0, 3:9].tolist() == [3] * 6
    assert positions[1, 3:9].tolist() == [3, 3, 3, 4, 4, 4]
    assert positions[2, 3:9].tolist() == [3, 4, 5, 3, 4, 5]
    # vision_end and text resume at 3 + max(2, 3) = 6
    assert positions[:, 9:].tolist() == [[6, 7]] * 3


def test_video_frames_restart_temporal_position_by_hand():
    """Each frame is its own [1, h, w] block: its temporal axis is the block start, not a frame
    counter, and the timestamp text between frames advances all three axes."""
    ids, _, videos = make_sample([("video", 2, 2, 4)])  # 2 frames of 1x2 merged tokens
    assert ids.numel() == 2 * (2 + 1 + 2 + 1)
    positions = ours(ids, None, videos)
    frame_one, frame_two = positions[:, 3:5], positions[:, 9:11]
    assert frame_one.tolist() == [[3, 3], [3, 3], [3, 4]]
    # end of frame one at 3 + max(1, 2) = 5, timestamp 6, 7, vision_start 8, frame two at 9
    assert positions[:, 5:9].tolist() == [[5, 6, 7, 8]] * 3
    assert frame_two.tolist() == [[9, 9], [9, 9], [9, 10]]


def test_without_video_token_id_video_tokens_are_text():
    ids, _, _ = make_sample([3])
    ids = torch.cat([ids, torch.tensor([VIDEO, VIDEO])])
    positions = build_mrope_position_ids(ids, None, IMAGE, MERGE)
    assert torch.equal(positions, torch.arange(5).expand(3, -1))


def test_more_runs_than_grids_raises():
    ids, images, _ = make_sample([2, ("image", 1, 4, 4), 2, ("image", 1, 4, 4), 2])
    with pytest.raises(ValueError, match=r"more image placeholder runs than image grids \(1\)"):
        build_mrope_position_ids(ids, images[:1], IMAGE, MERGE)


def test_fewer_runs_than_grids_raises():
    ids, _, videos = make_sample([2, ("video", 2, 4, 4), 2])
    with pytest.raises(ValueError, match="3 video frame grids but only 2 video frame placeholder"):
        build_mrope_position_ids(ids, None, IMAGE, MERGE, videos + torch.tensor([1, 0, 0]), VIDEO)


def test_run_size_mismatch_names_both_counts():
    ids = torch.tensor([1000, START] + [IMAGE] * 5 + [END])
    with pytest.raises(ValueError, match=r"has 5 placeholder tokens .*needs 4") as error:
        build_mrope_position_ids(ids, torch.tensor([[1, 4, 4]]), IMAGE, MERGE)
    assert "[1, 4, 4]" in str(error.value)


def test_rejects_malformed_arguments():
    ids = torch.tensor([1000, 1001])
    with pytest.raises(ValueError, match="1-D"):
        build_mrope_position_ids(ids.view(1, 2), None, IMAGE, MERGE)
    with pytest.raises(ValueError, match=r"image_grid_thw must have shape \[num_images, 3\]"):
        build_mrope_position_ids(ids, torch.tensor([1, 4, 4]), IMAGE, MERGE)
    with pytest.raises(ValueError, match="video_grid_thw was given without video_token_id"):
        build_mrope_position_ids(ids, None, IMAGE, MERGE, torch.tensor([[1, 4, 4]]))
