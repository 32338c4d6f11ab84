"""Fused weight-gradient accumulation against megatron DDP's own add (GPU).

    torchrun --nproc-per-node 1 tests/test_wgrad_fusion.py

`megatron_compat.fuse_wgrad_accumulation_into_main_grad` makes every TE layer, and megatron's own
output layer (through TE's GEMM in place of APEX's kernel), add its weight gradient into the fp32
`main_grad` inside the wgrad GEMM, and the word embedding add its looked-up rows' gradients there
(`EmbeddingGradientIntoMainGrad`). The same tiny model (dense, and MoE for
TE's grouped expert GEMMs) is built twice from one seed under megatron DDP, once fused and once
not, and takes the same two micro-batches (gradients accumulate across them). Every parameter's
`main_grad` must agree: the unfused path rounds each micro-batch's weight gradient to bf16 before
its fp32 add and the fused one does not, so they may differ by one bf16 rounding, 2^-8 = 3.9e-3
relative (difference norm / gradient norm, per parameter); a gradient counted twice or lost
differs by 1.0 or more. The layers must have been switched and must have marked their weights
`grad_added_to_main_grad`, the output layer's and the embedding's among them (their gradients
are also checked alone; the unfused embedding rounds each row's sum to bf16 first). With
multi-token prediction the embedding's weight is shared with MTP's copy (megatron marks it
`zero_out_wgrad` and adds every gradient it receives), so there it must keep megatron's lookup.
The second build loads the first one's weights.
"""

from __future__ import annotations

import os
import sys

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


def compare(moe: bool, mtp_layers: int = 0) -> list[Check]:
    config = tiny_config(moe=moe, mtp_layers=mtp_layers)
    label = ("MoE" if moe else "dense") + (" with MTP" if mtp_layers else "")
    reference = main_grads_after_micro_batches(config, None, lambda model: 0, TWO_MICRO_BATCHES)
    fused = main_grads_after_micro_batches(
        config, reference["initial"], fuse_wgrad_accumulation, TWO_MICRO_BATCHES
    )
    worst, error, differing = worst_relative_difference(
        fused["main_grads"], reference["main_grads"]
    )
    marked = fused["added_by_layer"]

    def alone(layer: str) -> tuple[list[str], list[str], float]:
        """The layer's weights marked as added, all its weights, and their worst error."""
        names = [name for name in reference["main_grads"] if layer in name]
        _, worst_error, _ = worst_relative_difference(
            {name: fused["main_grads"][name] for name in names},
            {name: reference["main_grads"][name] for name in names},
        )
        return [name for name in marked if layer in name], names, worst_error

    output_marked, output_grads, output_error = alone("output_layer")
    embedding_marked, embedding_grads, embedding_error = alone("word_embeddings")
    return [
        Check(f"{label}: layers switched to fused accumulation", fused["prepared"], 1, "", True),
        Check(
            f"{label}: weights whose gradient TE added to main_grad",
            len(marked),
            1,
            f"of {len(reference['main_grads'])} parameters",
            True,
        ),
        Check(
            f"{label}: output layer's weight marked as added by its GEMM",
            len(output_marked),
            1,
            ", ".join(output_marked) or "none",
            True,
        ),
        Check(
            f"{label}: output layer's main_grad fused vs unfused, rel",
            output_error,
            BF16_ROUNDING,
            ", ".join(output_grads),
        ),
        Check(
            f"{label}: word embedding's weight marked as added by its lookup"
            + (" (must be none: shared with MTP)" if mtp_layers else ""),
            len(embedding_marked),
            0 if mtp_layers else 1,
            ", ".join(embedding_marked) or "none",
            not mtp_layers,
        ),
        Check(
            f"{label}: word embedding's main_grad fused vs unfused, rel",
            embedding_error,
            BF16_ROUNDING,
            ", ".join(embedding_grads),
        ),
        Check(
            f"{label}: main_grad fused vs unfused, worst parameter, rel",
            error,
            BF16_ROUNDING,
            f"{worst}; {differing} of {len(reference['main_grads'])} parameters differ",
        ),
    ]


def main() -> int:
    init_distributed()
    checks = run_section("dense", lambda: compare(moe=False))
    checks += run_section("MoE", lambda: compare(moe=True))
    checks += run_section("dense with MTP", lambda: compare(moe=False, mtp_layers=1))
    return 0 if print_table("TE fused weight-gradient accumulation", checks) else 1


@needs_cuda
def test_wgrad_fusion():
    run_with_torchrun(__file__)


if __name__ == "__main__":
    sys.exit(main())
