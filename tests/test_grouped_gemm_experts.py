"""grouped_gemm_experts.py on CPU (torch's grouped GEMM runs there in fp32): the grouped forward
and backward over one stacked [experts, out, in] weight equal one matmul per expert, empty experts
included; weight gradients land in a megatron-style fp32 `main_grad` with the weight marked as
delivered; the swap stacks TE's per-expert weights into one parameter (attributes kept), keeps the
per-expert state-dict and checkpoint keys, and refuses what it cannot compute. bf16 against TE's
experts on a GPU: tests/test_grouped_gemm_experts_vs_te.py."""

from __future__ import annotations

import types

import pytest
import torch

import grouped_gemm_experts as experts

COUNTS = [3, 0, 5, 2]  # tokens per expert, one expert without tokens
IN, OUT = 16, 8


def make_inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(COUNTS), IN, generator=generator, requires_grad=True)
    weight = torch.randn(len(COUNTS), OUT, IN, generator=generator, requires_grad=True)
    grad_output = torch.randn(sum(COUNTS), OUT, generator=generator)
    offsets = torch.tensor(COUNTS).cumsum(0).to(torch.int32)
    return x, weight, grad_output, offsets


def per_expert_reference(x, weight, grad_output):
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    out = torch.cat([part @ w.t() for part, w in zip(x.split(COUNTS), weight, strict=True)])
    out.backward(grad_output)
    return out.detach(), x.grad, weight.grad


def test_forward_and_backward_equal_one_matmul_per_expert():
    x, weight, grad_output, offsets = make_inputs()
    out = experts.GroupedGemm.apply(x, offsets, weight, False)
    out.backward(grad_output)
    ref_out, ref_grad_x, ref_grad_w = per_expert_reference(x, weight, grad_output)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, ref_grad_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight.grad, ref_grad_w, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(weight.grad[1]) == 0  # the expert without tokens


def with_main_grad(weight):
    """An fp32 main_grad holding 1.0, a previous micro-batch's gradient."""
    weight.main_grad = torch.ones(weight.shape)
    weight.grad_added_to_main_grad = False
    return weight.main_grad


def test_weight_gradient_is_added_to_main_grad():
    x, weight, grad_output, offsets = make_inputs()
    with_main_grad(weight)
    experts.GroupedGemm.apply(x, offsets, weight, True).backward(grad_output)
    _, ref_grad_x, ref_grad_w = per_expert_reference(x, weight, grad_output)
    torch.testing.assert_close(x.grad, ref_grad_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight.main_grad, ref_grad_w + 1.0, rtol=1e-5, atol=1e-5)
    assert weight.grad_added_to_main_grad
    assert weight.grad is not None and weight.grad.shape == weight.shape  # the placeholder


def test_without_accumulation_main_grad_is_left_to_megatron():
    x, weight, grad_output, offsets = make_inputs()
    with_main_grad(weight)
    experts.GroupedGemm.apply(x, offsets, weight, False).backward(grad_output)
    assert torch.equal(weight.main_grad, torch.ones(weight.shape))
    assert not weight.grad_added_to_main_grad
    torch.testing.assert_close(weight.grad, per_expert_reference(x, weight, grad_output)[2])


def test_a_rank_without_tokens_adds_nothing():
    _, weight, _, _ = make_inputs()
    with_main_grad(weight)
    x = torch.zeros(0, IN, requires_grad=True)
    offsets = torch.zeros(len(COUNTS), dtype=torch.int32)
    out = experts.GroupedGemm.apply(x, offsets, weight, True)
    assert out.shape == (0, OUT)
    out.backward(torch.zeros(0, OUT))
    assert torch.equal(weight.main_grad, torch.ones(weight.shape))
    assert weight.grad_added_to_main_grad


def test_buffers_that_ask_to_be_overwritten_are_overwritten():
    x, weight, grad_output, offsets = make_inputs()
    with_main_grad(weight)
    weight.overwrite_main_grad = True
    experts.GroupedGemm.apply(x, offsets, weight, True).backward(grad_output)
    torch.testing.assert_close(weight.main_grad, per_expert_reference(x, weight, grad_output)[2])


def test_placeholders_of_every_shape_share_one_buffer():
    large, small = torch.empty(4, 8, 16), torch.empty(4, 16, 8)
    first, second = experts.placeholder_grad(small), experts.placeholder_grad(large)
    assert first.shape == small.shape and second.shape == large.shape
    again = experts.placeholder_grad(small)
    assert again.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()


class FakeGroupedLinear(torch.nn.Module):
    """What the swap relies on in megatron's TE grouped linear layers."""

    def __init__(self, num_gemms: int, tp_dim: int, use_bias: bool = False) -> None:
        super().__init__()
        self.num_gemms, self.use_bias = num_gemms, use_bias
        self.fuse_wgrad_accumulation = True
        for i in range(num_gemms):
            weight = torch.nn.Parameter(torch.randn(OUT, IN))
            weight.allreduce, weight.tensor_model_parallel = False, True
            weight.partition_dim, weight.partition_stride = tp_dim, 1
            self.register_parameter(f"weight{i}", weight)

    def get_extra_state(self) -> torch.Tensor:  # TE saves its FP8 state here; empty without FP8
        return torch.zeros(0, dtype=torch.uint8)


def fake_config(**overrides):
    fields = {"fp8": False, "fp4": False, "delay_wgrad_compute": False}
    fields["expert_tensor_parallel_size"] = 1
    return types.SimpleNamespace(**{**fields, **overrides})


class FakeExperts(torch.nn.Module):
    def __init__(self, use_bias: bool = False, **config) -> None:
        super().__init__()
        self.config = fake_config(**config)
        self.linear_fc1 = FakeGroupedLinear(len(COUNTS), 0, use_bias)
        self.linear_fc2 = FakeGroupedLinear(len(COUNTS), 1)


@pytest.fixture
def fake_te_grouped_mlp(monkeypatch):
    import megatron.core.transformer.moe.experts as megatron_experts

    monkeypatch.setattr(megatron_experts, "TEGroupedMLP", FakeExperts)


def test_swap_stacks_the_weights_into_one_parameter(fake_te_grouped_mlp):
    model = torch.nn.Sequential(FakeExperts())
    te_state = {k: v.clone() for k, v in model.state_dict().items()}
    assert experts.use_torch_grouped_gemm(model) == 2
    assert [name for name, _ in model.named_parameters()] == [
        "0.linear_fc1.weight",
        "0.linear_fc2.weight",
    ]
    linear = model[0].linear_fc1
    assert isinstance(linear, experts.StackedExpertLinear)
    assert linear.weight.shape == (len(COUNTS), OUT, IN)
    assert linear.weight.allreduce is False and linear.weight.tensor_model_parallel
    assert (linear.weight.partition_dim, model[0].linear_fc2.weight.partition_dim) == (1, 2)
    assert linear.fuse_wgrad_accumulation
    state = model.state_dict()
    assert state.keys() == {k for k in te_state if "_extra_state" not in k}
    assert all(torch.equal(state[k], te_state[k]) for k in state)
    x = torch.randn(sum(COUNTS), IN)
    out, bias = linear(x, COUNTS)
    expected = torch.cat([p @ w.t() for p, w in zip(x.split(COUNTS), linear.weight, strict=True)])
    assert bias is None
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_swapped_layers_load_per_expert_state_dicts(fake_te_grouped_mlp):
    te_model = torch.nn.Sequential(FakeExperts())
    te_state = te_model.state_dict()
    model = torch.nn.Sequential(FakeExperts())
    experts.use_torch_grouped_gemm(model)
    model.load_state_dict(te_state, strict=True)  # TE's `_extra_state` entries included
    for i in range(len(COUNTS)):
        assert torch.equal(model[0].linear_fc1.weight[i], te_state[f"0.linear_fc1.weight{i}"])
    missing = {k: v for k, v in te_state.items() if k != "0.linear_fc2.weight3"}
    result = model.load_state_dict(missing, strict=False)
    assert result.missing_keys == ["0.linear_fc2.weight3"]
    wrong = dict(te_state, **{"0.linear_fc1.weight0": torch.zeros(OUT, IN + 1)})
    with pytest.raises(RuntimeError, match=r"linear_fc1\.weight0: shape"):
        model.load_state_dict(wrong)


def test_checkpoint_names_each_expert_by_its_global_index():
    group = types.SimpleNamespace(size=lambda: 2, rank=lambda: 1)  # EP rank 1 of 2
    groups = types.SimpleNamespace(ep=group, expt_tp=group, expt_dp=group)
    linear = experts.StackedExpertLinear(
        torch.randn(len(COUNTS), OUT, IN), tp_axis=1, pg_collection=groups,
        fuse_wgrad_accumulation=False,
    )  # fmt: skip
    sharded = linear.sharded_state_dict("experts.linear_fc2.", sharded_offsets=((0, 3, 8),))
    assert list(sharded) == [f"experts.linear_fc2.weight{i}" for i in range(len(COUNTS))]
    last = sharded[f"experts.linear_fc2.weight{len(COUNTS) - 1}"]
    assert last.key == "experts.linear_fc2.weight"
    assert last.data.data_ptr() == linear.weight[len(COUNTS) - 1].data_ptr()
    # the layer offset, then this expert's global index: 4 local experts on EP rank 1 of 2
    assert last.global_offset[:2] == (3, 2 * len(COUNTS) - 1)
    assert last.replica_id[-1] == 1


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (FakeExperts(use_bias=True), "has biases"),
        (FakeExperts(fp8=True), "FP8"),
        (FakeExperts(delay_wgrad_compute=True), "delay_wgrad_compute"),
        (FakeExperts(expert_tensor_parallel_size=2), "expert tensor parallel size 1"),
    ],
)
def test_swap_refuses_what_it_cannot_compute(fake_te_grouped_mlp, module, message):
    with pytest.raises(ValueError, match=message):
        experts.use_torch_grouped_gemm(module)


def test_swap_refuses_a_model_without_te_experts(fake_te_grouped_mlp):
    with pytest.raises(ValueError, match="found no TE grouped expert layers"):
        experts.use_torch_grouped_gemm(torch.nn.Sequential(torch.nn.Linear(IN, OUT)))
