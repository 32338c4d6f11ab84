"""megatron_compat: the integer MoE token counts that Transformer Engine's fused aux loss needs
(exact counts, unchanged loss on the unfused path), the vectorised gradient scaling (megatron's
products bit for bit), the training hooks, and the version guard of every patch.
"""

from __future__ import annotations

import argparse
import types

import pytest
import torch
from megatron.core.transformer.moe import moe_utils, router

import megatron_compat
from megatron_compat import Patch, apply_patches


@pytest.fixture(scope="module", autouse=True)
def single_rank_group():
    """megatron's reductions want a real process group; one rank of gloo skips the reduction."""
    from tests.gpu_harness import free_port

    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    yield
    torch.distributed.destroy_process_group()


def group():
    return torch.distributed.group.WORLD


def padded_routing_map(valid_tokens: int, padded_tokens: int, experts: int, topk: int):
    """A routing map as megatron's aux-loss routing builds it: `topk` experts per valid token,
    padded rows zeroed; plus the matching scores."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(valid_tokens + padded_tokens, experts, generator=generator).softmax(-1)
    top = scores.topk(topk, dim=1).indices
    routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter(1, top, True)
    routing_map[valid_tokens:] = False
    scores[valid_tokens:] = 0
    return routing_map, scores


@pytest.fixture
def patched(monkeypatch):
    """The patch applied to this test only (monkeypatch restores megatron's function)."""
    for module in (moe_utils, router):
        monkeypatch.setattr(
            module,
            "get_tokens_per_expert_and_token_count",
            module.get_tokens_per_expert_and_token_count,
        )
    megatron_compat.count_moe_tokens_as_integers()
    return router.get_tokens_per_expert_and_token_count


def test_installed_megatron_still_counts_floats():
    # When this fails, megatron-core counts integers itself: delete the patch (PR 7183 landed).
    routing_map, _ = padded_routing_map(valid_tokens=6, padded_tokens=2, experts=4, topk=2)
    _, _, total = moe_utils.get_tokens_per_expert_and_token_count(
        routing_map=routing_map, reduce_group=group(), topk=2, with_padding_mask=True
    )
    assert total.is_floating_point() and float(total) == 6


def test_counts_become_exact_int64_tensors(patched):
    routing_map, _ = padded_routing_map(valid_tokens=37, padded_tokens=11, experts=16, topk=4)
    per_expert, local, total = patched(routing_map, group(), topk=4, with_padding_mask=True)
    assert local.dtype == total.dtype == torch.int64
    assert int(local) == int(total) == 37
    assert torch.equal(per_expert, routing_map.sum(dim=0))
    assert router.get_tokens_per_expert_and_token_count is patched
    assert moe_utils.get_tokens_per_expert_and_token_count is patched


def test_counts_without_padding_mask_are_megatrons(patched):
    routing_map, _ = padded_routing_map(valid_tokens=20, padded_tokens=0, experts=8, topk=2)
    _, local, total = patched(routing_map, group(), topk=2, with_padding_mask=False)
    assert (local, total) == (20, 20)


def test_unfused_aux_loss_unchanged_by_integer_counts(patched):
    routing_map, scores = padded_routing_map(valid_tokens=50, padded_tokens=14, experts=16, topk=4)
    per_expert, _, total = patched(routing_map, group(), topk=4, with_padding_mask=True)
    loss = moe_utils.switch_load_balancing_loss_func(
        scores, per_expert, total, topk=4, num_experts=16, moe_aux_loss_coeff=1e-3
    )
    reference = moe_utils.switch_load_balancing_loss_func(
        scores, per_expert, 50.0, topk=4, num_experts=16, moe_aux_loss_coeff=1e-3
    )
    torch.testing.assert_close(loss, reference, rtol=0, atol=0)


def test_patch_is_idempotent(patched):
    megatron_compat.count_moe_tokens_as_integers()
    assert router.get_tokens_per_expert_and_token_count is patched


def test_version_guard_applies_only_matching_versions():
    calls = []
    patch = Patch("probe", written_for="0.19.", upstream="PR 1", apply=lambda: calls.append(1))
    assert apply_patches((patch,), version="0.19.2") == [patch]
    with pytest.warns(UserWarning, match="written for megatron-core 0.19.x .*PR 1"):
        assert apply_patches((patch,), version="0.20.0") == []
    assert calls == [1]


def test_every_patch_names_its_version_and_upstream_change():
    for patch in megatron_compat.PATCHES:
        assert patch.written_for.endswith(".") and patch.upstream


def test_vectorised_gradient_scaling_is_megatrons_bit_for_bit(monkeypatch):
    """The per-token scaling by a one-element tensor, over several foreach pieces, equals
    megatron's `grad_data *= scaling`; a Python float still takes megatron's own line."""
    import types

    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBuffer

    megatron_compat.scale_gradients_in_a_vectorised_kernel()
    monkeypatch.setattr(megatron_compat, "GRADIENT_SCALING_PIECE", 1 << 10)
    grads, extra = torch.randn(3 * (1 << 10) + 7) * 100, torch.randn(5)
    scaling = 1.0 / torch.clamp(torch.tensor([8191]), min=1)
    for factor in (scaling, 0.37):
        buffer = types.SimpleNamespace(grad_data=grads.clone(), extra_main_grads=[extra.clone()])
        _ParamAndGradBuffer.scale_gradients(buffer, factor)
        expected, expected_extra = grads.clone(), extra.clone()
        expected *= factor
        expected_extra *= factor
        assert torch.equal(buffer.grad_data, expected)
        assert torch.equal(buffer.extra_main_grads[0], expected_extra)
    assert _ParamAndGradBuffer.scale_gradients.vectorised


class LayerWithFusionSetting(torch.nn.Linear):
    """Stands in for a TE layer: TE modules carry a bool `fuse_wgrad_accumulation`."""

    def __init__(self) -> None:
        super().__init__(2, 2)
        self.fuse_wgrad_accumulation = False


def training_args(**overrides) -> argparse.Namespace:
    settings = dict(
        gradient_accumulation_fusion=False, use_megatron_fsdp=False, use_torch_fsdp2=False
    )
    return argparse.Namespace(**{**settings, **overrides})


def megatron_output_layer(tied: bool) -> torch.nn.Module:
    """megatron's ColumnParallelLinear as the output layer holds it (no process groups needed to
    test the switch): its own weight, or None when tied to the embedding."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    layer = ColumnParallelLinear.__new__(ColumnParallelLinear)
    torch.nn.Module.__init__(layer)
    layer.weight = None if tied else torch.nn.Parameter(torch.zeros(2, 2))
    layer.gradient_accumulation_fusion = False
    return layer


def without_apex(monkeypatch):
    """megatron's tensor-parallel layers module as without APEX's kernels; undone after the test,
    so the kernels the fusion installs there do not outlive it. Returns the module."""
    from megatron.core.tensor_parallel import layers

    monkeypatch.setattr(layers, "fused_weight_gradient_mlp_cuda", None, raising=False)
    monkeypatch.delattr(layers, "fused_weight_gradient_mlp_cuda")
    return layers


def test_linear_layers_fuse_wgrad_accumulation_under_ddp(monkeypatch):
    layers = without_apex(monkeypatch)
    model = torch.nn.Sequential(
        LayerWithFusionSetting(),
        torch.nn.Linear(2, 2),
        LayerWithFusionSetting(),
        megatron_output_layer(tied=False),
        megatron_output_layer(tied=True),
    )
    assert megatron_compat.fuse_wgrad_accumulation_into_main_grad(model, training_args()) == 3
    assert model[0].fuse_wgrad_accumulation and model[2].fuse_wgrad_accumulation
    assert not hasattr(model[1], "fuse_wgrad_accumulation")  # a plain torch layer is left alone
    assert model[3].gradient_accumulation_fusion
    assert not model[4].gradient_accumulation_fusion  # tied: the embedding's gradient needs the add
    # Without APEX megatron's layers get the accumulation kernels from TE's GEMM.
    kernels = layers.fused_weight_gradient_mlp_cuda
    assert kernels.wgrad_gemm_accum_fp32 is megatron_compat.accumulate_wgrad_in_te_gemm
    assert kernels.wgrad_gemm_accum_fp16 is megatron_compat.accumulate_wgrad_in_te_gemm


def test_apex_wgrad_kernels_are_kept(monkeypatch):
    import types

    from megatron.core.tensor_parallel import layers

    apex = types.SimpleNamespace(wgrad_gemm_accum_fp32=None, wgrad_gemm_accum_fp16=None)
    monkeypatch.setattr(layers, "fused_weight_gradient_mlp_cuda", apex, raising=False)
    model = torch.nn.Sequential(megatron_output_layer(tied=False))
    assert megatron_compat.fuse_wgrad_accumulation_into_main_grad(model, training_args()) == 1
    assert layers.fused_weight_gradient_mlp_cuda is apex


@pytest.mark.parametrize(
    "setting", ["gradient_accumulation_fusion", "use_megatron_fsdp", "use_torch_fsdp2"]
)
def test_te_wgrad_fusion_left_alone_outside_plain_ddp(setting):
    model = torch.nn.Sequential(LayerWithFusionSetting())
    args = training_args(**{setting: True})
    assert megatron_compat.fuse_wgrad_accumulation_into_main_grad(model, args) == 0
    assert not model[0].fuse_wgrad_accumulation


def test_te_wgrad_fusion_skipped_on_other_megatron_versions(monkeypatch):
    monkeypatch.setattr(megatron_compat, "installed_megatron_core_version", lambda: "0.20.0")
    model = torch.nn.Sequential(LayerWithFusionSetting())
    with pytest.warns(UserWarning, match="not fusing weight-gradient accumulation"):
        assert megatron_compat.fuse_wgrad_accumulation_into_main_grad(model, training_args()) == 0
    assert not model[0].fuse_wgrad_accumulation


def megatron_embedding(**settings) -> torch.nn.Module:
    """megatron's VocabParallelEmbedding on one tensor-parallel rank (16 tokens of width 8), built
    on the CPU; `settings` are TransformerConfig fields."""
    from megatron.core.tensor_parallel.layers import VocabParallelEmbedding
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=1, hidden_size=8, num_attention_heads=1, use_cpu_initialization=True, **settings
    )
    return VocabParallelEmbedding(
        16, 8, init_method=torch.nn.init.normal_, config=config, tp_group=group()
    )


TOKENS = torch.tensor([[3, 5, 3, 0, 3, 15]])  # token 3 three times: its row sums three gradients


def test_embedding_adds_its_gradient_to_main_grad():
    fused, reference = megatron_embedding(), megatron_embedding()
    reference.load_state_dict(fused.state_dict())
    model = torch.nn.Sequential(fused)
    assert megatron_compat.fuse_wgrad_accumulation_into_main_grad(model, training_args()) == 1
    grad_output = torch.randn(1, 6, 8, generator=torch.Generator().manual_seed(0))
    reference(TOKENS).backward(grad_output)
    fused.weight.main_grad = torch.ones(16, 8)  # a previous micro-batch's gradient
    fused.weight.grad_added_to_main_grad = False
    output = fused(TOKENS)
    torch.testing.assert_close(output, reference(TOKENS), rtol=0, atol=0)
    output.backward(grad_output)
    torch.testing.assert_close(fused.weight.main_grad, reference.weight.grad + 1.0)
    assert fused.weight.grad_added_to_main_grad
    assert fused.weight.grad.shape == fused.weight.shape  # megatron DDP's hook ignores it


def test_embedding_without_main_grad_returns_the_ordinary_gradient():
    fused, reference = megatron_embedding(), megatron_embedding()
    reference.load_state_dict(fused.state_dict())
    megatron_compat.fuse_wgrad_accumulation_into_main_grad(fused, training_args())
    fused(TOKENS).sum().backward()
    reference(TOKENS).sum().backward()
    torch.testing.assert_close(fused.weight.grad, reference.weight.grad, rtol=0, atol=0)


def shared_embedding(marking: str) -> torch.nn.Module:
    """An embedding whose weight megatron marked as shared with the output layer or with
    multi-token prediction: `zero_out_wgrad` on one pipeline stage, `shared_embedding` across."""
    embedding = megatron_embedding()
    setattr(embedding.weight, marking, True)
    return embedding


def test_embedding_keeps_megatrons_lookup_where_the_fusion_does_not_hold():
    model = torch.nn.Sequential(
        shared_embedding("zero_out_wgrad"),
        shared_embedding("shared_embedding"),
        megatron_embedding(deterministic_mode=True),
    )
    assert megatron_compat.fuse_wgrad_accumulation_into_main_grad(model, training_args()) == 0
    for embedding in model:
        assert "forward" not in vars(embedding)  # megatron's class forward


def provide_model(monkeypatch, built: torch.nn.Module, **settings) -> torch.nn.Module:
    """pretrain_multimodal.model_provider on a stand-in spec that returns `built`."""
    import types

    import megatron.training

    import pretrain_multimodal

    def build_model(*args, **options):
        built.build_options = options
        return built

    spec = types.SimpleNamespace(build_model=build_model)
    settings = {"vision_cuda_graph_patches": 0, "vision_cuda_graph_images": 16, **settings}
    args = training_args(model_name="any", recompute_vision=False, **settings)
    monkeypatch.setattr(megatron.training, "get_args", lambda: args)
    monkeypatch.setattr(pretrain_multimodal, "get_model_spec", lambda name: spec)
    monkeypatch.setattr(pretrain_multimodal, "resolved_model_config", lambda args: None)
    return pretrain_multimodal.model_provider(config=object(), pg_collection=object())


def test_training_model_provider_fuses_wgrad_accumulation(monkeypatch):
    """The fusion stays on in training: model_provider switches the built model's TE layers and
    megatron's own output layer."""
    without_apex(monkeypatch)
    built = torch.nn.Sequential(LayerWithFusionSetting(), megatron_output_layer(tied=False))
    model = provide_model(monkeypatch, built, expert_gemm="te")
    assert model is built and model[0].fuse_wgrad_accumulation
    assert model[1].gradient_accumulation_fusion


def test_training_model_provider_passes_the_vision_graph_budget(monkeypatch):
    built = torch.nn.Sequential(LayerWithFusionSetting())
    model = provide_model(
        monkeypatch,
        built,
        expert_gemm="te",
        vision_cuda_graph_patches=4096,
        vision_cuda_graph_images=24,
    )
    options = model.build_options
    assert (options["vision_graph_patches"], options["vision_graph_images"]) == (4096, 24)


def test_torch_expert_gemm_refuses_a_model_without_te_experts(monkeypatch):
    """--expert-gemm torch must switch something: silently training TE's experts is refused."""
    built = torch.nn.Sequential(LayerWithFusionSetting())
    with pytest.raises(ValueError, match="found no TE grouped expert layers"):
        provide_model(monkeypatch, built, expert_gemm="torch")


@pytest.fixture
def te_cross_entropy_accepted(monkeypatch):
    """megatron's validation replaced by one that refuses TE's cross entropy as 0.19.2's does,
    then the patch applied over it (monkeypatch restores megatron's function)."""
    from megatron.training import arguments

    seen = []

    def refusing_validate(args, defaults={}):  # noqa: B006
        assert not (args.cross_entropy_loss_fusion and args.cross_entropy_fusion_impl == "te")
        seen.append(args.cross_entropy_fusion_impl)
        return args

    monkeypatch.setattr(arguments, "validate_args", refusing_validate)
    megatron_compat.accept_te_cross_entropy()
    return arguments.validate_args, seen


def test_te_cross_entropy_passes_validation_and_stays_te(te_cross_entropy_accepted, monkeypatch):
    validate, seen = te_cross_entropy_accepted
    monkeypatch.setattr(megatron_compat, "require_fixed_te_cross_entropy", lambda: None)
    args = argparse.Namespace(cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="te")
    validate(args)
    assert seen == ["native"] and args.cross_entropy_fusion_impl == "te"
    native = argparse.Namespace(cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="native")
    validate(native)
    assert seen[-1] == "native" and native.cross_entropy_fusion_impl == "native"
    from megatron.training import arguments

    megatron_compat.accept_te_cross_entropy()  # idempotent: not wrapped twice
    assert arguments.validate_args is validate


def test_te_cross_entropy_refused_with_an_older_transformer_engine(monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.19.1")
    with pytest.raises(ValueError, match=r"Transformer Engine 2\.20 or newer \(installed 2\.19\.1"):
        megatron_compat.require_fixed_te_cross_entropy()
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.20.2")
    megatron_compat.require_fixed_te_cross_entropy()


class DistributedOptimizerStandIn:
    """What megatron's ChainedOptimizer.step asks of a distributed optimizer, on the CPU: fp32
    parameters whose main gradients are views of one DDP-like buffer; its step records them."""

    def __init__(self, grads: torch.Tensor, clip_grad: float) -> None:
        self.config = types.SimpleNamespace(
            clip_grad=clip_grad,
            use_precision_aware_optimizer=False,
            use_precision_aware_optimizer_no_fp8_or_ds_fp8=False,
            log_num_zeros_in_grad=False,
            grad_norm_skip_threshold=float("inf"),
            reuse_grad_buf_for_mxfp8_param_ag=False,
            overlap_param_gather_with_optimizer_step=False,
            timers=None,
        )
        self.grad_scaler = None
        self.buffers = [types.SimpleNamespace(grad_data=grads, extra_main_grads=[])]
        self.parameters = [torch.nn.Parameter(torch.zeros(n)) for n in (5, 11, 4)]
        self.stepped_with = None

    def prepare_grads(self) -> bool:
        pieces = self.buffers[0].grad_data.split((5, 11, 4))
        for param, grad in zip(self.parameters, pieces, strict=True):
            param.grad = grad
        return False

    def get_parameters(self) -> list[torch.nn.Parameter]:
        return self.parameters

    def get_grad_norm(self):
        from megatron.core.optimizer import optimizer as megatron_optimizer

        grads = [param.grad for param in self.parameters]
        return megatron_optimizer.get_grad_norm_fp32(grads, grad_stats_parallel_group=None)

    def has_grad_norm_group(self, group: str) -> bool:
        return False

    def get_grad_stats_parallel_group(self):
        return None

    def step_with_ready_grads(self) -> bool:
        self.stepped_with = self.buffers[0].grad_data.clone()
        return True


def l2_norm_on_the_cpu(grads, norm_type=2, grad_stats_parallel_group=None) -> float:
    """megatron's fp32 gradient norm without TE (a Python float), for one CPU process."""
    return float(torch.stack([grad.double().norm() for grad in grads]).norm())


def clip_on_the_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False) -> None:
    """megatron's clipping by a Python-float norm (its path without TE), on CPU tensors."""
    coefficient = max_norm / (total_norm + 1.0e-6)
    if coefficient < 1.0:
        for param in parameters:
            param.grad.mul_(coefficient)


def stand_in_for_megatron_on_the_cpu(monkeypatch) -> None:
    """The fold patched in, megatron's CUDA-only norm and clipping under it replaced."""
    from megatron.core.optimizer import optimizer as megatron_optimizer

    megatron_compat.scale_gradients_in_a_vectorised_kernel()
    megatron_compat.fold_token_scaling_into_gradient_clipping()
    monkeypatch.setattr(megatron_optimizer.get_grad_norm_fp32, "megatron", l2_norm_on_the_cpu)
    monkeypatch.setattr(
        megatron_optimizer.clip_grad_by_total_norm_fp32, "megatron", clip_on_the_cpu
    )


@pytest.mark.parametrize("clip_grad", [1.0, 1e9])  # clipping, and a bound the norm stays under
def test_token_scaling_folded_into_the_clipping(monkeypatch, clip_grad):
    """From the first step on, the per-token scaling waits for the clipping and both happen in
    one multiply: the gradients the optimizer steps with, and the norm it reports, are megatron's
    two-pass results to within two fp32 roundings."""
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBuffer
    from megatron.core.optimizer.optimizer import ChainedOptimizer

    stand_in_for_megatron_on_the_cpu(monkeypatch)
    raw = torch.randn(20, generator=torch.Generator().manual_seed(5)) * 300
    scaling = 1.0 / torch.tensor([4093.0])
    scaled = raw * scaling
    norm = l2_norm_on_the_cpu([scaled])
    expected = scaled * min(1.0, clip_grad / (norm + 1e-6))
    part = DistributedOptimizerStandIn(raw.clone(), clip_grad)
    optimizer = ChainedOptimizer([part])
    buffer = part.buffers[0]
    assert buffer.folds_token_scaling
    for _ in range(3):
        buffer.grad_data.copy_(raw)
        _ParamAndGradBuffer.scale_gradients(buffer, scaling)  # finalize_model_grads' call
        assert torch.equal(buffer.grad_data, raw) and buffer.deferred_scaling is scaling
        _, grad_norm, _ = optimizer.step()
        assert part.stepped_with == pytest.approx(expected, rel=2.5e-7, abs=0)
        assert grad_norm == pytest.approx(norm, rel=2.5e-7)
        assert buffer.deferred_scaling is None


def test_token_scaling_applied_at_once_where_it_cannot_fold(monkeypatch):
    """An optimizer that does not clip leaves its buffers to megatron's order; a scaling that
    waits for a step that cannot fold is applied before it, and a second scaling before a step
    applies the first."""
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBuffer
    from megatron.core.optimizer.optimizer import ChainedOptimizer

    stand_in_for_megatron_on_the_cpu(monkeypatch)
    raw, scaling = torch.randn(20) * 300, 1.0 / torch.tensor([4093.0])
    part = DistributedOptimizerStandIn(raw.clone(), clip_grad=0.0)
    optimizer = ChainedOptimizer([part])
    buffer = part.buffers[0]
    assert not buffer.folds_token_scaling
    _ParamAndGradBuffer.scale_gradients(buffer, scaling)
    assert torch.equal(buffer.grad_data, raw * scaling)
    buffer.grad_data.copy_(raw)
    buffer.folds_token_scaling = True  # as if marked by an optimizer that could fold
    _ParamAndGradBuffer.scale_gradients(buffer, scaling)
    optimizer.step()
    assert torch.equal(part.stepped_with, raw * scaling)
    buffer.grad_data.copy_(raw)
    _ParamAndGradBuffer.scale_gradients(buffer, scaling)
    _ParamAndGradBuffer.scale_gradients(buffer, scaling)
    assert torch.equal(buffer.grad_data, raw * scaling) and buffer.deferred_scaling is scaling


def test_zeroed_buffer_drops_its_pending_scaling(monkeypatch):
    """Gradients zeroed before the step that would have scaled them: the next backward's
    gradients are scaled once, by their own scaling."""
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBuffer
    from megatron.core.optimizer.optimizer import ChainedOptimizer

    stand_in_for_megatron_on_the_cpu(monkeypatch)
    raw, scaling = torch.randn(20) * 300, 1.0 / torch.tensor([4093.0])
    part = DistributedOptimizerStandIn(raw.clone(), clip_grad=1e9)
    ChainedOptimizer([part])
    buffer = part.buffers[0]
    _ParamAndGradBuffer.scale_gradients(buffer, scaling)
    assert buffer.deferred_scaling is scaling
    _ParamAndGradBuffer.reset(buffer)
    assert buffer.deferred_scaling is None and not buffer.grad_data.any()
