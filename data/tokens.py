"""Special token ids read from a local Hugging Face tokenizer, so the model's image / vision
markers always match the tokenizer that produced the data.
"""

from __future__ import annotations

import argparse
from typing import Any

TOKEN_FIELDS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    """Ids of the Qwen vision markers; raises ValueError naming any the tokenizer lacks."""
    vocab = tokenizer.get_vocab()
    missing = [token for token in TOKEN_FIELDS.values() if token not in vocab]
    if missing:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no {', '.join(missing)} "
            "token; use the tokenizer of the model being trained (a Qwen vision-language one)"
        )
    return {field: vocab[token] for field, token in TOKEN_FIELDS.items()}


def token_ids_from_args(args: argparse.Namespace) -> dict[str, int]:
    """Marker ids of --hf-tokenizer-path, or {} (keep the variant's ids) without one."""
    if not args.hf_tokenizer_path:
        return {}
    return special_token_ids(load_tokenizer(args.hf_tokenizer_path))
