"""data/load_report.py and the loader's use of it: notes that samples carry out of DataLoader
workers are counted in the main process, skipped rows once each however often they are skipped,
truncations per sample loaded, with the first truncation and a summary every epoch logged.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from data.load_report import LoadNotes, LoadReport
from data.loader import build_loader
from tests.test_loader import COLLATE  # the same two-token BSHD collate

SAMPLES = 12


class Noted(Dataset):
    """Text-only sample i; samples 3 and 4 report skipping row 2, sample 7 a truncation. The
    dataset's own counters stay in whichever process loaded the sample."""

    label = "noted"

    def __init__(self) -> None:
        self.loaded = 0

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> dict:
        self.loaded += 1
        sample = {
            "input_ids": torch.tensor([index, index]),
            "supervised": torch.ones(2, dtype=bool),
        }
        if index in (3, 4):
            sample["load_notes"] = LoadNotes(skipped=(("shard row 2", "bad image"),))
        if index == 7:
            sample["load_notes"] = LoadNotes(truncated=(("shard row 7", 9000, 4096),))
        return sample


def test_workers_notes_are_counted_in_the_main_process():
    dataset, messages = Noted(), []
    report = LoadReport("noted", every=SAMPLES // 2, log=messages.append)
    loader = build_loader(dataset, COLLATE, 0, 2, 0, 1, num_workers=2, report=report)
    for _ in range(2 * SAMPLES // 2):  # two epochs of 2-sample micro-batches
        assert "load_notes" not in next(loader)
    assert dataset.loaded == 0  # this process's copy loaded nothing: the workers did
    assert report.counts() == {"loaded": 24, "truncated": 2, "skipped": 1}
    assert messages[0] == (
        "noted: shard row 7 has 9000 tokens; end-truncated to 4096 (--total-seq-length); further "
        "truncations are counted and reported every 6 samples"
    )
    summaries = [m for m in messages if "distinct unreadable rows" in m]
    assert len(summaries) == 4  # every 6 of the 24 samples, once row 2 was seen
    assert summaries[-1] == (
        "noted: 1 distinct unreadable rows were skipped so far (24 samples loaded on this rank; "
        "first: shard row 2: bad image)"
    )
    assert "noted: 2 of 24 samples loaded on this rank so far were end-truncated" in messages[-2]


def test_default_report_is_named_after_the_dataset_and_reports_each_epoch(caplog):
    loader = build_loader(Noted(), COLLATE, 0, 1, 0, 1, num_workers=0)
    with caplog.at_level("WARNING", logger="data.load_report"):
        for _ in range(SAMPLES - 1):
            next(loader)
        assert "so far" not in caplog.text
        next(loader)  # the epoch's last sample
    assert "noted: 1 of 12 samples loaded on this rank so far were end-truncated" in caplog.text
    assert "noted: 1 distinct unreadable rows were skipped so far (12 samples" in caplog.text


def test_notes_merge_and_are_false_when_empty():
    assert not LoadNotes()
    merged = LoadNotes.merge(
        [LoadNotes(skipped=(("a", "x"),)), LoadNotes(), LoadNotes(truncated=(("b", 5, 4),))]
    )
    assert merged == LoadNotes(truncated=(("b", 5, 4),), skipped=(("a", "x"),))
