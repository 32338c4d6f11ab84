"""Mock VLM dataset: seeded determinism, image placeholder counts that match the image grids,
pixel tensor layout, 1-3 images per sample, supervision of the answer span only, the trained
closing im_end (--mask-im-end masks it) and the prompt vocabulary behind the ~ln(4096) plateau.
"""

from __future__ import annotations

import argparse
import math
from types import SimpleNamespace

import pytest
import torch

from data.mock import PALETTE, MockTokens, MockVLMDataset, build_datasets
from models.qwen35_vl.configuration import get_variant

CONFIG = get_variant("proxy")
SEQ_LENGTH = 1024
NUM_SAMPLES = 40


def make_dataset(seed: int = 7, **overrides) -> MockVLMDataset:
    kwargs = dict(
        num_samples=NUM_SAMPLES,
        seq_length=SEQ_LENGTH,
        config=CONFIG,
        seed=seed,
        min_pixels=4 * 32 * 32,
        max_pixels=256 * 32 * 32,
    )
    kwargs.update(overrides)
    return MockVLMDataset(**kwargs)


@pytest.fixture(scope="module")
def dataset():
    return make_dataset()


@pytest.fixture(scope="module")
def samples(dataset):
    return [dataset[i] for i in range(len(dataset))]


def test_same_index_and_seed_is_identical(samples):
    again = make_dataset()
    for index in (0, 5, 17):
        first, second = samples[index], again[index]
        assert first.keys() == second.keys()
        for key in first:
            assert torch.equal(first[key], second[key]), key


def test_different_seed_differs(samples):
    other = make_dataset(seed=8)
    differing = sum(
        samples[i]["input_ids"].shape != other[i]["input_ids"].shape
        or not torch.equal(samples[i]["input_ids"], other[i]["input_ids"])
        for i in range(10)
    )
    assert differing == 10


def test_different_index_differs(samples):
    assert len({tuple(s["input_ids"].tolist()) for s in samples}) == len(samples)


def test_image_token_count_matches_grids(samples):
    for sample in samples:
        grid = sample["image_grid_thw"]
        num_image_tokens = int((sample["input_ids"] == CONFIG.image_token_id).sum())
        assert num_image_tokens == int(grid.prod(-1).sum()) // 4


def test_pixel_values_layout(samples):
    v = CONFIG.vision
    row = v.in_channels * v.temporal_patch_size * v.patch_size**2
    assert row == 1536
    for sample in samples:
        grid = sample["image_grid_thw"]
        assert grid.shape[1] == 3
        assert (grid[:, 0] == 1).all()
        assert (grid[:, 1:] % v.spatial_merge_size == 0).all()
        assert sample["pixel_values"].dtype == torch.bfloat16
        assert sample["pixel_values"].shape == (int(grid.prod(-1).sum()), row)


def test_image_sizes_respect_pixel_bounds(samples):
    merged_tokens = torch.cat([s["image_grid_thw"].prod(-1) // 4 for s in samples])
    assert int(merged_tokens.min()) >= 4
    assert int(merged_tokens.max()) <= 256


def test_one_to_three_images(samples):
    counts = [s["image_grid_thw"].shape[0] for s in samples]
    assert set(counts) == {1, 2, 3}
    for sample, count in zip(samples, counts, strict=True):
        ids = sample["input_ids"]
        assert int((ids == CONFIG.vision_start_token_id).sum()) == count
        assert int((ids == CONFIG.vision_end_token_id).sum()) == count


def test_samples_fit_the_sequence_length(samples):
    for sample in samples:
        assert sample["input_ids"].dtype == torch.long
        assert sample["input_ids"].numel() <= SEQ_LENGTH
        assert sample["supervised"].dtype == torch.bool
        assert sample["supervised"].shape == sample["input_ids"].shape


def test_supervised_tokens_are_the_answer_only(samples):
    tokens = MockTokens.for_model(CONFIG)
    for sample in samples:
        ids, supervised = sample["input_ids"].tolist(), sample["supervised"]
        num_images = sample["image_grid_thw"].shape[0]
        start = int(supervised.int().argmax())
        assert supervised[start:].all() and not supervised[:start].any()
        # The prompt sits between the last vision_end and the user's im_end.
        last_end = len(ids) - 1 - ids[::-1].index(tokens.vision_end)
        prompt_end = ids.index(tokens.im_end, last_end)
        prompt = ids[last_end + 1 : prompt_end]
        # After the prompt: im_end, newline, im_start, "assistant", newline; then the answer.
        assert start == prompt_end + 5
        assert ids[prompt_end + 2] == tokens.im_start
        answer = ids[start:]
        colours = answer[:num_images]
        assert all(tokens.colour_base <= c < tokens.colour_base + len(PALETTE) for c in colours)
        assert answer[num_images:-1] == prompt[::-1]
        assert answer[-1] == tokens.im_end
        assert not set(answer) & {tokens.image, tokens.vision_start, tokens.vision_end}


def test_index_out_of_range(dataset):
    with pytest.raises(IndexError, match="out of range"):
        dataset[NUM_SAMPLES]


def test_too_short_sequence_raises():
    with pytest.raises(ValueError, match="--total-seq-length 16 is too short"):
        make_dataset(seq_length=16)


def test_answer_names_each_image_colour(samples):
    tokens = MockTokens.for_model(CONFIG)
    v = CONFIG.vision
    per_channel = v.temporal_patch_size * v.patch_size**2
    for sample in samples[:10]:
        grid = sample["image_grid_thw"]
        start = int(sample["supervised"].int().argmax())
        colours = sample["input_ids"][start : start + grid.shape[0]] - tokens.colour_base
        patches = sample["pixel_values"].float().split(grid.prod(-1).tolist())
        for colour, image in zip(colours.tolist(), patches, strict=True):
            # Rows are [C, T, P, P] flattened, normalised with mean 0.5 and std 0.5.
            rgb = image.view(image.shape[0], v.in_channels, per_channel).mean(dim=(0, 2))
            rgb = (rgb * 0.5 + 0.5) * 255
            assert torch.allclose(rgb, torch.tensor(PALETTE[colour]).float(), atol=6)


@pytest.mark.parametrize("mask_im_end", [False, True])
def test_provider_trains_the_closing_im_end_unless_masked(mask_im_end):
    args = argparse.Namespace(
        micro_batch_size=1,
        data_parallel_size=1,
        total_seq_length=SEQ_LENGTH,
        seed=1,
        min_pixels=4 * 32 * 32,
        max_pixels=256 * 32 * 32,
        mock_max_images=3,
        mask_im_end=mask_im_end,
    )
    tokens = MockTokens.for_model(CONFIG)
    splits = build_datasets(args, CONFIG, (4, 1, 1))
    assert (tokens.im_end in splits.ignored_label_ids) == mask_im_end
    assert splits.ignored_label_ids | {tokens.im_end} == tokens.special_ids()
    del args.mask_im_end  # arguments without the flag: the default, trained
    assert tokens.im_end not in build_datasets(args, CONFIG, (4, 1, 1)).ignored_label_ids


def test_answer_is_mostly_uniform_prompt_words(samples):
    # Why the loss plateaus near ln(text_range): nearly every answer token is a prompt word drawn
    # uniformly from text_range ids, unpredictable until the model learns to copy the prompt.
    tokens = MockTokens.for_model(CONFIG)
    answer = torch.cat([s["input_ids"][s["supervised"]] for s in samples])
    words = (answer >= tokens.text_low) & (answer < tokens.text_low + tokens.text_range)
    assert float(words.float().mean()) > 0.95
    assert math.log(tokens.text_range) == pytest.approx(8.318, abs=1e-3)


def test_dry_run_description_names_the_seed_and_image_token():
    from data.mock import describe_dataset

    args = SimpleNamespace(seed=7, mock_max_images=3)
    (line,) = describe_dataset(args, get_variant("proxy"))
    assert line.startswith("mock: synthetic samples from seed 7 (1-3 images each")
    assert f"image token id {get_variant('proxy').image_token_id}" in line
