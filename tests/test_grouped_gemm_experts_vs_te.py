"""Routed experts through torch's grouped GEMM against Transformer Engine's grouped experts (GPU).

    torchrun --nproc-per-node 1 tests/test_grouped_gemm_experts_vs_te.py

The tiny MoE model is built twice from the same weights under megatron DDP with training's TE
weight-gradient fusion; the second build's expert layers are replaced by
`grouped_gemm_experts.use_torch_grouped_gemm` (one stacked [experts, out, in] parameter per layer,
compared expert by expert under TE's names). Both take the same two micro-batches. Limits: both
compute in bf16 with different GEMM kernels, so each GEMM output may differ by one bf16 rounding,
2^-8 = 3.9e-3 relative; the losses (means over tokens) and every
parameter's accumulated fp32 `main_grad` (TE adds the expert weight gradients in fp32 inside its
GEMM, the grouped path rounds them to bf16 once before adding) must agree within that. A lost or
doubled expert gradient differs by 1.0 or more. Every routed-expert weight must be marked as
added by its layer, so megatron's hooks do not add a placeholder.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.gpu_harness import (
    BF16_ROUNDING,
    TWO_MICRO_BATCHES,
    Check,
    fuse_wgrad_accumulation,
    init_distributed,
    main_grads_after_micro_batches,
    needs_cuda,
    print_table,
    run_section,
    run_with_torchrun,
    tiny_config,
    worst_relative_difference,
)


def with_torch_grouped_experts(model) -> int:
    from grouped_gemm_experts import use_torch_grouped_gemm

    fuse_wgrad_accumulation(model)
    return use_torch_grouped_gemm(model)


def per_expert(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stacked expert weights `...linear_fcN.weight` [experts, out, in] under TE's per-expert
    names `...linear_fcN.weight{e}`; other entries unchanged."""
    split = {}
    for name, tensor in tensors.items():
        if ".mlp.experts.linear_fc" in name and name.endswith(".weight") and tensor.dim() == 3:
            split.update({f"{name}{e}": expert for e, expert in enumerate(tensor)})
        else:
            split[name] = tensor
    return split


def compare() -> list[Check]:
    config = tiny_config(moe=True)
    te = main_grads_after_micro_batches(config, None, fuse_wgrad_accumulation, TWO_MICRO_BATCHES)
    grouped = main_grads_after_micro_batches(
        config, te["initial"], with_torch_grouped_experts, TWO_MICRO_BATCHES
    )
    loss_error = max(
        abs(a - b) / abs(b) for a, b in zip(grouped["losses"], te["losses"], strict=True)
    )
    grouped_main_grads = per_expert(grouped["main_grads"])
    worst, error, differing = worst_relative_difference(grouped_main_grads, te["main_grads"])
    experts = [name for name in te["main_grads"] if ".mlp.experts." in name]
    marked = per_expert({name: grouped["main_grads"][name] for name in grouped["added_by_layer"]})
    unmarked = sorted(set(experts) - set(marked))
    return [
        Check("expert linear layers switched", grouped["prepared"], 1, "", True),
        Check(
            "micro-batch losses, grouped GEMM vs TE, worst rel",
            loss_error,
            BF16_ROUNDING,
            f"TE {te['losses']}, grouped {grouped['losses']}",
        ),
        Check(
            "main_grad grouped GEMM vs TE, worst parameter, rel",
            error,
            BF16_ROUNDING,
            f"{worst}; {differing} of {len(te['main_grads'])} parameters differ",
        ),
        Check(
            "routed-expert weights not marked as added by their layer",
            len(unmarked),
            0,
            f"of {len(experts)}; first: {unmarked[:1]}",
        ),
    ]


def main() -> int:
    init_distributed()
    checks = run_section("MoE", compare)
    return 0 if print_table("Routed experts: torch grouped GEMM vs TE", checks) else 1


@needs_cuda
def test_grouped_gemm_experts_vs_te():
    run_with_torchrun(__file__)


if __name__ == "__main__":
    sys.exit(main())
