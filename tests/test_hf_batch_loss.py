"""scripts/hf_batch_loss.py rebuilds iteration 1's global batch through the real mock provider,
sampler and collate: the samples it pairs with each collated micro-batch are the ones in it, and
the labels / loss mask it scores are the collate's shifted ones. (The HF forward itself runs on
the GPU machine.)"""

from __future__ import annotations

import argparse

import pytest
import torch

from models import get_model_spec
from scripts.hf_batch_loss import first_global_batch


@pytest.mark.parametrize("model", ["qwen35_vl", "qwen3_vl"])
def test_first_global_batch_pairs_samples_with_their_micro_batches(model):
    config = get_model_spec(model).get_variant("proxy")
    args = argparse.Namespace(model=model, seq_len=1024, gbs=4, train_iters=20, seed=1234)
    pairs = first_global_batch(config, args)
    assert len(pairs) == 4
    seen = set()
    for sample, batch in pairs:
        ids = sample["input_ids"]
        assert torch.equal(batch["input_ids"][0, : ids.numel()], ids)
        assert not batch["padding_mask"][0, : ids.numel()].any()
        assert torch.equal(batch["labels"][0, : ids.numel() - 1], ids[1:])
        assert batch["loss_mask"][0].sum() > 0
        seen.add(tuple(ids.tolist()))
    assert len(seen) == 4  # four different samples, in the sampler's order
    again = first_global_batch(config, args)
    assert all(
        torch.equal(a[0]["input_ids"], b[0]["input_ids"]) for a, b in zip(pairs, again, strict=True)
    )
