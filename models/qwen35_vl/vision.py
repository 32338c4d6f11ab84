"""Qwen3.5-VL vision tower on megatron-core: patch embedding, learned positions resampled to each
image's grid, 2D rotary positions, pre-norm ViT blocks (TE) with attention restricted to each
image through THD cu_seqlens, and the 2x2 patch merger with exact GELU. With a `PatchBudget` the
blocks run as CUDA graphs (megatron-core's per-layer graphs) on inputs padded to fixed shapes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.extensions.transformer_engine import (
    TEColumnParallelLinear,
    TENorm,
    TERowParallelLinear,
)
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.cuda_graphs import create_cudagraphs
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor, nn

from .configuration import VisionConfig
from .vision_inputs import VisionInputs


def vision_process_groups(pg_collection: ProcessGroupCollection) -> ProcessGroupCollection:
    """The language model's groups with a size-1 context-parallel group: every CP rank encodes
    all images of its micro-batch whole (images are never split across CP ranks)."""
    if pg_collection.cp.size() == 1:
        return pg_collection
    vision_pgs = copy.copy(pg_collection)
    vision_pgs.cp = _singleton_group()
    return vision_pgs


_SINGLETON_GROUP = None


def _singleton_group():
    global _SINGLETON_GROUP
    if _SINGLETON_GROUP is None:
        _SINGLETON_GROUP, _ = torch.distributed.new_subgroups(group_size=1)
    return _SINGLETON_GROUP


@dataclass(frozen=True)
class PatchBudget:
    """Fixed vision shapes per micro-batch, so that CUDA graphs captured once replay every step:
    `patches` rows, the real patches then zero rows, in `images` + 1 attention segments: one per
    image, the zero rows split evenly over the rest (so that their attention, which is thrown
    away, costs little)."""

    patches: int
    images: int

    def pad(self, hidden: Tensor, rotary: Tensor, cu_seqlens: Tensor) -> tuple[Tensor, ...]:
        """`hidden` [N, 1, H], `rotary` [N, 1, 1, D] and `cu_seqlens` [images + 1] padded to the
        budget: ([patches, 1, H], [patches, 1, 1, D], [self.images + 2])."""
        patches, images = hidden.shape[0], cu_seqlens.shape[0] - 1
        if patches > self.patches or images > self.images:
            raise ValueError(
                f"a micro-batch has {patches} image patches in {images} images, over the vision "
                f"CUDA graph budget of {self.patches} patches in {self.images} images: raise "
                "VISION_GRAPH_PATCHES / VISION_GRAPH_IMAGES (or set VISION_CUDA_GRAPH=0)"
            )
        padding = self.patches - patches
        hidden = torch.cat((hidden, hidden.new_zeros(padding, *hidden.shape[1:])))
        rotary = torch.cat((rotary, rotary.new_zeros(padding, *rotary.shape[1:])))
        segments = self.images + 1 - images
        # Built on the device from host integers: no copy the host would wait for.
        steps = torch.arange(1, segments + 1, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
        ends = (patches + steps * -(-padding // segments)).clamp_(max=self.patches)
        return hidden, rotary, torch.cat((cu_seqlens, ends))


class ReportGraphedGradients(torch.autograd.Function):
    """Identity on the blocks' input whose backward hands autograd a zero gradient, marked as
    already added, for each parameter of the graphed blocks. megatron-core's graph replay adds
    weight gradients into `main_grad` itself and returns none for the parameters, so DDP's
    per-parameter hooks (grad-ready counting under --overlap-grad-reduce) would never fire; the
    input's gradient is the blocks' last, so every weight gradient is in place by then."""

    @staticmethod
    def forward(ctx, hidden: Tensor, *parameters: Tensor) -> Tensor:
        ctx.parameters = parameters
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, ...]:
        zeros: dict[tuple, Tensor] = {}
        grads = []
        for parameter in ctx.parameters:
            parameter.grad_added_to_main_grad = True
            key = (parameter.shape, parameter.dtype)
            if key not in zeros:
                zeros[key] = parameter.new_zeros(()).expand(parameter.shape)
            grads.append(zeros[key])
        return grad, *grads


class PatchMerger(MegatronModule):
    """LayerNorm per patch, concatenate each 2x2 block, then fc1 -> exact GELU -> fc2. With
    `norm_after_merge` the LayerNorm spans the concatenated block instead (Qwen3-VL's DeepStack
    mergers, HF's `use_postshuffle_norm`)."""

    def __init__(
        self,
        config: TransformerConfig,
        vision: VisionConfig,
        tp_group,
        norm_after_merge: bool = False,
    ) -> None:
        super().__init__(config=config)
        self.merged_size = vision.hidden_size * vision.spatial_merge_size**2
        self.norm_after_merge = norm_after_merge
        norm_size = self.merged_size if norm_after_merge else vision.hidden_size
        self.norm = TENorm(config=config, hidden_size=norm_size, eps=1e-6)
        mlp_config = copy.copy(config)
        mlp_config.hidden_size = vision.out_hidden_size
        mlp_config.ffn_hidden_size = self.merged_size
        mlp_config.activation_func = F.gelu  # HF's merger uses nn.GELU(), approximate='none'
        mlp_config.gated_linear_unit = False
        mlp_config.bias_activation_fusion = False
        self.mlp = MLP(
            config=mlp_config,
            submodules=MLPSubmodules(
                linear_fc1=TEColumnParallelLinear, linear_fc2=TERowParallelLinear
            ),
            input_size=self.merged_size,
            tp_group=tp_group,
        )

    def forward(self, hidden_states: Tensor) -> Tensor:
        if self.norm_after_merge:
            merged = self.norm(hidden_states.reshape(-1, self.merged_size))
        else:
            merged = self.norm(hidden_states).reshape(-1, self.merged_size)
        output, bias = self.mlp(merged)
        return output if bias is None else output + bias


class VisionRotaryEmbedding(nn.Module):
    """2D rotary angles: each head's channels rotate by (row, col) frequencies, [N, 1, 1, D]."""

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        spatial_dim = head_dim // 2
        # A plain attribute (not a buffer) so that bf16 casts of the model leave it fp32.
        self.inv_freq = 1.0 / (
            theta ** (torch.arange(0, spatial_dim, 2, dtype=torch.float) / spatial_dim)
        )

    def forward(self, rotary_position_ids: Tensor) -> Tensor:
        if self.inv_freq.device != rotary_position_ids.device:
            self.inv_freq = self.inv_freq.to(rotary_position_ids.device)
        angles = rotary_position_ids[..., None].float() * self.inv_freq  # [N, 2, F]
        row_col = angles.flatten(1)  # [N, 2F]: row frequencies, then column frequencies
        return torch.cat((row_col, row_col), dim=-1)[:, None, None, :]


class Qwen35VisionEncoder(MegatronModule):
    """Encodes variable-resolution images into merged tokens of the language hidden size."""

    def __init__(
        self,
        config: TransformerConfig,
        vision: VisionConfig,
        layer_spec: ModuleSpec,
        pg_collection: ProcessGroupCollection,
        patch_budget: PatchBudget | None = None,
    ) -> None:
        super().__init__(config=config)
        if (config.cuda_graph_impl == "local") != (patch_budget is not None):
            raise ValueError(
                "the vision tower's CUDA graphs need both cuda_graph_impl='local' in its config "
                f"and a patch budget (got {config.cuda_graph_impl!r} and {patch_budget})"
            )
        self.vision = vision
        self.patch_budget = patch_budget
        patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        # A Conv3d whose kernel equals its stride is a linear map of each flattened patch.
        self.patch_embed = nn.Linear(patch_dim, vision.hidden_size, bias=True)
        self.pos_embed = nn.Embedding(vision.num_position_embeddings, vision.hidden_size)
        self.rotary = VisionRotaryEmbedding(vision.head_dim)
        self.pg_collection = vision_process_groups(pg_collection)
        self.blocks = TransformerBlock(
            config=config,
            spec=layer_spec,
            post_layer_norm=False,
            pre_process=True,
            post_process=True,
            pg_collection=self.pg_collection,
        )
        self.merger = PatchMerger(config, vision, tp_group=self.pg_collection.tp)

    def blocks_replay_graphs(self) -> bool:
        """Whether the blocks' CUDA graphs exist (from the second training step on: the first
        runs eagerly while megatron-core records what to capture)."""
        runners = [
            runner
            for layer in self.blocks.layers
            for runner in layer.cudagraph_manager.cudagraph_runners
        ]
        return bool(runners) and all(runner.cudagraph_created for runner in runners)

    def forward(self, inputs: VisionInputs) -> Tensor:
        """[num_patches, patch_dim] pixels -> [num_patches / merge**2, out_hidden_size]."""
        hidden, _ = self.encode(inputs)
        return self.merger(hidden)

    def encode(
        self, inputs: VisionInputs, block_outputs: tuple[int, ...] = ()
    ) -> tuple[Tensor, list[Tensor]]:
        """The last block's output [num_patches, hidden] and the outputs of the blocks whose
        (0-based) indexes `block_outputs` lists, in block order; all before merging."""
        weight = self.patch_embed.weight
        hidden = self.patch_embed(inputs.pixel_values.to(weight.dtype))
        # The fp32 interpolation weights promote the weighted sum to fp32, as in HF.
        positions = (self.pos_embed(inputs.interp_indices) * inputs.interp_weights[..., None]).sum(
            1
        )
        hidden = (hidden + positions.to(hidden.dtype)).unsqueeze(1)
        rotary = self.rotary(inputs.rotary_position_ids)
        cu_seqlens, max_seqlen = inputs.cu_seqlens, inputs.max_seqlen
        patches = hidden.shape[0]
        if self.patch_budget is not None:
            # Captures the graphs megatron recorded in the previous step (a no-op once made).
            create_cudagraphs()
            hidden, rotary, cu_seqlens = self.patch_budget.pad(hidden, rotary, cu_seqlens)
            max_seqlen = self.patch_budget.patches
            if torch.is_grad_enabled() and self.blocks_replay_graphs():
                hidden = ReportGraphedGradients.apply(hidden, *self.blocks.parameters())
        packed = PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu_seqlens,
            cu_seqlens_kv=cu_seqlens,
            max_seqlen_q=max_seqlen,
            max_seqlen_kv=max_seqlen,
        )
        output = self.blocks(
            hidden_states=hidden,
            attention_mask=None,
            rotary_pos_emb=rotary,
            packed_seq_params=packed,
            extract_layer_indices=set(block_outputs),
        )
        hidden, extracted = output if block_outputs else (output, [])
        return hidden[:patches, 0], [block[:patches, 0] for block in extracted]
