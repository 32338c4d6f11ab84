"""Qwen3-VL on megatron-core: Qwen3.5's model structure (vision tower, HybridModel decoder with
interleaved MRoPE) with standard attention (q/k RMSNorm, rotary over the whole head), dense MLP or
routed experts, and DeepStack: mergers reading early vision blocks, whose features are added at
the image tokens to the outputs of the first decoder layers (through forward hooks on those
layers: HybridStack has no per-layer hook).
"""

from __future__ import annotations

from functools import partial

from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor, nn

from models.qwen35_vl.model import (
    Qwen35LanguageModel,
    Qwen35VLModel,
    check_feature_count,
    place_vision_features,
)
from models.qwen35_vl.vision import PatchMerger, Qwen35VisionEncoder, VisionInputs

from .configuration import Qwen3VLConfig


class Qwen3VLVisionEncoder(Qwen35VisionEncoder):
    """Qwen3.5's tower plus one merger per DeepStack level, each reading one block's output and
    normalising the merged 2x2 block (HF's `deepstack_merger_list`)."""

    def __init__(self, config: TransformerConfig, vision, *args, **kwargs) -> None:
        super().__init__(config, vision, *args, **kwargs)
        self.deepstack_mergers = nn.ModuleList(
            PatchMerger(config, vision, tp_group=self.pg_collection.tp, norm_after_merge=True)
            for _ in vision.deepstack_visual_indexes
        )

    def forward(self, inputs: VisionInputs) -> tuple[Tensor, list[Tensor]]:
        """Merged image features [tokens, out_hidden_size] and one tensor of that shape per
        DeepStack level."""
        hidden, levels = self.encode(inputs, self.vision.deepstack_visual_indexes)
        deepstack = [
            merger(level) for merger, level in zip(self.deepstack_mergers, levels, strict=True)
        ]
        return self.merger(hidden), deepstack


class Qwen3VLLanguageModel(Qwen35LanguageModel):
    """The decoder with DeepStack: the output of HF decoder layer k (megatron's MLP layer 2k + 1)
    gets `deepstack_inputs[k]` ([S, B, H], zero at text tokens) added, as HF's
    `_deepstack_process` adds the k-th level at the image tokens."""

    def __init__(self, model_config: Qwen3VLConfig, *args, **kwargs) -> None:
        super().__init__(model_config, *args, **kwargs)
        self.deepstack_inputs: list[Tensor] = []
        for level in range(len(model_config.vision.deepstack_visual_indexes)):
            layer = self.decoder.layers[2 * level + 1]
            layer.register_forward_hook(partial(self._add_deepstack_level, level))

    def _add_deepstack_level(self, level: int, module: nn.Module, args, output):
        if level >= len(self.deepstack_inputs):
            return output
        addition = self.deepstack_inputs[level]
        if isinstance(output, tuple):
            return (output[0] + addition, *output[1:])
        return output + addition


class Qwen3VLModel(Qwen35VLModel):
    """Qwen3.5-VL's vision-language model with the DeepStack tower and decoder."""

    vision_encoder_class = Qwen3VLVisionEncoder
    language_model_class = Qwen3VLLanguageModel

    def embed(
        self, input_ids: Tensor, vision_inputs: VisionInputs | None, vision_rows: Tensor | None
    ) -> Tensor:
        """Token embeddings [S, B, H] with the image features scattered in; the DeepStack levels,
        laid out the same way, go to the decoder for this forward."""
        embeddings = self.language_model.embedding(input_ids=input_ids, position_ids=None)
        if vision_inputs is None:
            return embeddings
        features, levels = self.vision(vision_inputs)
        check_feature_count(features, vision_inputs)
        place = partial(
            place_vision_features,
            vision_rows=vision_rows,
            config=self.config,
            tp_group=self.pg_collection.tp,
        )
        self.language_model.deepstack_inputs = [place(level, text=0.0) for level in levels]
        return place(features, text=embeddings)

    def forward(self, *args, **kwargs) -> Tensor:
        try:
            return super().forward(*args, **kwargs)
        finally:
            self.language_model.deepstack_inputs = []
