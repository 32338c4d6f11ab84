"""The vision tower's layers as CUDA graphs (VISION_CUDA_GRAPH=1) against the eager tower (GPU).

    torchrun --nproc-per-node 1 tests/test_vision_cuda_graph.py
    torchrun --nproc-per-node 2 tests/test_vision_cuda_graph.py   # data parallel 2

The tiny model is built twice from the same weights under megatron DDP with TE's fused weight-
gradient accumulation, as training runs: eagerly, and with a vision `PatchBudget` (megatron-core's
per-layer graphs; DDP overlapping its gradient reduction, whose grad-ready counting the graphed
layers must still feed). Four micro-batches with different image counts and sizes accumulate
gradients: the first runs eagerly while megatron records the layers, the next three replay graphs
captured once on inputs padded to the budget. Each micro-batch's loss and every parameter's
`main_grad` must agree with the eager build's. The graphed layers see 512 padded rows where the
eager ones see each batch's own count, so GEMM tilings differ: they may differ by one bf16
rounding, 2^-8 relative (a replay that skipped or repeated a weight gradient, or read another
micro-batch's images, differs by far more). Under data parallelism each rank takes its own samples
(the seeds shifted by rank), so a gradient that missed DDP's reduction differs too.
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

# Beyond TWO_MICRO_BATCHES: two images in one micro-batch, then a single small one.
FOUR_MICRO_BATCHES = [
    *TWO_MICRO_BATCHES,
    (63, (200, 150), ((128, 160), (224, 96))),
    (64, (90,), ((64, 64),)),
]


def compare(rank: int) -> list[Check]:
    config = tiny_config()
    samples = [
        (seed + 1000 * rank, lengths, images) for seed, lengths, images in FOUR_MICRO_BATCHES
    ]
    eager = main_grads_after_micro_batches(config, None, fuse_wgrad_accumulation, samples)
    graphed = main_grads_after_micro_batches(
        config,
        eager["initial"],
        fuse_wgrad_accumulation,
        samples,
        vision_graph=dict(vision_graph_patches=512, vision_graph_images=4),
        overlap_grad_reduce=True,
    )
    vision = graphed["model"].module.vision
    graphs = sum(
        runner.fwd_graph is not None and runner.bwd_graph is not None
        for layer in vision.blocks.layers
        for runner in layer.cudagraph_manager.cudagraph_runners
    )
    loss_errors = [
        abs(g - e) / abs(e) for g, e in zip(graphed["losses"], eager["losses"], strict=True)
    ]
    worst, error, differing = worst_relative_difference(graphed["main_grads"], eager["main_grads"])
    vision_grads = {k: v for k, v in eager["main_grads"].items() if k.startswith("vision.blocks.")}
    vision_worst, vision_error, _ = worst_relative_difference(
        {k: graphed["main_grads"][k] for k in vision_grads}, vision_grads
    )
    return [
        Check(
            "vision layers with forward and backward graphs",
            graphs,
            len(vision.blocks.layers),
            f"of {len(vision.blocks.layers)} layers",
            True,
        ),
        Check(
            "loss per micro-batch, graphed vs eager, worst rel",
            max(loss_errors),
            BF16_ROUNDING,
            ", ".join(f"{e:.1e}" for e in loss_errors),
        ),
        Check(
            "main_grad graphed vs eager, worst parameter, rel",
            error,
            BF16_ROUNDING,
            f"{worst}; {differing} of {len(eager['main_grads'])} parameters differ",
        ),
        Check(
            "main_grad of the graphed vision blocks, worst parameter, rel",
            vision_error,
            BF16_ROUNDING,
            vision_worst,
        ),
    ]


def main() -> int:
    rank, world = init_distributed()
    checks = run_section(f"vision CUDA graphs, data parallel {world}", lambda: compare(rank))
    return 0 if print_table("vision tower as CUDA graphs vs eager", checks) else 1


@needs_cuda
def test_vision_cuda_graph():
    run_with_torchrun(__file__, min(torch.cuda.device_count(), 2))


if __name__ == "__main__":
    sys.exit(main())
