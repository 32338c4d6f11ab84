"""Model inputs built in the data path: a micro-batch's vision inputs (pixel patches plus the
metadata the vision tower needs: attention boundaries, rotary and learned-position indices) and
each sample's MRoPE position ids, computed once on the CPU so the training step does no host
synchronisation for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.vision_utils import (
    get_vision_cu_seqlens,
    get_vision_interpolation_indices_and_weights,
    get_vision_position_ids,
)

from .configuration import Qwen35VLConfig, VisionConfig
from .mrope import build_mrope_position_ids


@dataclass
class VisionInputs:
    """Per-batch vision metadata, computed once on the CPU in the data path.

    `pixel_values`: [num_patches, C * T * P * P]; `grid_thw`: [num_images, 3] patch grids;
    `cu_seqlens`: per-frame attention boundaries (longest: `max_seqlen`); `num_merged_tokens`: the
    image tokens these images fill; `rotary_position_ids`: [num_patches, 2] (row,
    col) in merge-block order; `interp_indices` / `interp_weights`: [num_patches, 4] bilinear
    taps into the learned position table.
    """

    pixel_values: Tensor
    grid_thw: Tensor
    cu_seqlens: Tensor
    max_seqlen: int
    num_merged_tokens: int
    rotary_position_ids: Tensor
    interp_indices: Tensor
    interp_weights: Tensor

    @classmethod
    def from_grids(cls, pixel_values: Tensor, grid_thw: Tensor, config: VisionConfig):
        """Precompute the metadata for `grid_thw` (call on the CPU)."""
        cu_seqlens = get_vision_cu_seqlens(grid_thw)
        indices, weights = get_vision_interpolation_indices_and_weights(
            grid_thw,
            num_grid_per_side=int(config.num_position_embeddings**0.5),
            mode="bilinear",
            align_corners=True,
            spatial_merge_size=config.spatial_merge_size,
        )
        return cls(
            pixel_values=pixel_values,
            grid_thw=grid_thw,
            cu_seqlens=cu_seqlens,
            max_seqlen=int((cu_seqlens[1:] - cu_seqlens[:-1]).max()),
            num_merged_tokens=int(grid_thw.prod(-1).sum()) // config.spatial_merge_size**2,
            rotary_position_ids=get_vision_position_ids(grid_thw, config.spatial_merge_size),
            interp_indices=indices,
            interp_weights=weights,
        )

    def to(self, device: torch.device | str, non_blocking: bool = True) -> VisionInputs:
        moved = {
            name: value.to(device, non_blocking=non_blocking)
            if isinstance(value, Tensor)
            else value
            for name, value in vars(self).items()
        }
        return VisionInputs(**moved)


@dataclass(frozen=True)
class SampleInputs:
    """What the collate asks of Qwen3.5-VL (`models.spec.ModelInputs`): a sample's MRoPE position
    ids [3, L] and a micro-batch's `VisionInputs`."""

    image_token_id: int
    vision: VisionConfig

    @classmethod
    def of(cls, config: Qwen35VLConfig) -> SampleInputs:
        return cls(config.image_token_id, config.vision)

    def positions(self, input_ids: Tensor, image_grid_thw: Tensor | None) -> Tensor:
        merge = self.vision.spatial_merge_size
        return build_mrope_position_ids(input_ids, image_grid_thw, self.image_token_id, merge)

    def vision_inputs(self, pixel_values: Tensor, image_grid_thw: Tensor) -> VisionInputs:
        return VisionInputs.from_grids(pixel_values, image_grid_thw, self.vision)
