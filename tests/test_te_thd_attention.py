"""TE's fused attention backward on THD packs against a per-sequence fp32 reference (GPU).

    torchrun --nproc-per-node 1 tests/test_te_thd_attention.py

The proxy's attention shape (4 query heads, 2 KV groups, head dim 256, bf16, padding-causal), one
sequence or a pack of three, upstream gradients at scale 1 and 1000 (the MTP loss is a token sum,
so its gradients are that much larger), the value given as megatron gives it (a strided slice of
the fused projection output) and contiguous. Before every call the CUDA caching allocator is filled
with NaN bytes, so an output element the kernel never writes shows up as NaN instead of whatever
an earlier tensor left there. Checks: dq, dk, dv finite, and within 2e-2 (max-abs relative) of an
fp32 per-sequence causal softmax attention; bf16 inputs and outputs give ~4e-3 per element, the
backward's bf16 dS/dP products a few times that. The cuDNN version and TE's backend are printed.
"""

from __future__ import annotations

import itertools
import os
import sys
from functools import partial

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.gpu_harness import (
    Check,
    attention_reference_gradients,
    init_distributed,
    needs_cuda,
    poison_cached_memory,
    print_table,
    relative_error,
    run_section,
    run_with_torchrun,
)

HEADS, GROUPS, HEAD_DIM = 4, 2, 256
PACKS = [(272,), (440,), (632,), (440, 272, 632)]
GRAD_SCALES = (1.0, 1000.0)
LIMIT = 2e-2


def pack_checks(lengths: tuple[int, ...], grad_scale: float, strided_value: bool) -> list[Check]:
    from transformer_engine.pytorch import DotProductAttention

    attention = DotProductAttention(
        HEADS,
        HEAD_DIM,
        num_gqa_groups=GROUPS,
        attention_dropout=0.0,
        qkv_format="thd",
        attn_mask_type="padding_causal",
    )
    total = sum(lengths)
    generator = torch.Generator(device="cuda").manual_seed(total)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=generator, dtype=torch.bfloat16)

    q, k = randn(total, HEADS, HEAD_DIM), randn(total, GROUPS, HEAD_DIM)
    # megatron hands TE the value as a strided slice of the fused QKV(+gate) projection output,
    # while q and k are fresh tensors from their norms and RoPE.
    fused = randn(total, GROUPS, 3 * HEAD_DIM)
    v = fused[..., 2 * HEAD_DIM :]
    d_out = randn(total, HEADS * HEAD_DIM) * grad_scale
    bounds = torch.tensor([0, *lengths], device="cuda").cumsum(0).to(torch.int32)
    leaves = [q.clone().requires_grad_(), k.clone().requires_grad_()]
    fused_leaf = fused.clone().requires_grad_()
    value = (
        fused_leaf[..., 2 * HEAD_DIM :]
        if strided_value
        else fused_leaf[..., 2 * HEAD_DIM :].contiguous()
    )
    poison_cached_memory()
    out = attention(
        *leaves,
        value,
        cu_seqlens_q=bounds,
        cu_seqlens_kv=bounds,
        cu_seqlens_q_padded=bounds,
        cu_seqlens_kv_padded=bounds,
        max_seqlen_q=max(lengths),
        max_seqlen_kv=max(lengths),
    )
    poison_cached_memory()
    out.backward(d_out.view_as(out))
    references = attention_reference_gradients(q, k, v, d_out, bounds.tolist())
    layout = "strided v" if strided_value else "contiguous v"
    tag = f"lengths {list(lengths)}, dO x{grad_scale:g}, {layout}"
    gradients = (leaves[0].grad, leaves[1].grad, fused_leaf.grad[..., 2 * HEAD_DIM :])
    checks = []
    for name, gradient, reference in zip(("dq", "dk", "dv"), gradients, references, strict=True):
        gradient = gradient.float()
        bad = int((~torch.isfinite(gradient)).sum())
        rows = sorted({int(i) for i in (~torch.isfinite(gradient)).any(-1).any(-1).nonzero()})
        checks.append(Check(f"{tag}: {name} non-finite elements", bad, 0, f"rows {rows[:6]}"))
        if not bad:
            checks.append(
                Check(f"{tag}: {name} vs fp32 rel", relative_error(gradient, reference), LIMIT)
            )
    return checks


def cudnn_versions() -> str:
    """The cuDNN that TE and torch run, or the model factory's mismatch error naming both: the
    test still runs on a mismatch, since showing what such a process computes is its purpose."""
    from transformer_engine.pytorch.utils import get_cudnn_version

    from models.qwen35_vl.factory import require_matching_cudnn

    try:
        require_matching_cudnn()
    except RuntimeError as mismatch:
        return str(mismatch)
    return f"TE and torch on {'.'.join(map(str, get_cudnn_version()))}"


def main() -> int:
    init_distributed()
    settings = {
        name: os.environ.get(name, "unset")
        for name in ("NVTE_FUSED_ATTN", "NVTE_FLASH_ATTN", "NVTE_ALLOW_NONDETERMINISTIC_ALGO")
    }
    print(f"cuDNN {cudnn_versions()}, {torch.cuda.get_device_name()}, {settings}")
    checks: list[Check] = []
    for lengths, scale, strided in itertools.product(PACKS, GRAD_SCALES, (True, False)):
        case = partial(pack_checks, lengths, scale, strided)
        checks += run_section(f"{lengths} x{scale:g} strided {strided}", case)
    ok = print_table(f"TE THD attention backward, head dim {HEAD_DIM}, {settings}", checks)
    dist.destroy_process_group()
    return 0 if ok else 1


@needs_cuda
def test_te_thd_attention():
    run_with_torchrun(__file__)


if __name__ == "__main__":
    sys.exit(main())
