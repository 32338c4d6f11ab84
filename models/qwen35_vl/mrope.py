"""Interleaved multimodal RoPE (MRoPE) for Qwen3.5-VL and Qwen3-VL.

`build_mrope_position_ids` runs on the CPU in the data path (once per sample, no GPU sync) and
reproduces HF `get_rope_index` (the same rule in both families; tests compare with each);
`InterleavedMRopeEmbedding` turns the [3, ...] position ids into the rotary angle tensor
megatron-core's attention applies (GPU, inside the model).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _grid_rows(grid_thw: Tensor | None, kind: str) -> list[list[int]]:
    if grid_thw is None:
        return []
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise ValueError(f"{kind}_grid_thw must have shape [num_{kind}s, 3], got {grid_thw.shape}")
    return grid_thw.tolist()


def build_mrope_position_ids(
    input_ids: Tensor,
    image_grid_thw: Tensor | None,
    image_token_id: int,
    spatial_merge_size: int,
    video_grid_thw: Tensor | None = None,
    video_token_id: int | None = None,
) -> Tensor:
    """3D (temporal, height, width) positions of one sample, shape [3, len(input_ids)], int64.

    Text advances the three axes together. A vision block starting at text position p gets
    t = p + frame, h = p + row, w = p + col on the merged grid, and the text after it resumes at
    p + max(rows, cols). Each run of image tokens consumes the next image grid and must hold
    t*h*w / merge**2 tokens. A video of grid [t, h, w] is t frames of [1, h, w], each its own
    run of video tokens (the Qwen-VL prompts put a timestamp and vision_start/end around every
    frame).
    """
    if input_ids.dim() != 1:
        raise ValueError(f"expected the 1-D token ids of one sample, got shape {input_ids.shape}")
    if video_grid_thw is not None and video_token_id is None:
        raise ValueError("video_grid_thw was given without video_token_id")
    grids: dict[int, list[list[int]]] = {image_token_id: _grid_rows(image_grid_thw, "image")}
    if video_token_id is not None:
        grids[video_token_id] = [
            [1, h, w] for t, h, w in _grid_rows(video_grid_thw, "video") for _ in range(t)
        ]
    used = dict.fromkeys(grids, 0)

    ids = input_ids.tolist()
    positions = torch.empty(3, len(ids), dtype=torch.long)
    next_position = 0
    start = 0
    while start < len(ids):
        token = ids[start]
        end = start + 1
        while end < len(ids) and ids[end] == token:
            end += 1
        if token not in grids:
            positions[:, start:end] = torch.arange(next_position, next_position + end - start)
            next_position += end - start
            start = end
            continue
        kind = "image" if token == image_token_id else "video frame"
        if used[token] == len(grids[token]):
            raise ValueError(
                f"sample has more {kind} placeholder runs than {kind} grids "
                f"({len(grids[token])}); every run of placeholder tokens needs one grid_thw row"
            )
        frames, height, width = grids[token][used[token]]
        used[token] += 1
        rows, cols = height // spatial_merge_size, width // spatial_merge_size
        if end - start != frames * rows * cols:
            raise ValueError(
                f"{kind} {used[token] - 1} has {end - start} placeholder tokens but its grid_thw "
                f"{[frames, height, width]} needs {frames * rows * cols} "
                f"(t*h*w/{spatial_merge_size}^2)"
            )
        block = positions[:, start:end].view(3, frames, rows, cols)
        block[0] = torch.arange(frames).view(frames, 1, 1) + next_position
        block[1] = torch.arange(rows).view(1, rows, 1) + next_position
        block[2] = torch.arange(cols).view(1, 1, cols) + next_position
        next_position += max(rows, cols)
        start = end
    for token, grid_list in grids.items():
        if used[token] != len(grid_list):
            kind = "image" if token == image_token_id else "video frame"
            raise ValueError(
                f"sample has {len(grid_list)} {kind} grids but only {used[token]} {kind} "
                "placeholder runs in its tokens"
            )
    return positions


def mrope_axis_per_frequency(mrope_section: tuple[int, int, int] | list[int]) -> Tensor:
    """Which position axis (0=t, 1=h, 2=w) drives each rotary frequency in the interleaved
    layout: frequency j uses h when j % 3 == 1 and j < 3*section[1], w when j % 3 == 2 and
    j < 3*section[2], t otherwise."""
    num_freqs = sum(mrope_section)
    axis = torch.zeros(num_freqs, dtype=torch.long)
    for dim in (1, 2):
        axis[dim : 3 * mrope_section[dim] : 3] = dim
    return axis


class InterleavedMRopeEmbedding(nn.Module):
    """Rotary angles for interleaved MRoPE in megatron-core's layout.

    Given position ids [3, B, S] (BSHD) or [3, T] (THD pack) returns angles shaped
    [S, B, 1, rotary_dim] (or [T, 1, 1, rotary_dim]): the first half holds position x inverse
    frequency, the second half repeats it (rotate-half convention), so megatron's
    `apply_rotary_pos_emb` rotates the first `rotary_dim` channels of each head.
    """

    def __init__(self, rotary_dim: int, rotary_base: float, mrope_section: list[int]) -> None:
        super().__init__()
        if 2 * sum(mrope_section) != rotary_dim:
            raise ValueError(
                f"mrope_section {mrope_section} does not cover rotary_dim {rotary_dim}"
            )
        # Plain attributes, not buffers: megatron's Float16Module casts buffers to bf16, and the
        # angles (position x frequency, positions up to 1e5+) must be formed in fp32.
        self.inv_freq = 1.0 / (
            rotary_base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim)
        )
        self.axis = mrope_axis_per_frequency(mrope_section)

    def forward(self, position_ids: Tensor) -> Tensor:
        if position_ids.dim() == 2:
            position_ids = position_ids.unsqueeze(1)
        if position_ids.dim() != 3 or position_ids.shape[0] != 3:
            raise ValueError(f"expected position ids [3, B, S] or [3, T], got {position_ids.shape}")
        if self.inv_freq.device != position_ids.device:
            self.inv_freq = self.inv_freq.to(position_ids.device)
            self.axis = self.axis.to(position_ids.device)
        # [3, B, S] -> pick each frequency's axis -> [F, B, S]
        selected = position_ids.index_select(0, self.axis).float()
        angles = selected.permute(2, 1, 0) * self.inv_freq  # [S, B, F]
        return torch.cat((angles, angles), dim=-1).unsqueeze(2)
