"""The fp32 THD attention reference of the GPU tests (`gpu_harness.attention_reference_gradients`)
against attention written out by hand on CPU: per-sequence causal softmax, query head h reading
KV group h // (heads / groups), nothing crossing sequence boundaries."""

from __future__ import annotations

import itertools
import math

import torch

from tests.gpu_harness import attention_reference_gradients


def explicit_attention(q, k, v, bounds):
    """softmax(q k^T / sqrt(d) + causal mask) v, one sequence and one head at a time."""
    heads, groups, dim = q.shape[1], k.shape[1], q.shape[2]
    rows = []
    for start, end in itertools.pairwise(bounds):
        length = end - start
        future = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
        per_head = []
        for head in range(heads):
            group = head // (heads // groups)
            scores = q[start:end, head] @ k[start:end, group].T / math.sqrt(dim)
            weights = scores.masked_fill(future, float("-inf")).softmax(-1)
            per_head.append(weights @ v[start:end, group])
        rows.append(torch.stack(per_head, dim=1))
    return torch.cat(rows)


def test_reference_gradients_match_explicit_attention():
    torch.manual_seed(0)
    bounds = [0, 5, 12, 20]
    q, k, v = torch.randn(20, 4, 8), torch.randn(20, 2, 8), torch.randn(20, 2, 8)
    d_out = torch.randn(20, 4 * 8)
    gradients = attention_reference_gradients(q, k, v, d_out, bounds)

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    explicit_attention(*leaves, bounds).backward(d_out.view(20, 4, 8))
    for ours, expected in zip(gradients, (t.grad for t in leaves), strict=True):
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_sequences_do_not_see_each_other():
    torch.manual_seed(1)
    bounds = [0, 6, 10]
    q, k, v = torch.randn(10, 2, 4), torch.randn(10, 1, 4), torch.randn(10, 1, 4)
    d_out = torch.zeros(10, 2 * 4)
    d_out[6:] = torch.randn(4, 2 * 4)  # gradient only on the second sequence
    dq, dk, dv = attention_reference_gradients(q, k, v, d_out, bounds)
    assert torch.count_nonzero(dq[:6]) == torch.count_nonzero(dk[:6]) == 0
    assert torch.count_nonzero(dv[:6]) == 0
    assert torch.count_nonzero(dv[6:]) > 0
