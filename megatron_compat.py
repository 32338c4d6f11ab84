"""Every patch this project applies to megatron-core, in one place. Each names the megatron-core
version it was written for and the upstream change it waits for; `apply_patches()` (called by the
training entry, the GPU tests and the benchmark) applies the ones written for the installed
version and warns about the others, so an upgrade shows at once which patches to re-check.
"""

from __future__ import annotations

import argparse
import copy
import os
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

WRITTEN_FOR = "0.19."


@dataclass(frozen=True)
class Patch:
    """One change to megatron-core: `apply` is called when the installed version starts with
    `written_for`; `upstream` names the change that makes the patch unnecessary."""

    name: str
    written_for: str
    upstream: str
    apply: Callable[[], None]


def installed_megatron_core_version() -> str:
    import megatron.core

    return megatron.core.__version__


def count_moe_tokens_as_integers() -> None:
    """With a padding mask, megatron-core 0.19.2 counts the tokens of the MoE auxiliary loss as
    `tokens_per_expert.sum() / topk`, a float tensor, and Transformer Engine's fused aux loss
    (`--moe-router-fusion`) refuses it ("total_num_tokens must be int64"): every MoE step with a
    padding mask failed. The routing map of the aux loss gives each valid token exactly `topk`
    experts (it is taken before token dropping, padded rows zeroed), so the integer quotient is
    exact; the counts become int64 tensors, as Megatron-LM pull request 7183 makes them.

    seq_aux_loss divides by `topk x micro-batch size`, which is exact only for equal valid lengths;
    `arguments.validate_multimodal_args` refuses it with the fused router for that reason."""
    from megatron.core.transformer.moe import moe_utils, router

    original = moe_utils.get_tokens_per_expert_and_token_count
    if getattr(original, "counts_integers", False):
        return

    def tokens_per_expert_and_integer_token_count(
        routing_map: torch.Tensor,
        reduce_group: torch.distributed.ProcessGroup,
        topk: int | None = None,
        with_padding_mask: bool = False,
    ):
        global_tokens_per_expert, local_num_tokens, total_num_tokens = original(
            routing_map=routing_map,
            reduce_group=reduce_group,
            topk=topk,
            with_padding_mask=with_padding_mask,
        )
        if with_padding_mask:
            local_num_tokens = routing_map.sum() // topk
            total_num_tokens = global_tokens_per_expert.sum() // topk
        return global_tokens_per_expert, local_num_tokens, total_num_tokens

    tokens_per_expert_and_integer_token_count.counts_integers = True
    moe_utils.get_tokens_per_expert_and_token_count = tokens_per_expert_and_integer_token_count
    # router.py imported the function by name; its calls go through its own module attribute.
    router.get_tokens_per_expert_and_token_count = tokens_per_expert_and_integer_token_count


def skip_main_weight_refresh_under_megatron_fsdp() -> None:
    """Let Megatron-FSDP start from a weights-only checkpoint (an imported HF model, `CKPT_LOAD`
    with `CKPT_RESUME=0`). After such a load megatron asks the distributed optimizer to refresh
    its fp32 main weights from the model's, which megatron-core 0.19 refuses under Megatron-FSDP.
    There is nothing to refresh there: the fsdp_dtensor load writes the main weights themselves
    and FSDP's load_state_dict hook copies them into the compute weights."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    refresh = DistributedOptimizer._copy_model_params_to_main_params
    if getattr(refresh, "skips_megatron_fsdp", False):
        return

    def refresh_unless_megatron_fsdp(self, state_dict=None):
        if self.ddp_config.use_megatron_fsdp:
            return None
        return refresh(self, state_dict=state_dict)

    refresh_unless_megatron_fsdp.skips_megatron_fsdp = True
    DistributedOptimizer._copy_model_params_to_main_params = refresh_unless_megatron_fsdp


TE_CROSS_ENTROPY_REFUSAL = "Transformer Engine cross entropy loss fusion"
FIXED_TE_CROSS_ENTROPY = (2, 20)


def accept_te_cross_entropy() -> None:
    """Let `--cross-entropy-fusion-impl te` through megatron-core 0.19's argument validation, which
    refuses it "due to stability issues" (Megatron-LM pull request 5115), and silence the matching
    warning of its config. The issues were Transformer Engine's: its kernel kept fp32 gradients in
    the bf16 logits buffer (TransformerEngine pull request 3193) and the fix then held a whole
    gradient from the forward on (pull request 3273). TE 2.20's kernel keeps per-token softmax
    statistics and forms the gradient in fp32 during backward; tests/test_te_cross_entropy.py
    compares it with megatron's native fused cross entropy. Validation runs with `native` in its
    place and gets `te` back afterwards; a Transformer Engine older than 2.20 is refused."""
    from megatron.training import arguments

    validate = arguments.validate_args
    if getattr(validate, "accepts_te_cross_entropy", False):
        return

    def validate_accepting_te_cross_entropy(args, defaults={}):  # noqa: B006 (megatron's default)
        te = args.cross_entropy_loss_fusion and args.cross_entropy_fusion_impl == "te"
        if te:
            require_fixed_te_cross_entropy()
            args.cross_entropy_fusion_impl = "native"
        try:
            return validate(args, defaults)
        finally:
            if te:
                args.cross_entropy_fusion_impl = "te"

    validate_accepting_te_cross_entropy.accepts_te_cross_entropy = True
    arguments.validate_args = validate_accepting_te_cross_entropy
    warnings.filterwarnings("ignore", message=TE_CROSS_ENTROPY_REFUSAL, category=UserWarning)


def require_fixed_te_cross_entropy() -> None:
    """Raise if the installed Transformer Engine predates the fixed cross entropy; without TE
    (a CPU dry run) there is nothing to check."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("transformer_engine")
    except PackageNotFoundError:
        return
    release = tuple(int(part) for part in installed.split(".")[:2] if part.isdigit())
    if release < FIXED_TE_CROSS_ENTROPY:
        raise ValueError(
            f"--cross-entropy-fusion-impl te needs Transformer Engine 2.20 or newer (installed "
            f"{installed}, whose fused cross entropy has known gradient precision issues); "
            "use --cross-entropy-fusion-impl native"
        )


# Views of at most 2^28 elements (1 GiB of fp32) for the foreach scaling below.
GRADIENT_SCALING_PIECE = 1 << 28


def scale_gradients_in_a_vectorised_kernel() -> None:
    """With `--calculate-per-token-loss` megatron-core 0.19 divides every gradient by the step's
    token count after backward (`finalize_model_grads` -> `_ParamAndGradBuffer.scale_gradients`:
    `grad_data *= scaling`, a one-element device tensor). torch runs that broadcast in its strided,
    non-vectorised elementwise kernel, in 2 GiB pieces: 12 ms per step over the 4.2B fp32 gradients
    of the 9B-widths benchmark on one H200, 1.5 ms per piece. torch's foreach multiply by the same
    0-dim tensor forms the same products (bitwise equal: tests/test_megatron_compat.py) in its
    vectorised multi-tensor kernel. Other scalings (a Python float, another dtype or device) keep
    megatron's path."""
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBuffer

    scale = _ParamAndGradBuffer.scale_gradients
    if getattr(scale, "vectorised", False):
        return

    def scale_gradients(self, scaling_factor) -> None:
        grads = self.grad_data
        if not (
            torch.is_tensor(scaling_factor)
            and scaling_factor.numel() == 1
            and scaling_factor.dtype == grads.dtype
            and scaling_factor.device == grads.device
        ):
            return scale(self, scaling_factor)
        torch._foreach_mul_(grads.split(GRADIENT_SCALING_PIECE), scaling_factor.reshape(()))
        for grad in self.extra_main_grads:
            grad *= scaling_factor
        return None

    scale_gradients.vectorised = True
    _ParamAndGradBuffer.scale_gradients = scale_gradients


def is_foldable_scaling(scaling: Any, grads: Any) -> bool:
    """A scaling the per-token gradient passes can take as a device tensor: one fp32 element on
    the gradients' device (megatron's `1 / tokens`)."""
    return (
        torch.is_tensor(scaling)
        and scaling.numel() == 1
        and scaling.dtype == grads.dtype == torch.float32
        and scaling.device == grads.device
    )


def can_fold_token_scaling(chained_optimizer: Any) -> bool:
    """Whether a step of megatron's ChainedOptimizer clips every gradient it updates exactly once
    by the norm of all of them: each part a distributed optimizer (its gradients are views of the
    DDP buffers) that clips, without a loss scaler or the precision-aware optimizer's decoupled
    gradients, and no separate gradient-norm group (those params are clipped by their own norm)."""
    from megatron.core.optimizer.optimizer import SEPARATE_GRAD_NORM_GROUPS

    parts = [
        part
        for part in chained_optimizer.chained_optimizers
        if not getattr(part, "is_stub_optimizer", False)
    ]
    return (
        bool(parts)
        and all(
            hasattr(part, "buffers")
            and part.config.clip_grad > 0.0
            and getattr(part, "grad_scaler", None) is None
            and not part.config.use_precision_aware_optimizer
            for part in parts
        )
        and not any(
            chained_optimizer.has_grad_norm_group(group) for group in SEPARATE_GRAD_NORM_GROUPS
        )
    )


def fold_token_scaling_into_gradient_clipping() -> None:
    """With `--calculate-per-token-loss` and gradient clipping, megatron-core 0.19 passes over
    every fp32 gradient twice after backward: `finalize_model_grads` multiplies by 1 / tokens, and
    the optimizer's clipping by min(1, max_norm / norm). Over the 4.2B gradients of the 9B-widths
    benchmark each pass takes 9 ms on an H200. Here the first multiply waits for the second: the
    DDP buffers of an optimizer that clips keep their scaling s, the gradient norm is the norm of
    the unscaled gradients times s, and the clipping multiplies by min(1, max_norm / norm) x s in
    its one pass. The result may differ from megatron's two roundings by an fp32 rounding or two
    (tests/test_megatron_compat.py, tests/test_token_scaling_fold.py on a GPU).

    A ChainedOptimizer decides when it is built (`can_fold_token_scaling`) and marks the DDP
    buffers it steps, so every step folds alike, the first too and the first after a checkpoint
    resume (a resumed run repeats the saved one bit for bit). A step that finds scalings it
    cannot fold, or a second scaling before a step, applies them at once, as megatron does;
    zeroing a buffer drops its pending scaling. Code that reads the gradients after
    `finalize_model_grads` without the optimizer's step sees them unscaled.
    """
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBuffer
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as megatron_optimizer

    chained = megatron_optimizer.ChainedOptimizer
    if getattr(chained.step, "folds_token_scaling", False):
        return
    scale_now = _ParamAndGradBuffer.scale_gradients
    reset_buffer = _ParamAndGradBuffer.reset
    chained_init = chained.__init__
    chained_step = chained.step
    step_under_way = {"scaling": None}

    def buffers_of(chained_optimizer) -> list:
        return [
            buffer
            for part in chained_optimizer.chained_optimizers
            if not getattr(part, "is_stub_optimizer", False)
            for buffer in getattr(part, "buffers", ())
        ]

    def init(self, chained_optimizers) -> None:
        chained_init(self, chained_optimizers)
        foldable = can_fold_token_scaling(self)
        for buffer in buffers_of(self):
            buffer.folds_token_scaling = foldable

    def reset(self) -> None:
        self.deferred_scaling = None
        reset_buffer(self)

    def scale_gradients(self, scaling) -> None:
        if not getattr(self, "folds_token_scaling", False) or not is_foldable_scaling(
            scaling, self.grad_data
        ):
            return scale_now(self, scaling)
        pending = getattr(self, "deferred_scaling", None)
        if pending is not None:
            scale_now(self, pending)
        self.deferred_scaling = scaling
        return None

    def step(self):
        buffers = buffers_of(self)
        scalings = [getattr(buffer, "deferred_scaling", None) for buffer in buffers]
        for buffer in buffers:
            buffer.deferred_scaling = None
        foldable = can_fold_token_scaling(self)
        shared = scalings[0] if scalings else None
        if foldable and shared is not None and all(s is shared for s in scalings):
            step_under_way["scaling"] = shared
        else:
            for buffer, scaling in zip(buffers, scalings, strict=True):
                if scaling is not None:
                    scale_now(buffer, scaling)
        try:
            return chained_step(self)
        finally:
            step_under_way["scaling"] = None

    def norm_of_scaled_gradients(grads_for_norm, *args, **kwargs):
        norm = norm_of_scaled_gradients.megatron(grads_for_norm, *args, **kwargs)
        scaling = step_under_way["scaling"]
        if scaling is None:
            return norm
        return norm * scaling.reshape(()) if torch.is_tensor(norm) else norm * float(scaling)

    def clip_scaled_gradients(parameters, max_norm, total_norm, use_decoupled_grad=False):
        scaling = step_under_way["scaling"]
        if scaling is None:
            return clip_scaled_gradients.megatron(
                parameters, max_norm, total_norm, use_decoupled_grad
            )
        grads = [
            clip_grads.to_local_if_dtensor(param.grad).detach()
            for param in parameters
            if param.grad is not None
        ]
        coefficient = max_norm / (total_norm + 1.0e-6)
        no_overflow = torch.zeros(1, dtype=torch.int, device=scaling.device)
        if torch.is_tensor(coefficient):
            coefficient = coefficient.clamp_max(1.0) * scaling.reshape(())
            kernel = clip_grads.multi_tensor_scale_tensor_impl
        else:
            coefficient = min(coefficient, 1.0) * float(scaling)
            kernel = clip_grads.multi_tensor_scale_impl
        clip_grads.multi_tensor_applier(kernel, no_overflow, [grads, grads], coefficient)
        return None

    # megatron's own functions, reachable for tests that stand in for them.
    norm_of_scaled_gradients.megatron = megatron_optimizer.get_grad_norm_fp32
    clip_scaled_gradients.megatron = megatron_optimizer.clip_grad_by_total_norm_fp32
    step.folds_token_scaling = True
    # Its eager path is the vectorised kernel's: applying that patch again must not wrap this.
    scale_gradients.vectorised = getattr(scale_now, "vectorised", False)
    _ParamAndGradBuffer.scale_gradients = scale_gradients
    _ParamAndGradBuffer.reset = reset
    chained.__init__ = init
    chained.step = step
    megatron_optimizer.get_grad_norm_fp32 = norm_of_scaled_gradients
    megatron_optimizer.clip_grad_by_total_norm_fp32 = clip_scaled_gradients


def put_make_shim_on_path() -> None:
    """Put scripts/megatron_make_shim first on PATH: megatron's training start runs `make` on its
    dataset helpers unconditionally, and the wheel ships them prebuilt without their Makefile (see
    the shim)."""
    shim = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "megatron_make_shim")
    if not os.environ.get("PATH", "").startswith(shim + os.pathsep):
        os.environ["PATH"] = shim + os.pathsep + os.environ.get("PATH", "")


class SavedArgs(argparse.Namespace):
    """megatron's arguments, saved into checkpoints without `hybrid_layer_pattern` (megatron-core
    0.19; `pretrain_multimodal.parse_args` gives the parsed arguments this class).

    On load megatron-core 0.19 compares the saved pattern with the model it built: a saved pattern
    but no `HybridModel` along the `.module` wrapper chain means "GPT run loading a hybrid
    checkpoint" and raises. Our model wraps its HybridModel (vision tower in front), so a resume
    would fail; the pattern (only used by megatron while training: layer counts for its FLOPs and
    MoE logs) is pickled as `language_hybrid_layer_pattern` instead. Copies keep everything. Delete
    once megatron's check (training/checkpointing.py) looks inside wrapped models."""

    def __reduce__(self):
        state = dict(vars(self))
        state["language_hybrid_layer_pattern"] = state.pop("hybrid_layer_pattern", None)
        return argparse.Namespace, (), state

    def __copy__(self) -> SavedArgs:
        return SavedArgs(**vars(self))

    def __deepcopy__(self, memo: dict) -> SavedArgs:
        return SavedArgs(**copy.deepcopy(vars(self), memo))


def accumulate_wgrad_in_te_gemm(total_input: Any, grad_output: Any, main_grad: Any) -> None:
    """`main_grad += grad_output^T @ total_input` in one Transformer Engine GEMM, accumulated in
    `main_grad`'s dtype as TE's own layers do: what APEX's `fused_weight_gradient_mlp_cuda`
    (`wgrad_gemm_accum_fp32` / `_fp16`, same arguments) gives megatron's non-TE linear layers."""
    from transformer_engine.pytorch.cpp_extensions import general_gemm

    general_gemm(
        total_input,
        grad_output,
        out_dtype=main_grad.dtype,
        accumulate=True,
        layout="NT",
        out=main_grad,
        grad=True,
    )


def provide_wgrad_accumulation_without_apex() -> None:
    """Give megatron's tensor-parallel layers APEX's weight-gradient accumulation kernels, made of
    TE's GEMM, where APEX is not installed (its own kernels are kept where it is)."""
    from megatron.core.tensor_parallel import layers

    if not hasattr(layers, "fused_weight_gradient_mlp_cuda"):
        layers.fused_weight_gradient_mlp_cuda = types.SimpleNamespace(
            wgrad_gemm_accum_fp32=accumulate_wgrad_in_te_gemm,
            wgrad_gemm_accum_fp16=accumulate_wgrad_in_te_gemm,
        )


class EmbeddingGradientIntoMainGrad(torch.autograd.Function):
    """`F.embedding(token_ids, weight)` whose backward adds each token's output gradient, in fp32,
    to its row of the weight's fp32 `main_grad` (`index_add_`: only the looked-up rows are touched)
    and marks the weight `grad_added_to_main_grad`, so that megatron DDP skips its add. Autograd's
    own backward builds a bf16 gradient as large as the vocabulary (1.02B elements at 9B widths)
    that megatron DDP then adds to `main_grad`: two passes over the whole table per step. Without
    `main_grad` (no megatron DDP) the ordinary gradient is returned."""

    @staticmethod
    def forward(ctx, token_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(token_ids, weight)
        return torch.nn.functional.embedding(token_ids, weight)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        token_ids, weight = ctx.saved_tensors
        main_grad = getattr(weight, "main_grad", None)
        if main_grad is None:
            grad = torch.ops.aten.embedding_dense_backward(
                grad_output, token_ids, weight.shape[0], -1, False
            )
            return None, grad
        rows = grad_output.reshape(-1, grad_output.shape[-1]).to(main_grad.dtype)
        main_grad.index_add_(0, token_ids.reshape(-1), rows)
        weight.grad_added_to_main_grad = True
        # megatron DDP's hook runs only when autograd delivers a gradient, and ignores this one
        # (uninitialised, as megatron's own fused linear layers return).
        return None, torch.empty_like(weight)


def embed_with_gradient_into_main_grad(self: Any, input_: torch.Tensor) -> torch.Tensor:
    """megatron's `VocabParallelEmbedding.forward` for one tensor-parallel rank, without sequence
    parallelism, outside its deterministic mode: the lookup alone, through
    `EmbeddingGradientIntoMainGrad`."""
    return EmbeddingGradientIntoMainGrad.apply(input_, self.weight)


def can_embed_into_main_grad(embedding: Any) -> bool:
    """Whether megatron's forward of this `VocabParallelEmbedding` is the plain lookup that
    `embed_with_gradient_into_main_grad` replaces, and its weight is the embedding's alone.
    megatron marks a weight shared with the output layer or with multi-token prediction's copy
    (`LanguageModule.setup_embeddings_and_output_layer`): `zero_out_wgrad` on one pipeline stage,
    where megatron DDP adds every gradient the weight receives, placeholders included;
    `shared_embedding` across stages."""
    weight = embedding.weight
    return (
        embedding.tp_group.size() == 1
        and not embedding.reduce_scatter_embeddings
        and not embedding.deterministic_mode
        and getattr(embedding, "gtp_remat_size", 1) <= 1
        and not getattr(weight, "zero_out_wgrad", False)
        and not getattr(weight, "shared_embedding", False)
    )


def fuse_wgrad_accumulation_into_main_grad(model: Any, args: argparse.Namespace) -> int:
    """Make every linear layer of `model` accumulate its weight gradient straight into megatron's
    fp32 `main_grad` (the wgrad GEMM adds in place) instead of returning a bf16 gradient that
    megatron DDP adds in a kernel of its own (at 9B widths on an H200 the output layer's add over
    its 1.02B fp32 gradients took 4 ms per step, its GEMM writing fp32 costs 2 ms more than in
    bf16; docs/results.md). megatron-core 0.19 ties this
    to `--gradient-accumulation-fusion`, which its non-TE layers (the output layer) refuse without
    APEX's `fused_weight_gradient_mlp_cuda`; so the run script turns the flag off and this switches
    the TE layers (their `fuse_wgrad_accumulation`) and megatron's own layers with an untied weight
    (their `gradient_accumulation_fusion`, on TE's GEMM when APEX is absent:
    `provide_wgrad_accumulation_without_apex`). Each marks its weight `grad_added_to_main_grad`,
    which megatron DDP reads to skip its add. An output layer tied to the embedding keeps the add:
    the embedding's own gradient of that weight still has to reach `main_grad` through it. An
    embedding on one tensor-parallel rank whose weight is its own (not tied to the output layer,
    no multi-token prediction) adds its looked-up rows' gradients itself
    (`EmbeddingGradientIntoMainGrad`; in megatron's deterministic mode it keeps megatron's lookup,
    whose backward is deterministic). Training
    applies it in `pretrain_multimodal.model_provider`; tests/test_wgrad_fusion.py checks the
    gradients against the unfused path on a GPU.

    Only under megatron DDP with the flag off (with it on, megatron fuses already; Megatron-FSDP
    and torch FSDP keep `main_grad` their own way). Returns the number of layers switched; 0 also
    when megatron-core is not the version this was written for."""
    if args.gradient_accumulation_fusion or args.use_megatron_fsdp or args.use_torch_fsdp2:
        return 0
    version = installed_megatron_core_version()
    if not version.startswith(WRITTEN_FOR):
        warnings.warn(
            "megatron_compat: not fusing weight-gradient accumulation, written for "
            f"megatron-core {WRITTEN_FOR}x (installed {version}); check whether "
            "--gradient-accumulation-fusion still needs APEX there",
            stacklevel=2,
        )
        return 0
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
    )

    switched = 0
    for module in model.modules():
        if isinstance(module, VocabParallelEmbedding):
            if can_embed_into_main_grad(module):
                module.forward = types.MethodType(embed_with_gradient_into_main_grad, module)
                switched += 1
        elif isinstance(getattr(module, "fuse_wgrad_accumulation", None), bool):
            module.fuse_wgrad_accumulation = True
            switched += 1
        elif (
            isinstance(module, (ColumnParallelLinear, RowParallelLinear))
            and module.weight is not None
        ):
            provide_wgrad_accumulation_without_apex()
            module.gradient_accumulation_fusion = True
            switched += 1
    return switched


PATCHES: tuple[Patch, ...] = (
    Patch(
        name="integer MoE token counts for the fused aux loss",
        written_for=WRITTEN_FOR,
        upstream="Megatron-LM pull request 7183 (moe_utils.get_tokens_per_expert_and_token_count)",
        apply=count_moe_tokens_as_integers,
    ),
    Patch(
        name="no main-weight refresh under Megatron-FSDP after a weights-only load",
        written_for=WRITTEN_FOR,
        upstream="Megatron-LM pull request 4748 (DistributedOptimizer under Megatron-FSDP)",
        apply=skip_main_weight_refresh_under_megatron_fsdp,
    ),
    Patch(
        name="Transformer Engine's fused cross entropy accepted",
        written_for=WRITTEN_FOR,
        upstream="Megatron-LM pull request 7339 (enable Transformer Engine fused cross entropy)",
        apply=accept_te_cross_entropy,
    ),
    Patch(
        name="per-token gradient scaling in a vectorised kernel",
        written_for=WRITTEN_FOR,
        upstream="none known: _ParamAndGradBuffer.scale_gradients multiplying by a 0-dim tensor",
        apply=scale_gradients_in_a_vectorised_kernel,
    ),
    Patch(
        name="per-token gradient scaling folded into the gradient clipping",
        written_for=WRITTEN_FOR,
        upstream="none known: finalize_model_grads scaling before the optimizer's clipping",
        apply=fold_token_scaling_into_gradient_clipping,
    ),
    Patch(
        name="make shim for the prebuilt dataset helpers",
        written_for=WRITTEN_FOR,
        upstream="a megatron-core wheel that skips building its prebuilt dataset helpers",
        apply=put_make_shim_on_path,
    ),
)


def apply_patches(patches: tuple[Patch, ...] = PATCHES, version: str | None = None) -> list[Patch]:
    """Apply the patches written for the installed megatron-core; warn about the others. Returns
    the patches applied. Idempotent."""
    version = version or installed_megatron_core_version()
    applied = []
    for patch in patches:
        if version.startswith(patch.written_for):
            patch.apply()
            applied.append(patch)
        else:
            warnings.warn(
                f"megatron_compat: not applying {patch.name!r}, written for megatron-core "
                f"{patch.written_for}x (installed {version}); check that {patch.upstream} is in "
                "the installed version and delete the patch",
                stacklevel=2,
            )
    return applied
