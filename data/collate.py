"""Batch assembly for VLM samples: BSHD (pad every sample to the sequence length) or THD (pack the
micro-batch into one row with cu_seqlens). Labels are shifted here, once; the model's position ids
and vision inputs (its spec's `ModelInputs`) and the vision-feature row of every image token are
computed here too, on the CPU, so the training step needs no host synchronisation to build them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from models.spec import ModelInputs

from .load_report import LoadNotes

BSHD = "bshd"
THD = "thd"


@dataclass(frozen=True)
class CollateConfig:
    """How samples become a micro-batch.

    `seq_length` is the longest sample allowed (BSHD pads every sample to it). In THD mode each
    sample is padded to a multiple of `pad_multiple` (2 x CP x TP, as TE's THD context
    parallelism and sequence parallelism need) and the micro-batch becomes one packed row.
    `ignored_label_ids` are token ids never trained as targets (special tokens, pad, image).
    `model_inputs` gives the model's image token, position ids and vision inputs.
    """

    mode: str
    seq_length: int
    pad_token_id: int
    model_inputs: ModelInputs
    pad_multiple: int = 1
    ignored_label_ids: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if self.mode not in (BSHD, THD):
            raise ValueError(f"collate mode must be '{BSHD}' or '{THD}', got {self.mode!r}")
        if self.mode == BSHD and self.seq_length % self.pad_multiple:
            raise ValueError(
                f"--total-seq-length {self.seq_length} must be a multiple of {self.pad_multiple} "
                "(2 x context-parallel x tensor-parallel size) for BSHD batches"
            )


def shifted_labels_and_mask(
    input_ids: Tensor, supervised: Tensor, ignored_label_ids: frozenset[int]
) -> tuple[Tensor, Tensor]:
    """Next-token labels of one sample and their loss mask.

    `labels[i] = input_ids[i + 1]`; the mask is the supervision flag of that next token (the flag
    shifted together with the labels), off for the last position and wherever the label is an
    ignored id. The last label is a copy of the last token and always masked.
    """
    labels = torch.cat([input_ids[1:], input_ids[-1:]])
    mask = torch.cat([supervised[1:], supervised.new_zeros(1)]).clone()
    if ignored_label_ids:
        ignored = torch.tensor(sorted(ignored_label_ids), dtype=labels.dtype)
        mask &= ~torch.isin(labels, ignored)
    return labels, mask


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def pack_or_pad_batch(samples: Sequence[dict[str, Any]], config: CollateConfig) -> dict[str, Any]:
    """Collate samples with keys `input_ids` [L], `supervised` [L] bool and, when the sample has
    images, `pixel_values` [patches, C*T*P*P] and `image_grid_thw` [images, 3].

    Returns per-token tensors shaped [B, S] (BSHD) or [1, T] (THD): `input_ids`, `labels`,
    `loss_mask` (float), `padding_mask` (True on padding), `vision_rows` (row of each image
    token in the micro-batch's vision features, -1 elsewhere), `position_ids` [B, S, rows] (the
    model's, e.g. MRoPE t/h/w; every packed sequence restarts at 0); THD adds `cu_seqlens`,
    `cu_seqlens_padded` (int32) and `max_seqlen`; `vision` holds the model's vision inputs (or
    None without images). The
    `load_notes` of the samples (`LoadNotes`), when any has some, travel on merged under the
    same key, for the loader to count in the main process.
    """
    if not samples:
        raise ValueError("cannot collate an empty micro-batch")
    inputs, image_token_id = config.model_inputs, config.model_inputs.image_token_id
    rows, pixel_values, grids = [], [], []
    vision_row_offset = 0
    for index, sample in enumerate(samples):
        ids = sample["input_ids"]
        length = ids.numel()
        if length > config.seq_length:
            raise ValueError(
                f"sample {index} has {length} tokens but --total-seq-length is "
                f"{config.seq_length}; raise --total-seq-length or truncate the sample"
            )
        grid = sample.get("image_grid_thw")
        positions = inputs.positions(ids, grid)
        labels, loss_mask = shifted_labels_and_mask(
            ids, sample["supervised"].bool(), config.ignored_label_ids
        )
        is_image = ids == image_token_id
        vision_rows = torch.full_like(ids, -1)
        num_image_tokens = int(is_image.sum())
        vision_rows[is_image] = torch.arange(num_image_tokens) + vision_row_offset
        vision_row_offset += num_image_tokens
        if grid is not None and len(grid):
            pixel_values.append(sample["pixel_values"])
            grids.append(grid)
        padded = (
            config.seq_length if config.mode == BSHD else _round_up(length, config.pad_multiple)
        )
        rows.append(_pad_sample(ids, labels, loss_mask, positions, vision_rows, padded, config))

    batch = _stack(rows) if config.mode == BSHD else _pack(rows)
    batch["vision"] = None
    if grids:
        grid_thw = torch.cat(grids).long()
        batch["vision"] = inputs.vision_inputs(torch.cat(pixel_values), grid_thw)
    notes = LoadNotes.merge(sample["load_notes"] for sample in samples if "load_notes" in sample)
    if notes:
        batch["load_notes"] = notes
    return batch


def _pad_sample(ids, labels, loss_mask, positions, vision_rows, padded_length, config):
    length = ids.numel()
    pad = padded_length - length
    # Padding continues the text positions; it sits after each sequence's last token, so causal
    # attention and the recurrent layers never let it influence real tokens.
    pad_positions = positions.max() + 1 + torch.arange(pad)
    return {
        "input_ids": torch.cat([ids, ids.new_full((pad,), config.pad_token_id)]),
        "labels": torch.cat([labels, labels.new_full((pad,), config.pad_token_id)]),
        "loss_mask": torch.cat([loss_mask.float(), torch.zeros(pad)]),
        "padding_mask": torch.cat(
            [torch.zeros(length, dtype=torch.bool), torch.ones(pad, dtype=torch.bool)]
        ),
        "vision_rows": torch.cat([vision_rows, vision_rows.new_full((pad,), -1)]),
        "position_ids": torch.cat(
            [positions, pad_positions.expand(positions.shape[0], pad)], dim=1
        ).T,
        "length": length,
    }


# Tensors with one entry per token, laid out [B, S] ([B, S, rows] for positions) / [1, T] for THD.
TOKEN_KEYS = ("input_ids", "labels", "loss_mask", "padding_mask", "vision_rows", "position_ids")


def _stack(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {key: torch.stack([row[key] for row in rows]) for key in TOKEN_KEYS}


def _pack(rows: list[dict[str, Any]]) -> dict[str, Any]:
    batch = {key: torch.cat([row[key] for row in rows]).unsqueeze(0) for key in TOKEN_KEYS}
    lengths = torch.tensor([row["length"] for row in rows])
    padded = torch.tensor([row["input_ids"].numel() for row in rows])
    batch["cu_seqlens"] = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    batch["cu_seqlens_padded"] = torch.nn.functional.pad(padded.cumsum(0), (1, 0)).to(torch.int32)
    batch["max_seqlen"] = int(padded.max())
    return batch
