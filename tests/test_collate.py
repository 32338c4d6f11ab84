"""Batch collation (`data.collate.pack_or_pad_batch`): BSHD padding and THD packing, shifted
labels and loss mask (the answer's closing im_end trained unless masked), padding mask,
cu_seqlens, vision-feature rows, vision inputs, the samples' load notes and the errors for
over-long samples and bad sequence lengths.
"""

from __future__ import annotations

import pytest
import torch

from data.collate import BSHD, THD, CollateConfig, pack_or_pad_batch, shifted_labels_and_mask
from data.load_report import LoadNotes
from data.mock import MockTokens, MockVLMDataset
from models.qwen35_vl.configuration import get_variant
from models.qwen35_vl.vision_inputs import SampleInputs, VisionInputs

CONFIG = get_variant("proxy")
TOKENS = MockTokens.for_model(CONFIG)
IMAGE = CONFIG.image_token_id
IGNORED = TOKENS.ignored_label_ids()  # the mock provider's default: im_end trained
PATCH_ROW = 1536


def collate_config(
    mode: str, seq_length: int = 64, pad_multiple: int = 1, ignored: frozenset[int] = IGNORED
) -> CollateConfig:
    return CollateConfig(
        mode=mode,
        seq_length=seq_length,
        pad_token_id=TOKENS.pad,
        model_inputs=SampleInputs.of(CONFIG),
        pad_multiple=pad_multiple,
        ignored_label_ids=ignored,
    )


def make_sample(text_before: int, grids: list[list[int]], answer: int, seed: int) -> dict:
    """[im_start] text [vision_start image* vision_end]* text | answer... [im_end]."""
    generator = torch.Generator().manual_seed(seed)

    def text(n):
        return torch.randint(1000, 5000, (n,), generator=generator).tolist()

    ids = [TOKENS.im_start, *text(text_before)]
    for t, h, w in grids:
        ids += [TOKENS.vision_start] + [IMAGE] * (t * h * w // 4) + [TOKENS.vision_end]
    ids += [*text(2), TOKENS.im_end, TOKENS.im_start]
    prompt_length = len(ids)
    ids += [*text(answer), TOKENS.im_end]
    input_ids = torch.tensor(ids)
    supervised = torch.zeros(len(ids), dtype=torch.bool)
    supervised[prompt_length:] = True
    sample = {"input_ids": input_ids, "supervised": supervised}
    if grids:
        grid = torch.tensor(grids)
        patches = int(grid.prod(-1).sum())
        sample["image_grid_thw"] = grid
        sample["pixel_values"] = torch.randn(patches, PATCH_ROW, generator=generator)
    return sample


@pytest.fixture
def samples():
    return [
        make_sample(3, [[1, 4, 6], [1, 2, 2]], answer=5, seed=0),
        make_sample(7, [], answer=4, seed=1),
        make_sample(1, [[1, 8, 4]], answer=9, seed=2),
    ]


def real_rows(batch, samples, mode):
    """(row index, start, length) of each sample's real tokens in the batch."""
    if mode == BSHD:
        return [(i, 0, s["input_ids"].numel()) for i, s in enumerate(samples)]
    starts = batch["cu_seqlens_padded"].tolist()
    return [(0, starts[i], s["input_ids"].numel()) for i, s in enumerate(samples)]


def test_bshd_shapes(samples):
    batch = pack_or_pad_batch(samples, collate_config(BSHD, seq_length=64))
    for key in ("input_ids", "labels", "loss_mask", "padding_mask", "vision_rows"):
        assert batch[key].shape == (3, 64), key
    assert batch["position_ids"].shape == (3, 64, 3)
    assert batch["loss_mask"].dtype == torch.float32
    assert batch["padding_mask"].dtype == torch.bool
    assert "cu_seqlens" not in batch
    for row, sample in enumerate(samples):
        length = sample["input_ids"].numel()
        assert torch.equal(batch["input_ids"][row, :length], sample["input_ids"])
        assert (batch["input_ids"][row, length:] == TOKENS.pad).all()


@pytest.mark.parametrize("mode", [BSHD, THD])
def test_labels_are_next_tokens(samples, mode):
    batch = pack_or_pad_batch(samples, collate_config(mode, seq_length=64, pad_multiple=4))
    for row, start, length in real_rows(batch, samples, mode):
        ids = batch["input_ids"][row, start : start + length]
        labels = batch["labels"][row, start : start + length]
        assert torch.equal(labels[:-1], ids[1:])


@pytest.mark.parametrize("mode", [BSHD, THD])
@pytest.mark.parametrize("mask_im_end", [False, True])
def test_loss_mask(samples, mode, mask_im_end):
    ignored_ids = TOKENS.ignored_label_ids(mask_im_end)
    config = collate_config(mode, seq_length=64, pad_multiple=4, ignored=ignored_ids)
    batch = pack_or_pad_batch(samples, config)
    loss_mask, labels = batch["loss_mask"], batch["labels"]
    assert (loss_mask[batch["padding_mask"]] == 0).all()
    ignored = torch.isin(labels, torch.tensor(sorted(ignored_ids)))
    assert (loss_mask[ignored] == 0).all()
    for (row, start, length), sample in zip(real_rows(batch, samples, mode), samples, strict=True):
        mask = loss_mask[row, start : start + length]
        assert mask[-1] == 0  # the last real token has no next token
        expected = sample["supervised"][1:] & ~torch.isin(
            sample["input_ids"][1:], torch.tensor(sorted(ignored_ids))
        )
        assert torch.equal(mask[:-1].bool(), expected)
        # Every supervised answer token is trained, the closing im_end too (the model learns to
        # stop) unless masked; the user turn's im_end is never supervised.
        answer = int(sample["supervised"].sum())
        assert int(mask.sum()) == answer - mask_im_end
        assert bool(mask[length - 2]) != mask_im_end  # the label there is the closing im_end


def test_loss_mask_without_ignored_ids_keeps_supervised_specials():
    ids = torch.tensor([1, 2, 3, TOKENS.im_end])
    supervised = torch.tensor([False, True, True, True])
    labels, mask = shifted_labels_and_mask(ids, supervised, frozenset())
    assert labels.tolist() == [2, 3, TOKENS.im_end, TOKENS.im_end]
    assert mask.tolist() == [True, True, True, False]
    _, mask = shifted_labels_and_mask(ids, supervised, frozenset({TOKENS.im_end}))
    assert mask.tolist() == [True, True, False, False]
    assert supervised.tolist() == [False, True, True, True]  # input not modified


@pytest.mark.parametrize("pad_multiple", [1, 4, 8])
def test_thd_pack(samples, pad_multiple):
    batch = pack_or_pad_batch(
        samples, collate_config(THD, seq_length=64, pad_multiple=pad_multiple)
    )
    lengths = torch.tensor([s["input_ids"].numel() for s in samples])
    cu, cu_padded = batch["cu_seqlens"], batch["cu_seqlens_padded"]
    assert cu.dtype == torch.int32 and cu_padded.dtype == torch.int32
    assert cu.tolist() == [0, *lengths.cumsum(0).tolist()]
    padded = cu_padded.diff()
    assert (padded % pad_multiple == 0).all()
    assert (padded >= lengths).all()
    assert (padded - lengths < pad_multiple).all()
    total = batch["input_ids"].shape[1]
    assert int(cu[-1]) <= int(cu_padded[-1]) == total
    assert batch["max_seqlen"] == int(padded.max())
    assert isinstance(batch["max_seqlen"], int)
    for key in ("input_ids", "labels", "loss_mask", "padding_mask", "vision_rows"):
        assert batch[key].shape == (1, total), key
    assert batch["position_ids"].shape == (1, total, 3)
    expected_padding = torch.ones(total, dtype=torch.bool)
    for start, length in zip(cu_padded[:-1].tolist(), lengths.tolist(), strict=True):
        expected_padding[start : start + length] = False
    assert torch.equal(batch["padding_mask"][0], expected_padding)
    if pad_multiple == 1:
        assert not batch["padding_mask"].any()


def test_bshd_padding_mask(samples):
    batch = pack_or_pad_batch(samples, collate_config(BSHD, seq_length=64))
    for row, sample in enumerate(samples):
        length = sample["input_ids"].numel()
        assert not batch["padding_mask"][row, :length].any()
        assert batch["padding_mask"][row, length:].all()


@pytest.mark.parametrize("mode", [BSHD, THD])
def test_vision_rows_number_image_tokens_in_order(samples, mode):
    batch = pack_or_pad_batch(samples, collate_config(mode, seq_length=64, pad_multiple=4))
    rows = batch["vision_rows"]
    is_image = batch["input_ids"] == IMAGE
    num_image_tokens = sum(int(s["image_grid_thw"].prod(-1).sum()) // 4 for s in samples[::2])
    assert int(is_image.sum()) == num_image_tokens
    # Row-major order over the batch is the order of the samples' image tokens.
    assert rows[is_image].tolist() == list(range(num_image_tokens))
    assert (rows[~is_image] == -1).all()


@pytest.mark.parametrize("mode", [BSHD, THD])
def test_vision_inputs(samples, mode):
    batch = pack_or_pad_batch(samples, collate_config(mode, seq_length=64, pad_multiple=4))
    vision = batch["vision"]
    assert isinstance(vision, VisionInputs)
    images = [s for s in samples if "image_grid_thw" in s]
    assert torch.equal(vision.grid_thw, torch.cat([s["image_grid_thw"] for s in images]))
    assert torch.equal(vision.pixel_values, torch.cat([s["pixel_values"] for s in images]))
    patches = vision.grid_thw.prod(-1)
    assert vision.cu_seqlens.tolist() == [0, *patches.cumsum(0).tolist()]
    assert vision.max_seqlen == int(patches.max())
    # The merged vision features (patches / 4) give exactly one row per image token.
    assert int(patches.sum()) // 4 == int((batch["input_ids"] == IMAGE).sum())


def test_text_only_batch_has_no_vision(samples):
    batch = pack_or_pad_batch([samples[1]], collate_config(BSHD, seq_length=64))
    assert batch["vision"] is None
    assert (batch["vision_rows"] == -1).all()


def test_position_ids_match_mrope_per_sample(samples):
    from models.qwen35_vl.mrope import build_mrope_position_ids

    batch = pack_or_pad_batch(samples, collate_config(BSHD, seq_length=64))
    for row, sample in enumerate(samples):
        length = sample["input_ids"].numel()
        expected = build_mrope_position_ids(
            sample["input_ids"], sample.get("image_grid_thw"), IMAGE, 2
        )
        assert torch.equal(batch["position_ids"][row, :length].T, expected)


def test_mock_samples_collate():
    dataset = MockVLMDataset(
        num_samples=4,
        seq_length=1024,
        config=CONFIG,
        seed=3,
        min_pixels=4 * 32 * 32,
        max_pixels=256 * 32 * 32,
    )
    samples = [dataset[i] for i in range(4)]
    batch = pack_or_pad_batch(samples, collate_config(THD, seq_length=1024, pad_multiple=8))
    assert int(batch["loss_mask"].sum()) == sum(int(s["supervised"].sum()) for s in samples)
    image_tokens = sum(int(s["image_grid_thw"].prod(-1).sum()) // 4 for s in samples)
    assert int(batch["vision_rows"].max()) == image_tokens - 1
    assert batch["vision"].pixel_values.dtype == torch.bfloat16


def test_sample_longer_than_seq_length_raises(samples):
    length = samples[0]["input_ids"].numel()
    for mode in (BSHD, THD):
        with pytest.raises(ValueError, match="--total-seq-length") as error:
            pack_or_pad_batch(samples, collate_config(mode, seq_length=length - 1))
        assert f"sample 0 has {length} tokens" in str(error.value)


def test_sample_of_exactly_seq_length_fits(samples):
    length = samples[0]["input_ids"].numel()
    batch = pack_or_pad_batch(samples[:1], collate_config(BSHD, seq_length=length))
    assert not batch["padding_mask"].any()
    assert batch["loss_mask"][0, -1] == 0


def test_bshd_seq_length_must_divide_by_pad_multiple():
    with pytest.raises(ValueError, match="--total-seq-length 62 must be a multiple of 4"):
        collate_config(BSHD, seq_length=62, pad_multiple=4)
    # THD pads each sample instead, so any seq_length works.
    assert collate_config(THD, seq_length=62, pad_multiple=4).seq_length == 62


def test_bad_mode_and_empty_batch_raise():
    with pytest.raises(ValueError, match="collate mode"):
        collate_config("sbhd")
    with pytest.raises(ValueError, match="empty micro-batch"):
        pack_or_pad_batch([], collate_config(BSHD))


def test_load_notes_of_the_samples_are_merged_into_the_batch(samples):
    assert "load_notes" not in pack_or_pad_batch(samples, collate_config(BSHD))
    samples[0]["load_notes"] = LoadNotes(truncated=(("a row 1", 90, 64),))
    samples[2]["load_notes"] = LoadNotes(skipped=(("a row 7", "bad image"), ("a row 8", "no JSON")))
    for mode in (BSHD, THD):
        notes = pack_or_pad_batch(samples, collate_config(mode, pad_multiple=4))["load_notes"]
        assert notes.truncated == (("a row 1", 90, 64),)
        assert notes.skipped == (("a row 7", "bad image"), ("a row 8", "no JSON"))
