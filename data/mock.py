"""Seeded synthetic multimodal conversations shaped like real SFT data.

Each sample is a user turn with 1-3 images of different sizes and a prompt, and an assistant turn
that names each image's colour and repeats the prompt backwards. The reversed prompt is almost the
whole answer and its words are uniform over `text_range` (4096) ids, so the loss falls to about
ln(4096) = 8.3 from unigram statistics alone and below it only once the model learns to copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from models.spec import VisionLanguageConfig

from .loader import DatasetSplits

# Solid colours the assistant must name; one answer token per colour.
PALETTE = np.array(
    [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [128, 128, 128],
    ],
    dtype=np.int16,
)


@dataclass(frozen=True)
class MockTokens:
    """Token ids the mock conversations use: the model's markers and chat-template tokens."""

    image: int
    vision_start: int
    vision_end: int
    im_start: int
    im_end: int
    pad: int
    # Ordinary tokens: prompt words are drawn from [text_low, text_low + text_range).
    text_low: int = 1000
    text_range: int = 4096
    colour_base: int = 500

    @classmethod
    def for_model(cls, config: VisionLanguageConfig) -> MockTokens:
        tokens = cls(
            image=config.image_token_id,
            vision_start=config.vision_start_token_id,
            vision_end=config.vision_end_token_id,
            im_start=config.im_start_token_id,
            im_end=config.im_end_token_id,
            pad=config.pad_token_id,
        )
        largest = max(tokens.special_ids() | {tokens.text_low + tokens.text_range})
        if largest >= config.text.vocab_size:
            raise ValueError(
                f"mock data needs token id {largest} but the model vocabulary has "
                f"{config.text.vocab_size} entries"
            )
        return tokens

    def special_ids(self) -> set[int]:
        return {
            self.image,
            self.vision_start,
            self.vision_end,
            self.im_start,
            self.im_end,
            self.pad,
        }

    def ignored_label_ids(self, mask_im_end: bool = False) -> frozenset[int]:
        """Special ids never trained; the im_end closing the answer is, unless `mask_im_end`."""
        return frozenset(self.special_ids() - (set() if mask_im_end else {self.im_end}))


class MockVLMDataset(Dataset):
    """`num_samples` deterministic samples; sample i depends only on (seed, i)."""

    def __init__(
        self,
        num_samples: int,
        seq_length: int,
        config: VisionLanguageConfig,
        seed: int,
        min_pixels: int,
        max_pixels: int,
        max_images: int = 3,
    ) -> None:
        self.num_samples = num_samples
        self.seq_length = seq_length
        self.seed = seed
        self.max_images = max_images
        self.tokens = MockTokens.for_model(config)
        self.processor = config.image_processor(min_pixels, max_pixels)
        self.unit = config.vision.patch_size * config.vision.spatial_merge_size
        self.min_cells = -(-min_pixels // self.unit**2)
        self.max_cells = max_pixels // self.unit**2
        overhead = 12  # role markers and line breaks around the two turns
        if seq_length < overhead + 2 * (self.min_cells + 2) + 8:
            raise ValueError(
                f"--total-seq-length {seq_length} is too short for mock samples with one image of "
                f"at least {min_pixels} pixels; use a longer sequence or a smaller --min-pixels"
            )

    def __len__(self) -> int:
        return self.num_samples

    def _image_shape(self, rng: np.random.Generator, budget_cells: int) -> tuple[int, int]:
        """Height and width (multiples of patch x merge) with an aspect ratio within 1:4..4:1 and
        between min_cells and budget_cells merged tokens."""
        cells = int(rng.integers(self.min_cells, max(self.min_cells, budget_cells) + 1))
        aspect = float(np.exp(rng.uniform(np.log(0.25), np.log(4.0))))
        rows = max(1, round((cells * aspect) ** 0.5))
        cols = max(1, cells // rows)
        while rows * cols < self.min_cells:
            cols += 1
        return rows * self.unit, cols * self.unit

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"mock sample {index} out of range [0, {self.num_samples})")
        rng = np.random.default_rng([self.seed, index])
        t = self.tokens
        num_images = int(rng.integers(1, self.max_images + 1))
        # Half of the sequence is for images, the rest for prompt and answer.
        budget = min(self.max_cells, (self.seq_length // 2) // num_images - 2)
        if budget < self.min_cells:
            num_images = 1
            budget = min(self.max_cells, self.seq_length // 2 - 2)
        colours = rng.integers(0, len(PALETTE), size=num_images)
        images = []
        for colour in colours:
            height, width = self._image_shape(rng, budget)
            noise = rng.integers(-20, 21, size=(height, width, 3))
            pixels = np.clip(PALETTE[colour] + noise, 0, 255).astype(np.uint8)
            images.append(Image.fromarray(pixels))
        processed = self.processor(images=images, return_tensors="pt")
        grid = processed["image_grid_thw"]
        image_tokens = (grid.prod(-1) // self.processor.merge_size**2).tolist()

        prefix = [t.im_start, t.text_low, t.text_low + 1]
        for count in image_tokens:
            prefix += [t.vision_start] + [t.image] * count + [t.vision_end]
        room = self.seq_length - len(prefix) - num_images - 8
        prompt_length = int(rng.integers(min(4, room // 2), max(4, room // 2) + 1))
        prompt = (t.text_low + rng.integers(0, t.text_range, size=prompt_length)).tolist()
        prefix += [*prompt, t.im_end, t.text_low + 1, t.im_start, t.text_low + 2, t.text_low + 1]
        answer = [t.colour_base + int(c) for c in colours] + prompt[::-1] + [t.im_end]
        ids = torch.tensor(prefix + answer, dtype=torch.long)
        supervised = torch.zeros(ids.numel(), dtype=torch.bool)
        supervised[len(prefix) :] = True
        return {
            "input_ids": ids,
            "supervised": supervised,
            "pixel_values": processed["pixel_values"].to(torch.bfloat16),
            "image_grid_thw": grid,
        }


def interleaved_sample(
    config: VisionLanguageConfig,
    seed: int,
    text_lengths: Sequence[int],
    image_sizes: Sequence[tuple[int, int]],
    text_vocab: int = 150000,
) -> dict[str, torch.Tensor]:
    """One sample of random text segments and random-pixel images of the given (height, width),
    interleaved: text_lengths[0], image 0, text_lengths[1], ... (one more text segment than
    images). Ordinary tokens are drawn from [0, text_vocab); the second half is supervised.
    Used by tests and benchmarks that need exact lengths and image sizes."""
    rng = np.random.default_rng(seed)
    unit = config.vision.patch_size * config.vision.spatial_merge_size  # one merged token's side
    processor = config.image_processor(unit * unit, 16384 * unit * unit)
    ids: list[int] = []
    grids, pixels = [], []
    for index, length in enumerate(text_lengths):
        ids += rng.integers(0, text_vocab, size=length).tolist()
        if index < len(image_sizes):
            height, width = image_sizes[index]
            image = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
            out = processor(images=[image], return_tensors="pt")
            count = int(out["image_grid_thw"].prod()) // config.vision.spatial_merge_size**2
            ids += [config.vision_start_token_id, *[config.image_token_id] * count]
            ids.append(config.vision_end_token_id)
            grids.append(out["image_grid_thw"])
            pixels.append(out["pixel_values"].to(torch.bfloat16))
    supervised = torch.zeros(len(ids), dtype=torch.bool)
    supervised[len(ids) // 2 :] = True
    sample = {"input_ids": torch.tensor(ids), "supervised": supervised}
    if grids:
        sample["image_grid_thw"] = torch.cat(grids)
        sample["pixel_values"] = torch.cat(pixels)
    return sample


def build_datasets(
    args: Any, config: VisionLanguageConfig, num_samples: tuple[int, int, int]
) -> DatasetSplits:
    """Dataset provider `mock`: train / valid / test splits with different seeds; the answers'
    closing im_end is trained unless --mask-im-end."""
    minimum = args.micro_batch_size * args.data_parallel_size
    tokens = MockTokens.for_model(config)
    splits = [
        MockVLMDataset(
            num_samples=max(int(count or 0), minimum),
            seq_length=args.total_seq_length,
            config=config,
            seed=args.seed + offset,
            min_pixels=args.min_pixels,
            max_pixels=args.max_pixels,
            max_images=args.mock_max_images,
        )
        for offset, count in enumerate(num_samples)
    ]
    ignored = tokens.ignored_label_ids(bool(getattr(args, "mask_im_end", False)))
    return DatasetSplits(*splits, pad_token_id=tokens.pad, ignored_label_ids=ignored)


def describe_dataset(args: Any, config: VisionLanguageConfig) -> list[str]:
    """The dry run's line for `mock`: nothing to read, samples come from the seed."""
    return [
        f"mock: synthetic samples from seed {args.seed} (1-{args.mock_max_images} images each, "
        f"image token id {config.image_token_id}); no files read"
    ]
