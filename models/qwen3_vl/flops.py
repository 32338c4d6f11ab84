"""FLOPs model for Qwen3-VL training steps (`training_flops`; the dense and MoE models).

Counts matmul FLOPs only, a multiply-add being 2 FLOPs; norms (the q/k RMSNorms, the vision
LayerNorms), activations, rotary, softmax, the router's top-k, biases, the DeepStack additions,
the embedding lookups (text tokens and the vision position grid) and the losses are not counted.
A step is described by the lengths of its causal, independent text sequences (THD packs:
`cu_seqlens.diff()`, or `cu_seqlens_padded` to count the padding the GPU also runs; BSHD:
`[seq_length] * batch_size`) and the patch grids of its images (`vision.grid_thw`); concatenate
the lists of every micro-batch and data-parallel rank for a whole step. Image placeholder tokens
are part of the text lengths. Below T is the number of text tokens (sum of the lengths s), h the
hidden size, V the vocabulary, L the number of decoder layers, of which L_moe are sparse
(`TextConfig.sparse_layers`: layer i is sparse when (i + 1) % decoder_sparse_step == 0 and i is
not in mlp_only_layers) and L_dense = L - L_moe have the dense MLP (every layer of a dense model).

Training FLOPs = 3 x forward FLOPs for every part (backward = 2 x forward: the gradients of the
inputs and of the weights), the usual MFU convention: recomputation is not counted, and neither
is the input gradient that the first layer (patch embedding) does not actually need.

Forward FLOPs per part:

- attention_projections, per layer (H heads, H_kv key/value heads, head dim d; no output gate):
  q 2*T*h*(H*d), k and v 2*T*h*(H_kv*d) each, o 2*T*(H*d)*h.
- attention_scores, per layer and sequence: QK^T and PV over the causal half,
  2 * 2 * (s*(s+1)/2) * H * d.
- mlp, per dense layer (width ffn = intermediate_size): SwiGLU gate, up and down,
  3 * 2*T*h*ffn.
- moe_router, per sparse layer (E experts): 2*T*h*E.
- moe_routed_experts, per sparse layer (top-k routing, expert width moe_ffn; no shared expert):
  top_k * 3 * 2*T*h*moe_ffn (active experts only, no capacity padding).
- lm_head: 2*T*h*V (also when the embeddings are tied).
- vision, per image with patch grid (t, gh, gw), N = t*gh*gw patches, width h_v, MLP width f_v,
  patch volume p = in_channels*temporal_patch_size*patch_size^2, merge size m, merged width
  M = m^2*h_v, N/m^2 merged tokens, output width h_out = out_hidden_size, D = the number of
  `deepstack_visual_indexes`:
  vision_patch_embed (the Conv3d as a linear) 2*N*p*h_v;
  vision_layers, per block: qkv 2*N*h_v*(3*h_v), proj 2*N*h_v*h_v, fc1 2*N*h_v*f_v,
  fc2 2*N*f_v*h_v;
  vision_attention, per block: bidirectional attention within each frame (HF's
  `get_vision_cu_seqlens`: t frames of gh*gw patches; for an image t = 1 and this is N^2), QK^T
  and PV t * 2 * 2 * (gh*gw)^2 * h_v;
  vision_merger (LayerNorm on each patch before the spatial merge, then the two linears on the
  merged tokens): fc1 2*(N/m^2)*M*M, fc2 2*(N/m^2)*M*h_out;
  vision_deepstack_mergers, D of them, each the same matmuls as the final merger (its LayerNorm,
  `use_postshuffle_norm`, runs on the merged vectors instead, which changes no matmul):
  D * (2*(N/m^2)*M*M + 2*(N/m^2)*M*h_out).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from .configuration import Qwen3VLConfig, TextConfig

TRAINING_MULTIPLIER = 3  # forward + backward (2 x forward)


@dataclass(frozen=True)
class FlopsBreakdown:
    """Training FLOPs (forward + backward) of one step, per part; see the module docstring."""

    attention_projections: float = 0.0
    attention_scores: float = 0.0
    mlp: float = 0.0
    moe_router: float = 0.0
    moe_routed_experts: float = 0.0
    lm_head: float = 0.0
    vision_patch_embed: float = 0.0
    vision_layers: float = 0.0
    vision_attention: float = 0.0
    vision_merger: float = 0.0
    vision_deepstack_mergers: float = 0.0

    @property
    def total(self) -> float:
        return sum(dataclasses.astuple(self))

    def as_dict(self) -> dict[str, float]:
        """Every part plus `total`."""
        return {**dataclasses.asdict(self), "total": self.total}


def _attention_projections(t: TextConfig, tokens: int) -> int:
    """Forward FLOPs of one layer's q, k, v and o projections."""
    h = t.hidden_size
    q_width = t.num_attention_heads * t.head_dim
    kv_width = t.num_key_value_heads * t.head_dim
    return 2 * tokens * h * q_width + 2 * (2 * tokens * h * kv_width) + 2 * tokens * q_width * h


def _attention_scores(t: TextConfig, sequence_lengths: Sequence[int]) -> int:
    """Forward FLOPs of one layer's causal QK^T and PV over every sequence."""
    causal_pairs = sum(s * (s + 1) // 2 for s in sequence_lengths)
    return 2 * 2 * causal_pairs * t.num_attention_heads * t.head_dim


def _text_parts(t: TextConfig, sequence_lengths: Sequence[int]) -> dict[str, int]:
    """Forward FLOPs of the language model on `sequence_lengths`, by part."""
    tokens = sum(sequence_lengths)
    h = t.hidden_size
    num_sparse = sum(t.sparse_layers)
    num_dense = t.num_hidden_layers - num_sparse
    routed = t.num_experts_per_tok * 3 * 2 * tokens * h * t.moe_intermediate_size
    return {
        "attention_projections": t.num_hidden_layers * _attention_projections(t, tokens),
        "attention_scores": t.num_hidden_layers * _attention_scores(t, sequence_lengths),
        "mlp": num_dense * 3 * 2 * tokens * h * t.intermediate_size,
        "moe_router": num_sparse * 2 * tokens * h * t.num_experts,
        "moe_routed_experts": num_sparse * routed,
        "lm_head": 2 * tokens * h * t.vocab_size,
    }


def _vision_parts(config: Qwen3VLConfig, grids: Sequence[tuple[int, int, int]]) -> dict[str, int]:
    """Forward FLOPs of the vision tower on `grids`, by part."""
    v = config.vision
    hv, merged = v.hidden_size, v.hidden_size * v.spatial_merge_size**2
    patch_volume = v.in_channels * v.temporal_patch_size * v.patch_size**2
    patches = sum(frames * rows * cols for frames, rows, cols in grids)
    frame_pairs = sum(frames * (rows * cols) ** 2 for frames, rows, cols in grids)
    qkv_proj = 2 * patches * hv * (3 * hv) + 2 * patches * hv * hv
    mlp = 2 * (2 * patches * hv * v.intermediate_size)
    merged_tokens = patches // v.spatial_merge_size**2
    merger = 2 * merged_tokens * merged * merged + 2 * merged_tokens * merged * v.out_hidden_size
    return {
        "vision_patch_embed": 2 * patches * patch_volume * hv,
        "vision_layers": v.depth * (qkv_proj + mlp),
        "vision_attention": v.depth * 2 * 2 * frame_pairs * hv,
        "vision_merger": merger,
        "vision_deepstack_mergers": len(v.deepstack_visual_indexes) * merger,
    }


def training_flops(
    config: Qwen3VLConfig,
    sequence_lengths: list[int],
    image_grids: list[tuple[int, int, int]],
) -> FlopsBreakdown:
    """Training FLOPs of one step on the given causal sequences and image patch grids."""
    if any(s < 0 for s in sequence_lengths):
        raise ValueError(f"sequence lengths must be non-negative, got {sequence_lengths}")
    merge = config.vision.spatial_merge_size
    for grid in image_grids:
        frames, rows, cols = grid
        if frames <= 0 or rows <= 0 or cols <= 0 or rows % merge or cols % merge:
            raise ValueError(
                f"image grid {tuple(grid)} must be positive (t, h, w) patches with h and w "
                f"multiples of the spatial merge size {merge}"
            )
    forward = {
        **_text_parts(config.text, sequence_lengths),
        **_vision_parts(config, image_grids),
    }
    return FlopsBreakdown(
        **{name: float(TRAINING_MULTIPLIER * flops) for name, flops in forward.items()}
    )
