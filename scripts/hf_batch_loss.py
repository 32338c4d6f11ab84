"""User tool (GPU): HF transformers' bf16 loss on the first global batch of a mock-data run, to
check that a fine-tune from an imported checkpoint starts at HF's loss; exits non-zero when a
named run's iteration-1 loss does not (limits: LIMIT and CONTROL_FRACTION in this file).

    python -m scripts.hf_batch_loss [--model qwen3_vl] --hf-path HF --seq-len 1024 --gbs 4 \
        --train-iters 20 RUN/tensorboard ...
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

# bf16 forward on both sides: the parity test measured the next-token loss within 9.1e-5 (dense)
# and 5.2e-5 (MoE) of HF's, and this batch is scored the same way.
LIMIT = 1e-3
# Random models' mean losses sit close together (3.8e-4 relative apart for two seeds at the
# proxy's widths, measured on CPU), so LIMIT alone would not tell a loaded checkpoint from a model
# that loaded nothing: a run must also be 5 times closer to HF's loss than a control (the same
# architecture with other random weights, on the same batch).
CONTROL_FRACTION = 0.2  # a run's distance to HF, as a fraction of the control's distance


class RecordingDataset(torch.utils.data.Dataset):
    """Passes samples through and remembers which indices were read, in order."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset, self.indices = dataset, []

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        self.indices.append(index)
        return self.dataset[index]


def first_global_batch(config, args: argparse.Namespace) -> list[tuple[dict, dict]]:
    """(sample, collated micro-batch) pairs of iteration 1, as `pretrain_multimodal.py` builds them
    for the mock provider at micro-batch 1 and data-parallel size 1."""
    from arguments import add_multimodal_args
    from data.loader import build_loader
    from models import get_model_spec
    from pretrain_multimodal import collate_config

    data_args = add_multimodal_args(argparse.ArgumentParser()).parse_args([])
    data_args.total_seq_length = args.seq_len
    data_args.micro_batch_size, data_args.data_parallel_size = 1, 1
    data_args.tensor_model_parallel_size = data_args.context_parallel_size = 1
    data_args.sequence_parallel = False
    data_args.seed = args.seed
    provider = get_model_spec(args.model).dataset_provider("mock")
    splits = provider.build(data_args, config, (args.train_iters * args.gbs, 0, 0))
    collate = collate_config(data_args, config, splits)
    recorded = RecordingDataset(splits.train)
    loader = build_loader(recorded, collate, 0, 1, 0, 1, num_workers=0)
    batches = [next(loader) for _ in range(args.gbs)]
    return [(splits.train[i], b) for i, b in zip(recorded.indices, batches, strict=True)]


def hf_loss(model, config, pairs: list[tuple[dict, dict]]) -> float:
    """Per-token loss over the global batch: sum of masked token losses / number of tokens."""
    from tests.gpu_harness import hf_inputs

    total, tokens = 0.0, 0.0
    with torch.no_grad():
        for sample, batch in pairs:
            length = sample["input_ids"].numel()
            logits = model(**hf_inputs(sample, config, torch.bfloat16)).logits[0].float()
            labels = batch["labels"][0, :length].cuda()
            mask = batch["loss_mask"][0, :length].cuda().float()
            losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
            total += float((losses * mask).sum())
            tokens += float(mask.sum())
    return total / tokens


def main() -> int:
    from scripts.plot_training import read_scalars
    from tests.gpu_harness import Check, print_table

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="TensorBoard directories of the fine-tune runs")
    parser.add_argument("--model", default="qwen35_vl", help="registry entry of the checkpoint")
    parser.add_argument("--hf-path", required=True)
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--gbs", type=int, required=True)
    parser.add_argument("--train-iters", type=int, required=True)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    from transformers import AutoConfig, AutoModelForImageTextToText

    from models import get_model_spec

    hf_config = AutoConfig.from_pretrained(args.hf_path)
    config = get_model_spec(args.model).from_hf_config(hf_config, name=args.hf_path)
    pairs = first_global_batch(config, args)
    model = AutoModelForImageTextToText.from_pretrained(args.hf_path, dtype=torch.bfloat16)
    reference = hf_loss(model.cuda().eval(), config, pairs)
    torch.manual_seed(1)
    control_model = AutoModelForImageTextToText.from_config(hf_config, dtype=torch.bfloat16)
    control = hf_loss(control_model.cuda().eval(), config, pairs)
    tokens = sum(int(b["loss_mask"].sum()) for _, b in pairs)
    control_rel = abs(control - reference) / reference
    checks: list[Any] = []
    for run in args.runs:
        first = read_scalars(run, "lm loss").get(1)
        if first is None:  # the run failed before logging: failed rows, the others still count
            first, detail = float("nan"), "no iteration-1 lm loss logged: see the run's log"
        else:
            detail = f"iteration 1 {first:.5f}, HF {reference:.5f}, {tokens} loss tokens"
        rel = abs(first - reference) / reference
        checks.append(Check(f"{run}: iteration-1 loss vs HF, rel", rel, LIMIT, detail))
        checks.append(
            Check(
                f"{run}: distance to HF / control's distance",
                rel / control_rel,
                CONTROL_FRACTION,
                f"control (other random weights) {control:.5f}, rel to HF {control_rel:.2e}",
            )
        )
    passed = print_table("Fine-tune from an imported checkpoint starts at HF's loss", checks)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
