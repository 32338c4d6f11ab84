"""Every patch this project applies to megatron-core, in one place. Each names the megatron-core
version it was written for and the upstream change it waits for; `apply_patches()` applies the
ones written for the installed version and says which it skipped, so a megatron-core upgrade
shows at once which patches to re-check or delete.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass


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
    import torch
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


PATCHES: tuple[Patch, ...] = (
    Patch(
        name="integer MoE token counts for the fused aux loss",
        written_for="0.19.",
        upstream="Megatron-LM pull request 7183 (moe_utils.get_tokens_per_expert_and_token_count)",
        apply=count_moe_tokens_as_integers,
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
