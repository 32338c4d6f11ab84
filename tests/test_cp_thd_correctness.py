"""Context parallelism with BSHD and packed THD batches: CP=N against CP=1 (GPU, torchrun).

    torchrun --nproc-per-node 2 tests/test_cp_thd_correctness.py

One process group runs CP=1, then CP=N (megatron's groups rebuilt between phases, rank 0's weights
on every rank, pinned from one state dict, inputs from seeded generators): the proxy model with
images, B=2, unequal sequence lengths, bf16. Losses are per-token means (sum of losses and of
tokens all-reduced over CP); gradients are summed over CP, as megatron's DDP does over its data x
context group. Also: BSHD and THD losses at CP=1 on equal-length sequences, and a THD pack of 3
sequences against each sequence alone. MTP is off here (its loss enters through megatron's
training-loop scaling).

Tolerances (bf16): loss relative difference <= 1e-3, grad-norm relative difference <= 1e-2 and
the whole gradient's relative difference |g - g_ref| / |g_ref| <= 2^-5 (eight bf16 roundings; the
norms alone can agree while the gradients do not) —
CP changes the reduction order of attention (ring/p2p partial softmax) and of the Gated DeltaNet
all-to-all layout, which in bf16 moves results by ~1e-3. Packed vs alone: <= 1e-3 relative per
sequence (different GEMM shapes pick different bf16 accumulation orders).
"""

from __future__ import annotations

import itertools
import os
import sys
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.gpu_harness import (
    Check,
    build_megatron,
    collate,
    group_norm,
    init_distributed,
    make_sample,
    needs_cuda,
    print_table,
    run_with_torchrun,
    set_model_parallel,
    worst_relative_difference,
)

# Eight bf16 roundings (2^-8 each) of the whole gradient vector: CP reorders the attention and
# Gated DeltaNet reductions, and the summed differences of a few roundings per layer stay well
# below this, while ranks running different weights were 23% apart.
GRADIENT_LIMIT = 2**-5

# Unequal lengths with images: (seed, text segment lengths, image sizes).
UNEQUAL = [(21, (40, 300, 37), ((128, 224), (320, 96))), (22, (150, 91), ((160, 160),))]


def proxy_config():
    from models.qwen35_vl.configuration import get_variant

    return get_variant("proxy").with_mtp_layers(0)


def loss_and_gradients(model, cpu_batch, cp_group) -> tuple[float, dict[str, torch.Tensor]]:
    """Per-token mean loss over all CP ranks and the CP-summed gradient of every parameter."""
    from forward_step import partition_for_context_parallel, run_model, to_device

    model.zero_grad(set_to_none=True)
    batch = partition_for_context_parallel(to_device(cpu_batch, torch.device("cuda")), cp_group)
    losses = run_model(model, batch)
    mask = batch["loss_mask"].float()
    local_sum = torch.sum(losses.float() * mask)
    totals = torch.stack([local_sum.detach(), mask.sum()])
    dist.all_reduce(totals, group=cp_group)
    (local_sum / totals[1]).backward()
    gradients = {}
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad, group=cp_group)
            gradients[name] = parameter.grad.double()
    return float(totals[0] / totals[1]), gradients


def norm(gradients: dict[str, torch.Tensor]) -> float:
    return float(group_norm(gradients, list(gradients)))


def gradient_difference(
    gradients: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
) -> tuple[float, str]:
    """|g - g_ref| / |g_ref| over all parameters, and the parameter that differs most."""
    assert gradients.keys() == reference.keys(), "CP changed which parameters get gradients"
    differences = {n: g - reference[n] for n, g in gradients.items()}
    worst, error, _ = worst_relative_difference(gradients, reference)
    return norm(differences) / norm(reference), f"{worst} {error:.2e}"


def per_sequence_losses(model, cpu_batch) -> list[float]:
    """Mean loss of each sequence of a THD pack (CP=1)."""
    from tests.gpu_harness import megatron_forward

    losses = megatron_forward(model, cpu_batch, with_labels=True)[0].detach().float()
    mask = cpu_batch["loss_mask"][0].cuda()
    bounds = cpu_batch["cu_seqlens_padded"].tolist()
    return [
        float((losses[a:b] * mask[a:b]).sum() / mask[a:b].sum())
        for a, b in itertools.pairwise(bounds)
    ]


def main() -> int:
    from megatron.core import parallel_state

    _, world = init_distributed()
    config = proxy_config()
    pad = 2 * world  # per-sequence multiple for CP=world (TP=1)
    unequal = [make_sample(config, *spec) for spec in UNEQUAL]
    equal = [make_sample(config, seed, (120, 248), ((192, 192),)) for seed in (31, 32)]
    longest = max(s["input_ids"].numel() for s in unequal)
    seq_length = -(-longest // pad) * pad
    batches = {
        "BSHD": collate(unequal, config, "bshd", seq_length, pad_multiple=pad),
        "THD": collate(unequal, config, "thd", seq_length, pad_multiple=pad),
    }

    set_model_parallel(cp=1)
    model = build_megatron(config, torch.bfloat16)
    # The vision tower's patch and position embeddings are plain torch layers initialised from
    # torch's CPU generator, which megatron's seeding of the CUDA generators leaves alone (training
    # seeds it alike on every rank); every rank takes rank 0's weights, or the CP ranks would run
    # different vision towers.
    for tensor in model.state_dict().values():
        if torch.is_tensor(tensor) and tensor.is_cuda:  # TE's extra state is host bytes
            dist.broadcast(tensor, src=0)
    # TE keeps `_extra_state` entries that are None (TE 2.20) or bytes: only tensors are cloned.
    pinned = {
        k: v.detach().clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()
    }
    reference = {
        mode: loss_and_gradients(model, batch, parallel_state.get_context_parallel_group())
        for mode, batch in batches.items()
    }
    checks: list[Check] = []

    equal_length = equal[0]["input_ids"].numel()
    assert all(s["input_ids"].numel() == equal_length for s in equal)
    cp1 = parallel_state.get_context_parallel_group()
    bshd_loss, _ = loss_and_gradients(model, collate(equal, config, "bshd", equal_length), cp1)
    thd_loss, _ = loss_and_gradients(model, collate(equal, config, "thd", equal_length), cp1)
    checks.append(
        Check(
            "BSHD vs THD loss at CP=1 (equal lengths) |diff|",
            abs(bshd_loss - thd_loss),
            5e-8,
            f"BSHD {bshd_loss:.8f} THD {thd_loss:.8f} (7 decimals)",
        )
    )

    three = [
        make_sample(config, seed, (n, 30), ((96, 160),))
        for seed, n in ((41, 60), (42, 200), (43, 9))
    ]
    pack = collate(three, config, "thd", seq_length=512, pad_multiple=8)
    packed_losses = per_sequence_losses(model, pack)
    alone = [per_sequence_losses(model, collate([s], config, "thd", 512, 8))[0] for s in three]
    worst = max(abs(p - a) / abs(a) for p, a in zip(packed_losses, alone, strict=True))
    checks.append(
        Check(
            "THD pack of 3 vs each alone, max rel",
            worst,
            1e-3,
            " / ".join(f"{p:.5f}~{a:.5f}" for p, a in zip(packed_losses, alone, strict=True)),
        )
    )
    del model
    torch.cuda.empty_cache()

    if world > 1:
        set_model_parallel(cp=world)
        model = build_megatron(config, torch.bfloat16)
        model.load_state_dict(pinned)
        cp_group = parallel_state.get_context_parallel_group()
        for mode, batch in batches.items():
            loss, gradients = loss_and_gradients(model, batch, cp_group)
            ref_loss, ref_gradients = reference[mode]
            lengths = [s["input_ids"].numel() for s in unequal]
            shape = f"{tuple(batch['input_ids'].shape)}, lengths {lengths}"
            checks.append(
                Check(
                    f"{mode} CP={world} vs CP=1 loss rel",
                    abs(loss - ref_loss) / abs(ref_loss),
                    1e-3,
                    f"{loss:.6f} vs {ref_loss:.6f}; bf16; {shape}",
                )
            )
            grad_norm, ref_norm = norm(gradients), norm(ref_gradients)
            checks.append(
                Check(
                    f"{mode} CP={world} vs CP=1 grad-norm rel",
                    abs(grad_norm - ref_norm) / ref_norm,
                    1e-2,
                    f"{grad_norm:.5f} vs {ref_norm:.5f}",
                )
            )
            difference, worst = gradient_difference(gradients, ref_gradients)
            checks.append(
                Check(
                    f"{mode} CP={world} vs CP=1 gradients |g - g_ref| / |g_ref|",
                    difference,
                    GRADIENT_LIMIT,
                    f"worst parameter {worst}",
                )
            )
    ok = print_table(f"CP/THD correctness, proxy, world {world}", checks)
    dist.destroy_process_group()
    return 0 if ok else 1


@needs_cuda
def test_cp_thd_correctness():
    run_with_torchrun(__file__, min(torch.cuda.device_count(), 2))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(1)
