"""Routed experts whose per-expert GEMMs run as one torch grouped GEMM (`torch._grouped_mm`).

Transformer Engine's `GroupedLinear` issues one cuBLAS GEMM per expert on Hopper unless cuBLASLt
is 13.4 or newer. This swaps the forward of any model's megatron TE grouped expert layers for
torch's grouped GEMM (`--expert-gemm torch`), keeping their parameters (`weight0..N`),
checkpoints and megatron's expert MLP around them untouched.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor


class GroupedGemm(torch.autograd.Function):
    """`x` [tokens, in] sorted by expert, `offsets` the experts' cumulative token counts
    (int32, on x's device), `weights` one [out, in] per expert -> [tokens, out].

    Weight gradients go where megatron expects them: added to each weight's fp32 `main_grad`
    (one add over all experts when the buffers lie evenly spaced, as megatron's gradient buffer
    lays out one layer's experts) with a placeholder returned, as TE's fused accumulation does;
    without `main_grad`, as ordinary gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, offsets: Tensor, accumulate: bool, *weights: Tensor) -> Tensor:
        ctx.save_for_backward(x, offsets, *weights)
        ctx.accumulate = accumulate
        # Stacking copies the experts' weights in forward and again in backward (rather than
        # keeping the copy for backward, which would hold it through the whole step): the price
        # of leaving megatron's per-expert parameters, checkpoints and optimizer as they are.
        return torch._grouped_mm(x, torch.stack(weights).transpose(1, 2), offs=offsets)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        x, offsets, *weights = ctx.saved_tensors
        grad_output = grad_output.contiguous()
        stacked = torch.stack(weights)
        grad_x = torch._grouped_mm(grad_output, stacked, offs=offsets)
        if not any(ctx.needs_input_grad[3:]):
            return grad_x, None, None, *(None for _ in weights)
        if x.shape[0]:
            grad_weights = torch._grouped_mm(grad_output.t(), x, offs=offsets)  # [experts, out, in]
        else:  # no tokens on this rank: CUDA's grouped GEMM refuses a contraction of length 0
            grad_weights = torch.zeros_like(stacked)
        if ctx.accumulate and all(hasattr(w, "main_grad") for w in weights):
            add_to_main_grads(weights, grad_weights)
            return grad_x, None, None, *(placeholder_grad(w) for w in weights)
        return grad_x, None, None, *grad_weights.unbind(0)


def add_to_main_grads(weights: list[Tensor], grad_weights: Tensor) -> None:
    """main_grad[e] += grad_weights[e] (or = for buffers that ask to be overwritten), then mark
    each weight's gradient as delivered for megatron's gradient hooks."""
    main_grads = [w.main_grad for w in weights]
    overwrite = getattr(weights[0], "overwrite_main_grad", False)
    stacked = evenly_spaced_view(main_grads)
    if stacked is not None:
        buffer, reverse = stacked
        source = grad_weights.flip(0) if reverse else grad_weights
        if overwrite:
            buffer.copy_(source)
        else:
            buffer.add_(source)
    elif overwrite:
        torch._foreach_copy_(main_grads, list(grad_weights.unbind(0)))
    else:
        torch._foreach_add_(main_grads, list(grad_weights.unbind(0)))
    for weight in weights:
        weight.grad_added_to_main_grad = True


def evenly_spaced_view(tensors: list[Tensor]) -> tuple[Tensor, bool] | None:
    """The tensors as one [n, *shape] view of their shared storage when they lie back to back in
    it (ascending, or descending: then the view runs last to first, flagged True); else None."""
    first = tensors[0]
    if len(tensors) < 2 or not all(
        t.shape == first.shape and t.dtype == first.dtype and t.is_contiguous() for t in tensors
    ):
        return None
    if any(t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() for t in tensors):
        return None
    step = tensors[1].storage_offset() - first.storage_offset()
    offsets = [t.storage_offset() for t in tensors]
    if abs(step) != first.numel() or any(b - a != step for a, b in itertools.pairwise(offsets)):
        return None
    start = first if step > 0 else tensors[-1]
    view = start.as_strided(
        (len(tensors), *first.shape), (first.numel(), *first.stride()), start.storage_offset()
    )
    return view, step < 0


_PLACEHOLDERS: dict[tuple, Tensor] = {}


def placeholder_grad(weight: Tensor) -> Tensor:
    """An uninitialised gradient standing in for one already added to `main_grad`: megatron's
    hooks run only when autograd delivers a gradient, and ignore it for such weights. Shared per
    shape; each call returns a fresh alias, which autograd takes without copying."""
    key = (tuple(weight.shape), weight.dtype, weight.device)
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = torch.empty(key[0], dtype=key[1], device=key[2])
    return _PLACEHOLDERS[key].detach()


class TorchGroupedGemmForward:
    """Mixin for a TE grouped expert linear layer (`num_gemms` weights `weight0..N`, no bias):
    its forward through `GroupedGemm`, same signature and (output, bias=None) result."""

    def forward(self, x: Tensor, m_splits) -> tuple[Tensor, None]:
        counts = torch.as_tensor(m_splits, dtype=torch.int64)
        offsets = counts.cumsum(0).to(device=x.device, dtype=torch.int32, non_blocking=True)
        weights = [getattr(self, f"weight{i}") for i in range(self.num_gemms)]
        accumulate = bool(getattr(self, "fuse_wgrad_accumulation", False))
        return GroupedGemm.apply(x, offsets, accumulate, *weights), None


_SWAPPED_CLASSES: dict[type, type] = {}


def use_torch_grouped_gemm(model: torch.nn.Module) -> int:
    """Switch every routed-expert linear layer of megatron's `TEGroupedMLP` in `model` to torch's
    grouped GEMM, in place; returns how many layers were switched. Refuses layers it cannot
    serve (biases, FP8) instead of computing something else, and a model with none to switch
    instead of silently training TE's experts."""
    from megatron.core.transformer.moe.experts import TEGroupedMLP

    switched = 0
    for module in model.modules():
        if not isinstance(module, TEGroupedMLP):
            continue
        if module.config.fp8 or module.config.fp4:
            raise ValueError("torch grouped GEMM experts run in bf16/fp16; turn FP8/FP4 off")
        if module.config.delay_wgrad_compute:
            raise ValueError(
                "torch grouped GEMM experts compute weight gradients in backward; turn "
                "delay_wgrad_compute off"
            )
        for linear in (module.linear_fc1, module.linear_fc2):
            if getattr(linear, "use_bias", False):
                raise ValueError(f"{type(linear).__name__} has biases; torch grouped GEMM has none")
            cls = type(linear)
            if cls not in _SWAPPED_CLASSES:
                _SWAPPED_CLASSES[cls] = type(
                    f"TorchGroupedGemm{cls.__name__}", (TorchGroupedGemmForward, cls), {}
                )
            linear.__class__ = _SWAPPED_CLASSES[cls]
            switched += 1
    if not switched:
        raise ValueError(
            "--expert-gemm torch (EXPERT_GEMM=torch) found no TE grouped expert layers to switch "
            "in this model; use --expert-gemm te"
        )
    return switched
