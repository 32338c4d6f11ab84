"""Convert a registered model's weights (`--model`, default qwen35_vl; its spec's
`WeightConversion`) between a Hugging Face checkpoint and a megatron-core distributed checkpoint
(`torch_dist`, or Megatron-FSDP's `fsdp_dtensor`), streaming tensor by tensor (peak memory stays
near one output part, not the model).

    python scripts/convert_hf_checkpoint.py import --hf-path HF_DIR --out CKPT [--tp 2 --ep 4]
    python scripts/convert_hf_checkpoint.py import --hf-path HF_DIR --out CKPT --format fsdp_dtensor
    python scripts/convert_hf_checkpoint.py export --megatron-path CKPT --out HF_DIR

`import` writes CKPT/release/ and CKPT/latest_checkpointed_iteration.txt = "release", megatron's
convention for a fine-tuning start: `--load CKPT --finetune` loads the weights, starts at
iteration 0 and builds a fresh optimizer. A `torch_dist` checkpoint fits every parallel layout;
`--tp` / `--ep` check that the one you will train with divides the model. `fsdp_dtensor` (for
`FSDP=1` runs, which need it) fits every EP / DP layout at TP=1. `export` reads either format,
imported or saved by training (the save directory or one `iter_*` directory), and writes HF
safetensors shards, config and index that `transformers` loads with `from_pretrained`. MTP tensors
(`mtp.*`) travel both ways when present.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import pickle
import resource
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.default_planner import (
    DefaultSavePlanner,
    create_default_global_save_plan,
)
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from models import get_model_spec  # noqa: E402
from models.spec import ModelSpec  # noqa: E402

DEFAULT_MODEL = "qwen35_vl"

# One process writes and reads the whole checkpoint; DCP warns about that on every call.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")

INDEX_FILE = "model.safetensors.index.json"
TRACKER_FILE = "latest_checkpointed_iteration.txt"
HF_FILES = ("config.json", "generation_config.json", "preprocessor_config.json")
DEFAULT_SHARD_BYTES = 2 * 1024**3
# megatron's checkpoint_version for checkpoints written by current megatron-core.
CHECKPOINT_VERSION = 3.0
TORCH_DIST, FSDP_DTENSOR = "torch_dist", "fsdp_dtensor"


def open_safetensors(path: str) -> safe_open:
    """safe_open, with a missing or damaged (e.g. truncated) file named in a ValueError."""
    try:
        return safe_open(path, "pt")
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"{path}: not a readable safetensors file ({error}); download it again"
        ) from error


class TensorSource:
    """Lazy access to the tensors of a safetensors checkpoint (single file or sharded index)."""

    def __init__(self, directory: str) -> None:
        index_path = os.path.join(directory, INDEX_FILE)
        if os.path.exists(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (ValueError, KeyError) as error:
                raise ValueError(
                    f"{index_path}: not a safetensors index with a weight_map ({error})"
                ) from error
        elif os.path.exists(os.path.join(directory, "model.safetensors")):
            with open_safetensors(os.path.join(directory, "model.safetensors")) as f:
                weight_map = dict.fromkeys(f.keys(), "model.safetensors")
        else:
            raise FileNotFoundError(f"{directory} has neither {INDEX_FILE} nor model.safetensors")
        self.directory = directory
        self.weight_map = weight_map
        self._open_name: str | None = None
        self._open_handle = None

    def names(self) -> set[str]:
        return set(self.weight_map)

    def _file(self, name: str):
        # One file open at a time: safetensors maps files into memory, and the pages read stay
        # resident (and counted) for as long as a file is open.
        file = self.weight_map[name]
        if self._open_name != file:
            self._open_handle = open_safetensors(os.path.join(self.directory, file))
            self._open_name = file
        return self._open_handle

    def get(self, name: str) -> torch.Tensor:
        return self._file(name).get_tensor(name)

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype, read from the file header (no tensor data)."""
        return _SAFETENSORS_DTYPES[self._file(name).get_slice(name).get_dtype()]


_SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "U8": torch.uint8,
}


class ShardWriter:
    """Buffers tensors and writes them as safetensors files of at most `max_bytes` each, then
    an index {"weight_map": name -> file}."""

    def __init__(self, directory: str, prefix: str, max_bytes: int) -> None:
        os.makedirs(directory, exist_ok=True)
        if os.listdir(directory):
            raise FileExistsError(f"{directory} is not empty; choose a new --out directory")
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
    """Counts tensors and bytes; prints a progress line with tensors/s and MiB/s."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label = total, label
        self.done = self.bytes = 0
        self.start = time.perf_counter()

    def step(self, nbytes: int) -> None:
        self.done += 1
        self.bytes += nbytes
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


def load_hf_config(spec: ModelSpec, directory: str, tensor_names: set[str]) -> Any:
    """Our config from the checkpoint's config.json, completed from the tensors present (e.g.
    the MTP depth: transformers' save_pretrained writes no MTP tensors)."""
    from transformers import AutoConfig

    config = spec.from_hf_config(AutoConfig.from_pretrained(directory), name=directory)
    return spec.weights.config_with_tensors(config, tensor_names, False)


def check_layout(
    spec: ModelSpec,
    rules: list[Any],
    megatron_shapes: dict[str, tuple[int, ...]],
    config: Any,
    tp: int,
    ep: int,
) -> None:
    """Raise ValueError, listing every problem, unless all tensors split over TP and EP
    (checked on meta tensors: no memory)."""
    problems = []
    for rule in rules:
        if rule.expert:
            continue
        full = torch.empty(megatron_shapes[rule.megatron], device="meta")
        try:
            spec.weights.shard_for_tensor_parallel(rule, full, 0, tp)
        except ValueError as error:
            problems.append(str(error))
    experts = spec.shape(config).num_experts
    if experts and experts % ep:
        problems.append(f"{experts} experts do not split over EP {ep}")
    if ep > 1 and not experts:
        problems.append(f"EP {ep} needs a MoE model; this one is dense")
    if problems:
        raise ValueError(f"layout TP={tp} EP={ep} does not fit the model: " + "; ".join(problems))


class _ProducingPlanner(DefaultSavePlanner):
    """DCP save planner for precomputed write items whose data is produced only when written,
    so that one part of the checkpoint is in memory at a time."""

    def __init__(self, items: list[WriteItem], produce: Callable[[WriteItem], object]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.items, self.produce = items, produce

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False) -> None:
        super().set_up_planner({}, storage_meta, is_coordinator)

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(self.items)
        return self.plan

    def create_global_plan(self, all_plans: list[SavePlan]):
        # A key's chunks may span several parts: coverage is checked once all parts are written.
        self.global_plan, self.metadata = create_default_global_save_plan(all_plans)
        return self.global_plan, self.metadata

    def resolve_data(self, write_item: WriteItem):
        return self.produce(write_item)


def _serialized(value: object) -> io.BytesIO:
    """A DCP bytes entry: torch.save of `value` (megatron's ShardedObjects store `[value]`)."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return buffer


class DistCheckpointWriter:
    """Writes a PyTorch DCP checkpoint in parts of about `max_bytes`: each part is one DCP save
    of lazily produced chunks, and the parts' metadata are merged into the checkpoint's
    `.metadata` at the end (plus megatron's `metadata.json` for `torch_dist`)."""

    def __init__(self, directory: str, max_bytes: int) -> None:
        os.makedirs(directory, exist_ok=True)
        if os.listdir(directory):
            raise FileExistsError(f"{directory} is not empty; choose a new --out directory")
        self.directory, self.max_bytes = directory, max_bytes
        self.pending: list[tuple[WriteItem, Callable[[], object]]] = []
        self.pending_bytes = 0
        self.parts: list[Metadata] = []

    def add_tensor(
        self, chunk: Any, dtype: torch.dtype, produce: Callable[[], torch.Tensor]
    ) -> None:
        offsets = torch.Size(chunk.offset)
        item = WriteItem(
            index=MetadataIndex(chunk.key, offsets),
            type=WriteItemType.SHARD,
            tensor_data=TensorWriteData(
                chunk=ChunkStorageMetadata(offsets=offsets, sizes=torch.Size(chunk.shape)),
                properties=TensorProperties(dtype=dtype),
                size=torch.Size(chunk.global_shape),
            ),
        )
        self.pending.append((item, produce))
        self.pending_bytes += torch.Size(chunk.shape).numel() * dtype.itemsize
        if self.pending_bytes >= self.max_bytes:
            self.flush()

    def add_object(self, unique_key: str, value: object) -> None:
        item = WriteItem(index=MetadataIndex(unique_key), type=WriteItemType.BYTE_IO)
        self.pending.append((item, lambda: _serialized(value)))

    def flush(self) -> None:
        if not self.pending:
            return
        producers = {item.index: produce for item, produce in self.pending}
        planner = _ProducingPlanner(
            [item for item, _ in self.pending], lambda item: producers[item.index]()
        )
        number = len(self.parts)
        with tempfile.TemporaryDirectory(dir=self.directory) as part:
            writer = dcp.FileSystemWriter(part, single_file_per_rank=True, thread_count=1)
            dcp.save({}, storage_writer=writer, planner=planner, no_dist=True)
            metadata = dcp.FileSystemReader(part).read_metadata()
            renamed = {}
            for name in os.listdir(part):
                if name.endswith(".distcp"):
                    renamed[name] = f"__{number}_{name.split('_')[-1]}"
                    os.replace(
                        os.path.join(part, name), os.path.join(self.directory, renamed[name])
                    )
        metadata.storage_data = {
            index: dataclasses.replace(info, relative_path=renamed[info.relative_path])
            for index, info in metadata.storage_data.items()
        }
        self.parts.append(metadata)
        self.pending, self.pending_bytes = [], 0

    def close(self, megatron_format: str) -> Metadata:
        """Write the merged `.metadata` (and, for `torch_dist`, megatron's `metadata.json`);
        checks that the chunks of every tensor cover it exactly."""
        from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config

        self.flush()
        merged = dataclasses.replace(self.parts[0], state_dict_metadata={}, storage_data={})
        for part in self.parts:
            merged.storage_data.update(part.storage_data)
            for key, entry in part.state_dict_metadata.items():
                if key not in merged.state_dict_metadata:
                    merged.state_dict_metadata[key] = dataclasses.replace(entry)
                    if isinstance(entry, TensorStorageMetadata):
                        merged.state_dict_metadata[key].chunks = list(entry.chunks)
                elif isinstance(entry, TensorStorageMetadata):
                    merged.state_dict_metadata[key].chunks.extend(entry.chunks)
        for key, entry in merged.state_dict_metadata.items():
            if isinstance(entry, TensorStorageMetadata):
                stored = sum(chunk.sizes.numel() for chunk in entry.chunks)
                if stored != entry.size.numel():
                    raise RuntimeError(
                        f"{key}: chunks hold {stored} of {entry.size.numel()} values"
                    )
        # The same serialisation as torch's FileSystemWriter.finish (read back by FileSystemReader).
        with open(os.path.join(self.directory, ".metadata"), "wb") as f:
            pickle.dump(merged, f)
        if megatron_format == TORCH_DIST:
            save_config(CheckpointingConfig(TORCH_DIST, 1), self.directory)
        return merged


class _LastTensor:
    """Remembers the last megatron tensor built, so that the sections of one tensor (Gated
    DeltaNet's in_proj) are produced from one read of its HF tensors."""

    def __init__(self, source: TensorSource) -> None:
        self.source, self.rule, self.tensor = source, None, None

    def chunk(self, rule: Any, chunk: Any) -> torch.Tensor:
        if rule is not self.rule:
            self.rule, self.tensor = None, None
            self.tensor = rule.to_megatron([self.source.get(n) for n in rule.hf])
            self.rule = rule
        return chunk.take(self.tensor).contiguous()


def import_checkpoint(
    hf_path: str,
    out: str,
    tp: int = 1,
    ep: int = 1,
    max_bytes: int = DEFAULT_SHARD_BYTES,
    megatron_format: str = TORCH_DIST,
    model: str = DEFAULT_MODEL,
) -> dict:
    """HF safetensors -> megatron `torch_dist` or `fsdp_dtensor` release checkpoint in `out`."""
    spec = get_model_spec(model)
    weights = spec.weights
    if megatron_format == FSDP_DTENSOR and tp != 1 and weights.fsdp_dtensor_tp_note:
        raise ValueError(
            f"--format fsdp_dtensor with --tp {tp}: {weights.fsdp_dtensor_tp_note}; import for "
            "TP=1 (any EP / DP), or use torch_dist for TP>1"
        )
    if not os.path.isdir(hf_path):
        raise FileNotFoundError(f"--hf-path {hf_path}: no such directory")
    if not os.path.isfile(os.path.join(hf_path, "config.json")):
        raise FileNotFoundError(
            f"--hf-path {hf_path} has no config.json: give the directory of a Hugging Face "
            "checkpoint (config.json and the safetensors shards)"
        )
    source = TensorSource(hf_path)
    config = load_hf_config(spec, hf_path, source.names())
    rules = weights.rules(config)
    for name, reason in weights.unused_hf_tensors(config).items():
        if name in source.names():
            print(f"{name} ignored: {reason}")
            source.weight_map.pop(name)
    weights.check_names(
        f"checkpoint tensors do not match the {spec.name} model of its config.json",
        {name for rule in rules for name in rule.hf},
        source.names(),
    )
    hf_shapes = weights.hf_tensor_shapes(config)
    shapes = {rule.megatron: weights.megatron_shape(rule, hf_shapes) for rule in rules}
    check_layout(spec, rules, shapes, config, tp, ep)
    # Reading every dtype opens every shard's header: a damaged shard stops us before writing.
    planned = [
        (rule, chunk, source.dtype(rule.hf[0]))
        for rule in rules
        for chunk in checkpoint_chunks(spec, megatron_format, rule, shapes[rule.megatron], config)
    ]
    writer = DistCheckpointWriter(os.path.join(out, "release"), max_bytes)
    progress = Progress(len(planned), "import (chunks)")
    last = _LastTensor(source)

    def produce(rule: Any, chunk: Any) -> torch.Tensor:
        tensor = last.chunk(rule, chunk)
        progress.step(tensor.nbytes)
        return tensor

    for rule, chunk, dtype in planned:
        writer.add_tensor(chunk, dtype, lambda r=rule, c=chunk: produce(r, c))
    for key, value in checkpoint_objects(spec, megatron_format, rules, config).items():
        writer.add_object(key, value)
    writer.close(megatron_format)
    with open(os.path.join(out, TRACKER_FILE), "w") as f:
        f.write("release")
    copy_hf_files(hf_path, out)
    return {"tensors": len(rules), "parts": len(writer.parts), "peak_memory_mib": peak_memory_mib()}


def checkpoint_chunks(
    spec: ModelSpec, megatron_format: str, rule: Any, shape: tuple[int, ...], config: Any
) -> list[Any]:
    if megatron_format == TORCH_DIST:
        return spec.weights.torch_dist_chunks(rule, shape, config)
    return spec.weights.fsdp_dtensor_chunks(rule, shape)


def checkpoint_objects(
    spec: ModelSpec, megatron_format: str, rules: list[Any], config: Any
) -> dict[str, object]:
    """The non-tensor entries megatron's loader asks for, by DCP key."""
    if megatron_format == FSDP_DTENSOR:
        # Read by name from every fsdp_dtensor checkpoint. `args` stays None: an imported
        # checkpoint is a fine-tuning start (--finetune), which never compares saved arguments.
        return {"args": None, "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0}
    from megatron.core.dist_checkpointing import ShardedObject

    objects: dict[str, object] = {
        ShardedObject(obj.key, None, obj.global_shape, obj.offset).unique_key: [obj.value()]
        for obj in spec.weights.extra_state_objects(rules, config)
    }
    common = {"checkpoint_version": CHECKPOINT_VERSION, "iteration": 0}
    objects[ShardedObject("common_state", None, (1,), (0,)).unique_key] = [common]
    return objects


def copy_hf_files(source: str, destination: str) -> None:
    for name in HF_FILES:
        if os.path.exists(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), os.path.join(destination, name))


def resolve_checkpoint_dir(path: str) -> str:
    """The directory holding the DCP files: `path` itself, or the one its tracker file names."""
    tracker = os.path.join(path, TRACKER_FILE)
    if os.path.exists(tracker):
        with open(tracker) as f:
            step = f.read().strip()
        return os.path.join(path, "release" if step == "release" else f"iter_{int(step):07d}")
    if os.path.exists(os.path.join(path, ".metadata")):
        return path
    raise FileNotFoundError(f"{path} holds neither {TRACKER_FILE} nor a distributed checkpoint")


def checkpoint_format(directory: str) -> str:
    """megatron writes `metadata.json` next to torch_dist checkpoints only."""
    return TORCH_DIST if os.path.exists(os.path.join(directory, "metadata.json")) else FSDP_DTENSOR


class CheckpointTensors:
    """Reads global tensors of a torch_dist checkpoint by key, keeping the last one (all experts
    of a layer share one key)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.metadata = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
        self.key, self.tensor = None, None

    def get_object(self, key: str) -> object:
        target: dict[str, object] = {key: None}
        dcp.load(target, storage_reader=dcp.FileSystemReader(self.directory), no_dist=True)
        return target[key]

    def get(self, key: str) -> torch.Tensor:
        if key != self.key:
            entry = self.metadata.get(key)
            if not isinstance(entry, TensorStorageMetadata):
                raise KeyError(f"{self.directory} has no tensor {key!r}")
            self.key, self.tensor = None, None
            target = {key: torch.empty(entry.size, dtype=entry.properties.dtype)}
            dcp.load(target, storage_reader=dcp.FileSystemReader(self.directory), no_dist=True)
            self.key, self.tensor = key, target[key]
        return self.tensor


def export_checkpoint(
    megatron_path: str,
    out: str,
    hf_config_dir: str | None = None,
    max_bytes: int = DEFAULT_SHARD_BYTES,
    model: str = DEFAULT_MODEL,
) -> dict:
    """megatron checkpoint (torch_dist or fsdp_dtensor) -> HF safetensors; the HF config comes from
    `hf_config_dir` or, by default, the one `import` kept next to the checkpoint."""
    from transformers import AutoConfig

    spec = get_model_spec(model)
    weights = spec.weights

    config_dir = hf_config_dir or megatron_path
    if not os.path.exists(os.path.join(config_dir, "config.json")):
        raise FileNotFoundError(
            f"no config.json in {config_dir}: pass --hf-config with the model's HF config directory"
        )
    directory = resolve_checkpoint_dir(megatron_path)
    megatron_format = checkpoint_format(directory)
    checkpoint = CheckpointTensors(directory)
    if megatron_format == FSDP_DTENSOR and weights.fsdp_dtensor_tp_note:
        check_fsdp_tensor_parallel(checkpoint, weights.fsdp_dtensor_tp_note)
    config = spec.from_hf_config(AutoConfig.from_pretrained(config_dir), name=config_dir)
    config = weights.config_with_tensors(config, set(checkpoint.metadata), True)
    rules = weights.rules(config)
    hf_shapes = weights.hf_tensor_shapes(config)
    writer = ShardWriter(out, "model", max_bytes)
    progress = Progress(len(rules), "export")
    for rule in rules:
        shape = weights.megatron_shape(rule, hf_shapes)
        chunks = checkpoint_chunks(spec, megatron_format, rule, shape, config)
        full = torch.empty(shape, dtype=checkpoint.get(chunks[0].key).dtype)
        for chunk in chunks:
            stored = checkpoint.get(chunk.key)
            check_global_shape(chunk, stored)
            region = stored[chunk.offset[0] : chunk.offset[0] + 1] if chunk.stacked else stored
            chunk.put(region, full)
        hf_tensors = rule.to_hf(full, [hf_shapes[n] for n in rule.hf])
        for name, tensor in zip(rule.hf, hf_tensors, strict=True):
            writer.add(name, tensor.clone())
        progress.step(full.nbytes)
    writer.close()
    copy_hf_files(config_dir, out)
    return {"tensors": len(rules), "peak_memory_mib": peak_memory_mib()}


def check_fsdp_tensor_parallel(checkpoint: CheckpointTensors, note: str) -> None:
    """Refuse FSDP checkpoints trained with TP>1 (`note` says why the model needs TP=1); imported
    ones carry no arguments and are TP=1 by construction."""
    if "args" not in checkpoint.metadata:
        return
    saved = checkpoint.get_object("args")
    tp = getattr(saved, "tensor_model_parallel_size", 1)
    if tp != 1:
        raise ValueError(
            f"{checkpoint.directory}: an fsdp_dtensor checkpoint saved with TP={tp}; export "
            f"reads TP=1 ones ({note})"
        )


def check_global_shape(chunk: Any, stored: torch.Tensor) -> None:
    if tuple(stored.shape) != chunk.global_shape:
        raise ValueError(
            f"{chunk.key}: checkpoint holds shape {tuple(stored.shape)}, the config gives "
            f"{chunk.global_shape}; is --hf-config the config this checkpoint was trained with?"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF checkpoint -> megatron distributed checkpoint")
    imp.add_argument("--hf-path", required=True)
    imp.add_argument("--out", required=True, help="a new directory; use it as --load")
    imp.add_argument("--tp", type=int, default=1, help="check that this TP size divides the model")
    imp.add_argument(
        "--ep", type=int, default=1, help="check that this EP size divides the experts"
    )
    imp.add_argument(
        "--format",
        choices=[TORCH_DIST, FSDP_DTENSOR],
        default=TORCH_DIST,
        help="fsdp_dtensor for Megatron-FSDP runs (FSDP=1), which cannot load torch_dist",
    )
    exp = sub.add_parser("export", help="megatron checkpoint (either format) -> HF checkpoint")
    exp.add_argument("--megatron-path", required=True, help="a save directory or an iter_* one")
    exp.add_argument("--out", required=True)
    exp.add_argument("--hf-config", help="HF config directory (default: the one import kept)")
    for command in (imp, exp):
        command.add_argument("--max-shard-gib", type=float, default=2.0)
        command.add_argument(
            "--model", default=DEFAULT_MODEL, help="registry entry (models/__init__.py)"
        )
    args = parser.parse_args()
    max_bytes = int(args.max_shard_gib * 1024**3)
    start = time.perf_counter()
    try:
        if args.command == "import":
            result = import_checkpoint(
                args.hf_path, args.out, args.tp, args.ep, max_bytes, args.format, args.model
            )
        else:
            result = export_checkpoint(
                args.megatron_path, args.out, args.hf_config, max_bytes, args.model
            )
    except (ValueError, OSError, KeyError) as error:
        # Bad input (a missing or damaged file, an occupied --out, tensors or a layout that do
        # not fit the model) is one line; KeyError's str() would quote its message.
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        sys.exit(f"convert_hf_checkpoint.py {args.command}: error: {message}")
    print(
        f"{args.command} done in {time.perf_counter() - start:.1f} s; "
        f"peak memory {result['peak_memory_mib']:,.0f} MiB"
    )


if __name__ == "__main__":
    main()
