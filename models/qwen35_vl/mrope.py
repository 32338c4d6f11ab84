"""Interleaved multimodal RoPE (MRoPE) for Qwen3.5-VL.

`build_mrope_position_ids` runs on the CPU in the data path (once per sample, no GPU sync) and
reproduces HF `get_rope_index`; `InterleavedMRopeEmbedding` turns the [3, ...] position ids into
the rotary angle tensor megatron-core's attention applies (GPU, inside the model).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def build_mrope_position_ids(
    input_ids: Tensor,
    image_grid_thw: Tensor | None,
    image_token_id: int,
    spatial_merge_size: int,
    video_grid_thw: Tensor | None = None,
    video_token_id: int | None = None,
) -> Tensor:
    """3D (temporal, height, width) positions of one sample, shape [3, len(input_ids)].

    Text advances all three axes together; an image block at text position p gets
    t = p, h = p + row, w = p + col on the merged grid, and the text after it resumes at
    p + max(rows, cols). Each run of image (video) tokens consumes the next grid in order and
    must hold exactly t*h*w / merge**2 tokens. Videos are split per frame, as HF does.
    """
    if input_ids.dim() != 1:
        raise ValueError(f"expected the 1-D token ids of one sample, got shape {input_ids.shape}")
    ids = input_ids.tolist()
    grids = {
        image_token_id: [] if image_grid_thw is None else image_grid_thw.tolist(),
    }
    if video_token_id is not None:
        frames = []
        for t, h, w in [] if video_grid_thw is None else video_grid_thw.tolist():
            frames.extend([[1, h, w]] * t)
        grids[video_token_id] = frames
    used = dict.fromkeys(grids, 0)

    positions = torch.empty(3, len(ids), dtype=torch.long)
    current = 0
    i = 0
    while i < len(ids):
        token = ids[i]
        end = i + 1
        while end < len(ids) and ids[end] == token:
            end += 1
        if token not in grids:
            positions[:, i:end] = torch.arange(current, current + end - i)
            current += end - i
        else:
            kind = "image" if token == image_token_id else "video"
            if used[token] >= len(grids[token]):
                raise ValueError(
                    f"sample has more {kind} placeholder blocks than {kind} grids "
                    f"({len(grids[token])}); every <{kind}_pad> run needs one grid_thw row"
                )
            t, h, w = grids[token][used[token]]
            used[token] += 1
            rows, cols = h // spatial_merge_size, w // spatial_merge_size
            expected = t * rows * cols
            if end - i != expected:
                raise ValueError(
                    f"{kind} block {used[token] - 1} has {end - i} placeholder tokens but its "
                    f"grid_thw {[t, h, w]} needs {expected} (t*h*w/{spatial_merge_size}^2)"
                )
            frame = torch.arange(t).view(t, 1, 1).expand(t, rows, cols)
            row = torch.arange(rows).view(1, rows, 1).expand(t, rows, cols)
            col = torch.arange(cols).view(1, 1, cols).expand(t, rows, cols)
            positions[0, i:end] = frame.reshape(-1) + current
            positions[1, i:end] = row.reshape(-1) + current
            positions[2, i:end] = col.reshape(-1) + current
            current += max(rows, cols)
        i = end
    for token, grid_list in grids.items():
        if used[token] != len(grid_list):
            kind = "image" if token == image_token_id else "video"
            raise ValueError(
                f"sample has {len(grid_list)} {kind} grids but only {used[token]} {kind} "
                "placeholder blocks in its tokens"
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
