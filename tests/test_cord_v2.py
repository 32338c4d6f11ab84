"""CPU tests of the cord_v2 provider on the offline fixture of scripts/cord_fixture.py: exact answer
spans, labels and loss masks through the collate (BSHD and THD; the closing <|im_end|> trained
unless --mask-im-end), truncation and bad rows counted in the main process across loader workers,
the scan decoding every image, EXIF orientation, dynamic image resolution and the provider's
DatasetSplits.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import re

import numpy as np
import pytest
import torch
from PIL import Image
from qwen_vl_utils import smart_resize
from transformers import AutoTokenizer, Qwen2Tokenizer

from data.collate import BSHD, THD, CollateConfig, pack_or_pad_batch
from data.cord_v2 import (
    AssistantSpans,
    CordV2Dataset,
    build_datasets,
    decode_image,
    describe_dataset,
    find_shards,
    ignored_label_ids,
    image_token_id,
    load_tokenizer_and_image_processor,
    pad_token_id,
)
from data.load_report import LoadReport
from data.loader import build_loader
from data.tokens import special_token_ids
from models.qwen35_vl.configuration import VisionConfig, get_variant
from models.qwen35_vl.vision_inputs import SampleInputs
from scripts.cord_fixture import (
    EXIF_ORIENTATION,
    SIDEWAYS_ROW,
    SPECIAL_TOKENS,
    byte_symbols,
    encode_image,
    receipt_image,
    write_fixture,
)

SEQ = 512
MIN_PIXELS = 4 * 32 * 32
MAX_PIXELS = 64 * 32 * 32  # at most 64 merged tokens per image
THINK_HEADER = "<|im_start|>assistant\n<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return write_fixture(tmp_path_factory.mktemp("cord_clean"))


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    return write_fixture(tmp_path_factory.mktemp("cord_bad"), bad_rows=True)


@pytest.fixture(scope="module")
def processors(clean):
    return load_tokenizer_and_image_processor(str(clean.tokenizer_dir))


def make_dataset(fixture, processors, split="train", **kwargs):
    tokenizer, image_processor = processors
    options = dict(seq_length=SEQ, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, name=split)
    options.update(kwargs)
    shards = [str(path) for path in fixture.shards[split]]
    return CordV2Dataset(shards, tokenizer, image_processor, **options)


@pytest.fixture(scope="module")
def train(clean, processors):
    return make_dataset(clean, processors)


@pytest.fixture(scope="module")
def samples(train):
    return [train.load(i) for i in range(len(train))]


def collate_config(tokenizer, mode, mask_im_end=False):
    return CollateConfig(
        mode=mode,
        seq_length=SEQ,
        pad_token_id=pad_token_id(tokenizer),
        model_inputs=SampleInputs(image_token_id(tokenizer), VisionConfig()),
        ignored_label_ids=ignored_label_ids(tokenizer, mask_im_end),
    )


def one_epoch_through_workers(dataset, epochs=1, num_workers=2):
    """Load `epochs` epochs through build_loader with worker processes; the LoadReport that
    counted them in this (the main) process."""
    report = LoadReport(dataset.label, every=len(dataset))
    config = collate_config(dataset.tokenizer, THD)
    loader = build_loader(dataset, config, 0, 1, 0, 1, num_workers=num_workers, report=report)
    for _ in range(epochs * len(dataset)):
        assert "load_notes" not in next(loader)  # counted and taken off in the main process
    return report


def answer_span(sample):
    """[start, stop) of the single supervised run of a one-turn sample."""
    positions = sample["supervised"].nonzero().flatten()
    start, stop = int(positions[0]), int(positions[-1]) + 1
    assert positions.numel() == stop - start, "supervision is not one contiguous span"
    return start, stop


def test_supervised_span_is_exactly_the_answer(clean, train, samples):
    tokenizer = train.tokenizer
    for row, sample in zip(clean.rows["train"], samples, strict=True):
        if row.kind != "ok":
            continue
        start, stop = answer_span(sample)
        ids = sample["input_ids"]
        expected = json.dumps(row.gt_parse, ensure_ascii=False) + "<|im_end|>"
        assert tokenizer.decode(ids[start:stop]) == expected
        assert tokenizer.decode(ids[:start]).endswith(THINK_HEADER)
        assert stop == ids.numel() - 1  # only the template's final newline follows
    # ensure_ascii=False: non-ASCII item names reach the model as text, not \u escapes.
    answers = [tokenizer.decode(s["input_ids"][s["supervised"]]) for s in samples]
    assert any("Crème Brûlée" in a for a in answers)
    assert not any("\\u00" in a for a in answers)


@pytest.mark.parametrize("mask_im_end", [False, True])
def test_labels_and_loss_mask_through_collate_bshd(train, samples, mask_im_end):
    tokenizer = train.tokenizer
    config = collate_config(tokenizer, BSHD, mask_im_end)
    sample = samples[0]
    ids, length = sample["input_ids"], sample["input_ids"].numel()
    batch = pack_or_pad_batch([sample], config)
    labels, loss_mask = batch["labels"][0], batch["loss_mask"][0]
    assert labels.shape == (SEQ,)
    assert torch.equal(labels[: length - 1], ids[1:])
    pad = torch.full((SEQ - length,), config.pad_token_id)
    assert torch.equal(batch["input_ids"][0, length:], pad)
    start, stop = answer_span(sample)
    # Position p predicts ids[p + 1]: the answer's tokens are predicted from p = start - 1 on,
    # up to the closing <|im_end|> (label at p = stop - 2), trained so that the model learns to
    # stop; --mask-im-end keeps it out of the loss like every other special token.
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert int(labels[stop - 2]) == im_end
    expected = torch.zeros(SEQ)
    expected[start - 1 : stop - 2 if mask_im_end else stop - 1] = 1.0
    assert torch.equal(loss_mask, expected)
    assert (im_end in config.ignored_label_ids) == mask_im_end
    special = torch.tensor(sorted(config.ignored_label_ids))
    assert not loss_mask[torch.isin(labels, special)].any()
    assert not loss_mask[length:].any() and batch["padding_mask"][0, length:].all()
    image_id = config.model_inputs.image_token_id
    assert int((ids == image_id).sum()) == int(sample["image_grid_thw"].prod()) // 4
    assert batch["vision"].pixel_values.dtype == torch.bfloat16


def test_collate_bshd_and_thd_on_a_batch(train, samples):
    config_bshd = collate_config(train.tokenizer, BSHD)
    config_thd = collate_config(train.tokenizer, THD)
    batch_samples = samples[:4]
    lengths = [s["input_ids"].numel() for s in batch_samples]
    answers = [int(s["supervised"].sum()) for s in batch_samples]
    patches = sum(int(s["image_grid_thw"].prod()) for s in batch_samples)

    bshd = pack_or_pad_batch(batch_samples, config_bshd)
    assert bshd["input_ids"].shape == (4, SEQ) and bshd["position_ids"].shape == (4, SEQ, 3)
    # Each answer of n tokens, its <|im_end|> included, gives n trained targets.
    assert bshd["loss_mask"].sum(1).tolist() == answers
    assert bshd["vision"].pixel_values.shape[0] == patches

    thd = pack_or_pad_batch(batch_samples, config_thd)
    assert thd["input_ids"].shape == (1, sum(lengths))
    assert thd["cu_seqlens"].tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert torch.equal(thd["input_ids"][0], torch.cat([s["input_ids"] for s in batch_samples]))
    unpadded = [row[:n] for row, n in zip(bshd["loss_mask"], lengths, strict=True)]
    assert torch.equal(thd["loss_mask"][0], torch.cat(unpadded))
    grids = torch.cat([s["image_grid_thw"] for s in batch_samples])
    assert torch.equal(thd["vision"].grid_thw, grids)


def test_multi_turn_marks_every_assistant_answer(train):
    first, second = '{"menu": {"nm": "ICE TEA"}}', "Two items, 50,000 in total."
    messages = train.messages(None, first)
    messages += [
        {"role": "user", "content": [{"type": "text", "text": "And the total?"}]},
        {"role": "assistant", "content": second},
    ]
    ids, supervised = train.encoder.encode(messages, [6])
    spans = train.encoder.spans.spans(ids.tolist())
    decode = train.tokenizer.decode
    assert [decode(ids[a:b]) for a, b in spans] == [first + "<|im_end|>", second + "<|im_end|>"]
    assert int(supervised.sum()) == sum(b - a for a, b in spans)
    # The earlier turn has no think block, the last one has the template's empty one.
    assert decode(ids[: spans[0][0]]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert decode(ids[: spans[1][0]]).endswith(THINK_HEADER)
    assert int((ids == image_token_id(train.tokenizer)).sum()) == 6


def test_span_finder_on_raw_ids(train):
    spans = AssistantSpans(train.tokenizer)
    encode = train.tokenizer.encode
    text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    text += "<|im_start|>user\nmore<|im_end|>\n" + THINK_HEADER + "B"  # cut before <|im_end|>
    ids = encode(text)
    found = spans.spans(ids)
    assert [train.tokenizer.decode(ids[a:b]) for a, b in found] == ["A<|im_end|>", "B"]
    assert found[-1][1] == len(ids)


def test_dynamic_resolution_keeps_aspect(clean, train, samples):
    image_id = image_token_id(train.tokenizer)
    tall, wide = clean.rows["train"][0].size, clean.rows["train"][1].size
    assert tall == (200, 600) and wide == (640, 180)
    for (width, height), sample in ((tall, samples[0]), (wide, samples[1])):
        h, w = smart_resize(height, width, 32, MIN_PIXELS, MAX_PIXELS)
        grid = sample["image_grid_thw"]
        assert grid.tolist() == [[1, h // 16, w // 16]]
        assert h * w <= MAX_PIXELS
        assert abs((h / w) / (height / width) - 1) < 0.2  # aspect kept, no square resize
        assert sample["pixel_values"].shape == (int(grid.prod()), 3 * 2 * 16 * 16)
        assert sample["pixel_values"].dtype == torch.bfloat16
        image_tokens = int((sample["input_ids"] == image_id).sum())
        assert image_tokens == int(grid.prod()) // 4
    (_, th, tw), (_, wh, ww) = samples[0]["image_grid_thw"][0], samples[1]["image_grid_thw"][0]
    assert th > tw and wh < ww


def test_sideways_photo_is_turned_upright(clean, train, samples):
    row = clean.rows["train"][SIDEWAYS_ROW]
    assert row.sideways and row.size == (180, 540)
    # The file holds the receipt on its side (wide), tagged to be shown turned clockwise.
    data = train._read(train.rows[SIDEWAYS_ROW])[0]["bytes"]
    stored = Image.open(io.BytesIO(data))
    assert stored.size == (540, 180) and stored.getexif()[EXIF_ORIENTATION] == 6
    # The model gets it upright (tall), as HF datasets and any image viewer show it.
    assert decode_image(data).size == (180, 540)
    h, w = smart_resize(540, 180, 32, MIN_PIXELS, MAX_PIXELS)
    assert samples[SIDEWAYS_ROW]["image_grid_thw"].tolist() == [[1, h // 16, w // 16]]
    assert h > w
    # Upright pixel for pixel (JPEG-close), not just the right size: the printed lines run across.
    upright = receipt_image(np.random.default_rng(3), 120, 200)
    turned = decode_image(encode_image(upright, "JPEG", sideways=True))
    difference = np.abs(np.asarray(turned, dtype=float) - np.asarray(upright, dtype=float))
    assert turned.size == upright.size and difference.mean() < 4


def test_epoch_statistics_are_exact(train, samples, clean, processors, caplog):
    assert train.epoch_tokens == sum(s["input_ids"].numel() for s in samples)
    assert train.epoch_supervised_tokens == sum(int(s["supervised"].sum()) for s in samples)
    assert train.long_rows == 1
    assert train.scan_seconds is not None and train.scan_seconds >= 0
    with caplog.at_level(logging.INFO, logger="data.cord_v2"):
        make_dataset(clean, processors, split="validation")
    assert "cord_v2 validation: 3 samples" in caplog.text and "supervised" in caplog.text
    assert re.search(r"every image decoded in \d+\.\d s", caplog.text)


def test_long_sample_is_end_truncated_and_counted_across_workers(clean, processors, caplog):
    dataset = make_dataset(clean, processors)
    roomy = make_dataset(clean, processors, seq_length=4096, scan=False)
    long_index = [row.kind for row in clean.rows["train"]].index("long")
    full, cut = roomy.load(long_index), dataset[long_index]
    assert full["input_ids"].numel() > SEQ
    assert cut["input_ids"].numel() == cut["supervised"].numel() == SEQ
    assert torch.equal(cut["input_ids"], full["input_ids"][:SEQ])
    assert torch.equal(cut["supervised"], full["supervised"][:SEQ])
    where = f"{clean.shards['train'][0]} row {long_index}"
    assert cut["load_notes"].truncated == ((where, full["input_ids"].numel(), SEQ),)
    assert "load_notes" not in dataset[0]
    # Loaded by two worker processes, counted in this one: one warning at the first
    # truncation, one summary when the epoch's samples are loaded.
    with caplog.at_level(logging.WARNING, logger="data.load_report"):
        report = one_epoch_through_workers(dataset)
    assert report.counts() == {"loaded": 8, "truncated": 1, "skipped": 0}
    assert f"{where} has {full['input_ids'].numel()} tokens; end-truncated to 512" in caplog.text
    assert "1 of 8 samples loaded on this rank so far were end-truncated" in caplog.text


def test_pad_id_falls_back_to_eos_then_raises(clean):
    tokenizer = AutoTokenizer.from_pretrained(clean.tokenizer_dir)
    assert pad_token_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokenizer.pad_token = None
    assert pad_token_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="neither pad_token nor eos_token"):
        pad_token_id(tokenizer)


def test_tokenizer_without_image_token_is_refused(clean, tmp_path):
    vocab = {symbol: i for i, symbol in enumerate(byte_symbols())}
    specials = [t for t in SPECIAL_TOKENS if t != "<|image_pad|>"]
    for token in specials:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = AutoTokenizer.from_pretrained(clean.tokenizer_dir).chat_template
    with pytest.raises(ValueError, match=r"no <\|image_pad\|> token"):
        image_token_id(tokenizer)
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(
        (clean.tokenizer_dir / "preprocessor_config.json").read_text()
    )
    with pytest.raises(ValueError, match=r"no <\|image_pad\|> token"):
        build_datasets(provider_args(clean, hf_tokenizer_path=str(tmp_path)))


def test_unreadable_rows_raise_naming_shard_and_row(bad, processors):
    shard = re.escape(str(bad.shards["train"][0]))
    # The construction scan reads ground truths and decodes images, so it fails first ...
    with pytest.raises(ValueError, match=rf"{shard} row 2: image cannot be decoded or resized"):
        make_dataset(bad, processors)
    # ... and without it every row fails when loaded.
    dataset = make_dataset(bad, processors, scan=False)
    for row, reason in (
        (2, "image cannot be decoded or resized"),
        (5, "ground_truth is not JSON"),
        (6, "ground_truth has no gt_parse object"),
        (8, "image cannot be decoded or resized"),
    ):
        with pytest.raises(ValueError, match=rf"{shard} row {row}: {reason}.*--skip-bad-samples"):
            dataset[row]


def test_skip_bad_samples_returns_next_good_row_and_counts_rows_once(bad, processors, caplog):
    with caplog.at_level(logging.INFO, logger="data.cord_v2"):
        dataset = make_dataset(bad, processors, skip_bad_samples=True)
    # The scan decodes every image, so it finds the cut PNG (whose header reads) too.
    assert sorted(dataset.bad_rows) == [2, 5, 6, 8]
    assert "4 unreadable rows will be skipped" in caplog.text
    reference = make_dataset(bad, processors, scan=False)
    shard = str(bad.shards["train"][0])
    for index, served, skipped in ((2, 3, [2]), (5, 7, [5, 6]), (8, 9, [8])):
        sample = dataset[index]
        assert torch.equal(sample["input_ids"], reference.load(served)["input_ids"])
        notes = sample["load_notes"]
        assert [where for where, _ in notes.skipped] == [f"{shard} row {r}" for r in skipped]
        assert notes.truncated == ()
    # Two epochs through two workers: 2 x 5 skip events, 4 distinct rows; the long row is
    # truncated once per epoch.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="data.load_report"):
        report = one_epoch_through_workers(dataset, epochs=2)
    assert report.counts() == {"loaded": 24, "truncated": 2, "skipped": 4}
    assert "4 distinct unreadable rows were skipped so far (12 samples loaded" in caplog.text
    assert f"first: {shard} row " in caplog.text


def test_shard_index_spans_several_files(tmp_path, train, processors):
    split = write_fixture(tmp_path, train_shards=3)
    dataset = make_dataset(split, processors, scan=False)
    assert len(dataset.shards) == 3 and len(dataset) == len(train)
    last = dataset.rows[-1]
    assert last.shard.endswith("train-00002-of-00003.parquet") and last.file_row == 2
    for index in (2, 6):
        assert torch.equal(dataset.load(index)["input_ids"], train.load(index)["input_ids"])


def test_missing_shards_name_the_directory(tmp_path):
    with pytest.raises(ValueError, match=rf"no validation shards in {re.escape(str(tmp_path))}"):
        find_shards(str(tmp_path), "validation")


def provider_args(fixture, **overrides):
    args = argparse.Namespace(
        dataset_path=str(fixture.root),
        hf_tokenizer_path=str(fixture.tokenizer_dir),
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        total_seq_length=SEQ,
        skip_bad_samples=False,
        seed=1234,
        micro_batch_size=2,
        data_parallel_size=1,
    )
    for name, value in overrides.items():
        setattr(args, name, value)
    return args


def test_provider_returns_splits_and_feeds_the_loader(clean):
    args = provider_args(clean)
    tokenizer = AutoTokenizer.from_pretrained(clean.tokenizer_dir)
    config = get_variant("proxy").with_token_ids(**special_token_ids(tokenizer))
    splits = build_datasets(args, config, (100, 10, 10))
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (8, 3, 3)
    assert splits.pad_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert set(tokenizer.all_special_ids) - {im_end} == splits.ignored_label_ids
    assert len(splits.ignored_label_ids) == len(SPECIAL_TOKENS) - 1
    masked = build_datasets(provider_args(clean, mask_im_end=True))
    assert masked.ignored_label_ids == splits.ignored_label_ids | {im_end}
    assert build_datasets(args).ignored_label_ids == splits.ignored_label_ids

    collate = CollateConfig(
        mode=THD,
        seq_length=SEQ,
        pad_token_id=splits.pad_token_id,
        model_inputs=SampleInputs.of(config),
        ignored_label_ids=splits.ignored_label_ids,
    )
    loader = build_loader(splits.train, collate, 0, 2, 0, 1, num_workers=0)
    batch = next(loader)
    assert batch["input_ids"].shape[0] == 1 and batch["vision"].grid_thw.shape == (2, 3)
    assert batch["loss_mask"].sum() > 0

    with pytest.raises(ValueError, match="image token id is 248056"):
        build_datasets(args, get_variant("proxy"), (1, 1, 1))


def test_dry_run_description_reads_rows_and_tokenizer(clean):
    args = argparse.Namespace(
        dataset_path=str(clean.root), hf_tokenizer_path=str(clean.tokenizer_dir)
    )
    released = get_variant("proxy")
    lines = describe_dataset(args, released)
    for line, split in zip(lines, ("train", "validation", "test"), strict=False):
        assert f"{len(clean.rows[split]):,} rows in {len(clean.shards[split])} shard(s)" in line
    tokenizer, _ = load_tokenizer_and_image_processor(str(clean.tokenizer_dir))
    image = image_token_id(tokenizer)
    assert (
        f"image token id {image} (the model was released with {released.image_token_id}"
        in (lines[-1])
    )
    matching = dataclasses.replace(released, image_token_id=image)
    assert f"image token id {image} (the model's)" in describe_dataset(args, matching)[-1]
