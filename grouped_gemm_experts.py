"""Routed experts as one [experts, out, in] parameter per linear layer and one torch grouped GEMM.

Transformer Engine's `GroupedLinear` keeps one parameter per expert (2 x 256 per layer at
Qwen3.5-MoE's widths) and issues one cuBLAS GEMM per expert on Hopper unless cuBLASLt is 13.4 or
newer; megatron's gradient hooks, gradient-norm and optimizer loops then walk every one of those
parameters on the host each step. `--expert-gemm torch` replaces each of megatron's TE grouped
expert layers by a `StackedExpertLinear`: the same weights stacked into one parameter, computed
with `torch._grouped_mm`. Its state dict and distributed checkpoint still name each expert's
weight `weight{e}`, as TE's layers do, so HF conversion and checkpoints see the same keys. TE's
layers also ask for per-expert `_extra_state` entries (FP8 scaling state), which these layers
ignore when loading and do not save: their checkpoints resume with `--expert-gemm torch`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class GroupedGemm(torch.autograd.Function):
    """`x` [tokens, in] sorted by expert, `offsets` the experts' cumulative token counts (int32,
    on x's device), `weight` [experts, out, in] -> [tokens, out].

    With `accumulate`, the weight gradient is added to the weight's fp32 `main_grad` (megatron's
    gradient buffer) and a placeholder returned, as TE's fused accumulation does; otherwise it is
    returned as an ordinary gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, offsets: Tensor, weight: Tensor, accumulate: bool) -> Tensor:
        ctx.save_for_backward(x, offsets, weight)
        ctx.accumulate = accumulate
        return torch._grouped_mm(x, weight.transpose(1, 2), offs=offsets)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        x, offsets, weight = ctx.saved_tensors
        grad_output = grad_output.contiguous()
        grad_x = torch._grouped_mm(grad_output, weight, offs=offsets)
        if not ctx.needs_input_grad[2]:
            return grad_x, None, None, None
        if x.shape[0]:
            grad_weight = torch._grouped_mm(grad_output.t(), x, offs=offsets)
        else:  # no tokens on this rank: CUDA's grouped GEMM refuses a contraction of length 0
            grad_weight = torch.zeros_like(weight)
        main_grad = getattr(weight, "main_grad", None)
        if not ctx.accumulate or main_grad is None:
            return grad_x, None, grad_weight, None
        if getattr(weight, "overwrite_main_grad", False):
            main_grad.copy_(grad_weight)
        else:
            main_grad.add_(grad_weight)
        weight.grad_added_to_main_grad = True
        return grad_x, None, placeholder_grad(weight), None


_PLACEHOLDER_STORAGE: dict[tuple, Tensor] = {}


def placeholder_grad(weight: Tensor) -> Tensor:
    """An uninitialised gradient standing in for one already added to `main_grad`: megatron's
    hooks run only when autograd delivers a gradient, and ignore it for such weights. Every shape
    of a dtype and device shares one buffer (as large as the largest asked for); each call returns
    a fresh contiguous view, which autograd takes without copying."""
    key = (weight.dtype, weight.device)
    storage = _PLACEHOLDER_STORAGE.get(key)
    if storage is None or storage.numel() < weight.numel():
        storage = torch.empty(weight.numel(), dtype=weight.dtype, device=weight.device)
        _PLACEHOLDER_STORAGE[key] = storage
    return storage[: weight.numel()].view(weight.shape).detach()


class StackedExpertLinear(torch.nn.Module):
    """One TE grouped expert linear layer's weights as a single [experts, out, in] parameter
    `weight`; called like TE's layer, `(x sorted by expert, tokens per expert) -> (out, None)`.

    `tp_axis` is the per-expert weight's tensor-parallel axis (0 for fc1, 1 for fc2), used only
    to name the checkpoint's sharding; `pg_collection` supplies the expert-parallel groups."""

    def __init__(
        self,
        weight: Tensor,
        *,
        tp_axis: int,
        pg_collection: Any,
        fuse_wgrad_accumulation: bool,
        parameter_attributes: dict | None = None,
    ) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight)
        for name, value in (parameter_attributes or {}).items():
            setattr(self.weight, name, value)
        self.num_gemms = weight.shape[0]
        self.tp_axis = tp_axis
        self.pg_collection = pg_collection
        self.fuse_wgrad_accumulation = fuse_wgrad_accumulation

    @classmethod
    def from_te_layer(cls, linear: torch.nn.Module, tp_axis: int) -> StackedExpertLinear:
        """The TE layer's `weight0..N` stacked (copied), with weight0's megatron attributes
        (`allreduce=False` puts the parameter in the expert-data-parallel gradient buffer)."""
        weights = [getattr(linear, f"weight{i}") for i in range(linear.num_gemms)]
        attributes = {
            name: value
            for name, value in vars(weights[0]).items()
            if not name.startswith("_") and name != "main_grad"
        }
        if "partition_dim" in attributes:  # the stacked weight has the experts' axis first
            attributes["partition_dim"] += 1
        with torch.no_grad():
            stacked = torch.stack([w.detach() for w in weights])
        return cls(
            stacked,
            tp_axis=tp_axis,
            pg_collection=getattr(linear, "_pg_collection", None),
            fuse_wgrad_accumulation=bool(getattr(linear, "fuse_wgrad_accumulation", False)),
            parameter_attributes=attributes,
        )

    def forward(self, x: Tensor, m_splits: list[int]) -> tuple[Tensor, None]:
        counts = torch.as_tensor(m_splits, dtype=torch.int64)
        offsets = counts.cumsum(0).to(device=x.device, dtype=torch.int32, non_blocking=True)
        return GroupedGemm.apply(x, offsets, self.weight, self.fuse_wgrad_accumulation), None

    def backward_dw(self) -> None:
        """Weight gradients are computed in backward (delayed wgrad is refused)."""

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        weight = self.weight if keep_vars else self.weight.detach()
        for i in range(self.num_gemms):
            destination[f"{prefix}weight{i}"] = weight[i]

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ) -> None:
        # TE's layers also save `_extra_state` (FP8 scaling state); these layers run without FP8.
        for key in [k for k in state_dict if k.startswith(f"{prefix}_extra_state")]:
            state_dict.pop(key)
        with torch.no_grad():
            for i in range(self.num_gemms):
                key = f"{prefix}weight{i}"
                if key not in state_dict:
                    missing_keys.append(key)
                elif state_dict[key].shape != self.weight.shape[1:]:
                    errors.append(
                        f"{key}: shape {tuple(state_dict[key].shape)} in the checkpoint, "
                        f"{tuple(self.weight.shape[1:])} in the model"
                    )
                else:
                    self.weight[i].copy_(state_dict[key])
        if strict:
            known = {f"{prefix}weight{i}" for i in range(self.num_gemms)}
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in known)

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> dict:
        """One sharded tensor per expert, keyed by its global index as TE's grouped layers key
        theirs (`megatron`'s TEGroupedMLP then maps them to the experts' checkpoint names)."""
        from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        metadata = metadata or {}
        groups = self.pg_collection
        ep_size, ep_rank = groups.ep.size(), groups.ep.rank()
        singleton_local_shards = metadata.get("singleton_local_shards", False)
        ep_axis = len(sharded_offsets)
        sharded = {}
        weight = self.weight.detach()  # views of the parameter's storage, outside autograd
        for i in range(self.num_gemms):
            global_index = ep_rank * self.num_gemms + i
            if singleton_local_shards:
                expert_prefix, offsets = f"{global_index}.{prefix}", sharded_offsets
            else:
                expert_prefix = prefix
                offsets = (*sharded_offsets, (ep_axis, global_index, ep_size * self.num_gemms))
            sub = make_sharded_tensors_for_checkpoint(
                {f"{i}.weight": weight[i]},
                "",
                {f"{i}.weight": self.tp_axis},
                offsets,
                tp_group=groups.expt_tp,
                dp_cp_group=metadata.get("dp_cp_group"),
            )
            replace_prefix_for_sharding(sub, f"{i}.", expert_prefix)
            tensor = sub[f"{i}.weight"]
            # one writer per expert-data-parallel group (the experts' replicas)
            tensor.replica_id = (*tensor.replica_id[:2], groups.expt_dp.rank())
            sharded[f"{prefix}weight{i}"] = tensor
        return sharded

    def extra_repr(self) -> str:
        experts, out_features, in_features = self.weight.shape
        return f"experts={experts}, in={in_features}, out={out_features}, torch grouped GEMM"


def use_torch_grouped_gemm(model: torch.nn.Module) -> int:
    """Replace every routed-expert linear layer of megatron's `TEGroupedMLP` in `model` by a
    `StackedExpertLinear` holding the same weights, in place (before DDP wraps the model);
    returns how many layers were replaced. Refuses layers it cannot serve (biases, FP8, delayed
    wgrad, expert tensor parallelism) instead of computing something else, and a model with none
    to replace instead of silently training TE's experts."""
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
        if getattr(module.config, "expert_tensor_parallel_size", 1) not in (None, 1):
            raise ValueError(
                "torch grouped GEMM experts hold whole experts; set expert tensor parallel size 1"
            )
        for name, tp_axis in (("linear_fc1", 0), ("linear_fc2", 1)):
            linear = getattr(module, name)
            if getattr(linear, "use_bias", False):
                raise ValueError(f"{type(linear).__name__} has biases; torch grouped GEMM has none")
            setattr(module, name, StackedExpertLinear.from_te_layer(linear, tp_axis))
            switched += 1
    if not switched:
        raise ValueError(
            "--expert-gemm torch (EXPERT_GEMM=torch) found no TE grouped expert layers to switch "
            "in this model; use --expert-gemm te"
        )
    return switched
