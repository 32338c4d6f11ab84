"""data/loader.py: the samples of a global step do not depend on the data-parallel size, a loader
started at `consumed_samples` continues where an uninterrupted one would be, and epochs cycle.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from data.collate import BSHD, CollateConfig
from data.loader import build_loader
from models.qwen35_vl.configuration import get_variant
from models.qwen35_vl.vision_inputs import SampleInputs

SAMPLES = 40


class Numbered(Dataset):
    """Text-only sample i: tokens [i, i]."""

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor([index, index]), "supervised": torch.ones(2, dtype=bool)}


COLLATE = CollateConfig(
    mode=BSHD,
    seq_length=2,
    pad_token_id=0,
    model_inputs=SampleInputs(10**6, get_variant("proxy").vision),
)


def global_steps(dp: int, steps: int, consumed: int = 0, micro: int = 1, gbs: int = 8):
    """Sample ids of each global step, gathered over all DP ranks."""
    loaders = [build_loader(Numbered(), COLLATE, consumed, micro, r, dp, 0) for r in range(dp)]
    per_rank = gbs // (micro * dp)
    result = []
    for _ in range(steps):
        ids = set()
        for loader in loaders:
            for _ in range(per_rank):
                ids.update(next(loader)["input_ids"][:, 0].tolist())
        result.append(sorted(ids))
    return result


def test_global_batch_is_the_same_for_every_dp_size():
    reference = global_steps(dp=1, steps=3)
    assert all(len(step) == 8 for step in reference)
    assert global_steps(dp=2, steps=3) == reference
    assert global_steps(dp=4, steps=3, micro=2) == reference


def test_resume_from_consumed_samples_continues_the_sequence():
    uninterrupted = global_steps(dp=2, steps=3)
    assert global_steps(dp=2, steps=2, consumed=8) == uninterrupted[1:]


def test_epochs_cycle_with_a_new_order():
    steps = global_steps(dp=1, steps=10)  # two epochs of 5 steps
    first, second = steps[:5], steps[5:]
    assert sorted(i for step in first for i in step) == list(range(SAMPLES))
    assert sorted(i for step in second for i in step) == list(range(SAMPLES))
    assert first != second
