"""grouped_gemm_experts.py on CPU (torch's grouped GEMM runs there in fp32): the
grouped forward and backward equal one matmul per expert, empty experts included; weight
gradients land in megatron-style fp32 `main_grad` buffers (one layer's experts back to back in
either order, or scattered) with the weights marked as delivered; the layer swap keeps parameters
and refuses what it cannot compute. bf16 against TE's experts on a GPU:
tests/test_grouped_gemm_experts_vs_te.py."""

from __future__ import annotations

import pytest
import torch

import grouped_gemm_experts as experts

COUNTS = [3, 0, 5, 2]  # tokens per expert, one expert without tokens
IN, OUT = 16, 8


def make_inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(COUNTS), IN, generator=generator, requires_grad=True)
    weights = [torch.randn(OUT, IN, generator=generator, requires_grad=True) for _ in COUNTS]
    grad_output = torch.randn(sum(COUNTS), OUT, generator=generator)
    offsets = torch.tensor(COUNTS).cumsum(0).to(torch.int32)
    return x, weights, grad_output, offsets


def per_expert_reference(x, weights, grad_output):
    x = x.detach().requires_grad_()
    weights = [w.detach().requires_grad_() for w in weights]
    out = torch.cat([part @ w.t() for part, w in zip(x.split(COUNTS), weights, strict=True)])
    out.backward(grad_output)
    return out.detach(), x.grad, [w.grad for w in weights]


def test_forward_and_backward_equal_one_matmul_per_expert():
    x, weights, grad_output, offsets = make_inputs()
    out = experts.GroupedGemm.apply(x, offsets, False, *weights)
    out.backward(grad_output)
    ref_out, ref_grad_x, ref_grad_w = per_expert_reference(x, weights, grad_output)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, ref_grad_x, rtol=1e-5, atol=1e-5)
    for weight, reference in zip(weights, ref_grad_w, strict=True):
        torch.testing.assert_close(weight.grad, reference, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(weights[1].grad) == 0  # the expert without tokens


def with_main_grads(weights, layout: str):
    """fp32 main_grad buffers holding 1.0 (a previous micro-batch's gradient), laid out as
    megatron's gradient buffer would (back to back, either order) or scattered."""
    n, size = len(weights), weights[0].numel()
    if layout == "scattered":
        buffers = [torch.ones(weights[0].shape) for _ in weights]
    else:
        flat = torch.ones(n * size)
        order = range(n) if layout == "ascending" else reversed(range(n))
        slots = {e: flat[i * size : (i + 1) * size] for i, e in enumerate(order)}
        buffers = [slots[e].view(weights[0].shape) for e in range(n)]
    for weight, buffer in zip(weights, buffers, strict=True):
        weight.main_grad = buffer
        weight.grad_added_to_main_grad = False
    return buffers


@pytest.mark.parametrize("layout", ["ascending", "descending", "scattered"])
def test_weight_gradients_are_added_to_main_grad(layout):
    x, weights, grad_output, offsets = make_inputs()
    buffers = with_main_grads(weights, layout)
    view = experts.evenly_spaced_view(buffers)
    assert (view is None) == (layout == "scattered")
    if view is not None:
        assert view[1] == (layout == "descending")
    out = experts.GroupedGemm.apply(x, offsets, True, *weights)
    out.backward(grad_output)
    _, ref_grad_x, ref_grad_w = per_expert_reference(x, weights, grad_output)
    torch.testing.assert_close(x.grad, ref_grad_x, rtol=1e-5, atol=1e-5)
    for weight, reference in zip(weights, ref_grad_w, strict=True):
        torch.testing.assert_close(weight.main_grad, reference + 1.0, rtol=1e-5, atol=1e-5)
        assert weight.grad_added_to_main_grad
        assert weight.grad is not None and weight.grad.shape == weight.shape  # the placeholder


def test_a_rank_without_tokens_adds_nothing():
    _, weights, _, _ = make_inputs()
    with_main_grads(weights, "ascending")
    x = torch.zeros(0, IN, requires_grad=True)
    offsets = torch.zeros(len(COUNTS), dtype=torch.int32)
    out = experts.GroupedGemm.apply(x, offsets, True, *weights)
    assert out.shape == (0, OUT)
    out.backward(torch.zeros(0, OUT))
    assert all(torch.equal(w.main_grad, torch.ones(OUT, IN)) for w in weights)
    assert all(w.grad_added_to_main_grad for w in weights)


def test_buffers_that_ask_to_be_overwritten_are_overwritten():
    x, weights, grad_output, offsets = make_inputs()
    with_main_grads(weights, "ascending")
    for weight in weights:
        weight.overwrite_main_grad = True
    experts.GroupedGemm.apply(x, offsets, True, *weights).backward(grad_output)
    _, _, ref_grad_w = per_expert_reference(x, weights, grad_output)
    for weight, reference in zip(weights, ref_grad_w, strict=True):
        torch.testing.assert_close(weight.main_grad, reference, rtol=1e-5, atol=1e-5)


def test_tensors_not_back_to_back_get_no_stacked_view():
    flat = torch.zeros(40)
    gapped = [flat[0:8].view(2, 4), flat[10:18].view(2, 4)]
    assert experts.evenly_spaced_view(gapped) is None
    assert experts.evenly_spaced_view([flat[0:8].view(2, 4)]) is None


class FakeGroupedLinear(torch.nn.Module):
    """What the swap relies on in megatron's TE grouped linear layers."""

    def __init__(self, num_gemms: int, use_bias: bool = False) -> None:
        super().__init__()
        self.num_gemms, self.use_bias = num_gemms, use_bias
        for i in range(num_gemms):
            self.register_parameter(f"weight{i}", torch.nn.Parameter(torch.randn(OUT, IN)))


class FakeExperts(torch.nn.Module):
    def __init__(self, use_bias: bool = False, fp8: bool = False, delay_wgrad: bool = False):
        super().__init__()
        fields = {"fp8": fp8, "fp4": False, "delay_wgrad_compute": delay_wgrad}
        self.config = type("Config", (), fields)()
        self.linear_fc1 = FakeGroupedLinear(len(COUNTS), use_bias)
        self.linear_fc2 = FakeGroupedLinear(len(COUNTS))


@pytest.fixture
def fake_te_grouped_mlp(monkeypatch):
    import megatron.core.transformer.moe.experts as megatron_experts

    monkeypatch.setattr(megatron_experts, "TEGroupedMLP", FakeExperts)


def test_swap_keeps_the_parameters_and_computes_the_grouped_gemm(fake_te_grouped_mlp):
    model = torch.nn.Sequential(FakeExperts())
    names = [name for name, _ in model.named_parameters()]
    assert experts.use_torch_grouped_gemm(model) == 2
    assert [name for name, _ in model.named_parameters()] == names
    linear = model[0].linear_fc1
    assert isinstance(linear, FakeGroupedLinear)
    x = torch.randn(sum(COUNTS), IN)
    out, bias = linear(x, COUNTS)
    weights = [getattr(linear, f"weight{i}") for i in range(len(COUNTS))]
    expected = torch.cat([p @ w.t() for p, w in zip(x.split(COUNTS), weights, strict=True)])
    assert bias is None
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (FakeExperts(use_bias=True), "has biases"),
        (FakeExperts(fp8=True), "FP8"),
        (FakeExperts(delay_wgrad=True), "delay_wgrad_compute"),
    ],
)
def test_swap_refuses_what_it_cannot_compute(fake_te_grouped_mlp, module, message):
    with pytest.raises(ValueError, match=message):
        experts.use_torch_grouped_gemm(module)


def test_swap_refuses_a_model_without_te_experts(fake_te_grouped_mlp):
    with pytest.raises(ValueError, match="found no TE grouped expert layers"):
        experts.use_torch_grouped_gemm(torch.nn.Sequential(torch.nn.Linear(IN, OUT)))
