"""`model.place_vision_features` on CPU: image tokens take their rows of the vision features and
text tokens keep their embeddings; the features' gradient is each image token's gradient, bit
for bit what advanced indexing gives (text tokens all look up row 0, whose repeats add zeros)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from models.qwen35_vl.model import place_vision_features

CONFIG = SimpleNamespace(sequence_parallel=False, params_dtype=torch.bfloat16)


def test_features_and_their_gradients_equal_advanced_indexing():
    generator = torch.Generator().manual_seed(0)
    batch, seq, hidden, images = 2, 40, 8, 11
    rows = torch.full((batch, seq), -1)
    positions = torch.randperm(batch * seq, generator=generator)[:images]
    rows.view(-1)[positions] = torch.arange(images)
    features = torch.randn(images, hidden, generator=generator, dtype=torch.bfloat16)
    text = torch.randn(seq, batch, hidden, generator=generator, dtype=torch.bfloat16)
    upstream = torch.randn(seq, batch, hidden, generator=generator, dtype=torch.bfloat16)

    ours = features.clone().requires_grad_()
    placed = place_vision_features(ours, rows, text, CONFIG, tp_group=None)
    placed.backward(upstream)

    reference = features.clone().requires_grad_()
    gathered = reference[rows.transpose(0, 1).clamp(min=0)]
    expected = torch.where((rows.transpose(0, 1) >= 0).unsqueeze(-1), gathered, text)
    expected.backward(upstream)

    assert torch.equal(placed, expected)
    assert torch.equal(ours.grad, reference.grad)
    image_tokens = rows.transpose(0, 1) >= 0
    assert torch.equal(placed[image_tokens], features[rows.transpose(0, 1)[image_tokens]])
    assert torch.equal(placed[~image_tokens], text[~image_tokens])
