"""Packed (THD) training steps against padded (BSHD) ones on one GPU, as training runs them (GPU).

    torchrun --nproc-per-node 1 tests/test_thd_backward.py

The proxy model with its MTP layer and training's fusions (fused cross entropy, bias-dropout-add)
takes the same mock samples with images as a BSHD batch and as THD: all three in one pack, and
the shortest alone (MBS=1 trains one sequence per pack); MTP and the fusions are also switched off
one at a time. The CUDA cache is filled with NaN bytes before each step, so unwritten memory shows.
Every gradient must be finite; THD must match BSHD to the bf16 floor: loss <= 1e-3 relative,
gradient norm <= 1e-2 relative (padding changes GEMM shapes and so the bf16 accumulation order).
A non-finite gradient is traced to its module: the detail names the last modules (in forward
order) whose outputs received non-finite gradients and the first ones after them that did not;
the culprit is among the latter that consume the former's outputs (its output gradient is finite,
its input gradient is not). Then every THD attention call of the step is replayed alone with its
recorded inputs and output gradient: non-finite dq/dk/dv there convict the attention kernel.
"""

from __future__ import annotations

import itertools
import os
import sys
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.gpu_harness import (
    Check,
    NonFiniteGradientTrace,
    attention_reference_gradients,
    build_megatron,
    collate,
    init_distributed,
    make_sample,
    needs_cuda,
    poison_cached_memory,
    print_table,
    relative_error,
    run_section,
    run_with_torchrun,
    set_model_parallel,
)

# (seed, text lengths, image sizes): unequal lengths, none a multiple of the 64-token GDN chunk.
SAMPLES = [
    (51, (40, 300, 37), ((128, 224), (320, 96))),
    (52, (150, 91), ((160, 160),)),
    (53, (77, 500), ((224, 224),)),
]
# Run alone as well (a short one: 268 tokens), which keeps four model variants in one device call.
ALONE = (1,)
TRAINING_FUSIONS = dict(
    cross_entropy_loss_fusion=True,
    cross_entropy_fusion_impl="native",
    bias_dropout_fusion=True,
    masked_softmax_fusion=True,
)


def training_step(model, cpu_batch, observer_type=None) -> tuple[float, float, list[str], Any]:
    """Per-token mean loss, norm of the token-sum gradient, parameters with non-finite gradients
    and the observer (`observer_type(model)`, attached for this step only), if any."""
    from forward_step import run_model, to_device

    model.zero_grad(set_to_none=True)
    poison_cached_memory()
    observer = observer_type(model) if observer_type else None
    batch = to_device(cpu_batch, torch.device("cuda"))
    losses = run_model(model, batch)
    mask = batch["loss_mask"].float()
    # As megatron's --calculate-per-token-loss: the backward runs on the token sum (megatron
    # divides the gradients by the token count afterwards), which sets the magnitude of every
    # upstream gradient, MTP's included.
    loss_sum = torch.sum(losses.float() * mask)
    loss_sum.backward()
    loss = loss_sum.detach() / mask.sum()
    squares, non_finite = torch.zeros((), device="cuda", dtype=torch.float64), []
    for name, parameter in model.named_parameters():
        if parameter.grad is None:
            continue
        if not torch.isfinite(parameter.grad).all():
            non_finite.append(name)
        squares += parameter.grad.double().pow(2).sum()
    if observer is not None:
        observer.remove()
    return float(loss), float(squares.sqrt()), non_finite, observer


class CoreAttentionCapture:
    """Keeps every packed (THD) core-attention call of one step: the module, its inputs and the
    gradient its output received, so that the call can be replayed on its own."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: list[dict[str, Any]] = []
        self.handles = [
            module.register_forward_hook(self._hook(name), with_kwargs=True)
            for name, module in model.named_modules()
            if name.endswith("core_attention")
        ]

    def _hook(self, name: str):
        def on_forward(module, args, kwargs, output):
            if kwargs.get("packed_seq_params") is None or not output.requires_grad:
                return
            call = dict(
                name=name,
                module=module,
                inputs=[tensor.detach().clone() for tensor in args[:3]],
                attention_mask=args[3],
                kwargs=dict(kwargs),
            )
            self.calls.append(call)

            def keep(gradient: torch.Tensor) -> None:
                call["d_out"] = gradient.detach().clone()

            output.register_hook(keep)

        return on_forward

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def replay_attention(call: dict[str, Any]) -> tuple[bool, str]:
    """One captured call again, alone, on a NaN-filled cache: whether dq, dk, dv came out
    non-finite, and a summary (the inputs' finiteness, then per gradient its non-finite count or
    its error against the fp32 reference)."""
    q, k, v = call["inputs"]
    leaves = [tensor.clone().requires_grad_() for tensor in (q, k, v)]
    poison_cached_memory()
    out = call["module"](*leaves, call["attention_mask"], **call["kwargs"])
    out.backward(call["d_out"].view_as(out))
    # The vision tower's packs carry no padded boundaries and attend in both directions.
    params = call["kwargs"]["packed_seq_params"]
    padded = params.cu_seqlens_q_padded
    bounds = (params.cu_seqlens_q if padded is None else padded).tolist()
    causal = "causal" in str(call["kwargs"].get("attn_mask_type"))
    references = attention_reference_gradients(q, k, v, call["d_out"], bounds, causal)
    inputs_finite = all(bool(torch.isfinite(t).all()) for t in (q, k, v, call["d_out"]))
    parts, broken = [], False
    for name, leaf, reference in zip(("dq", "dk", "dv"), leaves, references, strict=True):
        bad = int((~torch.isfinite(leaf.grad)).sum())
        broken |= bad > 0
        error = relative_error(leaf.grad.float(), reference)
        parts.append(f"{name} {bad} non-finite" if bad else f"{name} rel {error:.1e}")
    summary = f"{call['name']} (inputs finite: {inputs_finite}): {', '.join(parts)}"
    return broken, summary


def trace_non_finite(model, cpu_batch) -> str:
    """The step again with the module trace, and once more with every THD attention call kept
    and replayed alone; a step that cannot run says why instead. The re-runs' own counts of
    non-finite parameters tell a reproducible fault from one that depends on memory contents."""
    try:
        _, _, traced, tracer = training_step(model, cpu_batch, NonFiniteGradientTrace)
        _, _, captured, capture = training_step(model, cpu_batch, CoreAttentionCapture)
        replays = [replay_attention(call) for call in capture.calls]
    except RuntimeError as error:
        return f"trace failed: {error}"[:200]
    broken = [summary for is_broken, summary in replays if is_broken]
    return (
        f"traced re-run: {len(traced)} non-finite parameters; {tracer.boundary()}; "
        f"capture re-run: {len(captured)} non-finite; attention replayed alone: "
        f"{len(broken)} of {len(replays)} calls non-finite {broken[:2]}; "
        f"{replays[0][1] if replays and not broken else ''}"
    )


def non_finite_check(name: str, model, cpu_batch, non_finite: list[str]) -> Check:
    """The step's count of parameters with non-finite gradients; when there are any, the detail
    says where they arose (`trace_non_finite`)."""
    detail = ""
    if non_finite:
        where = trace_non_finite(model, cpu_batch)
        detail = f"last of {len(non_finite)}: {non_finite[-3:]}; {where}"
    return Check(f"{name}: parameters with non-finite gradients", len(non_finite), 0, detail)


def thd_checks(model, config, label: str) -> list[Check]:
    """Each case as a BSHD batch (the reference) and as a THD pack of the same samples."""
    samples = [make_sample(config, *spec) for spec in SAMPLES]
    longest = max(s["input_ids"].numel() for s in samples)
    seq_length = -(-longest // 8) * 8
    cases = {"all in one batch": samples}
    cases.update({f"sample {index} alone": [samples[index]] for index in ALONE})
    checks = []
    for case, members in cases.items():
        bshd = collate(members, config, "bshd", seq_length, pad_multiple=8)
        thd = collate(members, config, "thd", seq_length, pad_multiple=8)
        reference_loss, reference_norm, non_finite, _ = training_step(model, bshd)
        checks.append(non_finite_check(f"{label}: BSHD, {case}", model, bshd, non_finite))
        loss, norm, non_finite, _ = training_step(model, thd)
        checks.append(non_finite_check(f"{label}: THD, {case}", model, thd, non_finite))
        checks.append(
            Check(
                f"{label}: THD vs BSHD, {case}: loss rel",
                abs(loss - reference_loss) / abs(reference_loss),
                1e-3,
                f"{loss:.6f} vs {reference_loss:.6f}",
            )
        )
        checks.append(
            Check(
                f"{label}: THD vs BSHD, {case}: grad-norm rel",
                abs(norm - reference_norm) / reference_norm,
                1e-2,
                f"{norm:.5f} vs {reference_norm:.5f}",
            )
        )
    return checks


def variant_checks(label: str, overrides: dict, mtp_layers: int) -> list[Check]:
    from models.qwen35_vl.configuration import get_variant

    config = get_variant("proxy").with_mtp_layers(mtp_layers)
    torch.manual_seed(0)
    model = build_megatron(config, torch.bfloat16, **overrides)
    checks = thd_checks(model, config, label)
    del model
    torch.cuda.empty_cache()
    return checks


def main() -> int:
    from models.qwen35_vl.configuration import get_variant

    init_distributed()
    set_model_parallel()
    mtp_layers = get_variant("proxy").text.mtp_num_hidden_layers
    checks: list[Check] = []
    for mtp, fusions in itertools.product((mtp_layers, 0), (True, False)):
        label = f"proxy, MTP {mtp}, {'training fusions' if fusions else 'no fusions'}"
        overrides = TRAINING_FUSIONS if fusions else {}
        checks += run_section(label, partial(variant_checks, label, overrides, mtp))
    ok = print_table("THD vs BSHD training step, proxy, one GPU", checks)
    dist.destroy_process_group()
    return 0 if ok else 1


@needs_cuda
def test_thd_backward():
    run_with_torchrun(__file__)


if __name__ == "__main__":
    sys.exit(main())
