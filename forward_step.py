"""One training step's data handling for megatron's `pretrain()`: move the collated micro-batch to
the GPU, give each context-parallel rank its share of every per-token tensor (zigzag for BSHD, TE's
THD partition from the padded cu_seqlens for packed batches), run the model and reduce the loss
per token (sum of losses and number of tokens, normalised by megatron across micro-batches and
data / context-parallel ranks).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from torch import Tensor

from data.collate import TOKEN_KEYS


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Copy tensors (and the VisionInputs) to `device`; the loader pins host memory."""
    return {
        key: value.to(device, non_blocking=True) if callable(getattr(value, "to", None)) else value
        for key, value in batch.items()
    }


def thd_partition_index(cu_seqlens_padded: Tensor, total: int, cp_size: int, cp_rank: int):
    """This rank's token indices of a THD pack: TE's partition, which splits every (padded)
    sequence into 2 x CP chunks and gives rank r chunks r and 2CP-1-r."""
    import transformer_engine_torch as tex

    return tex.thd_get_partitioned_indices(cu_seqlens_padded, total, cp_size, cp_rank)


def partition_for_context_parallel(batch: dict[str, Any], cp_group) -> dict[str, Any]:
    """Slice every per-token tensor of a full-length batch to this CP rank (exactly once).

    THD: one index from `cu_seqlens_padded` is applied to tokens, labels, loss mask, padding
    mask and vision rows; MRoPE positions stay full-length because megatron-core's THD RoPE
    picks each rank's angles with the same partition. BSHD: megatron's zigzag split of
    `get_batch_on_this_cp_rank`, positions included.
    """
    cp_size = cp_group.size() if cp_group is not None else 1
    if cp_size == 1:
        return batch
    full_length = batch["input_ids"].shape[1]
    for key in TOKEN_KEYS:
        if batch[key].shape[1] != full_length:
            raise RuntimeError(
                f"{key} is already CP-local ({batch[key].shape}); refusing to re-slice"
            )
    out = dict(batch)
    if batch.get("cu_seqlens_padded") is not None:
        index = thd_partition_index(
            batch["cu_seqlens_padded"], full_length, cp_size, cp_group.rank()
        )
        for key in TOKEN_KEYS:
            if key != "position_ids":
                out[key] = batch[key].index_select(1, index)
        return out
    if full_length % (2 * cp_size):
        raise ValueError(
            f"sequence length {full_length} is not divisible by 2 x CP ({2 * cp_size}); "
            "change --total-seq-length or --context-parallel-size"
        )
    from megatron.core.utils import get_batch_on_this_cp_rank

    local = get_batch_on_this_cp_rank(
        {key: batch[key] for key in TOKEN_KEYS} | {"cu_seqlens": None},
        is_hybrid_cp=False,
        cp_group=cp_group,
    )
    out.update({key: local[key] for key in TOKEN_KEYS})
    return out


def packed_seq_params(batch: dict[str, Any]) -> PackedSeqParams | None:
    """THD metadata from the padded boundaries (TE's `cu_seqlens_*_padded` convention), which
    drive the CP split, the Gated DeltaNet segments and RoPE. Attention also uses them: each
    sequence's padding sits after its last token, so causal attention never lets real tokens
    see it, while a padded row with no keys at all would give TE undefined gradients."""
    if batch.get("cu_seqlens_padded") is None:
        return None
    cu_seqlens = batch["cu_seqlens_padded"]
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        cu_seqlens_q_padded=cu_seqlens,
        cu_seqlens_kv_padded=cu_seqlens,
        max_seqlen_q=batch["max_seqlen"],
        max_seqlen_kv=batch["max_seqlen"],
    )


def model_position_ids(position_ids: Tensor, packed: bool) -> Tensor:
    """[B, S, 3] -> [3, B, S]; a THD pack [1, T, 3] -> [3, T]."""
    position_ids = position_ids.permute(2, 0, 1)
    return position_ids[:, 0] if packed else position_ids


def run_model(model, batch: dict[str, Any], with_labels: bool = True) -> Tensor:
    """The model on a device batch (already CP-partitioned): per-token losses, or logits
    without labels."""
    packed = packed_seq_params(batch)
    return model(
        input_ids=batch["input_ids"],
        position_ids=model_position_ids(batch["position_ids"], packed is not None),
        vision_inputs=batch["vision"],
        vision_rows=batch["vision_rows"],
        labels=batch["labels"] if with_labels else None,
        loss_mask=batch["loss_mask"] if with_labels else None,
        packed_seq_params=packed,
        padding_mask=batch["padding_mask"],
    )


def get_batch(data_iterator, cp_group) -> dict[str, Any]:
    """Next micro-batch on this GPU, partitioned for context parallelism."""
    batch = to_device(next(data_iterator), torch.device("cuda", torch.cuda.current_device()))
    return partition_for_context_parallel(batch, cp_group)


def loss_func(loss_mask: Tensor, output_tensor: Tensor):
    """Per-token loss in megatron's `--calculate-per-token-loss` convention: (sum of masked
    token losses, number of loss tokens, {"lm loss": [sum, count]})."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.cat([loss_sum.detach().view(1), num_tokens.view(1).float()])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    """megatron's forward-step signature: returns the per-token losses and the loss function."""
    from megatron.core import parallel_state
    from megatron.training import get_timers

    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    batch = get_batch(data_iterator, parallel_state.get_context_parallel_group())
    timers("batch-generator").stop()
    return run_model(model, batch), partial(loss_func, batch["loss_mask"])
