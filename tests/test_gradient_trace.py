"""The GPU tests' non-finite gradient trace (`tests/gpu_harness.NonFiniteGradientTrace`) on CPU:
a module whose backward turns its gradient into NaN is named at the boundary it reports."""

from __future__ import annotations

import torch

from tests.gpu_harness import NonFiniteGradientTrace


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
