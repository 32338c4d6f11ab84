"""Shared pieces of the torchrun GPU tests: process groups, tiny Qwen3.5-VL configs, building our
megatron model and the matching HF model with identical weights, seeded multimodal samples, and a
result table. Imported by tests/test_*.py scripts; not a test itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest
import torch
import torch.distributed as dist

from data.collate import CollateConfig, pack_or_pad_batch
from data.mock import interleaved_sample
from models.qwen35_vl.configuration import Qwen35VLConfig, TextConfig, VisionConfig
from models.qwen35_vl.vision_inputs import SampleInputs
from models.spec import ModelInputs

TINY_TOKENS = dict(
    image_token_id=1000, video_token_id=1001, vision_start_token_id=1002, vision_end_token_id=1003
)
TEXT_VOCAB = 990  # ordinary tokens are drawn from [0, TEXT_VOCAB)


def tiny_config(moe: bool = False, mtp_layers: int = 0) -> Qwen35VLConfig:
    """Four decoder layers (3 Gated DeltaNet + 1 attention), head_dim 256 as released (so the
    MRoPE sections are the real ones), vocabulary 1024."""
    text = dict(
        vocab_size=1024,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        max_position_embeddings=4096,
        mtp_num_hidden_layers=mtp_layers,
    )
    if moe:
        text.update(
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
            shared_expert_intermediate_size=128,
        )  # fmt: skip
    else:
        text.update(intermediate_size=512)
    vision = VisionConfig(
        depth=2, hidden_size=128, intermediate_size=256, num_heads=2, out_hidden_size=256
    )
    return Qwen35VLConfig(
        name="tiny-moe" if moe else "tiny",
        text=TextConfig(**text),
        vision=vision,
        source="test",
        **TINY_TOKENS,
    )


# ---- distributed --------------------------------------------------------------------------------


def init_distributed() -> tuple[int, int]:
    """Start NCCL from torchrun's environment (or as a single process); returns (rank, world)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        dist.init_process_group("nccl")
    return dist.get_rank(), dist.get_world_size()


def set_model_parallel(
    tp: int = 1, cp: int = 1, ep: int = 1, seed: int = 1234, te_rng_tracker: bool = False
) -> None:
    """(Re)build megatron's process groups and RNG tracker for a layout, in the same process
    group; `te_rng_tracker`: TE's graph-safe tracker, which TE's attention needs under CUDA graph
    capture (training's --te-rng-tracker)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, context_parallel_size=cp, expert_model_parallel_size=ep
    )
    model_parallel_cuda_manual_seed(seed, te_rng_tracker=te_rng_tracker, force_reset_rng=True)


# ---- models -------------------------------------------------------------------------------------


def base_transformer_config(config: Qwen35VLConfig, dtype: torch.dtype, **overrides: Any) -> Any:
    """A TransformerConfig standing in for megatron's arguments (precision and parallelism)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = dict(
        num_layers=2,
        hidden_size=config.text.hidden_size,
        num_attention_heads=config.text.num_attention_heads,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
        sequence_parallel=parallel_state.get_tensor_model_parallel_world_size() > 1,
        moe_router_dtype="fp32",
        calculate_per_token_loss=True,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def build_megatron(
    config: Qwen35VLConfig,
    dtype: torch.dtype,
    vision_graph: Mapping[str, int] | None = None,
    **overrides: Any,
):
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_compat import apply_patches
    from models.qwen35_vl.factory import build_model

    apply_patches()
    base = base_transformer_config(config, dtype, **overrides)
    model = build_model(
        config,
        base,
        ProcessGroupCollection.use_mpu_process_groups(),
        **(vision_graph or {}),
    ).cuda()
    # As megatron's Float16Module does in training: every parameter in the training dtype.
    return model.to(dtype)


def build_hf(config: Qwen35VLConfig, seed: int = 0):
    """The HF model with random weights; every 1-D parameter (norms, biases, A_log, dt_bias) is
    perturbed so that a wrong norm convention or a dropped bias shows up in the outputs."""
    from transformers import Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration

    torch.manual_seed(seed)
    hf_class = (
        Qwen3_5MoeForConditionalGeneration
        if config.text.is_moe
        else Qwen3_5ForConditionalGeneration
    )
    model = hf_class(config.to_hf_config(attn_implementation="eager"))
    perturb_hf_parameters(model, seed + 1)
    return model.cuda().eval()


def perturb_hf_parameters(model: torch.nn.Module, seed: int) -> None:
    """Add 0.1 x N(0, 1) to every 1-D parameter of an HF model (norms, biases, ...), so that a
    wrong norm convention or a dropped bias shows up in the outputs, and draw the token embedding
    and output layer from N(0, 0.5) so that top-1 decisions are meaningful in bf16 comparisons."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1:
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.add_(0.1 * noise)
            if "embed_tokens" in name or "lm_head" in name:
                # Spread the logits so top-1 decisions are meaningful for the bf16 comparison.
                parameter.normal_(0.0, 0.5, generator=generator)


def hf_reference_kernels() -> None:
    """Make HF's Qwen3.5 Gated DeltaNet use its pure-torch chunked rule even when fla is
    installed (transformers swaps in fla's kernel when it finds it)."""
    import transformers.models.qwen3_5.modeling_qwen3_5 as dense
    import transformers.models.qwen3_5_moe.modeling_qwen3_5_moe as moe

    for module in (dense, moe):
        function = module.torch_chunk_gated_delta_rule
        module.torch_chunk_gated_delta_rule = getattr(function, "__wrapped__", function)


def load_hf_weights(model, hf_model, config: Qwen35VLConfig) -> None:
    """Copy the HF model's weights into our (TP=1) model through the weight mapping; strict."""
    from models.qwen35_vl.hf_weights import split_fused_experts

    state = split_fused_experts(hf_model.state_dict(), config)
    if config.text.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    load_hf_tensors(model, state, config)


def load_hf_tensors(
    model,
    hf_tensors: dict[str, torch.Tensor],
    config: Any,
    hf_to_megatron: Callable[[dict[str, torch.Tensor], Any], dict[str, torch.Tensor]] | None = None,
) -> None:
    """Copy HF tensors in checkpoint layout into our (TP=1) model through the weight mapping
    (`hf_to_megatron(tensors, config)`, Qwen3.5-VL's by default); strict except for TE's
    `_extra_state` entries."""
    if hf_to_megatron is None:
        from models.qwen35_vl.hf_weights import hf_to_megatron

    result = model.load_state_dict(hf_to_megatron(hf_tensors, config), strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise KeyError(f"missing {missing}, unexpected {result.unexpected_keys}")


# ---- data ---------------------------------------------------------------------------------------


def make_sample(
    config: Qwen35VLConfig,
    seed: int,
    text_lengths: Sequence[int],
    image_sizes: Sequence[tuple[int, int]],
) -> dict[str, torch.Tensor]:
    """`data.mock.interleaved_sample` with the tiny test vocabulary's ordinary tokens."""
    return interleaved_sample(config, seed, text_lengths, image_sizes, text_vocab=TEXT_VOCAB)


def collate(
    samples: list[dict[str, torch.Tensor]],
    config: Qwen35VLConfig,
    mode: str,
    seq_length: int,
    pad_multiple: int = 1,
    model_inputs: ModelInputs | None = None,
) -> dict[str, Any]:
    """Collate with the tiny vocabulary's special tokens ignored as labels; `model_inputs` are
    Qwen3.5-VL's unless given (another model's `SampleInputs.of(config)`)."""
    special = frozenset(TINY_TOKENS.values()) | {0}
    collate_config = CollateConfig(
        mode=mode,
        seq_length=seq_length,
        pad_token_id=0,
        model_inputs=model_inputs if model_inputs is not None else SampleInputs.of(config),
        pad_multiple=pad_multiple,
        ignored_label_ids=special,
    )
    return pack_or_pad_batch(samples, collate_config)


def hf_inputs(sample: dict[str, torch.Tensor], config: Qwen35VLConfig, dtype) -> dict[str, Any]:
    ids = sample["input_ids"].unsqueeze(0).cuda()
    inputs: dict[str, Any] = {
        "input_ids": ids,
        "mm_token_type_ids": (ids == config.image_token_id).int(),
    }
    if "pixel_values" in sample:
        inputs["pixel_values"] = sample["pixel_values"].cuda().to(dtype)
        inputs["image_grid_thw"] = sample["image_grid_thw"].cuda()
    return inputs


def megatron_forward(model, batch: dict[str, Any], with_labels: bool = False):
    """Logits [B, S, V] (or per-token losses with labels) for a collated CPU batch."""
    from forward_step import run_model, to_device

    return run_model(model, to_device(batch, torch.device("cuda")), with_labels)


# One bf16 rounding (8 significant bits), relative: the limit when two bf16 paths compute the
# same quantity with different kernels (tests/test_wgrad_fusion.py and
# tests/test_grouped_gemm_experts_vs_te.py).
BF16_ROUNDING = 2.0**-8

# Two multimodal micro-batches (seed, text segment lengths, image sizes) whose gradients
# accumulate: the weight-gradient comparisons of tests/test_wgrad_fusion.py and
# tests/test_grouped_gemm_experts_vs_te.py.
TWO_MICRO_BATCHES = [(61, (120, 200), ((160, 224),)), (62, (300, 41), ((96, 128),))]


def fuse_wgrad_accumulation(model: torch.nn.Module) -> int:
    """Training's TE weight-gradient fusion under megatron DDP; returns the layers switched."""
    import argparse

    from megatron_compat import fuse_wgrad_accumulation_into_main_grad

    ddp_args = argparse.Namespace(
        use_megatron_fsdp=False, use_torch_fsdp2=False, gradient_accumulation_fusion=False
    )
    return fuse_wgrad_accumulation_into_main_grad(model, ddp_args)


def main_grads_after_micro_batches(
    config: Qwen35VLConfig,
    weights: dict[str, torch.Tensor] | None,
    prepare: Callable[[torch.nn.Module], int],
    samples: Sequence[tuple[int, tuple[int, ...], tuple[tuple[int, int], ...]]],
    seq_length: int = 640,
    vision_graph: Mapping[str, int] | None = None,
    overlap_grad_reduce: bool = False,
) -> dict[str, Any]:
    """Build the bf16 model under megatron DDP (fp32 grads), load `weights` (another build's:
    megatron's initialisation is not reproducible from one seed across two builds in a
    process), apply `prepare` (a model change; returns how many modules it changed), and run
    the (seed, text lengths, images) `samples` as micro-batches whose gradients accumulate;
    `vision_graph`: `build_model`'s vision CUDA graph budget (`vision_graph_patches`, ...).
    Returns the initial weights, the summed per-token losses, `prepare`'s count, every
    parameter's `main_grad` and the parameters whose gradient a layer added itself; the model
    too (`model`, DDP-wrapped)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    set_model_parallel(seed=1234, te_rng_tracker=bool(vision_graph))
    model = build_megatron(config, torch.bfloat16, vision_graph)
    if weights is not None:
        model.load_state_dict(weights, strict=True)
    initial = {k: v.clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}
    prepared = prepare(model)
    language = model.language_model.config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=overlap_grad_reduce
    )
    model = DistributedDataParallel(language, ddp_config, model)
    model.zero_grad_buffer()
    losses = []
    for seed, lengths, images in samples:
        batch = collate([make_sample(config, seed, lengths, images)], config, "bshd", seq_length)
        token_losses = megatron_forward(model, batch, with_labels=True)
        mask = batch["loss_mask"].cuda().float()
        loss = (token_losses.float() * mask).sum() / mask.sum()
        loss.backward()
        losses.append(float(loss))
    model.finish_grad_sync()
    parameters = list(model.module.named_parameters())
    return {
        "model": model,
        "initial": initial,
        "losses": losses,
        "prepared": prepared,
        "main_grads": {name: p.main_grad.detach().clone() for name, p in parameters},
        "added_by_layer": [
            name for name, p in parameters if getattr(p, "grad_added_to_main_grad", False)
        ],
    }


def worst_relative_difference(
    values: dict[str, torch.Tensor], references: dict[str, torch.Tensor]
) -> tuple[str, float, int]:
    """(name, error) of the tensor differing most, relative to its reference's norm, and how
    many differ at all."""
    errors = {
        name: float((values[name] - ref).norm() / ref.norm().clamp_min(1e-30))
        for name, ref in references.items()
    }
    worst = max(errors, key=errors.get)
    return worst, errors[worst], sum(error > 0 for error in errors.values())


def poison_cached_memory(gib: float = 2.0) -> None:
    """Fill a block of the CUDA caching allocator with 0xFF bytes (NaN in every float dtype) and
    hand it back to the cache: tensors allocated next without being written read as NaN, which
    makes a kernel's unwritten outputs visible instead of depending on what was freed before.
    Without CUDA there is no cache to fill."""
    if not torch.cuda.is_available():
        return
    block = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    block.fill_(0xFF)
    del block


def attention_reference_gradients(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    d_out: torch.Tensor,
    bounds: list[int],
    causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of fp32 softmax attention (causal, or bidirectional as in the vision tower)
    run sequence by sequence over a THD pack: q [T, heads, d], k and v [T, groups, d] (each
    group serving heads / groups query heads), `d_out` the output gradient ([T, heads * d] or
    [T, heads, d]), `bounds` the cu_seqlens."""
    heads, groups = q.shape[1], k.shape[1]
    q, k, v = (t.detach().float().requires_grad_() for t in (q, k, v))
    outputs = []
    for start, end in itertools.pairwise(bounds):
        # [s, h, d] -> [1, h, s, d]; KV groups repeated up to the query heads.
        qs = q[start:end].transpose(0, 1).unsqueeze(0)
        ks = k[start:end].repeat_interleave(heads // groups, dim=1).transpose(0, 1).unsqueeze(0)
        vs = v[start:end].repeat_interleave(heads // groups, dim=1).transpose(0, 1).unsqueeze(0)
        out = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
        outputs.append(out.squeeze(0).transpose(0, 1))
    torch.cat(outputs).backward(d_out.float().reshape(-1, heads, v.shape[-1]))
    return q.grad, k.grad, v.grad


class NonFiniteGradientTrace:
    """Records, per module in forward-completion order, whether the gradient reaching its output
    was finite. Only for diagnosis: each recorded gradient costs a device sync."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.names: list[str] = []
        self.finite: dict[int, bool] = {}
        self.handles = [
            module.register_forward_hook(self._hook(name))
            for name, module in model.named_modules()
            if name
        ]

    def _hook(self, name: str):
        def on_forward(module, inputs, output):
            index = len(self.names)
            self.names.append(name)
            outputs = output if isinstance(output, (tuple, list)) else (output,)
            for tensor in outputs:
                if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                    tensor.register_hook(self._record(index))

        return on_forward

    def _record(self, index: int):
        def on_gradient(gradient: torch.Tensor) -> None:
            finite = bool(torch.isfinite(gradient).all())
            self.finite[index] = self.finite.get(index, True) and finite

        return on_gradient

    def boundary(self) -> str:
        bad = [i for i, ok in self.finite.items() if not ok]
        if not bad:
            return "all module output gradients finite"
        last_bad = max(bad)
        after = [i for i in sorted(self.finite) if i > last_bad][:3]
        return (
            f"last non-finite outputs: {[self.names[i] for i in sorted(bad)[-3:]]}; "
            f"next finite: {[self.names[i] for i in after]}"
        )

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


# ---- reporting ----------------------------------------------------------------------------------


@contextlib.contextmanager
def torch_tf32(enabled: bool) -> Iterator[None]:
    """Toggle TF32 GEMMs in torch (an HF reference's side; TE decides for itself)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def fp32_limit(goal: float, floor: float) -> float:
    """Limit of an fp32 comparison with a TF32 side: the goal, or twice the measured TF32 floor
    (two independent TF32 implementations each contribute about one floor)."""
    return max(goal, 2 * floor)


def group_norm(tensors: dict[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """L2 norm (float64) over the named tensors together."""
    return torch.sqrt(sum(tensors[n].double().pow(2).sum() for n in names))


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """max |value - reference| / max |reference|."""
    value, reference = value.double(), reference.double()
    return float((value - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


TOP1_AGREEMENT = 0.995  # the bf16 goal against fp32 HF


def top1_flips(logits: list[torch.Tensor], references: list[torch.Tensor]) -> int:
    """How many tokens' argmax differs from the reference's."""
    return sum(
        int((value.argmax(-1) != reference.argmax(-1)).sum())
        for value, reference in zip(logits, references, strict=True)
    )


def top1_flip_limit(hf_bf16_flips: int, tokens: int) -> float:
    """Flips allowed a bf16 model against fp32 HF: the goal's 0.5% of the tokens, or twice HF's
    own bf16 model's flips where that is more (bf16 rounding alone flips near-tied argmaxes, and
    random weights give many near ties). Counted in tokens, so that the limit is exact."""
    return max((1 - TOP1_AGREEMENT) * tokens, 2 * hf_bf16_flips)


@dataclasses.dataclass
class Check:
    name: str
    measured: float
    limit: float
    detail: str = ""
    higher_is_better: bool = False

    @property
    def passed(self) -> bool:
        return self.measured >= self.limit if self.higher_is_better else self.measured <= self.limit


def print_table(title: str, checks: list[Check]) -> bool:
    """Print the checks as a markdown table (rank 0); returns whether all passed."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"\n### {title}\n")
        print("| check | measured | limit | result | detail |")
        print("|---|---|---|---|---|")
        for c in checks:
            bound = ">=" if c.higher_is_better else "<="
            verdict = "pass" if c.passed else "FAIL"
            print(
                f"| {c.name} | {c.measured:.3e} | {bound} {c.limit:.1e} | {verdict} | {c.detail} |"
            )
    return all(c.passed for c in checks)


def run_section(title: str, run) -> list[Check]:
    """Collect one group's checks; an exception becomes a failed check after the ones already
    measured (the other groups still run)."""
    checks: list[Check] = []
    try:
        checks.extend(run())
    except Exception as error:
        traceback.print_exc()
        checks.append(Check(f"{title} raised", 1.0, 0.0, f"{type(error).__name__}: {error}"[:300]))
    return checks


# ---- pytest entry -------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torchrun script)"
)


def free_port() -> int:
    """A TCP port nobody holds now, for launchers that share one machine."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def run_with_torchrun(script: str, processes: int = 1) -> None:
    """pytest's way into a GPU test script: run it under torchrun, on torch's own cuDNN
    (scripts/torch_cudnn.sh, as the launchers do), and fail on a non-zero exit."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.abspath(script)
    command = (
        'PYTHON="$1"; source scripts/torch_cudnn.sh && '
        'exec torchrun --standalone --nproc-per-node "$2" "$3"'
    )
    launch = ["bash", "-c", command, "run_with_torchrun", sys.executable, str(processes), script]
    subprocess.run(launch, check=True, cwd=repo)
