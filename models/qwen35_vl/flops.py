"""FLOPs model for Qwen3.5-VL training steps (the spec's `training_flops`; the benchmark's split).

Counts matmul FLOPs only, a multiply-add being 2 FLOPs; norms, activations, rotary, softmax,
gates, the embedding lookup and the losses are not counted. A step is described by the lengths of
its causal, independent text sequences (THD packs: `cu_seqlens.diff()`, or `cu_seqlens_padded`
to count the padding the GPU also runs; BSHD: `[seq_length] * batch_size`) and the patch grids of
its images (`vision.grid_thw`); concatenate the lists of every micro-batch and data-parallel rank
for a whole step. Image placeholder tokens are part of the text lengths. Below T is the number of
text tokens (sum of the lengths s), h the hidden size, V the vocabulary.

Training FLOPs = 3 x forward FLOPs for every part (backward = 2 x forward: the gradients of the
inputs and of the weights), the usual MFU convention: recomputation is not counted, and neither
is the input gradient that the first layer (patch embedding) does not actually need.

Forward FLOPs per part (L_full / L_lin = full attention / Gated DeltaNet layers):

- attention_projections, per full attention layer (H heads, H_kv key/value heads, head dim d):
  q with its output gate 2*T*h*(2*H*d), k and v 2*T*h*(H_kv*d) each, o 2*T*(H*d)*h.
- attention_scores, per full attention layer and sequence: QK^T and PV over the causal half,
  2 * 2 * (s*(s+1)/2) * H * d.
- gdn_projections, per Gated DeltaNet layer (key/value heads H_k/H_v with dims d_k/d_v,
  key_dim = H_k*d_k, value_dim = H_v*d_v, conv_dim = 2*key_dim + value_dim): in_proj_qkv
  2*T*h*conv_dim, in_proj_z 2*T*h*value_dim, in_proj_b and in_proj_a 2*T*h*H_v each,
  out_proj 2*T*value_dim*h.
- gdn_conv, per Gated DeltaNet layer: depthwise causal conv of kernel K, 2*T*K*conv_dim.
- gdn_delta_rule, per Gated DeltaNet layer: the chunked gated delta rule (chunk C = 64, as fla's
  `chunk_gated_delta_rule`) runs on H_v heads (q and k heads repeated to the value heads). Per
  token and head it counts the eight matmuls of the chunked algorithm:
  WY transform: A = beta*K K^T in the chunk 2*C*d_k, w = A (beta*exp(g)*K) 2*C*d_k,
  u = A (beta*V) 2*C*d_v; state pass: w S 2*d_k*d_v, state update S += K^T (u - w S) 2*d_k*d_v;
  output: inter-chunk readout q S 2*d_k*d_v, intra-chunk QK^T 2*C*d_k and its product with the
  new values 2*C*d_v. Total 6*d_k*d_v + 6*C*d_k + 4*C*d_v per token per head, i.e.
  T * H_v * (6*d_k*d_v + 6*C*d_k + 4*C*d_v). Not counted: the triangular inverse of the C x C
  matrix (about C^2/3 multiply-adds per token and head) and the masked remainder of a sequence's
  last, partial chunk (every token is charged a full chunk of C).
- mlp, per layer of a dense model: gated MLP, 3 * 2*T*h*ffn.
- moe_router / moe_routed_experts / moe_shared_expert, per layer of an MoE model (E experts,
  top-k routing): router 2*T*h*E; routed experts top_k * 3 * 2*T*h*moe_ffn (active experts only,
  no capacity padding); shared expert 3 * 2*T*h*shared_ffn plus its sigmoid gate 2*T*h.
- lm_head: 2*T*h*V (also when the embeddings are tied).
- mtp, per multi-token-prediction depth (`text.mtp_num_hidden_layers`, when include_mtp): eh_proj
  2*T*(2h)*h, one full attention layer (projections + scores as above), one dense MLP or MoE layer
  as above, and its own LM head 2*T*h*V.
- vision, per image with patch grid (t, gh, gw), N = t*gh*gw patches, width h_v, MLP width f_v,
  patch volume p = in_channels*temporal_patch_size*patch_size^2, merge size m:
  vision_patch_embed 2*N*p*h_v; vision_layers, per block: qkv 2*N*h_v*(3*h_v), proj 2*N*h_v*h_v,
  fc1 2*N*h_v*f_v, fc2 2*N*f_v*h_v; vision_attention, per block: bidirectional attention within
  each frame (`get_vision_cu_seqlens`: gh*gw patches, t frames; for an image t = 1 and this is
  N^2), QK^T and PV t * 2 * 2 * (gh*gw)^2 * h_v; vision_merger: fc1 on the N/m^2 merged tokens
  2*(N/m^2)*(m^2*h_v)*(m^2*h_v), fc2 2*(N/m^2)*(m^2*h_v)*out_hidden_size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from .configuration import FULL_ATTENTION, Qwen35VLConfig, TextConfig

GDN_CHUNK_SIZE = 64
TRAINING_MULTIPLIER = 3  # forward + backward (2 x forward)


@dataclass(frozen=True)
class FlopsBreakdown:
    """Training FLOPs (forward + backward) of one step, per part; see the module docstring."""

    attention_projections: float = 0.0
    attention_scores: float = 0.0
    gdn_projections: float = 0.0
    gdn_conv: float = 0.0
    gdn_delta_rule: float = 0.0
    mlp: float = 0.0
    moe_router: float = 0.0
    moe_routed_experts: float = 0.0
    moe_shared_expert: float = 0.0
    lm_head: float = 0.0
    mtp: float = 0.0
    vision_patch_embed: float = 0.0
    vision_layers: float = 0.0
    vision_attention: float = 0.0
    vision_merger: float = 0.0

    @property
    def total(self) -> float:
        return sum(dataclasses.astuple(self))

    def as_dict(self) -> dict[str, float]:
        """Every part plus `total`."""
        return {**dataclasses.asdict(self), "total": self.total}


def _attention_projections(t: TextConfig, tokens: int) -> int:
    h = t.hidden_size
    q_width = t.num_attention_heads * t.head_dim
    kv_width = t.num_key_value_heads * t.head_dim
    q_with_gate = 2 * tokens * h * (2 * q_width)
    return q_with_gate + 2 * (2 * tokens * h * kv_width) + 2 * tokens * q_width * h


def _attention_scores(t: TextConfig, sequence_lengths: Sequence[int]) -> int:
    causal_pairs = sum(s * (s + 1) // 2 for s in sequence_lengths)
    return 2 * 2 * causal_pairs * t.num_attention_heads * t.head_dim


def _gdn_dims(t: TextConfig) -> tuple[int, int, int]:
    key_dim = t.linear_num_key_heads * t.linear_key_head_dim
    value_dim = t.linear_num_value_heads * t.linear_value_head_dim
    return key_dim, value_dim, 2 * key_dim + value_dim


def _gdn_projections(t: TextConfig, tokens: int) -> int:
    _, value_dim, conv_dim = _gdn_dims(t)
    h = t.hidden_size
    in_proj = 2 * tokens * h * (conv_dim + value_dim + 2 * t.linear_num_value_heads)
    return in_proj + 2 * tokens * value_dim * h


def _gdn_delta_rule(t: TextConfig, tokens: int) -> int:
    d_k, d_v, c = t.linear_key_head_dim, t.linear_value_head_dim, GDN_CHUNK_SIZE
    per_token_head = 6 * d_k * d_v + 6 * c * d_k + 4 * c * d_v
    return tokens * t.linear_num_value_heads * per_token_head


def _mlp_parts(t: TextConfig, tokens: int) -> dict[str, int]:
    """Forward FLOPs of one MLP or MoE layer, by part."""
    h = t.hidden_size
    if not t.is_moe:
        return {"mlp": 3 * 2 * tokens * h * t.intermediate_size}
    return {
        "moe_router": 2 * tokens * h * t.num_experts,
        "moe_routed_experts": t.num_experts_per_tok * 3 * 2 * tokens * h * t.moe_intermediate_size,
        "moe_shared_expert": 3 * 2 * tokens * h * t.shared_expert_intermediate_size
        + 2 * tokens * h,
    }


def _vision_parts(config: Qwen35VLConfig, grids: Sequence[tuple[int, int, int]]) -> dict[str, int]:
    """Forward FLOPs of the vision tower on `grids`, by part."""
    v = config.vision
    hv, merged = v.hidden_size, v.hidden_size * v.spatial_merge_size**2
    patch_volume = v.in_channels * v.temporal_patch_size * v.patch_size**2
    patches = sum(frames * rows * cols for frames, rows, cols in grids)
    frame_pairs = sum(frames * (rows * cols) ** 2 for frames, rows, cols in grids)
    qkv_proj = 2 * patches * hv * (3 * hv) + 2 * patches * hv * hv
    mlp = 2 * (2 * patches * hv * v.intermediate_size)
    merged_tokens = patches // v.spatial_merge_size**2
    return {
        "vision_patch_embed": 2 * patches * patch_volume * hv,
        "vision_layers": v.depth * (qkv_proj + mlp),
        "vision_attention": v.depth * 2 * 2 * frame_pairs * hv,
        "vision_merger": 2 * merged_tokens * merged * merged
        + 2 * merged_tokens * merged * v.out_hidden_size,
    }


def training_flops(
    config: Qwen35VLConfig,
    sequence_lengths: list[int],
    image_grids: list[tuple[int, int, int]],
    include_mtp: bool = True,
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
    t = config.text
    tokens = sum(sequence_lengths)
    h = t.hidden_size
    n_full = sum(1 for layer in t.layer_types if layer == FULL_ATTENTION)
    n_linear = t.num_hidden_layers - n_full
    _, _, conv_dim = _gdn_dims(t)

    attention_projections = _attention_projections(t, tokens)
    attention_scores = _attention_scores(t, sequence_lengths)
    mlp_parts = _mlp_parts(t, tokens)
    lm_head = 2 * tokens * h * t.vocab_size
    forward: dict[str, int] = {
        "attention_projections": n_full * attention_projections,
        "attention_scores": n_full * attention_scores,
        "gdn_projections": n_linear * _gdn_projections(t, tokens),
        "gdn_conv": n_linear * 2 * tokens * t.linear_conv_kernel_dim * conv_dim,
        "gdn_delta_rule": n_linear * _gdn_delta_rule(t, tokens),
        **{name: t.num_hidden_layers * flops for name, flops in mlp_parts.items()},
        "lm_head": lm_head,
        **_vision_parts(config, image_grids),
    }
    if include_mtp:
        eh_proj = 2 * tokens * (2 * h) * h
        mtp_depth = (
            eh_proj + attention_projections + attention_scores + sum(mlp_parts.values()) + lm_head
        )
        forward["mtp"] = t.mtp_num_hidden_layers * mtp_depth
    return FlopsBreakdown(
        **{name: float(TRAINING_MULTIPLIER * flops) for name, flops in forward.items()}
    )
