"""CORD-V2 receipts (Hub dataset naver-clova-ix/cord-v2, parquet shards) as SFT samples: the user
turn is the receipt image plus an instruction, the assistant turn its `gt_parse` as JSON, rendered
with the chat template of --hf-tokenizer-path; the assistant answers, each with its closing
<|im_end|>, are supervised. Images are decoded upright (EXIF orientation applied).
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq
import torch
from PIL import Image, ImageOps
from qwen_vl_utils import process_vision_info, smart_resize
from torch import Tensor
from torch.utils.data import Dataset

from .load_report import LoadNotes
from .loader import DatasetSplits

logger = logging.getLogger(__name__)

INSTRUCTION = "Extract the receipt as JSON."
IMAGE_TOKEN = "<|image_pad|>"
ASSISTANT_HEADER = "<|im_start|>assistant\n"
TURN_END = "<|im_end|>"
THINK_START, THINK_END = "<think>", "</think>"
COLUMNS = ("image", "ground_truth")
# DatasetSplits field -> CORD split name (file prefix of its shards).
SPLIT_FILES = {"train": "train", "valid": "validation", "test": "test"}
# What PIL raises on bytes that are not a readable image.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error)


class BadSampleError(ValueError):
    """A row whose image or ground truth cannot be read; the message names shard and row,
    `reason` says what is wrong with it."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _tokenizer_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def token_id(tokenizer: Any, token: str, vocab: dict[str, int] | None = None) -> int | None:
    """Id of `token` in the tokenizer's vocabulary (added tokens included), or None."""
    vocab = tokenizer.get_vocab() if vocab is None else vocab
    return vocab.get(token)


def image_token_id(tokenizer: Any) -> int:
    """Id of <|image_pad|>; ValueError when the tokenizer has none (not a Qwen-VL tokenizer)."""
    image_id = token_id(tokenizer, IMAGE_TOKEN)
    if image_id is None:
        raise ValueError(
            f"tokenizer {_tokenizer_name(tokenizer)!r} has no {IMAGE_TOKEN} token; point "
            "--hf-tokenizer-path at a Qwen3.5 tokenizer / processor directory"
        )
    return image_id


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its eos id; ValueError when it has neither."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise ValueError(
        f"tokenizer {_tokenizer_name(tokenizer)!r} defines neither pad_token nor eos_token; set "
        "pad_token in its tokenizer_config.json (Qwen3.5 uses <|endoftext|>)"
    )


def ignored_label_ids(tokenizer: Any, mask_im_end: bool = False) -> frozenset[int]:
    """Label ids never trained: every special token, the pad id and the image placeholder, but
    <|im_end|> unless `mask_im_end`: closing an assistant answer, it is how a fine-tuned model
    learns to stop (padding is kept out of the loss by the loss mask, whatever its id)."""
    special = {int(i) for i in tokenizer.all_special_ids}
    ignored = special | {pad_token_id(tokenizer), image_token_id(tokenizer)}
    end = token_id(tokenizer, TURN_END)
    if not mask_im_end and end is not None:
        ignored.discard(end)
    return frozenset(ignored)


def decode_image(data: bytes) -> Image.Image:
    """An image's bytes decoded in full and turned upright as its EXIF orientation tag says
    (a photo stored sideways with the tag is shown, and trained, upright; HF datasets does the
    same). Raises what PIL raises on unreadable bytes (see _DECODE_ERRORS)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    ImageOps.exif_transpose(image, in_place=True)
    return image


def load_tokenizer_and_image_processor(path: str) -> tuple[Any, Any]:
    """Tokenizer and image processor of a local HF directory: AutoProcessor where it loads (the
    Qwen processors need torchvision for their video half), else AutoTokenizer plus the PIL
    backend of the image processor saved there."""
    from transformers import (
        AutoImageProcessor,
        AutoProcessor,
        AutoTokenizer,
        PreTrainedTokenizerBase,
    )

    if not path or not os.path.isdir(path):
        raise ValueError(f"--hf-tokenizer-path must be a local directory, got {path!r}")
    try:
        processor = AutoProcessor.from_pretrained(path)
    except Exception as error:  # missing torchvision shows up as several exception types
        logger.debug("AutoProcessor failed on %s (%s); using the PIL image processor", path, error)
        processor = None
    # Without processor files AutoProcessor returns the bare tokenizer.
    bare = isinstance(processor, PreTrainedTokenizerBase)
    tokenizer = processor if bare else getattr(processor, "tokenizer", None)
    image_processor = getattr(processor, "image_processor", None)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(path)
    if image_processor is None:
        try:
            image_processor = AutoImageProcessor.from_pretrained(path, backend="pil")
        except (OSError, ValueError) as error:
            raise ValueError(
                f"{path} has no image processor config (preprocessor_config.json); download the "
                "processor files of the model along with the tokenizer"
            ) from error
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"tokenizer in {path} has no chat template (chat_template.jinja or the "
            "chat_template entry of tokenizer_config.json); download it with the tokenizer"
        )
    return tokenizer, image_processor


class AssistantSpans:
    """Marks assistant answers in token ids: after every `<|im_start|>assistant\\n` header (and
    the <think>...</think> block plus blank tokens the template may put after it) up to and
    including the next <|im_end|>, or to the end when the sample was cut. Multi-turn safe."""

    def __init__(self, tokenizer: Any) -> None:
        vocab = tokenizer.get_vocab()
        self.header = tokenizer.encode(ASSISTANT_HEADER, add_special_tokens=False)
        self.end = token_id(tokenizer, TURN_END, vocab)
        if self.end is None:
            raise ValueError(
                f"tokenizer {_tokenizer_name(tokenizer)!r} has no {TURN_END} token; a Qwen chat "
                "tokenizer is required"
            )
        self.think_start = token_id(tokenizer, THINK_START, vocab)
        self.think_end = token_id(tokenizer, THINK_END, vocab)
        self.special = {int(i) for i in tokenizer.all_special_ids}
        self._decode = tokenizer.decode
        self._blank: dict[int, bool] = {}

    def _is_blank(self, token: int) -> bool:
        if token not in self._blank:
            text = self._decode([token])
            self._blank[token] = token not in self.special and not text.strip()
        return self._blank[token]

    def answer_start(self, ids: list[int], after_header: int) -> int:
        """First answer token after a header ending at `after_header` (skips a think block)."""
        i = after_header
        if self.think_start is not None and i < len(ids) and ids[i] == self.think_start:
            close = _find(ids, [self.think_end], i + 1) if self.think_end is not None else -1
            if close < 0:
                return len(ids)
            i = close + 1
            while i < len(ids) and self._is_blank(ids[i]):
                i += 1
        return i

    def spans(self, ids: Sequence[int] | Tensor) -> list[tuple[int, int]]:
        """[start, stop) of every assistant answer, the closing <|im_end|> included."""
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        found, i = [], 0
        while (head := _find(ids, self.header, i)) >= 0:
            start = self.answer_start(ids, head + len(self.header))
            end = _find(ids, [self.end], start)
            stop = len(ids) if end < 0 else end + 1
            found.append((start, stop))
            i = stop
        return found

    def mask(self, ids: Sequence[int] | Tensor) -> Tensor:
        """Bool flags, True on the assistant answers."""
        supervised = torch.zeros(len(ids), dtype=torch.bool)
        for start, stop in self.spans(ids):
            supervised[start:stop] = True
        return supervised


def _find(ids: list[int], pattern: list[int], start: int) -> int:
    """Index of the first occurrence of `pattern` in `ids` at or after `start`, else -1."""
    if not pattern:
        return -1
    first, size = pattern[0], len(pattern)
    i = start
    while True:
        try:
            i = ids.index(first, i)
        except ValueError:
            return -1
        if ids[i : i + size] == pattern:
            return i
        i += 1


class ConversationEncoder:
    """Chat template -> token ids with every <|image_pad|> expanded to its image's token count
    (what Qwen's processor does), plus the supervised flags of the assistant answers."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id(tokenizer)
        self.spans = AssistantSpans(tokenizer)

    def render(self, messages: list[dict[str, Any]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def expand_images(self, ids: list[int], image_tokens: Sequence[int]) -> list[int]:
        placeholders = ids.count(self.image_token_id)
        if placeholders != len(image_tokens):
            raise ValueError(
                f"the chat template rendered {placeholders} {IMAGE_TOKEN} placeholders for "
                f"{len(image_tokens)} images; it must render one per image content item"
            )
        expanded: list[int] = []
        counts = iter(image_tokens)
        for token in ids:
            if token == self.image_token_id:
                expanded.extend([token] * next(counts))
            else:
                expanded.append(token)
        return expanded

    def encode(
        self, messages: list[dict[str, Any]], image_tokens: Sequence[int]
    ) -> tuple[Tensor, Tensor]:
        """(input_ids, supervised) of a whole conversation; `image_tokens[i]` is the number of
        merged tokens of the i-th image (grid_thw.prod() // merge**2)."""
        ids = self.expand_images(self.render(messages), image_tokens)
        supervised = self.spans.mask(ids)
        if any(m["role"] == "assistant" for m in messages) and not supervised.any():
            raise ValueError(
                f"no assistant answer found: the chat template of "
                f"{_tokenizer_name(self.tokenizer)!r} does not render {ASSISTANT_HEADER!r} "
                f"... {TURN_END!r} around assistant turns"
            )
        return torch.tensor(ids, dtype=torch.long), supervised


@dataclass(frozen=True)
class RowRef:
    """Where sample i lives: shard file, row group, row in the group, row in the file."""

    shard: str
    row_group: int
    group_row: int
    file_row: int


def find_shards(dataset_path: str, split: str) -> list[str]:
    """Parquet shards of a CORD split: DIR/data/{split}-*.parquet (the Hub layout) or
    DIR/{split}-*.parquet; ValueError naming the directory when there are none."""
    if not dataset_path or not os.path.isdir(dataset_path):
        raise ValueError(f"--dataset-path must be a local directory, got {dataset_path!r}")
    patterns = [
        os.path.join(dataset_path, "data", f"{split}-*.parquet"),
        os.path.join(dataset_path, f"{split}-*.parquet"),
    ]
    for pattern in patterns:
        shards = sorted(glob.glob(pattern))
        if shards:
            return shards
    raise ValueError(
        f"no {split} shards in {dataset_path}: looked for {' and '.join(patterns)}; point "
        "--dataset-path at a download of the Hub dataset naver-clova-ix/cord-v2"
    )


def check_args(args: Any) -> None:
    """Before any run: --dataset-path and --hf-tokenizer-path are given, and every split this
    provider reads has parquet shards under the former."""
    from arguments import LAUNCHER_VARIABLES, flag_value

    for flag, value in (
        ("--dataset-path", args.dataset_path),
        ("--hf-tokenizer-path", args.hf_tokenizer_path),
    ):
        if not value:
            raise ValueError(
                f"the cord_v2 dataset needs {flag} ({LAUNCHER_VARIABLES[flag]}), a local "
                "directory (README, CORD-V2)"
            )
    for split in SPLIT_FILES.values():
        try:
            find_shards(args.dataset_path, split)
        except ValueError as error:
            where = flag_value("--dataset-path", args.dataset_path)
            raise ValueError(f"{where}: {error}") from error


def describe_dataset(args: Any, config: Any) -> list[str]:
    """What a dry run reads without a GPU: each split's shards and rows (parquet metadata only),
    the tokenizer and image processor of --hf-tokenizer-path, and the image token id the data
    will carry against the one the chosen model was released with."""
    import pyarrow.parquet as pq

    lines = []
    for field, split in SPLIT_FILES.items():
        shards = find_shards(args.dataset_path, split)
        rows = sum(pq.ParquetFile(shard).metadata.num_rows for shard in shards)
        lines.append(f"cord_v2 {field}: {rows:,} rows in {len(shards)} shard(s)")
    tokenizer, image_processor = load_tokenizer_and_image_processor(args.hf_tokenizer_path)
    image = image_token_id(tokenizer)
    agreement = (
        "the model's"
        if image == config.image_token_id
        else f"the model was released with {config.image_token_id}: the run embeds {image}"
    )
    lines.append(
        f"tokenizer {args.hf_tokenizer_path}: {len(tokenizer):,} tokens, image token id {image} "
        f"({agreement}); image processor patch {image_processor.patch_size}, merge "
        f"{image_processor.merge_size}"
    )
    return lines


class CordV2Dataset(Dataset):
    """CORD-V2 rows read lazily from parquet shards (one row group cached per process).

    Each sample: `input_ids` [L], `supervised` [L] bool, `pixel_values` bf16 [patches, C*T*P*P]
    and `image_grid_thw` [1, 3]. Samples over `seq_length` are end-truncated; with
    `skip_bad_samples` an unreadable row yields the next readable one. Both are noted in the
    sample's `load_notes` (`LoadNotes`), which the loader counts in the main process. The scan at
    construction decodes every image, so unreadable rows are found before training starts.
    """

    def __init__(
        self,
        shards: Sequence[str],
        tokenizer: Any,
        image_processor: Any,
        *,
        seq_length: int,
        min_pixels: int,
        max_pixels: int,
        skip_bad_samples: bool = False,
        name: str = "train",
        instruction: str = INSTRUCTION,
        scan: bool = True,
    ) -> None:
        if not shards:
            raise ValueError(f"cord_v2 {name}: no shards given")
        self.name = name
        self.shards = list(shards)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.encoder = ConversationEncoder(tokenizer)
        self.seq_length = seq_length
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.skip_bad_samples = skip_bad_samples
        self.instruction = instruction
        self.patch_size = int(image_processor.patch_size)
        self.merge_size = int(image_processor.merge_size)
        self.rows = self._index_rows()
        # index -> reason, found by the scan or when loaded (in this process)
        self.bad_rows: dict[int, str] = {}
        # Set by the scan: one epoch's tokens and supervised tokens (after truncation).
        self.epoch_tokens: int | None = None
        self.epoch_supervised_tokens: int | None = None
        self.long_rows: int | None = None
        self.scan_seconds: float | None = None
        self._reset_handles()
        if scan:
            self._scan()

    @property
    def label(self) -> str:
        return f"cord_v2 {self.name}"

    # ---- parquet access ---------------------------------------------------------------------

    def _index_rows(self) -> list[RowRef]:
        rows = []
        for shard in self.shards:
            parquet = pq.ParquetFile(shard)
            metadata = parquet.metadata
            names = set(parquet.schema_arrow.names)
            missing = [c for c in COLUMNS if c not in names]
            if missing:
                raise ValueError(
                    f"{shard} lacks column(s) {missing} (has {sorted(names)}); expected the "
                    "naver-clova-ix/cord-v2 parquet layout with `image` and `ground_truth`"
                )
            file_row = 0
            for group in range(metadata.num_row_groups):
                for group_row in range(metadata.row_group(group).num_rows):
                    rows.append(RowRef(shard, group, group_row, file_row))
                    file_row += 1
        if not rows:
            raise ValueError(f"cord_v2 {self.name}: shards {self.shards} hold no rows")
        return rows

    def _reset_handles(self) -> None:
        self._pid = os.getpid()
        self._files: dict[str, pq.ParquetFile] = {}
        self._group_key: tuple[str, int] | None = None
        self._group: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_files={}, _group_key=None, _group=None)
        return state

    def _read(self, ref: RowRef) -> tuple[dict[str, Any] | None, Any]:
        """The raw `image` struct and `ground_truth` value of one row."""
        if self._pid != os.getpid():  # a DataLoader worker: never share parquet handles
            self._reset_handles()
        key = (ref.shard, ref.row_group)
        if self._group_key != key:
            if ref.shard not in self._files:
                self._files[ref.shard] = pq.ParquetFile(ref.shard)
            self._group = self._files[ref.shard].read_row_group(ref.row_group, columns=COLUMNS)
            self._group_key = key
        image = self._group.column("image")[ref.group_row].as_py()
        return image, self._group.column("ground_truth")[ref.group_row].as_py()

    # ---- one row ----------------------------------------------------------------------------

    @staticmethod
    def where(ref: RowRef) -> str:
        return f"{ref.shard} row {ref.file_row}"

    def _bad(self, ref: RowRef, reason: str) -> BadSampleError:
        return BadSampleError(
            f"cord_v2 {self.name}: {self.where(ref)}: {reason}; repair or drop the row, or pass "
            "--skip-bad-samples to skip such rows",
            reason,
        )

    def _answer(self, ref: RowRef, ground_truth: Any) -> str:
        try:
            parsed = json.loads(ground_truth)
        except (TypeError, json.JSONDecodeError) as error:
            raise self._bad(ref, f"ground_truth is not JSON ({error})") from error
        parse = parsed.get("gt_parse") if isinstance(parsed, dict) else None
        if not isinstance(parse, dict):
            raise self._bad(ref, "ground_truth has no gt_parse object")
        return json.dumps(parse, ensure_ascii=False)

    def _image_bytes(self, ref: RowRef, image: dict[str, Any] | None) -> bytes:
        data = (image or {}).get("bytes")
        if not data:
            raise self._bad(ref, "image has no embedded bytes")
        return data

    def messages(self, image: Any, answer: str) -> list[dict[str, Any]]:
        """The conversation of one receipt; `image` is a PIL image (or None for counting)."""
        picture: dict[str, Any] = {"type": "image", "image": image}
        picture.update(min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        return [
            {"role": "user", "content": [picture, {"type": "text", "text": self.instruction}]},
            {"role": "assistant", "content": answer},
        ]

    def image_tokens(self, width: int, height: int) -> int:
        """Merged tokens of a width x height image after qwen_vl_utils' dynamic resize."""
        factor = self.patch_size * self.merge_size
        h, w = smart_resize(height, width, factor, self.min_pixels, self.max_pixels)
        return (h // factor) * (w // factor)

    def _prompt_too_long(self, ref: RowRef, prompt_tokens: int) -> ValueError:
        return ValueError(
            f"cord_v2 {self.name}: {ref.shard} row {ref.file_row} has {prompt_tokens} tokens "
            f"before its answer (image and instruction) but --total-seq-length is "
            f"{self.seq_length}; raise --total-seq-length or lower --max-pixels"
        )

    def load(self, index: int) -> dict[str, Any]:
        """Sample `index`, with `load_notes` when it was end-truncated; BadSampleError (a
        ValueError) when its row is unreadable."""
        ref = self.rows[index]
        if index in self.bad_rows:
            raise self._bad(ref, self.bad_rows[index])
        image_struct, ground_truth = self._read(ref)
        answer = self._answer(ref, ground_truth)
        data = self._image_bytes(ref, image_struct)
        try:
            messages = self.messages(decode_image(data), answer)
            images, _ = process_vision_info(messages, image_patch_size=self.patch_size)
        except _DECODE_ERRORS as error:
            raise self._bad(ref, f"image cannot be decoded or resized ({error})") from error
        size = {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}
        processed = self.image_processor(images=images, size=size, return_tensors="pt")
        grid = torch.as_tensor(processed["image_grid_thw"], dtype=torch.long)
        image_tokens = (grid.prod(-1) // self.merge_size**2).tolist()
        ids, supervised = self.encoder.encode(messages, image_tokens)
        sample: dict[str, Any] = {
            "input_ids": ids[: self.seq_length],
            "supervised": supervised[: self.seq_length],
            "pixel_values": torch.as_tensor(processed["pixel_values"]).to(torch.bfloat16),
            "image_grid_thw": grid,
        }
        if ids.numel() > self.seq_length:
            answer_start = int(supervised.int().argmax())
            if answer_start >= self.seq_length:
                raise self._prompt_too_long(ref, answer_start)
            truncated = ((self.where(ref), ids.numel(), self.seq_length),)
            sample["load_notes"] = LoadNotes(truncated=truncated)
        return sample

    # ---- Dataset ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self.rows):
            raise IndexError(f"cord_v2 {self.name}: index {index} out of range [0, {len(self)})")
        skipped: list[tuple[str, str]] = []
        for offset in range(len(self.rows)):
            row = (index + offset) % len(self.rows)
            try:
                sample = self.load(row)
            except BadSampleError as error:
                if not self.skip_bad_samples:
                    raise
                self.bad_rows.setdefault(row, error.reason)
                skipped.append((self.where(self.rows[row]), error.reason))
                continue
            if skipped:
                truncated = [sample["load_notes"]] if "load_notes" in sample else []
                notes = LoadNotes(skipped=tuple(skipped))
                sample["load_notes"] = LoadNotes.merge([notes, *truncated])
            return sample
        raise ValueError(f"cord_v2 {self.name}: no readable row in {self.shards}")

    # ---- epoch statistics -------------------------------------------------------------------

    def _scan_row(self, ref: RowRef, image: dict[str, Any] | None, truth: Any) -> Tensor:
        """Supervised flags of one row (so its length too), from its ground truth and its
        decoded image's size; BadSampleError when either is unreadable."""
        answer = self._answer(ref, truth)
        data = self._image_bytes(ref, image)
        try:
            width, height = decode_image(data).size
            image_tokens = self.image_tokens(width, height)
        except _DECODE_ERRORS as error:
            raise self._bad(ref, f"image cannot be decoded or resized ({error})") from error
        ids, supervised = self.encoder.encode(self.messages(None, answer), [image_tokens])
        if ids.numel() > self.seq_length and int(supervised.int().argmax()) >= self.seq_length:
            raise self._prompt_too_long(ref, int(supervised.int().argmax()))
        return supervised

    def _scan(self) -> None:
        """Token count and supervised fraction of one epoch, exact without preprocessing images
        (token counts from the decoded sizes). Every image is decoded in full, so that a
        truncated or corrupt one raises here already (or with skip_bad_samples is recorded in
        `bad_rows`) rather than stopping training later; the time this takes is logged."""
        started = time.perf_counter()
        lengths: dict[int, tuple[int, int]] = {}  # index -> (tokens, supervised), truncated
        long_rows = 0
        index = 0
        for shard in self.shards:
            for batch in pq.ParquetFile(shard).iter_batches(batch_size=16, columns=COLUMNS):
                images = batch.column("image").to_pylist()
                truths = batch.column("ground_truth").to_pylist()
                for image, truth in zip(images, truths, strict=True):
                    try:
                        supervised = self._scan_row(self.rows[index], image, truth)
                    except BadSampleError as error:
                        if not self.skip_bad_samples:
                            raise
                        self.bad_rows[index] = error.reason
                    else:
                        long_rows += supervised.numel() > self.seq_length
                        kept = supervised[: self.seq_length]
                        lengths[index] = (kept.numel(), int(kept.sum()))
                    index += 1
        if not lengths:
            raise ValueError(f"cord_v2 {self.name}: no readable row in {self.shards}")
        # With skipping, a bad row's index serves the next readable row.
        tokens = supervised_tokens = 0
        for i in range(len(self.rows)):
            j = i
            while j not in lengths:
                j = (j + 1) % len(self.rows)
            tokens += lengths[j][0]
            supervised_tokens += lengths[j][1]
        self.epoch_tokens = tokens
        self.epoch_supervised_tokens = supervised_tokens
        self.long_rows = long_rows
        self.scan_seconds = time.perf_counter() - started
        message = (
            f"cord_v2 {self.name}: {len(self)} samples from {len(self.shards)} shard(s) in "
            f"{os.path.dirname(self.shards[0])}, every image decoded in "
            f"{self.scan_seconds:.1f} s; one epoch = {tokens:,} tokens, "
            f"{supervised_tokens / tokens:.1%} supervised (assistant answers); {long_rows} of "
            f"the samples exceed --total-seq-length {self.seq_length} and will be end-truncated"
        )
        if self.bad_rows:
            first = self.rows[min(self.bad_rows)]
            message += (
                f"; {len(self.bad_rows)} unreadable rows will be skipped (first: "
                f"{self.where(first)}: {self.bad_rows[min(self.bad_rows)]})"
            )
        log_rank0(message)


def log_rank0(message: str) -> None:
    """Info message from rank 0 only (every process when not distributed); printed when this
    module's logger is not enabled for INFO (megatron leaves Python logging at WARNING)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    if logger.isEnabledFor(logging.INFO):
        logger.info(message)
    else:
        print(message, flush=True)


def check_model_match(config: Any, tokenizer: Any, image_processor: Any, path: str) -> None:
    """The model must read the tokenizer's image id and use the image processor's geometry."""
    image_id = image_token_id(tokenizer)
    if config.image_token_id != image_id:
        raise ValueError(
            f"the model's image token id is {config.image_token_id} but {IMAGE_TOKEN} is "
            f"{image_id} in {path}; build the model config with the same --hf-tokenizer-path"
        )
    if len(tokenizer) > config.text.vocab_size:
        raise ValueError(
            f"tokenizer in {path} has {len(tokenizer)} tokens, more than the model vocabulary "
            f"({config.text.vocab_size}); use the tokenizer of the model being trained"
        )
    vision = config.vision
    for field, model_value in (
        ("patch_size", vision.patch_size),
        ("merge_size", vision.spatial_merge_size),
        ("temporal_patch_size", vision.temporal_patch_size),
    ):
        value = getattr(image_processor, field, model_value)
        if value != model_value:
            raise ValueError(
                f"image processor in {path} has {field} {value} but the model's vision tower "
                f"uses {model_value}; use the processor files of the model being trained"
            )


def build_datasets(
    args: Any, config: Any = None, num_samples: Sequence[int] | None = None
) -> DatasetSplits:
    """Dataset provider `cord_v2`: train / valid / test from the shards under --dataset-path,
    tokenized with --hf-tokenizer-path. The splits keep their own sizes (`num_samples` is not
    used: the loader cycles a finite dataset). --mask-im-end keeps the <|im_end|> closing each
    answer out of the loss."""
    path = args.hf_tokenizer_path
    tokenizer, image_processor = load_tokenizer_and_image_processor(path)
    pad_id = pad_token_id(tokenizer)
    ignored = ignored_label_ids(tokenizer, bool(getattr(args, "mask_im_end", False)))
    if config is not None:
        check_model_match(config, tokenizer, image_processor, path)
    seq_length = getattr(args, "total_seq_length", None) or getattr(args, "seq_length", None)
    if not seq_length:
        raise ValueError("cord_v2 needs --total-seq-length (or --seq-length)")
    shards = {field: find_shards(args.dataset_path, split) for field, split in SPLIT_FILES.items()}
    splits = {
        field: CordV2Dataset(
            shards[field],
            tokenizer,
            image_processor,
            seq_length=seq_length,
            min_pixels=args.min_pixels,
            max_pixels=args.max_pixels,
            skip_bad_samples=bool(getattr(args, "skip_bad_samples", False)),
            name=split,
        )
        for field, split in SPLIT_FILES.items()
    }
    return DatasetSplits(**splits, pad_token_id=pad_id, ignored_label_ids=ignored)
