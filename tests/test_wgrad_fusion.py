"""Fused weight-gradient accumulation in the TE layers against megatron DDP's own add (GPU).

    torchrun --nproc-per-node 1 tests/test_wgrad_fusion.py

`megatron_compat.fuse_wgrad_accumulation_in_te_layers` makes every TE layer add its weight
gradient into the fp32 `main_grad` inside the wgrad GEMM. The same tiny model (dense, and MoE for
TE's grouped expert GEMMs) is built twice from one seed under megatron DDP, once fused and once
not, and takes the same two micro-batches (gradients accumulate across them). Every parameter's
`main_grad` must agree: the unfused path rounds each micro-batch's weight gradient to bf16 before
its fp32 add and the fused one does not, so they may differ by one bf16 rounding, 2^-8 = 3.9e-3
relative (difference norm / gradient norm, per parameter); a gradient counted twice or lost
differs by 1.0 or more. The TE layers must have been switched and must have marked their weights
`grad_added_to_main_grad`, and the non-TE output layer must have kept megatron's add.
The second build loads the first one's weights.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.gpu_harness import (
    Check,
    build_megatron,
    collate,
    init_distributed,
    make_sample,
    megatron_forward,
    needs_cuda,
    print_table,
    run_section,
    run_with_torchrun,
    set_model_parallel,
    tiny_config,
)

BF16_ROUNDING = 2.0**-8
SAMPLES = [(61, (120, 200), ((160, 224),)), (62, (300, 41), ((96, 128),))]


def main_grads_after_two_micro_batches(
    config, fused: bool, weights: dict[str, torch.Tensor] | None
) -> tuple[dict, dict, int, list[str]]:
    """(the model's initial weights, main_grad per parameter, TE layers switched, names of the
    weights TE marked as added). `weights` (the other build's) are loaded first: megatron's
    initialisation is not reproducible from one seed across two builds in a process."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_compat import fuse_wgrad_accumulation_in_te_layers

    set_model_parallel(seed=1234)
    model = build_megatron(config, torch.bfloat16)
    if weights is not None:
        model.load_state_dict(weights, strict=True)
    initial = {k: v.clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}
    ddp_args = argparse.Namespace(
        use_megatron_fsdp=False, use_torch_fsdp2=False, gradient_accumulation_fusion=False
    )
    switched = fuse_wgrad_accumulation_in_te_layers(model, ddp_args) if fused else 0
    language = model.language_model.config
    model = DistributedDataParallel(
        language, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model
    )
    model.zero_grad_buffer()
    for seed, lengths, images in SAMPLES:
        sample = make_sample(config, seed, lengths, images)
        batch = collate([sample], config, "bshd", 640)
        losses = megatron_forward(model, batch, with_labels=True)
        mask = batch["loss_mask"].cuda().float()
        ((losses.float() * mask).sum() / mask.sum()).backward()
    model.finish_grad_sync()
    marked = [
        name
        for name, param in model.module.named_parameters()
        if getattr(param, "grad_added_to_main_grad", False)
    ]
    grads = {
        name: param.main_grad.detach().clone() for name, param in model.module.named_parameters()
    }
    return initial, grads, switched, marked


def compare(moe: bool) -> list[Check]:
    config = tiny_config(moe=moe)
    label = "MoE" if moe else "dense"
    weights, reference, _, _ = main_grads_after_two_micro_batches(config, False, None)
    _, fused, switched, marked = main_grads_after_two_micro_batches(config, True, weights)
    errors = {
        name: float((fused[name] - ref).norm() / ref.norm().clamp_min(1e-30))
        for name, ref in reference.items()
    }
    worst = max(errors, key=errors.get)
    output_marked = [name for name in marked if "output_layer" in name]
    return [
        Check(f"{label}: TE layers switched to fused accumulation", switched, 1, "", True),
        Check(
            f"{label}: weights whose gradient TE added to main_grad",
            len(marked),
            1,
            f"of {len(reference)} parameters",
            True,
        ),
        Check(
            f"{label}: output layer marked as fused (must keep megatron's add)",
            len(output_marked),
            0,
        ),
        Check(
            f"{label}: main_grad fused vs unfused, worst parameter, rel",
            errors[worst],
            BF16_ROUNDING,
            f"{worst}; {sum(e > 0 for e in errors.values())} of {len(errors)} parameters differ",
        ),
    ]


def main() -> int:
    init_distributed()
    checks = run_section("dense", lambda: compare(moe=False))
    checks += run_section("MoE", lambda: compare(moe=True))
    return 0 if print_table("TE fused weight-gradient accumulation", checks) else 1


@needs_cuda
def test_wgrad_fusion():
    run_with_torchrun(__file__)


if __name__ == "__main__":
    sys.exit(main())
