"""`Qwen35LanguageModel.losses_of_loss_tokens` on CPU, with a plain linear layer and cross entropy
standing in for megatron's output layer and loss: the output layer sees exactly the tokens whose
loss mask is nonzero, the losses and input gradients are those of projecting every token, and the
other tokens' losses are 0; without any loss token every token is projected, so the layer still
takes part in backward. tests/test_loss_token_output.py checks the real model on a GPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from models.qwen35_vl.model import Qwen35LanguageModel

SEQ, BATCH, HIDDEN, VOCAB = 7, 3, 16, 11


def stand_in_model(projection: torch.Tensor, projected_rows: list[int]) -> SimpleNamespace:
    """The two members the method uses: the output layer ([N, B, H] -> ([N, B, V], bias)) and
    megatron's per-token loss (labels [B, N], logits [N, B, V] -> losses [B, N])."""

    def output_layer(hidden: torch.Tensor, weight: torch.Tensor | None = None):
        projected_rows.append(hidden.shape[0] * hidden.shape[1])
        return hidden @ projection.t(), None

    def compute_language_model_loss(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        losses = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), labels.t().flatten(), reduction="none"
        )
        return losses.view(logits.shape[:2]).t().contiguous()  # as megatron returns them

    return SimpleNamespace(
        output_layer=output_layer, compute_language_model_loss=compute_language_model_loss
    )


def every_token_losses(hidden, labels, weight):
    logits = hidden @ weight.t()
    losses = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), labels.t().flatten(), reduction="none"
    )
    return losses.view(SEQ, BATCH).t()


@pytest.mark.parametrize("mask_kind", ["scattered", "none"])
def test_only_loss_tokens_reach_the_output_layer(mask_kind):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(SEQ, BATCH, HIDDEN, generator=generator, dtype=torch.float64)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    loss_mask = (torch.rand(BATCH, SEQ, generator=generator) < 0.4).double()
    if mask_kind == "none":
        loss_mask.zero_()
    assert 0 < loss_mask.sum() < loss_mask.numel() or mask_kind == "none"

    projected_rows: list[int] = []
    ours_input = hidden.clone().requires_grad_()
    losses = Qwen35LanguageModel.losses_of_loss_tokens(
        stand_in_model(weight, projected_rows), ours_input, labels, loss_mask, None
    )
    reference_input = hidden.clone().requires_grad_()
    reference = every_token_losses(reference_input, labels, weight)

    expected_rows = int(loss_mask.sum()) if mask_kind == "scattered" else SEQ * BATCH
    assert projected_rows == [expected_rows]
    assert losses.shape == (BATCH, SEQ) and losses.is_contiguous()
    torch.testing.assert_close(losses * loss_mask, reference * loss_mask, rtol=0, atol=1e-12)
    if mask_kind == "scattered":
        assert bool((losses[loss_mask == 0] == 0).all())
    (losses * loss_mask).sum().backward()
    (reference * loss_mask).sum().backward()
    torch.testing.assert_close(ours_input.grad, reference_input.grad, rtol=0, atol=1e-12)
