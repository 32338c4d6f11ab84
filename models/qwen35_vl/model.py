"""Qwen3.5-VL on megatron-core: the vision tower feeding a HybridModel language decoder (Gated
DeltaNet + gated attention, dense MLP or MoE, optional MTP) that rotates queries and keys with
interleaved MRoPE. `HybridModel` has no rotary hook, so `Qwen35LanguageModel` overrides forward.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.models.hybrid.hybrid_model import HybridModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.multi_token_prediction import process_mtp_loss
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from .configuration import Qwen35VLConfig
from .mrope import InterleavedMRopeEmbedding
from .specs import language_stack_spec, vision_layer_spec
from .vision import PatchBudget, Qwen35VisionEncoder, VisionInputs


def check_feature_count(features: Tensor, vision_inputs: VisionInputs) -> None:
    if features.shape[0] != vision_inputs.num_merged_tokens:
        raise ValueError(
            f"vision tower returned {features.shape[0]} features for "
            f"{vision_inputs.num_merged_tokens} image tokens"
        )


def place_vision_features(
    features: Tensor,
    vision_rows: Tensor,
    text: Tensor | float,
    config: TransformerConfig,
    tp_group: torch.distributed.ProcessGroup,
) -> Tensor:
    """[S, B, H] (this rank's sequence shard under sequence parallelism): each image token's
    row of `features`, `text` (embeddings, or a constant) elsewhere. `vision_rows` [B, S] holds
    per token its row in `features` (-1 for text)."""
    rows = vision_rows.transpose(0, 1)  # [S, B]
    if config.sequence_parallel and tp_group.size() > 1:
        # Each TP rank holds a contiguous sequence chunk; its rows take gradients only from its
        # tokens, so sum the feature gradients over TP in backward.
        chunk = rows.shape[0] // tp_group.size()
        rows = rows[tp_group.rank() * chunk : (tp_group.rank() + 1) * chunk]
        features = tensor_parallel.copy_to_tensor_model_parallel_region(features, group=tp_group)
    is_image = (rows >= 0).unsqueeze(-1)
    dtype = text.dtype if isinstance(text, Tensor) else config.params_dtype
    # Every text token gathers row 0; its (zero) gradient then returns to that one row. An
    # embedding lookup's backward sums such repeats in parallel, where advanced indexing's
    # serialises them (its backward kernel took 8.25 ms of a 9B-widths 8k-token step on an
    # H200, docs/results.md). Rows other than 0 are gathered once, and row 0's sum is its one
    # image token's gradient plus zeros: exact in any order.
    gathered = torch.nn.functional.embedding(rows.clamp(min=0), features).to(dtype)
    return torch.where(is_image, gathered, text)


class Qwen35LanguageModel(HybridModel):
    """HybridModel whose attention layers use interleaved MRoPE angles from 3D position ids."""

    def __init__(
        self,
        model_config: Qwen35VLConfig,
        config: TransformerConfig,
        pg_collection: ProcessGroupCollection,
        pre_process: bool = True,
        post_process: bool = True,
        parallel_output: bool = True,
        vp_stage: int | None = None,
    ) -> None:
        text = model_config.text
        super().__init__(
            config=config,
            hybrid_stack_spec=language_stack_spec(text.num_experts),
            vocab_size=text.vocab_size,
            max_sequence_length=text.max_position_embeddings,
            hybrid_layer_pattern=model_config.hybrid_layer_pattern(),
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=parallel_output,
            share_embeddings_and_output_weights=text.tie_word_embeddings,
            position_embedding_type="none",
            pg_collection=pg_collection,
            vp_stage=vp_stage,
        )
        self.mrope = InterleavedMRopeEmbedding(
            rotary_dim=text.rotary_dim,
            rotary_base=text.rope_theta,
            mrope_section=list(text.mrope_section),
        )

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        decoder_input: Tensor,
        labels: Tensor | None = None,
        loss_mask: Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Per-token losses [B, S] when `labels` is given (0 where `loss_mask` is 0, when it is
        given), else logits [B, S, V/TP].

        `decoder_input` is the embedded sequence with vision features already scattered in
        ([S, B, H], sequence-parallel sharded when SP is on). `position_ids` are the MRoPE ids:
        [3, B, S] CP-local for BSHD; [3, T] for the whole THD pack, because megatron-core's THD
        RoPE selects each CP rank's rows from full-length angles by `cu_seqlens_q_padded`.
        """
        rotary_pos_emb = self.mrope(position_ids)
        hidden_states = self.decoder(
            hidden_states=decoder_input,
            attention_mask=None,
            rotary_pos_emb=rotary_pos_emb,
            packed_seq_params=packed_seq_params,
            padding_mask=padding_mask,
        )
        output_weight = None
        if self.share_embeddings_and_output_weights:
            output_weight = self.shared_embedding_or_output_weight()

        if self.mtp_process:
            # MTP embeds the next tokens itself. The embedding has no position table, so the
            # position ids MTP rolls alongside the tokens are unused: the (CP-local) token ids
            # stand in for them, keeping their shape right under THD + CP.
            hidden_states = self.mtp(
                input_ids=input_ids,
                position_ids=input_ids,
                hidden_states=hidden_states,
                attention_mask=None,
                rotary_pos_emb=rotary_pos_emb,
                packed_seq_params=packed_seq_params,
                embedding=self.embedding,
            )
        if not self.post_process:
            return hidden_states
        if self.mtp_process:
            hidden_states = process_mtp_loss(
                hidden_states=hidden_states,
                labels=labels,
                loss_mask=loss_mask,
                output_layer=self.output_layer,
                output_weight=output_weight,
                runtime_gather_output=None,
                is_training=self.training,
                compute_language_model_loss=self.compute_language_model_loss,
                config=self.config,
                cp_group=self.pg_collection.cp,
                tp_group=self.tp_group,
                packed_seq_params=packed_seq_params,
                input_ids=input_ids,
            )
        if labels is not None and loss_mask is not None and not self.config.sequence_parallel:
            return self.losses_of_loss_tokens(hidden_states, labels, loss_mask, output_weight)
        logits, _ = self.output_layer(hidden_states, weight=output_weight)
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        return self.compute_language_model_loss(labels, logits)

    def losses_of_loss_tokens(
        self,
        hidden_states: Tensor,
        labels: Tensor,
        loss_mask: Tensor,
        output_weight: Tensor | None,
    ) -> Tensor:
        """Per-token losses [B, S] with the output layer and cross entropy run only on the
        tokens whose loss mask is nonzero; the others get 0, which the masked loss sum ignores.

        The vocabulary projection is the step's largest GEMM, and a prompt's, image's or
        padding's tokens take no loss, so their logits are never needed. Selecting the rows
        costs one host synchronisation (their count). Sequence parallelism keeps the full
        projection: its output layer gathers equal sequence shards from every TP rank.
        """
        seq_length, batch_size = hidden_states.shape[:2]
        rows = loss_mask.transpose(0, 1).reshape(-1).nonzero().squeeze(1)  # into [S * B]
        if rows.numel() == 0:  # the output layer must still take part in backward
            logits, _ = self.output_layer(hidden_states, weight=output_weight)
            return self.compute_language_model_loss(labels, logits)
        selected = hidden_states.reshape(seq_length * batch_size, 1, -1).index_select(0, rows)
        logits, _ = self.output_layer(selected, weight=output_weight)
        selected_labels = labels.transpose(0, 1).reshape(1, -1).index_select(1, rows)
        losses = self.compute_language_model_loss(selected_labels, logits).view(-1)
        every_token = losses.new_zeros(seq_length * batch_size).index_copy(0, rows, losses)
        return every_token.view(seq_length, batch_size).transpose(0, 1).contiguous()


class Qwen35VLModel(MegatronModule):
    """Vision tower + language decoder. Image features replace the embeddings of image tokens."""

    # The two halves, as classes so that a model family sharing this structure can subclass.
    vision_encoder_class: type[Qwen35VisionEncoder] = Qwen35VisionEncoder
    language_model_class: type[Qwen35LanguageModel] = Qwen35LanguageModel

    def __init__(
        self,
        model_config: Qwen35VLConfig,
        language_config: TransformerConfig,
        vision_config: TransformerConfig,
        pg_collection: ProcessGroupCollection,
        pre_process: bool = True,
        post_process: bool = True,
        parallel_output: bool = True,
        vp_stage: int | None = None,
        vision_patch_budget: PatchBudget | None = None,
    ) -> None:
        super().__init__(config=language_config)
        self.model_config = model_config
        self.pg_collection = pg_collection
        self.pre_process = pre_process
        self.vision = (
            self.vision_encoder_class(
                vision_config,
                model_config.vision,
                vision_layer_spec(),
                pg_collection,
                patch_budget=vision_patch_budget,
            )
            if pre_process
            else None
        )
        self.language_model = self.language_model_class(
            model_config,
            language_config,
            pg_collection,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=parallel_output,
            vp_stage=vp_stage,
        )

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def embed(
        self, input_ids: Tensor, vision_inputs: VisionInputs | None, vision_rows: Tensor | None
    ) -> Tensor:
        """Token embeddings [S, B, H] (SP-sharded under sequence parallelism) with the vision
        features of image tokens scattered in. `vision_rows` [B, S] holds, per token, its row in
        the micro-batch's vision features (-1 for text); under CP it is already CP-local."""
        embeddings = self.language_model.embedding(input_ids=input_ids, position_ids=None)
        if vision_inputs is None:
            return embeddings
        features = self.vision(vision_inputs)
        check_feature_count(features, vision_inputs)
        return place_vision_features(
            features, vision_rows, embeddings, self.config, self.pg_collection.tp
        )

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        vision_inputs: VisionInputs | None = None,
        vision_rows: Tensor | None = None,
        labels: Tensor | None = None,
        loss_mask: Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        decoder_input = (
            self.embed(input_ids, vision_inputs, vision_rows) if self.pre_process else None
        )
        if padding_mask is not None and self.config.sequence_parallel:
            # MoE layers see SP-sharded tokens; shard their padding mask the same way.
            padding_mask = tensor_parallel.scatter_to_sequence_parallel_region(
                padding_mask.transpose(0, 1).contiguous(), group=self.pg_collection.tp
            ).transpose(0, 1)
        return self.language_model(
            input_ids=input_ids,
            position_ids=position_ids,
            decoder_input=decoder_input,
            labels=labels,
            loss_mask=loss_mask,
            packed_seq_params=packed_seq_params,
            padding_mask=padding_mask,
        )
