"""What the collate asks of Qwen3-VL (`models.spec.ModelInputs`): each sample's MRoPE position ids
(Qwen3-VL's `get_rope_index`) and a micro-batch's vision-tower inputs, which are Qwen3.5's (the
same tower, patch layout and position-embedding interpolation).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from models.qwen35_vl.vision_inputs import VisionInputs

from .configuration import Qwen3VLConfig, VisionConfig
from .mrope import build_mrope_position_ids


@dataclass(frozen=True)
class SampleInputs:
    image_token_id: int
    vision: VisionConfig

    @classmethod
    def of(cls, config: Qwen3VLConfig) -> SampleInputs:
        return cls(config.image_token_id, config.vision)

    def positions(self, input_ids: Tensor, image_grid_thw: Tensor | None) -> Tensor:
        merge = self.vision.spatial_merge_size
        return build_mrope_position_ids(input_ids, image_grid_thw, self.image_token_id, merge)

    def vision_inputs(self, pixel_values: Tensor, image_grid_thw: Tensor) -> VisionInputs:
        return VisionInputs.from_grids(pixel_values, image_grid_thw, self.vision)
