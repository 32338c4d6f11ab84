"""forward_step.partition_for_context_parallel on CPU: BSHD through megatron's zigzag split in
two real (gloo) CP ranks, every per-token tensor sliced the same way and the ranks together
holding each token once; THD applying one partition index to every tensor but the positions;
CP-local tensors and lengths CP cannot split refused. (TE's THD index itself needs the GPU:
tests/test_cp_thd_correctness.py.)"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import forward_step
from forward_step import TOKEN_KEYS, partition_for_context_parallel
from tests.gpu_harness import free_port

BATCH, SEQ = 2, 16


def full_batch(seq: int = SEQ) -> dict:
    """Per-token tensors whose values encode (sample, position), plus non-token entries."""
    token = torch.arange(BATCH * seq).view(BATCH, seq)
    return {
        "input_ids": token,
        "labels": token + 1000,
        "loss_mask": (token % 3 != 0).float(),
        "padding_mask": token % 5 == 0,
        "vision_rows": token - 7,
        "position_ids": torch.stack([token, token + 1, token + 2], dim=-1),  # [B, S, 3]
        "vision": None,
        "cu_seqlens_padded": None,
    }


def partition_on_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    local = partition_for_context_parallel(full_batch(), dist.group.WORLD)
    torch.save({key: local[key] for key in TOKEN_KEYS}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_bshd_zigzag_split_over_two_ranks(tmp_path):
    mp.spawn(partition_on_rank, args=(2, free_port(), str(tmp_path)), nprocs=2)
    full = full_batch()
    local = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    chunk = SEQ // 4  # 2 x CP chunks; rank r holds chunks r and 3 - r
    for rank, pieces in enumerate(local):
        for key in TOKEN_KEYS:
            expected = torch.cat(
                [
                    full[key][:, rank * chunk : (rank + 1) * chunk],
                    full[key][:, (3 - rank) * chunk : (4 - rank) * chunk],
                ],
                dim=1,
            )
            assert torch.equal(pieces[key], expected), (rank, key)
    held = torch.cat([pieces["input_ids"] for pieces in local], dim=1)
    assert torch.equal(held.sort(dim=1).values, full["input_ids"])  # each token exactly once


class FakeGroup:
    def __init__(self, size: int, rank: int) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def test_thd_applies_one_index_to_every_token_tensor(monkeypatch):
    batch = full_batch()
    batch.update({key: batch[key][:1] for key in TOKEN_KEYS})  # a pack is one row
    batch["cu_seqlens_padded"] = torch.tensor([0, 8, SEQ], dtype=torch.int32)
    index = torch.tensor([0, 1, 6, 7, 8, 9, 14, 15])
    calls = []

    def fake_index(cu_seqlens_padded, total, cp_size, cp_rank):
        calls.append((cu_seqlens_padded.tolist(), total, cp_size, cp_rank))
        return index

    monkeypatch.setattr(forward_step, "thd_partition_index", fake_index)
    local = partition_for_context_parallel(batch, FakeGroup(2, 1))
    assert calls == [([0, 8, SEQ], SEQ, 2, 1)]  # computed once, from the padded boundaries
    for key in TOKEN_KEYS:
        if key == "position_ids":  # megatron's THD RoPE picks this rank's angles itself
            assert local[key] is batch[key]
        else:
            assert torch.equal(local[key], batch[key][:, index]), key


def test_refuses_cp_local_tensors_and_unsplittable_lengths():
    batch = full_batch()
    batch["labels"] = batch["labels"][:, : SEQ // 2]
    with pytest.raises(RuntimeError, match="labels is already CP-local"):
        partition_for_context_parallel(batch, FakeGroup(2, 0))
    with pytest.raises(ValueError, match="not divisible by 2 x CP"):
        partition_for_context_parallel(full_batch(seq=12), FakeGroup(4, 0))
    unchanged = full_batch()
    assert partition_for_context_parallel(unchanged, FakeGroup(1, 0)) is unchanged
