"""The THD tests' diagnostics on CPU: the non-finite gradient trace
(`tests/gpu_harness.NonFiniteGradientTrace`) names a module whose backward turns its gradient into
NaN, and `tests/test_thd_backward.py`'s attention capture keeps packed calls (inputs and output
gradient) whose replay alone tells a broken attention backward from a sound one."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import torch

from tests.gpu_harness import NonFiniteGradientTrace
from tests.test_thd_backward import CoreAttentionCapture, replay_attention


class NaNInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, gradient):
        return torch.full_like(gradient, float("nan"))


class Faulty(torch.nn.Module):
    """Identity forward, NaN input gradient: a stand-in for a kernel with a broken backward."""

    def forward(self, x):
        return NaNInBackward.apply(x)


def model(faulty: bool) -> torch.nn.Sequential:
    torch.manual_seed(0)
    middle = Faulty() if faulty else torch.nn.Identity()
    return torch.nn.Sequential(
        torch.nn.Linear(4, 4), torch.nn.Tanh(), middle, torch.nn.Linear(4, 1)
    )


def test_boundary_names_the_faulty_module():
    net = model(faulty=True)
    trace = NonFiniteGradientTrace(net)
    net(torch.randn(3, 4)).sum().backward()
    report = trace.boundary()
    trace.remove()
    # Forward order: 0 Linear, 1 Tanh, 2 Faulty, 3 Linear. The faulty module's own output
    # gradient is finite; everything before it receives NaN.
    assert report == "last non-finite outputs: ['0', '1']; next finite: ['2', '3']"
    assert not torch.isfinite(net[0].weight.grad).all()
    assert torch.isfinite(net[3].weight.grad).all()


def test_all_finite_and_hooks_removed():
    net = model(faulty=False)
    trace = NonFiniteGradientTrace(net)
    net(torch.randn(3, 4)).sum().backward()
    assert trace.boundary() == "all module output gradients finite"
    trace.remove()
    calls_before = len(trace.names)
    net(torch.randn(3, 4)).sum().backward()
    assert len(trace.names) == calls_before


class PackedAttention(torch.nn.Module):
    """Causal attention over each sequence of a THD pack, called the way megatron calls its core
    attention; `nan_dv` plants a NaN value gradient, as a broken kernel would."""

    def __init__(self, nan_dv: bool = False) -> None:
        super().__init__()
        self.nan_dv = nan_dv

    def forward(self, q, k, v, attention_mask, attn_mask_type=None, packed_seq_params=None):
        if self.nan_dv:
            v = NaNInBackward.apply(v)
        bounds = [0, q.shape[0]]
        if packed_seq_params is not None:
            bounds = packed_seq_params.cu_seqlens_q_padded.tolist()
        repeat = q.shape[1] // k.shape[1]
        outputs = []
        for start, end in itertools.pairwise(bounds):
            qs, ks, vs = (
                t[start:end].repeat_interleave(r, dim=1).transpose(0, 1)
                for t, r in ((q, 1), (k, repeat), (v, repeat))
            )
            out = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
            outputs.append(out.transpose(0, 1))
        return torch.cat(outputs).flatten(1)


class Layer(torch.nn.Module):
    def __init__(self, nan_dv: bool) -> None:
        super().__init__()
        self.core_attention = PackedAttention(nan_dv)

    def forward(self, q, k, v, packed_seq_params):
        return self.core_attention(
            q, k, v, None, attn_mask_type="causal", packed_seq_params=packed_seq_params
        )


def captured_step(nan_dv: bool, packed: bool) -> CoreAttentionCapture:
    torch.manual_seed(2)
    layer = Layer(nan_dv)
    q, k, v = (torch.randn(12, h, 8, requires_grad=True) for h in (4, 2, 2))
    params = SimpleNamespace(cu_seqlens_q_padded=torch.tensor([0, 5, 12])) if packed else None
    capture = CoreAttentionCapture(layer)
    (layer(q, k, v, params) * torch.randn(12, 32)).sum().backward()
    capture.remove()
    return capture


def test_capture_keeps_packed_calls_only():
    assert captured_step(nan_dv=False, packed=False).calls == []
    (call,) = captured_step(nan_dv=False, packed=True).calls
    assert call["name"] == "core_attention"
    assert [t.shape for t in call["inputs"]] == [(12, 4, 8), (12, 2, 8), (12, 2, 8)]
    assert call["d_out"].shape == (12, 32)


def test_replay_tells_a_broken_attention_backward_from_a_sound_one():
    (sound,) = captured_step(nan_dv=False, packed=True).calls
    broken, summary = replay_attention(sound)
    assert not broken
    assert "inputs finite: True" in summary and "non-finite" not in summary
    (faulty,) = captured_step(nan_dv=True, packed=True).calls
    broken, summary = replay_attention(faulty)
    assert broken
    assert "dv 192 non-finite" in summary and "dq rel" in summary
