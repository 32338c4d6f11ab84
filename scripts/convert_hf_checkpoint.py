"""Convert Qwen3.5-VL weights between a Hugging Face checkpoint and megatron's tensor layout,
streaming tensor by tensor (peak memory stays near one output file, not the model).

    python scripts/convert_hf_checkpoint.py import --hf-path HF_DIR --out OUT --tp 2 --ep 4
    python scripts/convert_hf_checkpoint.py export --megatron-path OUT --out HF_DIR

`import` writes, per (TP rank, EP rank), the tensors that rank's megatron model holds (names and
slices from models/qwen35_vl/hf_weights.py) as size-bounded safetensors files with an index;
`export` gathers them back into HF safetensors shards, config.json and the index, which
`transformers` loads with `from_pretrained`. MTP tensors (`mtp.*`) travel both ways when present.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from models.qwen35_vl.configuration import Qwen35VLConfig, from_hf_config  # noqa: E402
from models.qwen35_vl.hf_weights import (  # noqa: E402
    WeightRule,
    expert_parallel_name,
    gather_tensor_parallel,
    hf_tensor_shapes,
    shard_for_tensor_parallel,
    weight_rules,
)

LAYOUT_FILE = "megatron_layout.json"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3


class TensorSource:
    """Lazy access to the tensors of a safetensors checkpoint (single file or sharded index)."""

    def __init__(self, directory: str) -> None:
        index_path = os.path.join(directory, INDEX_FILE)
        if os.path.exists(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.exists(os.path.join(directory, "model.safetensors")):
            with safe_open(os.path.join(directory, "model.safetensors"), "pt") as f:
                weight_map = dict.fromkeys(f.keys(), "model.safetensors")
        else:
            raise FileNotFoundError(f"{directory} has neither {INDEX_FILE} nor model.safetensors")
        self.directory = directory
        self.weight_map = weight_map
        self._open: dict[str, object] = {}

    def names(self) -> set[str]:
        return set(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        file = self.weight_map[name]
        if file not in self._open:
            self._open[file] = safe_open(os.path.join(self.directory, file), "pt")
        return self._open[file].get_tensor(name)


class ShardWriter:
    """Buffers tensors and writes them as safetensors files of at most `max_bytes` each, then
    an index {"weight_map": name -> file}."""

    def __init__(self, directory: str, prefix: str, max_bytes: int) -> None:
        os.makedirs(directory, exist_ok=True)
        self.directory, self.prefix, self.max_bytes = directory, prefix, max_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffered + size > self.max_bytes:
            self.flush()
        self.buffer[name] = tensor.contiguous()
        self.buffered += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.buffer:
            return
        name = f"{self.prefix}-{len(self.files) + 1:05d}.safetensors"
        save_file(self.buffer, os.path.join(self.directory, name), metadata={"format": "pt"})
        self.files.append((name, list(self.buffer)))
        self.buffer, self.buffered = {}, 0

    def close(self) -> dict[str, str]:
        """Write the last file and the index; files are renamed to the HF `-of-NNNNN` form."""
        self.flush()
        count = len(self.files)
        weight_map = {}
        for number, (name, tensors) in enumerate(self.files, start=1):
            final = f"{self.prefix}-{number:05d}-of-{count:05d}.safetensors"
            os.replace(os.path.join(self.directory, name), os.path.join(self.directory, final))
            weight_map.update(dict.fromkeys(tensors, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        with open(os.path.join(self.directory, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
        return weight_map


class Progress:
    """Counts tensors and bytes; prints a progress line with tensors/s and MB/s."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label = total, label
        self.done = self.bytes = 0
        self.start = time.perf_counter()

    def step(self, tensor: torch.Tensor) -> None:
        self.done += 1
        self.bytes += tensor.numel() * tensor.element_size()
        if self.done == self.total or self.done % 50 == 0:
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            print(
                f"\r{self.label}: {self.done}/{self.total} tensors, {self.bytes / 2**20:,.0f} MiB, "
                f"{self.done / elapsed:,.0f} tensors/s, {self.bytes / 2**20 / elapsed:,.0f} MiB/s",
                end="\n" if self.done == self.total else "",
                flush=True,
            )


def peak_memory_mib() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_hf_config(directory: str, source: TensorSource) -> Qwen35VLConfig:
    """Our config from the checkpoint's config.json; MTP depth from the tensors present
    (transformers' save_pretrained writes none)."""
    from transformers import AutoConfig

    config = from_hf_config(AutoConfig.from_pretrained(directory), name=directory)
    has_mtp = any(name.startswith("mtp.") for name in source.names())
    return config.with_mtp_layers(1 if has_mtp else 0)


def check_layout(
    rules: list[WeightRule],
    shapes: dict[str, tuple[int, ...]],
    config: Qwen35VLConfig,
    tp: int,
    ep: int,
) -> None:
    """Raise ValueError, listing every problem, unless all tensors split over TP and EP
    (checked on meta tensors: no memory)."""
    problems = []
    for rule in rules:
        if rule.expert:
            continue
        full = rule.to_megatron([torch.empty(shapes[n], device="meta") for n in rule.hf])
        try:
            shard_for_tensor_parallel(rule, full, 0, tp)
        except ValueError as error:
            problems.append(str(error))
    if config.text.num_experts and config.text.num_experts % ep:
        problems.append(f"{config.text.num_experts} experts do not split over EP {ep}")
    if ep > 1 and not config.text.num_experts:
        problems.append(f"EP {ep} needs a MoE model; this one is dense")
    if problems:
        raise ValueError(f"layout TP={tp} EP={ep} does not fit the model: " + "; ".join(problems))


@dataclass(frozen=True)
class RankFiles:
    tp_rank: int
    ep_rank: int

    @property
    def directory(self) -> str:
        return f"tp{self.tp_rank:02d}_ep{self.ep_rank:03d}"


def rank_tensors(
    rules: list[WeightRule],
    source: TensorSource,
    config: Qwen35VLConfig,
    rank: RankFiles,
    tp: int,
    ep: int,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(megatron name, tensor) pairs this rank holds, read one HF tensor group at a time."""
    for rule in rules:
        if rule.expert:
            owner, local = expert_parallel_name(rule.megatron, config.text.num_experts, ep)
            if owner != rank.ep_rank:
                continue
            yield local, rule.to_megatron([source.get(n) for n in rule.hf])
            continue
        full = rule.to_megatron([source.get(n) for n in rule.hf])
        yield rule.megatron, shard_for_tensor_parallel(rule, full, rank.tp_rank, tp).clone()


def import_checkpoint(
    hf_path: str, out: str, tp: int, ep: int, max_bytes: int = DEFAULT_SHARD_BYTES
) -> dict:
    source = TensorSource(hf_path)
    config = load_hf_config(hf_path, source)
    rules = weight_rules(config)
    expected = {name for rule in rules for name in rule.hf}
    missing, unexpected = sorted(expected - source.names()), sorted(source.names() - expected)
    if missing or unexpected:
        raise KeyError(
            f"checkpoint tensors do not match a {config.text.num_hidden_layers}-layer "
            f"Qwen3.5{'-MoE' if config.text.is_moe else ''} model: missing {missing[:20]}, "
            f"unexpected {unexpected[:20]}"
        )
    check_layout(rules, hf_tensor_shapes(config), config, tp, ep)
    os.makedirs(out, exist_ok=True)
    ranks = [RankFiles(t, e) for e in range(ep) for t in range(tp)]
    per_rank = sum(1 for r in rules if not r.expert) + sum(1 for r in rules if r.expert) // ep
    progress = Progress(per_rank * len(ranks), "import")
    for rank in ranks:
        writer = ShardWriter(os.path.join(out, rank.directory), "model", max_bytes)
        for name, tensor in rank_tensors(rules, source, config, rank, tp, ep):
            writer.add(name, tensor)
            progress.step(tensor)
        writer.close()
    for name in ("config.json", "generation_config.json", "preprocessor_config.json"):
        if os.path.exists(os.path.join(hf_path, name)):
            shutil.copy(os.path.join(hf_path, name), os.path.join(out, name))
    layout = {
        "tp": tp,
        "ep": ep,
        "mtp_num_hidden_layers": config.text.mtp_num_hidden_layers,
        "ranks": [r.directory for r in ranks],
        "peak_memory_mib": peak_memory_mib(),
    }
    with open(os.path.join(out, LAYOUT_FILE), "w") as f:
        json.dump(layout, f, indent=2)
    return layout


def export_checkpoint(megatron_path: str, out: str, max_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    from transformers import AutoConfig

    with open(os.path.join(megatron_path, LAYOUT_FILE)) as f:
        layout = json.load(f)
    tp, ep = layout["tp"], layout["ep"]
    config = from_hf_config(AutoConfig.from_pretrained(megatron_path), name=megatron_path)
    config = config.with_mtp_layers(layout["mtp_num_hidden_layers"])
    sources = {
        (t, e): TensorSource(os.path.join(megatron_path, RankFiles(t, e).directory))
        for t in range(tp)
        for e in range(ep)
    }
    rules = weight_rules(config)
    shapes = hf_tensor_shapes(config)
    writer = ShardWriter(out, "model", max_bytes)
    progress = Progress(len(rules), "export")
    for rule in rules:
        if rule.expert:
            owner, local = expert_parallel_name(rule.megatron, config.text.num_experts, ep)
            full = sources[(0, owner)].get(local)
        else:
            full = gather_tensor_parallel(
                rule, [sources[(t, 0)].get(rule.megatron) for t in range(tp)]
            )
        for name, tensor in zip(
            rule.hf, rule.to_hf(full, [shapes[n] for n in rule.hf]), strict=True
        ):
            writer.add(name, tensor.clone())
        progress.step(full)
    writer.close()
    for name in ("config.json", "generation_config.json", "preprocessor_config.json"):
        if os.path.exists(os.path.join(megatron_path, name)):
            shutil.copy(os.path.join(megatron_path, name), os.path.join(out, name))
    return {"tensors": len(rules), "peak_memory_mib": peak_memory_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF checkpoint -> per-rank megatron tensors")
    imp.add_argument("--hf-path", required=True)
    imp.add_argument("--out", required=True)
    imp.add_argument("--tp", type=int, default=1)
    imp.add_argument("--ep", type=int, default=1)
    exp = sub.add_parser("export", help="per-rank megatron tensors -> HF checkpoint")
    exp.add_argument("--megatron-path", required=True)
    exp.add_argument("--out", required=True)
    for command in (imp, exp):
        command.add_argument("--max-shard-gib", type=float, default=2.0)
    args = parser.parse_args()
    max_bytes = int(args.max_shard_gib * 1024**3)
    start = time.perf_counter()
    if args.command == "import":
        result = import_checkpoint(args.hf_path, args.out, args.tp, args.ep, max_bytes)
    else:
        result = export_checkpoint(args.megatron_path, args.out, max_bytes)
    print(
        f"{args.command} done in {time.perf_counter() - start:.1f} s; "
        f"peak memory {result['peak_memory_mib']:,.0f} MiB"
    )


if __name__ == "__main__":
    main()
