"""Parity of our megatron Qwen3-VL with HF transformers on the same weights (GPU, torchrun).

    torchrun --nproc-per-node 1 tests/test_qwen3_vl_parity.py

Checks, for a tiny dense model and a tiny MoE model (3 decoder layers, hidden 256, 4 query heads
of head_dim 64 over 2 KV groups, MRoPE sections (12, 10, 10); a 3-block vision tower whose three
blocks all feed DeepStack levels, i.e. the first 3 decoder layers; MoE: 8 experts, top-2), with the
HF model's random weights (every 1-D tensor perturbed, so that a wrong norm convention or a
dropped bias shows) loaded into ours through `models/qwen3_vl/hf_weights.py`:

1. parameter counts: ours == HF == `config.parameter_counts().total`, exactly;
2. vision tower, fp32: our merged features and each DeepStack level against HF's
   `pooler_output` / `deepstack_features`, on three images of different sizes;
3. whole-model logits, fp32: a BSHD batch of two samples padded to the longer one, and one THD
   pack of both, each sample over its real tokens against HF run on it alone; plus how far HF's
   own logits move without DeepStack, which must be far above the limit (the check can see a
   DeepStack bug);
4. the bf16 model (same weights) against fp32 HF, BSHD and THD: relative error and top-1
   agreement;
5. gradients: one fp32 backward of the masked mean token loss of one sample on both sides; our
   gradients mapped to HF names (`hf_weights.megatron_to_hf`, so both sides group the same
   tensors), compared by group norm (vision patch / position embeddings, vision blocks, final
   merger, DeepStack mergers, token embeddings, attention, MLP, router, routed experts, norms,
   output layer). The MoE load-balancing loss is off on our side: HF's forward has none.
Exits non-zero when a check fails; pytest runs it through torchrun and skips it without CUDA.

Tolerances (as tests/test_hf_parity.py). Transformer Engine runs every pure-fp32 GEMM in TF32
(cublaslt_gemm.cu: "Use TF32 only for pure FP32 GEMM"), so an fp32 megatron model cannot match a
true-fp32 reference beyond TF32 rounding (10-bit mantissa). Each fp32 check therefore also
measures that floor: the same HF model with torch's TF32 GEMMs enabled, against itself in full
fp32. The limit is max(goal, 2 x floor): two independent TF32 implementations (TE/cuBLASLt and
torch/cuBLAS, different fusions) each contribute about one floor. Under `NVIDIA_TF32_OVERRIDE=0`
cuBLAS refuses TF32 for everyone, TE included: the floors vanish and the fp32 checks test the goals
themselves. Goals: vision outputs, logits and gradient-norm groups 1e-4 relative.

bf16 runs are compared with the fp32 reference by relative error (goal 3e-2: bf16 keeps 8 mantissa
bits) and top-1 agreement (goal 99.5%). bf16 rounding alone flips near-tied top-1 decisions, and
random weights give flat logits with many near ties: on the CPU, HF's own bf16 copy of the tiny
dense model flipped 18 of the 631 tokens (2.9%); an MoE model also flips near-tied routing
decisions, which moves whole tokens. So the bf16 rows measure their floor too, HF's own model cast
to bf16 against fp32 HF: the limits are max(3e-2, 2 x its relative error) and at most
max(0.5% of the tokens, 2 x its count) tokens whose argmax flips. The MoE model faces the same
goals as the dense one, as in tests/test_hf_parity.py; its TF32 floors include HF's own routing
flips.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.qwen3_vl.configuration import Qwen3VLConfig, TextConfig, VisionConfig
from tests.gpu_harness import (
    TINY_TOKENS,
    Check,
    base_transformer_config,
    collate,
    fp32_limit,
    group_norm,
    hf_inputs,
    init_distributed,
    load_hf_tensors,
    make_sample,
    megatron_forward,
    needs_cuda,
    perturb_hf_parameters,
    print_table,
    relative_error,
    run_section,
    run_with_torchrun,
    set_model_parallel,
    top1_flip_limit,
    top1_flips,
    torch_tf32,
)

# (seed, text segment lengths, image sizes (h, w)): 340 and 291 tokens, enough that the top-1
# agreement rows count flips by the handful rather than one or none.
SAMPLES = [
    (11, (90, 170, 60), ((64, 96), (160, 64))),
    (12, (50, 230), ((96, 96),)),
]
# The vision check's images: 384 patches, enough rows that cuBLAS runs TF32 tensor-core kernels
# for the floor measurement.
VISION_SAMPLE = (13, (3, 3, 3, 3), ((64, 96), (160, 64), (256, 320)))

GOAL = 1e-4  # fp32 vision outputs, logits and gradient-norm groups, relative
BF16_LOGITS_LIMIT = 3e-2
# Dropping DeepStack must move HF's logits by this many times the fp32 logits limit.
DEEPSTACK_EFFECT_FACTOR = 10.0


def tiny_config(moe: bool = False) -> Qwen3VLConfig:
    """3 decoder layers, head_dim 64 (MRoPE sections (12, 10, 10) over its 32 frequencies),
    vocabulary 1024 with the harness's special tokens; a 3-block vision tower whose blocks
    0, 1, 2 feed the DeepStack levels of decoder layers 0, 1, 2."""
    text: dict[str, Any] = dict(
        vocab_size=1024,
        hidden_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        mrope_section=(12, 10, 10),
        intermediate_size=512,
        max_position_embeddings=4096,
    )
    if moe:
        text.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64)
    vision = VisionConfig(
        depth=3,
        hidden_size=128,
        intermediate_size=256,
        num_heads=2,
        out_hidden_size=256,
        deepstack_visual_indexes=(0, 1, 2),
    )
    return Qwen3VLConfig(
        name="tiny-qwen3-vl-moe" if moe else "tiny-qwen3-vl",
        text=TextConfig(**text),
        vision=vision,
        source="test",
        **TINY_TOKENS,
    )


# ---- models and inputs ------------------------------------------------------------------------


def build_ours(config: Qwen3VLConfig, dtype: torch.dtype) -> torch.nn.Module:
    """Our model (TP=1) with every parameter in `dtype`, as megatron's Float16Module makes it."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_compat import apply_patches
    from models.qwen3_vl.factory import build_model

    apply_patches()
    base = base_transformer_config(config, dtype)
    model = build_model(config, base, ProcessGroupCollection.use_mpu_process_groups()).cuda()
    return model.to(dtype)


def build_reference(config: Qwen3VLConfig, seed: int = 0) -> torch.nn.Module:
    """The HF model in fp32 with random, perturbed weights; eager attention and the eager
    per-expert loop, plain torch ops whose TF32 use torch's flags decide."""
    from models.qwen3_vl.hf_weights import hf_model_class

    torch.manual_seed(seed)
    hf_config = config.to_hf_config(attn_implementation="eager", experts_implementation="eager")
    model = hf_model_class(config)(hf_config)
    perturb_hf_parameters(model, seed + 1)
    return model.cuda().eval()


def load_reference_weights(model: torch.nn.Module, hf: torch.nn.Module, config: Qwen3VLConfig):
    """HF's weights (fused experts in transformers' layout) into our model; strict except for
    TE's `_extra_state` entries."""
    from models.qwen3_vl.hf_weights import hf_to_megatron

    load_hf_tensors(model, hf.state_dict(), config, hf_to_megatron)


def collate_samples(
    samples: list[dict[str, torch.Tensor]],
    config: Qwen3VLConfig,
    mode: str,
    seq_length: int,
    pad_multiple: int = 1,
) -> dict[str, Any]:
    """The training collate with Qwen3-VL's position ids and vision inputs."""
    from models.qwen35_vl.vision_inputs import SampleInputs

    return collate(
        samples, config, mode, seq_length, pad_multiple, model_inputs=SampleInputs.of(config)
    )


def reference_logits(
    hf: torch.nn.Module, sample: dict[str, torch.Tensor], config: Qwen3VLConfig
) -> torch.Tensor:
    """HF's logits [L, V] (as fp32) of one sample run alone; pixels in the model's dtype."""
    return hf(**hf_inputs(sample, config, torch.float32), use_cache=False).logits[0].float()


def compare(value: torch.Tensor, reference: torch.Tensor, what: str) -> float:
    """`relative_error` after checking the shapes (broadcasting would hide a layout bug)."""
    if value.shape != reference.shape:
        raise ValueError(f"{what}: ours {tuple(value.shape)} vs HF {tuple(reference.shape)}")
    return relative_error(value, reference)


def our_logits(
    model: torch.nn.Module, samples: list[dict[str, torch.Tensor]], config: Qwen3VLConfig
) -> dict[str, list[torch.Tensor]]:
    """Our logits of each sample over its real tokens, by layout: a BSHD batch padded to the
    longest sample, and one THD pack (each sequence padded to a multiple of 8). Run with autograd
    on, as training does (the graph is dropped right away)."""
    lengths = [sample["input_ids"].numel() for sample in samples]
    bshd = collate_samples(samples, config, "bshd", seq_length=max(lengths))
    batch_logits = megatron_forward(model, bshd).detach().float()
    thd = collate_samples(samples, config, "thd", seq_length=max(lengths), pad_multiple=8)
    packed = megatron_forward(model, thd)[0].detach().float()
    starts = thd["cu_seqlens_padded"].tolist()[:-1]
    return {
        "BSHD": [batch_logits[i, :n] for i, n in enumerate(lengths)],
        "THD": [packed[start : start + n] for start, n in zip(starts, lengths, strict=True)],
    }


# ---- checks -----------------------------------------------------------------------------------


def count_checks(config: Qwen3VLConfig, hf: torch.nn.Module, tag: str) -> Iterator[Check]:
    """Parameter counts: ours (TP=1) and HF's against the config's formula, exactly."""
    model = build_ours(config, torch.bfloat16)
    ours = sum(p.numel() for p in model.parameters())
    reference = sum(p.numel() for p in hf.parameters())
    expected = config.parameter_counts().total
    yield Check(f"{tag} params ours vs config", abs(ours - expected), 0, f"{ours:,}")
    yield Check(f"{tag} params HF vs config", abs(reference - expected), 0, f"{reference:,}")


def vision_checks(config: Qwen3VLConfig, hf: torch.nn.Module, tag: str) -> Iterator[Check]:
    """Our vision tower (fp32) against HF's: merged features and every DeepStack level."""
    from models.qwen35_vl.vision_inputs import SampleInputs

    model = build_ours(config, torch.float32)
    load_reference_weights(model, hf, config)
    sample = make_sample(config, *VISION_SAMPLE)
    pixels, grid = sample["pixel_values"], sample["image_grid_thw"]
    vision = SampleInputs.of(config).vision_inputs(pixels, grid).to(torch.device("cuda"))
    with torch.no_grad():
        merged, levels = model.vision(vision)
        ours = [merged.float(), *(level.float() for level in levels)]
        references: dict[bool, list[torch.Tensor]] = {}
        for tf32 in (False, True):
            with torch_tf32(tf32):
                output = hf.model.visual(pixels.cuda().float(), grid_thw=grid.cuda())
            references[tf32] = [
                output.pooler_output.float(),
                *(feature.float() for feature in output.deepstack_features),
            ]
    yield Check(
        f"{tag} vision DeepStack levels, ours - HF",
        abs(len(ours) - len(references[False])),
        0,
        f"{len(levels)} levels from blocks {list(config.vision.deepstack_visual_indexes)}",
    )
    names = ["merger", *(f"DeepStack level {k}" for k in range(len(levels)))]
    detail = f"{pixels.shape[0]} patches, grids {grid.tolist()}"
    for name, value, exact, tf32_value in zip(
        names, ours, references[False], references[True], strict=False
    ):
        floor = relative_error(tf32_value, exact)
        yield Check(
            f"{tag} vision {name} fp32 rel",
            compare(value, exact, f"vision {name}"),
            fp32_limit(GOAL, floor),
            f"TF32 floor {floor:.2e}, {detail}",
        )


def deepstack_effect(
    hf: torch.nn.Module,
    samples: list[dict[str, torch.Tensor]],
    config: Qwen3VLConfig,
    references: list[torch.Tensor],
) -> float:
    """How far HF's fp32 logits move when its DeepStack mergers output zeros (relative)."""
    handles = [
        merger.register_forward_hook(lambda module, args, output: torch.zeros_like(output))
        for merger in hf.model.visual.deepstack_merger_list
    ]
    try:
        with torch.no_grad():
            return max(
                relative_error(reference_logits(hf, sample, config), reference)
                for sample, reference in zip(samples, references, strict=True)
            )
    finally:
        for handle in handles:
            handle.remove()


def logits_fp32_checks(config: Qwen3VLConfig, hf: torch.nn.Module, tag: str) -> Iterator[Check]:
    """fp32 logits, BSHD and THD, against HF per sample; DeepStack's weight in the comparison."""
    samples = [make_sample(config, *spec) for spec in SAMPLES]
    with torch.no_grad():
        references = [reference_logits(hf, sample, config) for sample in samples]
        with torch_tf32(True):
            floor = max(
                relative_error(reference_logits(hf, sample, config), reference)
                for sample, reference in zip(samples, references, strict=True)
            )
    limit = fp32_limit(GOAL, floor)
    model = build_ours(config, torch.float32)
    load_reference_weights(model, hf, config)
    lengths = [sample["input_ids"].numel() for sample in samples]
    for layout, logits in our_logits(model, samples, config).items():
        error = max(
            compare(ours, reference, f"{layout} logits")
            for ours, reference in zip(logits, references, strict=True)
        )
        yield Check(
            f"{tag} logits fp32 {layout} rel",
            error,
            limit,
            f"TF32 floor {floor:.2e}, samples of {lengths} tokens",
        )
    effect = deepstack_effect(hf, samples, config, references)
    yield Check(
        f"{tag} HF logits without DeepStack vs with, rel",
        effect,
        DEEPSTACK_EFFECT_FACTOR * limit,
        f"must exceed {DEEPSTACK_EFFECT_FACTOR:g} x the fp32 logits limit",
        higher_is_better=True,
    )


def logits_bf16_checks(config: Qwen3VLConfig, hf: torch.nn.Module, tag: str) -> Iterator[Check]:
    """The bf16 model against fp32 HF: relative error and top-1 agreement, BSHD and THD, with
    HF's own bf16 model as the floor."""
    samples = [make_sample(config, *spec) for spec in SAMPLES]
    hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)
    with torch.no_grad():
        references = [reference_logits(hf, sample, config) for sample in samples]
        hf_bf16_logits = [reference_logits(hf_bf16, sample, config) for sample in samples]
    del hf_bf16
    floor = max(
        relative_error(value, reference)
        for value, reference in zip(hf_bf16_logits, references, strict=True)
    )
    hf_bf16_flips = top1_flips(hf_bf16_logits, references)
    error_limit = max(BF16_LOGITS_LIMIT, 2 * floor)
    total = sum(reference.shape[0] for reference in references)
    flip_limit = top1_flip_limit(hf_bf16_flips, total)
    model = build_ours(config, torch.bfloat16)
    load_reference_weights(model, hf, config)
    for layout, logits in our_logits(model, samples, config).items():
        error = max(
            compare(ours, reference, f"{layout} logits")
            for ours, reference in zip(logits, references, strict=True)
        )
        yield Check(
            f"{tag} logits bf16 {layout} rel",
            error,
            error_limit,
            f"vs fp32 HF; HF bf16 {floor:.2e}",
        )
        yield Check(
            f"{tag} top-1 flips bf16 {layout}",
            top1_flips(logits, references),
            flip_limit,
            f"of {total} tokens; HF bf16 {hf_bf16_flips}",
        )


def gradient_group(name: str) -> str:
    """The group of an HF parameter name."""
    if name.startswith("model.visual."):
        return (
            "vision DeepStack mergers" if ".deepstack_merger_list." in name
            else "vision merger" if ".merger." in name
            else "vision blocks" if ".blocks." in name
            else "vision patch/position embeddings"
        )  # fmt: skip
    return (
        "token embeddings" if "embed_tokens" in name
        else "output layer" if name == "lm_head.weight"
        else "attention" if ".self_attn." in name  # q, k, v, o and the q / k norms
        else "routed experts" if ".mlp.experts." in name
        else "router" if ".mlp.gate." in name
        else "mlp" if ".mlp." in name
        else "norms"  # input / post-attention layernorms, final norm
    )  # fmt: skip


def hf_gradients(
    hf: torch.nn.Module,
    sample: dict[str, torch.Tensor],
    batch: dict[str, Any],
    config: Qwen3VLConfig,
) -> dict[str, torch.Tensor]:
    """Gradients of the masked mean token loss in the HF model (fp32), by HF name."""
    hf.zero_grad(set_to_none=True)
    logits = reference_logits(hf, sample, config)
    labels, mask = batch["labels"][0].cuda(), batch["loss_mask"][0].cuda()
    token_losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    (torch.sum(token_losses * mask) / mask.sum()).backward()
    grads = {n: p.grad.detach().clone() for n, p in hf.named_parameters() if p.grad is not None}
    hf.zero_grad(set_to_none=True)
    return grads


def gradient_checks(config: Qwen3VLConfig, hf: torch.nn.Module, tag: str) -> Iterator[Check]:
    """One fp32 backward of the same loss on both sides; per-group relative difference of the
    gradient norms (and, in the detail, the norm of the difference)."""
    from models.qwen3_vl.hf_weights import megatron_to_hf

    sample = make_sample(config, *SAMPLES[0])
    batch = collate_samples([sample], config, "bshd", seq_length=sample["input_ids"].numel())
    no_aux = dataclasses.replace(
        config, text=dataclasses.replace(config.text, router_aux_loss_coef=0.0)
    )
    model = build_ours(no_aux, torch.float32)
    load_reference_weights(model, hf, config)
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

    unmatched = sorted(set(ours) ^ set(reference))
    yield Check(
        f"{tag} gradient tensors on one side only",
        len(unmatched),
        0,
        ", ".join(unmatched[:4]) or f"{len(reference)} tensors",
    )
    groups: dict[str, list[str]] = {}
    for name in sorted(set(ours) & set(reference)):
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
            fp32_limit(GOAL, floor),
            f"|g|={float(ref_norm):.3e}, TF32 floor {floor:.1e}, rel ||dg||={diff:.1e}, "
            f"{len(names)} tensors",
        )


def main() -> int:
    init_distributed()
    set_model_parallel()
    # The HF reference runs true fp32 unless a floor measurement turns TF32 on.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    tf32_refused = os.environ.get("NVIDIA_TF32_OVERRIDE") == "0"
    note = " (NVIDIA_TF32_OVERRIDE=0)" if tf32_refused else ""
    ok = True
    for moe in (False, True):
        config = tiny_config(moe=moe)
        tag = config.name
        hf = build_reference(config)
        sections = [
            ("parameter counts", partial(count_checks, config, hf, tag)),
            ("vision fp32", partial(vision_checks, config, hf, tag)),
            ("logits fp32", partial(logits_fp32_checks, config, hf, tag)),
            ("logits bf16", partial(logits_bf16_checks, config, hf, tag)),
            ("gradients fp32", partial(gradient_checks, config, hf, tag)),
        ]
        for title, run in sections:
            checks = run_section(title, run)
            ok &= print_table(f"Qwen3-VL HF parity, {tag}: {title}{note}", checks)
            torch.cuda.empty_cache()
        del hf
        torch.cuda.empty_cache()
    return 0 if ok else 1


@needs_cuda
def test_qwen3_vl_parity() -> None:
    run_with_torchrun(__file__)


if __name__ == "__main__":
    sys.exit(main())
