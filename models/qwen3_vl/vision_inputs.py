"""What the collate asks of Qwen3-VL (`models.spec.ModelInputs`): Qwen3.5's vision-tower inputs
(the same tower, patch layout and position-embedding interpolation) with Qwen3-VL's MRoPE position
ids (its `get_rope_index`).
"""

from __future__ import annotations

from torch import Tensor

from models.qwen35_vl.vision_inputs import SampleInputs as Qwen35SampleInputs

from .mrope import build_mrope_position_ids


class SampleInputs(Qwen35SampleInputs):
    def positions(self, input_ids: Tensor, image_grid_thw: Tensor | None) -> Tensor:
        merge = self.vision.spatial_merge_size
        return build_mrope_position_ids(input_ids, image_grid_thw, self.image_token_id, merge)
