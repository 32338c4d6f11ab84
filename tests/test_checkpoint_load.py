"""A checkpoint from `scripts/convert_hf_checkpoint.py import` loads into our megatron model (GPU).

    torchrun --nproc-per-node 1 tests/test_checkpoint_load.py

For the tiny dense and MoE configs with an MTP layer, HF weights saved by save_pretrained (plus
`mtp.*` tensors) are imported, then: the checkpoint's tensor keys and global shapes equal those
of the model's own `sharded_state_dict()` (megatron's factories applied) and every `_extra_state`
object the model asks for is stored; megatron's `dist_checkpointing.load` fills a freshly built
model whose parameters then equal, bit for bit, those copied from HF through the weight mapping;
and its bf16 logits and loss match HF's fp32 ones (bf16 limits as in test_hf_parity.py). The MoE
model is checked twice: with TE's grouped experts and with `--expert-gemm torch`'s stacked experts
(grouped_gemm_experts.py), which must ask for the same expert tensors under the same keys.
Exits non-zero when a check fails; pytest runs it through torchrun and skips it without CUDA.
"""

from __future__ import annotations

import os
import sys
import tempfile
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts.hf_checkpoint import save_hf_checkpoint
from tests.gpu_harness import (
    Check,
    build_hf,
    build_megatron,
    collate,
    hf_inputs,
    init_distributed,
    load_hf_tensors,
    make_sample,
    megatron_forward,
    needs_cuda,
    print_table,
    relative_error,
    run_section,
    run_with_torchrun,
    set_model_parallel,
    tiny_config,
)

SAMPLE = (11, (9, 17, 6), ((64, 96), (160, 64)))  # seed, text segment lengths, image sizes


def sharded_metadata() -> dict:
    """The metadata megatron's training passes to `sharded_state_dict` (checkpointing.py)."""
    from megatron.core import parallel_state

    return {
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
        "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True),
    }


def model_layout(model) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """(tensor key -> global shape, object unique keys) the model saves and loads."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import (
        ShardedObject,
        ShardedTensor,
        apply_factories,
    )

    sharded = model.sharded_state_dict(metadata=sharded_metadata())
    apply_factories(sharded)
    tensors, objects = {}, set()
    for value in nested_values(sharded):
        if isinstance(value, ShardedTensor):
            tensors[value.key] = tuple(value.global_shape)
        elif isinstance(value, ShardedObject):
            objects.add(value.unique_key)
    return tensors, objects


def build_model(config, expert_gemm: str):
    model = build_megatron(config, torch.bfloat16)
    if expert_gemm == "torch":
        from grouped_gemm_experts import use_torch_grouped_gemm

        use_torch_grouped_gemm(model)
    return model


def weights_of(model) -> dict[str, torch.Tensor]:
    """The model's tensors by state-dict name (stacked experts listed per expert, as TE's)."""
    return {
        name: value
        for name, value in model.state_dict().items()
        if torch.is_tensor(value) and not name.endswith("_extra_state")
    }


def checkpoint_checks(moe: bool, workdir: str, expert_gemm: str = "te"):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    from scripts.convert_hf_checkpoint import import_checkpoint

    config = tiny_config(moe=moe, mtp_layers=1)
    tag = config.name + (" torch experts" if expert_gemm == "torch" else "")
    hf = build_hf(config.with_mtp_layers(0))
    hf_dir = os.path.join(workdir, f"{tag}-hf".replace(" ", "-"))
    ckpt = os.path.join(workdir, f"{tag}-ckpt".replace(" ", "-"))
    hf_tensors = save_hf_checkpoint(hf.to(torch.bfloat16).cpu(), config, hf_dir, with_mtp=True)
    hf.float().cuda()
    import_checkpoint(hf_dir, ckpt)
    release = os.path.join(ckpt, "release")

    model = build_model(config, expert_gemm)
    wanted_tensors, wanted_objects = model_layout(model)
    stored_tensors = {
        key: tuple(t.global_shape)
        for key, t in dist_checkpointing.load_tensors_metadata(release).items()
    }
    stored_objects = set(load_sharded_metadata(release)) - set(stored_tensors)
    key_problems = sorted(set(wanted_tensors) ^ set(stored_tensors))
    shape_problems = sorted(
        key
        for key in set(wanted_tensors) & set(stored_tensors)
        if wanted_tensors[key] != stored_tensors[key]
    )
    missing_objects = sorted(wanted_objects - stored_objects)
    yield Check(
        f"{tag} tensor keys: model vs checkpoint", len(key_problems), 0, str(key_problems[:6])
    )
    yield Check(f"{tag} global shapes differing", len(shape_problems), 0, str(shape_problems[:6]))
    yield Check(
        f"{tag} extra-state objects missing",
        len(missing_objects),
        0,
        f"{len(wanted_objects)} wanted, {len(stored_objects)} stored; {missing_objects[:4]}",
    )

    loaded = dist_checkpointing.load(model.sharded_state_dict(metadata=sharded_metadata()), release)
    # The common state megatron's loader reads beside the weights comes back merged in.
    common = {key: loaded.pop(key, None) for key in ("checkpoint_version", "iteration")}
    yield Check(f"{tag} common state: iteration", float(common["iteration"] != 0), 0, str(common))
    model.load_state_dict(loaded, strict=True)
    reference = build_megatron(config, torch.bfloat16)
    load_hf_tensors(reference, hf_tensors, config)
    ours, theirs = weights_of(model), weights_of(reference)
    differing = sorted(name for name in theirs if not torch.equal(ours[name], theirs[name]))
    yield Check(
        f"{tag} parameters differing from the direct mapping",
        len(differing),
        0,
        f"{len(theirs)} tensors; {differing[:4]}",
    )

    sample = make_sample(config, *SAMPLE)
    batch = collate([sample], config, "bshd", seq_length=int(sample["input_ids"].numel()))
    with torch.no_grad():
        logits = megatron_forward(model.eval(), batch)[0].float()
        hf_logits = hf(**hf_inputs(sample, config, torch.float32)).logits[0].float()
    yield Check(f"{tag} bf16 logits vs HF fp32, rel", relative_error(logits, hf_logits), 3e-2)
    labels = sample["input_ids"][1:].cuda()
    ours_loss = torch.nn.functional.cross_entropy(logits[:-1], labels)
    hf_loss = torch.nn.functional.cross_entropy(hf_logits[:-1], labels)
    yield Check(
        f"{tag} next-token loss vs HF, rel",
        abs(float(ours_loss / hf_loss) - 1),
        1e-2,
        f"ours {float(ours_loss):.5f}, HF {float(hf_loss):.5f}",
    )


def main() -> int:
    init_distributed()
    set_model_parallel()
    ok = True
    with tempfile.TemporaryDirectory() as workdir:
        for moe, expert_gemm in ((False, "te"), (True, "te"), (True, "torch")):
            checks = run_section(
                "checkpoint", partial(checkpoint_checks, moe, workdir, expert_gemm)
            )
            title = "MoE" if moe else "dense"
            if expert_gemm == "torch":
                title += ", stacked torch experts"
            ok &= print_table(f"Imported checkpoint, {title}", checks)
    return 0 if ok else 1


@needs_cuda
def test_checkpoint_load():
    run_with_torchrun(__file__)


if __name__ == "__main__":
    sys.exit(main())
