"""Datasets: preference and SFT records in the formats TRL and the HF hub use, tokenised with the
tokenizer's chat template, prompt tokens kept apart so they are never scored.

    preference: {"prompt": ..., "chosen": ..., "rejected": ...}
    SFT:        {"messages": [...]}  or  {"prompt": ..., "completion": ...}

Each text field is a plain string or a list of chat messages ({"role": ..., "content": ...}).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]
Text = str | Messages


def load_records(source: str, split: str = "train") -> datasets.Dataset:
    """Load a dataset from a local .jsonl/.json/.parquet file or folder, or a hub name."""
    path = Path(source)
    if path.is_file():
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix)
        if kind is None:
            raise ValueError(f"{source}: expected a .jsonl, .json or .parquet file")
        return datasets.load_dataset(kind, data_files={split: str(path)}, split=split)
    return datasets.load_dataset(source, split=split)


def _is_chat(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Text) -> list[int]:
    """Prompt ids, ending where the response starts (the generation prompt for chats)."""
    if _is_chat(prompt):
        return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def encode_response(tokenizer: PreTrainedTokenizerBase, prompt: Text, response: Text) -> list[int]:
    """Response ids that follow `encode_prompt(prompt)`, ending with the end-of-turn/EOS token."""
    if _is_chat(prompt) != _is_chat(response):
        raise ValueError("prompt and response must both be chat messages or both be strings")
    if not _is_chat(response):
        return list(tokenizer(response, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    prompt_ids = encode_prompt(tokenizer, prompt)
    full = list(tokenizer.apply_chat_template(prompt + response, tokenize=True, return_dict=False))
    if full[: len(prompt_ids)] != prompt_ids:
        raise ValueError(
            "the chat template does not render the prompt as a prefix of prompt + response; "
            "responses can't be separated from prompts with this template"
        )
    return full[len(prompt_ids) :]


@dataclass
class PreferenceExample:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def _fit(prompt: list[int], response: list[int], max_length: int) -> list[int] | None:
    """Truncate a response to fit max_length with its prompt; None when the prompt alone doesn't fit."""
    room = max_length - len(prompt)
    return response[:room] if room > 0 else None


def tokenize_preferences(
    records: datasets.Dataset | list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int = 1024
) -> list[PreferenceExample]:
    """Tokenise preference records; pairs whose prompt alone exceeds max_length are skipped (and counted)."""
    out, skipped = [], 0
    for i, record in enumerate(records):
        missing = {"prompt", "chosen", "rejected"} - set(record)
        if missing:
            raise ValueError(f"preference record {i} lacks {sorted(missing)}; it has {sorted(record)}")
        prompt = encode_prompt(tokenizer, record["prompt"])
        chosen = _fit(prompt, encode_response(tokenizer, record["prompt"], record["chosen"]), max_length)
        rejected = _fit(prompt, encode_response(tokenizer, record["prompt"], record["rejected"]), max_length)
        if chosen is None or rejected is None or not chosen or not rejected:
            skipped += 1
            continue
        out.append(PreferenceExample(prompt, chosen, rejected))
    if skipped:
        logger.warning("skipped %d of %d preference records longer than max_length=%d", skipped, len(records), max_length)
    return out
