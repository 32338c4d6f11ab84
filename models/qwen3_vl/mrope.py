"""Qwen3-VL multimodal RoPE position ids, computed on the CPU in the data path for one sample.

`build_mrope_position_ids` reproduces HF `Qwen3VLModel.get_rope_index` (images, and videos split
per frame as the timestamped Qwen3-VL prompts lay them out); `mrope_position_delta` is the offset
HF caches to continue positions during generation.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
    run of video tokens (Qwen3-VL puts a timestamp and vision_start/end around every frame).
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


def mrope_position_delta(position_ids: Tensor) -> int:
    """HF's `mrope_position_deltas` entry for one sample's [3, L] positions: how far the next
    generated token's position (max + 1) is from its index L."""
    return int(position_ids.max()) + 1 - position_ids.shape[1]
