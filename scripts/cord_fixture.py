"""User tool: writes a tiny, seeded CORD-V2 stand-in and a Qwen3.5-style tokenizer / processor,
on disk in the Hub's layout, so the cord_v2 provider can be tested and smoke-trained offline.

    python -m scripts.cord_fixture --out DIR [--bad-rows] [--no-long-row]
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw
from transformers import Qwen2Tokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<think>",
    "</think>",
)

# Written for this fixture: the Qwen3.5 chat layout (an empty think block opens every assistant
# turn after the last user turn, as in non-thinking mode), images as vision-start/pad/end.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' ~ message.role ~ '\\n' -}}"
    "{%- if message.role == 'assistant' and loop.index0 > ns.last_user -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- if message.content is string -%}{{- message.content -}}"
    "{%- else -%}"
    "{%- for part in message.content -%}"
    "{%- if part.type == 'image' or 'image' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part.type == 'text' -%}{{- part.text -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
)

# Words that get whole-word BPE merges (the rest of the text falls back to bytes).
WORDS = (
    "user",
    "assistant",
    "system",
    "Extract",
    " the",
    " receipt",
    " as",
    " JSON",
    "menu",
    "nm",
    "cnt",
    "price",
    "unitprice",
    "sub",
    "sub_total",
    "subtotal_price",
    "tax_price",
    "service_price",
    "discount_price",
    "total",
    "total_price",
    "cashprice",
    "changeprice",
    "menuqty_cnt",
    "ICE",
    " TEA",
    " LATTE",
    " COFFEE",
    " RICE",
    " NOODLE",
    " CHICKEN",
    " SOUP",
    " CAKE",
    " BREAD",
    "000",
    '": "',
    '", "',
    '"}, {"',
    '": {"',
    '": [{"',
    '"}]',
    '"}}',
    ' {"',
)

ITEMS = (
    "ICE TEA",
    "HOT LATTE",
    "KOPI SUSU",
    "NASI GORENG",
    "MIE AYAM",
    "CHICKEN KATSU",
    "TOFU SOUP",
    "CHEESE CAKE",
    "GARLIC BREAD",
    "Crème Brûlée",
)

# (width, height) of the generated receipts: tall, wide and squarish, so dynamic resolution shows.
TRAIN_SIZES = ((200, 600), (640, 180), (320, 480), (480, 320), (256, 256), (180, 540), (600, 200))
EVAL_SIZES = ((240, 480), (560, 200), (300, 300))
# This train row's JPEG holds its (tall) receipt turned on its side, with the EXIF orientation
# tag 6 ("rotate 90 degrees clockwise to display"), as phone photos often are.
SIDEWAYS_ROW = 5
EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class FixtureRow:
    """What one parquet row holds. `kind`: ok, long, corrupt_image (random bytes),
    truncated_image (a PNG cut short: its header reads, decoding fails), not_json, no_gt_parse."""

    kind: str
    gt_parse: dict[str, Any] | None
    size: tuple[int, int] | None  # (width, height), upright
    sideways: bool = False  # stored turned, with an EXIF orientation tag


@dataclass
class CordFixture:
    """Paths of a written fixture and the rows of every shard, in order."""

    root: Path
    tokenizer_dir: Path
    shards: dict[str, list[Path]] = field(default_factory=dict)
    rows: dict[str, list[FixtureRow]] = field(default_factory=dict)


def byte_symbols() -> list[str]:
    """GPT-2 byte-level alphabet: the printable byte values map to themselves, the rest to
    code points from 256 on, in byte order."""
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
    symbols, shifted = [], 0
    for value in range(256):
        if value in printable:
            symbols.append(chr(value))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def build_tokenizer() -> Qwen2Tokenizer:
    """A byte-level BPE Qwen2 tokenizer (bytes + whole-word merges for WORDS, a few hundred
    tokens) with the Qwen3.5 special tokens, eos <|im_end|>, pad <|endoftext|> and CHAT_TEMPLATE."""
    symbols = byte_symbols()
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        pieces = [symbols[byte] for byte in word.encode("utf-8")]
        merged = pieces[0]
        for piece in pieces[1:]:
            if merged + piece not in vocab:
                merges.append((merged, piece))
                vocab[merged + piece] = len(vocab)
            merged += piece
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(SPECIAL_TOKENS),
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_image_processor() -> Qwen2VLImageProcessorPil:
    """Qwen3.5's image processor geometry: 16-pixel patches, 2x2 merge, two frames per patch."""
    return Qwen2VLImageProcessorPil(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        min_pixels=4 * 32 * 32,
        max_pixels=1280 * 32 * 32,
    )


def receipt_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """White paper with dark bars standing in for printed lines."""
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    line = max(6, height // 24)
    for top in range(line, height - line, 2 * line):
        left = int(rng.integers(4, max(5, width // 8)))
        right = int(rng.integers(width // 2, width - 4))
        shade = int(rng.integers(0, 80))
        draw.rectangle([left, top, right, top + line - 2], fill=(shade, shade, shade))
    return image


def encode_image(image: Image.Image, fmt: str, sideways: bool = False) -> bytes:
    """The image's file bytes; `sideways` stores it turned 90 degrees counter-clockwise with
    EXIF orientation 6, so that a viewer (or the provider) turns it back upright."""
    buffer = io.BytesIO()
    if sideways:
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = 6
        image.transpose(Image.Transpose.ROTATE_90).save(buffer, format=fmt, exif=exif.tobytes())
    else:
        image.save(buffer, format=fmt)
    return buffer.getvalue()


def price(rng: np.random.Generator) -> int:
    return int(rng.integers(5, 120)) * 1000


def money(value: int) -> str:
    return f"{value:,}"


def receipt_parse(rng: np.random.Generator, num_items: int) -> dict[str, Any]:
    """A CORD-shaped `gt_parse`: menu (a dict when there is one item, as in CORD), sub_total,
    total; some items carry a `sub` entry."""
    menu, subtotal = [], 0
    for _ in range(num_items):
        count = int(rng.integers(1, 4))
        unit = price(rng)
        item: dict[str, Any] = {
            "nm": ITEMS[int(rng.integers(len(ITEMS)))],
            "cnt": str(count),
            "price": money(count * unit),
        }
        if rng.random() < 0.25:
            item["sub"] = {"nm": "EXTRA SHOT", "price": "0"}
        menu.append(item)
        subtotal += count * unit
    tax = subtotal // 10
    paid = -(-(subtotal + tax) // 50_000) * 50_000
    return {
        "menu": menu[0] if num_items == 1 else menu,
        "sub_total": {"subtotal_price": money(subtotal), "tax_price": money(tax)},
        "total": {
            "total_price": money(subtotal + tax),
            "cashprice": money(paid),
            "changeprice": money(paid - subtotal - tax),
        },
    }


def ground_truth(parse: dict[str, Any]) -> str:
    """The `ground_truth` string of a CORD row (gt_parse plus metadata the provider ignores)."""
    meta = {"version": "2.0.0", "split": "fixture", "image_size": {}}
    return json.dumps({"gt_parse": parse, "meta": meta, "valid_line": []}, ensure_ascii=False)


def split_rows(
    split: str, rng: np.random.Generator, long_row: bool, bad_rows: bool
) -> list[tuple[FixtureRow, dict[str, Any]]]:
    """Rows of one split as (description, parquet record)."""
    sizes = TRAIN_SIZES if split == "train" else EVAL_SIZES
    rows = []
    for index, (width, height) in enumerate(sizes):
        parse = receipt_parse(rng, num_items=1 if index == 4 else int(rng.integers(2, 5)))
        fmt = "PNG" if index % 2 == 0 else "JPEG"
        sideways = split == "train" and index == SIDEWAYS_ROW
        data = encode_image(receipt_image(rng, width, height), fmt, sideways)
        record = {"image": {"bytes": data, "path": f"{split}_{index}.{fmt.lower()}"}}
        record["ground_truth"] = ground_truth(parse)
        rows.append((FixtureRow("ok", parse, (width, height), sideways), record))
    if split != "train":
        return rows
    if long_row:
        parse = receipt_parse(rng, num_items=60)
        data = encode_image(receipt_image(rng, 224, 320), "PNG")
        record = {"image": {"bytes": data, "path": "long.png"}, "ground_truth": ground_truth(parse)}
        rows.append((FixtureRow("long", parse, (224, 320)), record))
    if bad_rows:
        good = rows[0][1]
        noise = rng.integers(0, 256, size=512, dtype=np.uint8).tobytes()
        corrupt = {"image": {"bytes": noise, "path": "corrupt.jpg"}}
        cut = {"image": {"bytes": good["image"]["bytes"][:400], "path": "cut.png"}}
        for record in (corrupt, cut):
            record["ground_truth"] = good["ground_truth"]
        not_json = {"image": good["image"], "ground_truth": '{"gt_parse": {"menu": ['}
        no_parse = {"image": good["image"], "ground_truth": json.dumps({"meta": {}})}
        size = rows[0][0].size
        # Between good rows, so a skipped row's next good row is not a wrap-around.
        for position, row in (
            (2, (FixtureRow("corrupt_image", None, None), corrupt)),
            (5, (FixtureRow("not_json", None, size), not_json)),
            (6, (FixtureRow("no_gt_parse", None, size), no_parse)),
            (8, (FixtureRow("truncated_image", None, size), cut)),
        ):
            rows.insert(position, row)
    return rows


PARQUET_SCHEMA = pa.schema(
    [
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ("ground_truth", pa.string()),
    ]
)


def write_fixture(
    out: str | Path,
    *,
    long_row: bool = True,
    bad_rows: bool = False,
    train_shards: int = 1,
    seed: int = 0,
) -> CordFixture:
    """Write DIR/tokenizer (tokenizer + image processor) and DIR/data/{split}-*.parquet.

    Train has 7 good rows (row SIDEWAYS_ROW stored sideways with an EXIF orientation tag), then
    the over-long row (`long_row`); `bad_rows` inserts, at train rows 2, 5, 6 and 8, random
    image bytes, a ground truth that is not JSON, one without gt_parse and a truncated PNG.
    `train_shards` spreads the train rows over that many shards (row groups of 3 rows
    everywhere)."""
    root = Path(out)
    fixture = CordFixture(root=root, tokenizer_dir=root / "tokenizer")
    fixture.tokenizer_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save_pretrained(fixture.tokenizer_dir)
    build_image_processor().save_pretrained(fixture.tokenizer_dir)
    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split in ("train", "validation", "test"):
        rows = split_rows(split, rng, long_row=long_row, bad_rows=bad_rows)
        fixture.rows[split] = [row for row, _ in rows]
        count = train_shards if split == "train" else 1
        bounds = np.linspace(0, len(rows), count + 1).round().astype(int)
        fixture.shards[split] = []
        for shard, (start, stop) in enumerate(itertools.pairwise(bounds)):
            path = data_dir / f"{split}-{shard:05d}-of-{count:05d}.parquet"
            records = [record for _, record in rows[start:stop]]
            pq.write_table(
                pa.Table.from_pylist(records, schema=PARQUET_SCHEMA), path, row_group_size=3
            )
            fixture.shards[split].append(path)
    return fixture


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory to write (created if missing)")
    parser.add_argument("--bad-rows", action="store_true", help="add unreadable train rows")
    parser.add_argument("--no-long-row", action="store_true", help="omit the over-long row")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    fixture = write_fixture(
        args.out, long_row=not args.no_long_row, bad_rows=args.bad_rows, seed=args.seed
    )
    counts = ", ".join(f"{split} {len(rows)}" for split, rows in fixture.rows.items())
    print(f"wrote {fixture.root}: tokenizer in {fixture.tokenizer_dir}, rows {counts}")


if __name__ == "__main__":
    main()
