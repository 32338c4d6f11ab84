"""Parity of our megatron Qwen3.5-VL with HF transformers on the same weights (GPU, torchrun).

    torchrun --nproc-per-node 1 tests/test_hf_parity.py

Checks, for a tiny dense model (3 Gated DeltaNet + 1 attention layer) and a tiny MoE model:
parameter counts; patch merger and vision tower on two images of different sizes; whole-VLM
logits (BSHD and a THD pack) in fp32 and bf16; per-group gradient norms after one backward.
Exits non-zero when a check fails; pytest runs it through torchrun and skips it without CUDA.

Tolerances. Transformer Engine runs every pure-fp32 GEMM in TF32 (cublaslt_gemm.cu: "Use TF32
only for pure FP32 GEMM"), and fla's Triton kernels use TF32 dot products too, so an fp32
megatron model cannot match a true-fp32 reference beyond TF32 rounding (10-bit mantissa). Each
fp32 check therefore also measures that floor: the same HF model with torch's TF32 GEMMs enabled,
against itself in full fp32. The limit is max(goal, 2 x floor): two independent TF32
implementations (TE/cuBLASLt and torch/cuBLAS, different fusions) each contribute about one floor.
Under `NVIDIA_TF32_OVERRIDE=0` cuBLAS refuses TF32 for everyone, TE included: the floors vanish and
the fp32 checks test the goals themselves, except that fla's Triton kernels keep TF32 dot products,
so the fla logits row also allows 2 x the difference between our fp32 model with fla and with the
torch Gated DeltaNet rule (the kernel's own floor).
Goals: patch merger 3e-5 max abs, vision tower and logits 1e-4 relative, gradient-norm groups 1e-4.
bf16 runs are compared with the fp32 reference by top-1 agreement (goal >= 99.5%) and relative
error (bf16 keeps 8 mantissa bits: 3e-2 after a few layers). bf16 rounding alone flips near-tied
argmaxes, many on random weights: HF's own bf16 copy is measured against fp32 HF alongside, and
the tokens whose argmax flips may number 0.5% of the tokens or twice HF's own flips, whichever
is more (as in tests/test_qwen3_vl_parity.py).
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Iterator
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.gpu_harness import (
    Check,
    build_hf,
    build_megatron,
    collate,
    fp32_limit,
    group_norm,
    hf_inputs,
    hf_reference_kernels,
    init_distributed,
    load_hf_weights,
    make_sample,
    megatron_forward,
    needs_cuda,
    print_table,
    relative_error,
    run_section,
    run_with_torchrun,
    set_model_parallel,
    tiny_config,
    top1_flip_limit,
    top1_flips,
    torch_tf32,
)

SAMPLES = [  # (seed, text segment lengths, image sizes (h, w))
    (11, (9, 17, 6), ((64, 96), (160, 64))),
    (12, (5, 23), ((96, 96),)),
]


def vision_checks(config, hf, dtype_name: str) -> Iterator[Check]:
    """Patch merger and whole vision tower, our modules loaded from the HF weights."""
    from models.qwen35_vl.vision_inputs import VisionInputs

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    model = build_megatron(config, dtype)
    load_hf_weights(model, hf, config)
    hf_visual = hf.model.visual.to(dtype)
    torch.manual_seed(3)
    # fp32: enough rows that cuBLAS picks tensor-core (TF32) kernels for the floor measurement.
    rows = 4096 if dtype == torch.float32 else 64
    merger_input = torch.randn(rows, config.vision.hidden_size, device="cuda", dtype=dtype)
    sample = make_sample(config, *SAMPLES[0])
    vision = VisionInputs.from_grids(
        sample["pixel_values"], sample["image_grid_thw"], config.vision
    ).to("cuda")
    pixels, grid = sample["pixel_values"].cuda().to(dtype), sample["image_grid_thw"].cuda()
    with torch.no_grad():
        merger_ours = model.vision.merger(merger_input).float()
        tower_ours = model.vision(vision).float()
        references = {}
        for tf32 in (False, True):
            with torch_tf32(tf32):
                references[tf32] = (
                    hf_visual.merger(merger_input).float(),
                    hf_visual(pixels, grid_thw=grid).pooler_output.float(),
                )
    hf.float()
    (merger_ref, tower_ref), (merger_tf32, tower_tf32) = references[False], references[True]
    merger_error = float((merger_ours - merger_ref).abs().max())
    tower_error = relative_error(tower_ours, tower_ref)
    grids = sample["image_grid_thw"].tolist()
    if dtype == torch.bfloat16:
        yield Check("patch merger bf16 max abs", merger_error, 4e-3, "[64, 128] input")
        yield Check("vision tower bf16 rel", tower_error, 3e-2, f"grids {grids}")
        return
    merger_floor = float((merger_tf32 - merger_ref).abs().max())
    tower_floor = relative_error(tower_tf32, tower_ref)
    scale = float(merger_ref.abs().max())
    yield Check(
        "patch merger fp32 max abs",
        merger_error,
        fp32_limit(3e-5, merger_floor),
        f"[4096, 128] input, TF32 floor {merger_floor:.2e}, max |out| {scale:.2f}",
    )
    yield Check(
        "vision tower fp32 rel",
        tower_error,
        fp32_limit(1e-4, tower_floor),
        f"TF32 floor {tower_floor:.2e}, grids {grids}",
    )


def logits_checks(config, hf, tag: str) -> Iterator[Check]:
    """Whole-model logits: fp32 with the torch GDN rule and with fla; bf16; a THD pack."""
    samples = [make_sample(config, *spec) for spec in SAMPLES]
    with torch.no_grad():
        references = [hf(**hf_inputs(s, config, torch.float32)).logits[0] for s in samples]
        with torch_tf32(True):
            floors = [
                relative_error(hf(**hf_inputs(s, config, torch.float32)).logits[0], reference)
                for s, reference in zip(samples, references, strict=True)
            ]
    floor = max(floors)
    hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)
    with torch.no_grad():
        hf_bf16_logits = [
            hf_bf16(**hf_inputs(s, config, torch.bfloat16)).logits[0].float() for s in samples
        ]
    del hf_bf16
    hf_bf16_flips = top1_flips(hf_bf16_logits, references)
    tokens = sum(reference.shape[0] for reference in references)
    torch_rule_logits: list[torch.Tensor] = []  # filled by the first pass
    for label, dtype, deterministic in (
        ("fp32 torch GDN", torch.float32, True),
        ("fp32 fla GDN", torch.float32, False),
        ("bf16 fla GDN", torch.bfloat16, False),
    ):
        model = build_megatron(config, dtype, deterministic_mode=deterministic)
        load_hf_weights(model, hf, config)
        errors, pass_logits = [], []
        for sample, reference in zip(samples, references, strict=True):
            length = sample["input_ids"].numel()
            batch = collate([sample], config, "bshd", seq_length=length)
            # With autograd on: TE offers no fp32 attention backend for inference-mode calls.
            logits = megatron_forward(model, batch)[0, :length].detach().float()
            errors.append(relative_error(logits, reference))
            pass_logits.append(logits)
        if deterministic:
            torch_rule_logits = pass_logits
        if dtype == torch.bfloat16:
            limit, detail = 3e-2, "vs fp32 HF"
        elif deterministic:
            limit, detail = fp32_limit(1e-4, floor), f"TF32 floor {floor:.2e}"
        else:
            # fla's Triton kernels keep TF32 dot products whatever cuBLAS does: their own floor
            # is our fp32 model with fla against the same model with the torch rule.
            kernel_floor = max(
                relative_error(fla, torch_rule)
                for fla, torch_rule in zip(pass_logits, torch_rule_logits, strict=True)
            )
            # Bounded on its own, so that a wrong kernel cannot widen the row below: TF32 keeps
            # 10 mantissa bits (unit roundoff 4.9e-4); 1e-3 is two of those.
            yield Check(
                f"{tag} logits fp32: fla kernel vs torch rule (ours), rel", kernel_floor, 1e-3
            )
            limit = max(fp32_limit(1e-4, floor), 2 * kernel_floor)
            detail = f"TF32 floor {floor:.2e}, fla kernel vs torch rule {kernel_floor:.2e}"
        yield Check(f"{tag} logits {label} rel", max(errors), limit, detail + ", BSHD")
        if dtype == torch.bfloat16:
            yield Check(
                f"{tag} top-1 flips bf16",
                top1_flips(pass_logits, references),
                top1_flip_limit(hf_bf16_flips, tokens),
                f"of {tokens} tokens; HF bf16 {hf_bf16_flips}",
            )
        if dtype == torch.bfloat16:
            # THD (TE has no fp32 kernel for packed causal attention): both samples packed in
            # one row, each compared with HF run alone.
            lengths = [s["input_ids"].numel() for s in samples]
            batch = collate(samples, config, "thd", seq_length=max(lengths), pad_multiple=8)
            packed = megatron_forward(model, batch)[0].detach().float()
            starts = batch["cu_seqlens_padded"].tolist()[:-1]
            thd_error = max(
                relative_error(packed[start : start + n], reference)
                for start, n, reference in zip(starts, lengths, references, strict=True)
            )
            yield Check(f"{tag} logits {label} THD pack rel", thd_error, limit, detail + ", 2 seqs")
        del model


def hf_gradients(hf, sample, batch, config) -> dict[str, torch.Tensor]:
    """Gradients of the masked mean token loss in the HF model (checkpoint-layout names)."""
    from models.qwen35_vl.hf_weights import split_fused_experts

    hf.zero_grad()
    logits = hf(**hf_inputs(sample, config, torch.float32)).logits[0].float()
    labels, mask = batch["labels"][0].cuda(), batch["loss_mask"][0].cuda()
    token_losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    (torch.sum(token_losses * mask) / mask.sum()).backward()
    grads = {n: p.grad.detach().clone() for n, p in hf.named_parameters() if p.grad is not None}
    return split_fused_experts(grads, config)


def gradient_group(name: str) -> str:
    return (
        "vision" if ".visual." in name
        else "embeddings/head" if "embed_tokens" in name or "lm_head" in name
        else "gated deltanet" if "linear_attn" in name
        else "attention" if "self_attn" in name
        else "experts" if ".experts." in name
        else "mlp/router/norms"
    )  # fmt: skip


def gradient_checks(config, hf, tag: str) -> Iterator[Check]:
    """One backward of the same loss on both sides (fp32, torch GDN rule); per-group relative
    difference of gradient norms. The MoE load-balancing loss is off on our side because HF's
    forward (without output_router_logits) has none."""
    import dataclasses

    from models.qwen35_vl.hf_weights import megatron_to_hf

    sample = make_sample(config, *SAMPLES[0])
    batch = collate([sample], config, "bshd", seq_length=sample["input_ids"].numel())
    no_aux = dataclasses.replace(
        config, text=dataclasses.replace(config.text, router_aux_loss_coef=0.0)
    )
    model = build_megatron(no_aux, torch.float32, deterministic_mode=True)
    load_hf_weights(model, hf, config)
    losses = megatron_forward(model, batch, with_labels=True)
    mask = batch["loss_mask"].cuda()
    (torch.sum(losses.float() * mask) / mask.sum()).backward()
    ours = megatron_to_hf(
        {
            n: p.grad if p.grad is not None else torch.zeros_like(p)
            for n, p in model.named_parameters()
        },
        config,
    )
    reference = hf_gradients(hf, sample, batch, config)
    with torch_tf32(True):
        reference_tf32 = hf_gradients(hf, sample, batch, config)

    groups: dict[str, list[str]] = {}
    for name in reference:
        groups.setdefault(gradient_group(name), []).append(name)
    for group, names in sorted(groups.items()):
        ref_norm = group_norm(reference, names)
        error = float((group_norm(ours, names) - ref_norm).abs() / ref_norm)
        floor = float((group_norm(reference_tf32, names) - ref_norm).abs() / ref_norm)
        difference = {n: ours[n].double() - reference[n].double() for n in names}
        diff = float(group_norm(difference, names) / ref_norm)
        yield Check(
            f"{tag} grad norm {group}",
            error,
            fp32_limit(1e-4, floor),
            f"|g|={float(ref_norm):.3e}, TF32 floor {floor:.1e}, rel ||dg||={diff:.1e}",
        )
    del model


def count_checks(config, tag: str) -> Iterator[Check]:
    model = build_megatron(config, torch.bfloat16)
    ours = sum(p.numel() for p in model.parameters())
    expected = config.parameter_counts()
    mtp_model = build_megatron(config.with_mtp_layers(1), torch.bfloat16)
    ours_mtp = sum(p.numel() for p in mtp_model.parameters()) - ours
    yield Check(f"{tag} params vs config", abs(ours - expected.total), 0, f"{ours:,}")
    yield Check(
        f"{tag} MTP params vs config",
        abs(ours_mtp - config.with_mtp_layers(1).parameter_counts().mtp),
        0,
        f"{ours_mtp:,}",
    )


def main() -> int:
    # megatron's deterministic mode (torch GDN rule) requires TE's deterministic attention.
    os.environ["NVTE_ALLOW_NONDETERMINISTIC_ALGO"] = "0"
    init_distributed()
    set_model_parallel()
    hf_reference_kernels()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ok = True
    for moe in (False, True):
        config = tiny_config(moe=moe)
        tag = config.name
        hf = build_hf(config)
        sections = [
            ("parameter counts", partial(count_checks, config, tag)),
            ("logits", partial(logits_checks, config, hf, tag)),
            ("gradients", partial(gradient_checks, config, hf, tag)),
        ]
        if not moe:
            sections[1:1] = [
                ("vision fp32", partial(vision_checks, config, hf, "fp32")),
                ("vision bf16", partial(vision_checks, config, hf, "bf16")),
            ]
        tf32_refused = os.environ.get("NVIDIA_TF32_OVERRIDE") == "0"
        no_tf32 = " (NVIDIA_TF32_OVERRIDE=0)" if tf32_refused else ""
        for title, run in sections:
            ok &= print_table(f"HF parity, {tag}: {title}{no_tf32}", run_section(title, run))
        del hf
        torch.cuda.empty_cache()
    return 0 if ok else 1


@needs_cuda
def test_hf_parity():
    run_with_torchrun(__file__)


if __name__ == "__main__":
    sys.exit(main())
